"""``hyperface generate``: render K face images per identity embedding with Arc2Face."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  # 10,000 packed identities x 50 images, Arc2Face defaults, image folder + RecordIO
  hyperface generate identities.npy --arc2face models/Arc2Face --sd15 models/stable-diffusion-v1-5 \\
      --images-per-identity 50 --out data/hyperface-10k --batch-size 32

  # quality filter with Arc2Face's own FR model: keep images with cosine >= 0.5, up to 100 renders
  hyperface generate identities.npy --arc2face models/Arc2Face --sd15 models/stable-diffusion-v1-5 \\
      -k 50 --out data/hf10k --fr-model models/Arc2Face/arcface.onnx --min-similarity 0.5 --max-attempts 100

  # fast mode with the LCM-LoRA (4 steps, guidance 1)
  hyperface generate identities.npy ... --lcm-lora models/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors

  # 8 GPUs: each rank renders a disjoint set of identities, then merge once
  torchrun --nproc-per-node 8 -m hyperface generate identities.npy ... --out data/hf10k
  hyperface generate --merge --out data/hf10k

  # after a kill: rerun the same command with --resume (finished identities are skipped)

weights (no download happens):
  --arc2face DIR   Hugging Face FoivosPar/Arc2Face: encoder/ (config.json, pytorch_model.bin) and
                   arc2face/ (config.json, diffusion_pytorch_model.safetensors)
  --sd15 DIR       Hugging Face stable-diffusion-v1-5/stable-diffusion-v1-5: vae/, tokenizer/, scheduler/

output (--out DIR):
  images/<label:06d>/<k:04d>.jpg      --format folder|both (label = row of IDENTITIES.npy)
  rec/train.rec, train.idx, property  --format rec|both (insightface RecordIO)
  samples.jpg                         8 identities spread over the set x their first 8 images
  acceptance.json, manifest.json, run.json, parts/ (per-shard journals; --no-keep-parts deletes them)
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from hyperface.cli import HelpFormatter

    from hyperface.generation.arc2face import ATTENTION_KERNELS, COMPILE_MODES

    parser = subparsers.add_parser(
        "generate",
        help="render a face-recognition dataset from identity embeddings with Arc2Face",
        description=(
            "Render K images per identity embedding with Arc2Face (SD1.5 conditioned on ArcFace embeddings), "
            "align them to 112x112, optionally keep only those the FR model still recognises, and write an "
            "image folder and/or insightface RecordIO. Every image is a function of (--seed, identity, image "
            "index), so runs are reproducible, resumable and shardable."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("identities", nargs="?", help="(N, 512) .npy of unit-norm identity embeddings, or the `hyperface pack` output folder holding identities.npy")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--arc2face", help="local Arc2Face folder (holds encoder/ and arc2face/)")
    parser.add_argument("--sd15", help="local Stable Diffusion 1.5 folder (holds vae/, tokenizer/, scheduler/)")
    parser.add_argument("-k", "--images-per-identity", type=int, default=50, help="images kept per identity (default: 50)")
    parser.add_argument("--format", choices=("folder", "rec", "both"), default=None,
                        help="dataset format (default: both; with --merge, the run's own format)")
    parser.add_argument("--seed", type=int, default=0, help="global seed; image = f(seed, identity, index) (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per UNet batch, across identities (default: 16; on an H100, 64 measured "
                             "1.85-2.0x Arc2Face's 4-per-call recipe, 2.2-2.9x with --channels-last --compile --fuse-qkv)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"), help="auto: fp16 on CUDA, fp32 on CPU")

    sampling = parser.add_argument_group("sampling (defaults: Arc2Face's)")
    sampling.add_argument("--scheduler", default=None, help="dpm (default), dpm-sde, unipc, ddim, euler, euler-a, pndm, lcm")
    sampling.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25; 4 with --lcm-lora)")
    sampling.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: 3.0; 1.0 with --lcm-lora)")
    sampling.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    sampling.add_argument("--lcm-lora", default=None, help="LCM-LoRA .safetensors (latent-consistency/lcm-lora-sdv1-5) for a few-step fast mode")
    sampling.add_argument("--channels-last", action="store_true",
                          help="channels_last memory format for UNet and VAE; use with --compile (eager, it measured 10%% slower)")
    sampling.add_argument("--compile", action="store_true",
                          help="torch.compile the UNet and the VAE decoder (the first batch compiles for minutes: worth it on long jobs)")
    sampling.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, metavar="MODE",
                          help="torch.compile mode, implies --compile: default, max-autotune (also CUDA graphs and diffusers' "
                               "inductor flags for UNets), max-autotune-no-cudagraphs, reduce-overhead (default: default; max-autotune compiled for over 8 minutes on an H100 and found kernels under 1%% faster)")
    sampling.add_argument("--fuse-qkv", action="store_true",
                          help="one matmul per attention for Q, K and V (same images up to rounding)")
    sampling.add_argument("--attention", default="auto", choices=ATTENTION_KERNELS,
                          help="SDPA kernel tried first: auto (torch's order, flash first), flash, cudnn, efficient; "
                               "a preference, attentions it cannot run fall back (default: auto)")

    variation = parser.add_argument_group("intra-class variation")
    variation.add_argument("--perturbation", default="angle", choices=("angle", "noise", "none"), help="how each image's embedding is varied (default: angle)")
    variation.add_argument("--perturbation-scale", type=float, default=10.0, help="degrees for angle, noise norm for noise (default: 10)")

    post = parser.add_argument_group("alignment and quality filter")
    post.add_argument("--align", default="ffhq", choices=("ffhq", "detect", "none"), help="ffhq: fixed crop of the face-centred render (default); detect: SCRFD landmarks; none: keep the full render")
    post.add_argument("--detector", default=None, help="SCRFD .onnx (det_10g.onnx from insightface buffalo_l) for --align detect")
    post.add_argument("--fr-model", default=None, help="FR model that scores every image (acceptance.json, samples.jpg): Arc2Face's arcface.onnx "
                      "(not glintr100), an iResNet .pth or a train run folder; --min-similarity filters on it")
    post.add_argument("--min-similarity", type=float, default=None, help="keep images whose cosine to the identity is >= this (needs --fr-model)")
    post.add_argument("--max-attempts", type=int, default=None, help="renders per identity before filling with the best rejects (default: 2*K)")
    post.add_argument("--image-format", default="jpg", choices=("jpg", "png"), help="stored image encoding (default: jpg, quality 95)")

    run_group = parser.add_argument_group("runs")
    run_group.add_argument("--shard", default=None, help="i/n: render identities i, i+n, ... (default: torchrun RANK/WORLD_SIZE, else 0/1)")
    run_group.add_argument("--merge", action="store_true", help="only build the dataset from finished shards in --out")
    run_group.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same settings)")
    run_group.add_argument("--overwrite", action="store_true", help="delete a previous hyperface run in --out first")
    run_group.add_argument("--no-keep-parts", dest="keep_parts", action="store_false", help="delete parts/ after a successful merge")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from hyperface.common.errors import HyperfaceError
    from hyperface.common.runtime import get_logger

    log = get_logger("hyperface.generation")
    from hyperface.generation.dataset import (
        GenerationConfig,
        Shard,
        acceptance_line,
        acceptance_warning,
        generate_dataset,
        finished_run,
        merge_parts,
        open_run,
        release_shard,
    )

    def report_dataset(dataset: dict, verb: str) -> None:
        log.info("%s %d images of %d identities into %s", verb, dataset["num_images"], dataset["num_identities"], ", ".join(dataset["outputs"].values()))
        log.info("quality: %s", acceptance_line(dataset["acceptance"]))
        warning = acceptance_warning(dataset["acceptance"])
        if warning:
            log.warning("%s", warning)

    if args.merge:
        report_dataset(merge_parts(args.out, formats=args.format, keep_parts=args.keep_parts), "merged")
        return 0
    missing = [flag for flag, value in (("IDENTITIES.npy", args.identities), ("--arc2face", args.arc2face), ("--sd15", args.sd15)) if not value]
    if missing:
        raise HyperfaceError(f"missing {', '.join(missing)}: see `hyperface generate --help`")
    args.format = args.format or "both"
    if args.min_similarity is not None and not args.fr_model:
        raise HyperfaceError("--min-similarity needs --fr-model (Arc2Face's arcface.onnx)")
    from hyperface.common.errors import check_option, check_seed

    # numbers found wrong now, not after minutes of loading models (or as a 16 TB allocation)
    check_seed(args.seed)
    check_option("--resolution", args.resolution, lambda v: 8 <= v <= 4096, "between 8 and 4096 pixels (SD1.5: 512)", integer=True)
    if args.guidance is not None:
        check_option("--guidance", args.guidance, lambda v: v >= 1, ">= 1 (1 turns classifier-free guidance off)", finite=True)
    check_option("--perturbation-scale", args.perturbation_scale, lambda v: v >= 0, ">= 0", finite=True)

    from pathlib import Path

    from hyperface.common.io import duplicate_rows, file_sha256, files_sha256, load_embeddings, output_stage, read_json
    from hyperface.common.runtime import resolve_device, seed_everything
    from hyperface.generation.arc2face import (
        Arc2FaceGenerator,
        IDENTITY_DIM,
        Arc2FaceSettings,
        check_resolution,
        find_arc2face_files,
        resolve_dtype,
        sampler_facts,
        weight_files,
    )
    from hyperface.recognition.recognizers import resolve_model_path
    from hyperface.generation.postprocess import load_embed_fn, make_aligner
    from hyperface.generation.variation import Perturbation

    if Path(args.identities).is_dir():  # a `hyperface pack` output folder
        if output_stage(args.identities) == "embed" and not (Path(args.identities) / "identities.npy").exists():
            raise HyperfaceError(
                f"{args.identities} is a `hyperface embed` gallery (embeddings of real faces), not packed identities: make "
                f"identities from it with `hyperface pack --identities N --gallery {args.identities} --out DIR`, then "
                "generate from DIR"
            )
        args.identities = str(Path(args.identities) / "identities.npy")
    embeddings = load_embeddings(args.identities, what="identity embeddings", dim=IDENTITY_DIM, require_unit=True)
    repeats = duplicate_rows(embeddings).nonzero()[0]
    if repeats.size:  # not refused: the row count is the dataset's labels, and the user may mean it
        log.warning("%d identity row(s) repeat an earlier row exactly, e.g. rows %s: each renders the same person "
                    "under a second label", repeats.size, repeats[:5].tolist())
    shard = Shard.parse(args.shard)
    device_name = args.device
    if device_name == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device_name = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    device = resolve_device(device_name)
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = True  # fixed shapes batch after batch: let cuDNN pick
        torch.backends.cuda.matmul.allow_tf32 = True
    seed_everything(args.seed)
    config = GenerationConfig(
        images_per_identity=args.images_per_identity,
        seed=args.seed,
        batch_size=args.batch_size,
        perturbation=Perturbation(args.perturbation, args.perturbation_scale),
        min_similarity=args.min_similarity,
        max_attempts=args.max_attempts,
        image_format=args.image_format,
    )
    settings = Arc2FaceSettings(
        steps=args.steps,
        guidance_scale=args.guidance,
        resolution=args.resolution,
        scheduler=args.scheduler,
        lcm_lora=args.lcm_lora,
        dtype=args.dtype,
        channels_last=args.channels_last,
        compile=args.compile or args.compile_mode is not None,
        compile_mode=args.compile_mode or "default",
        fuse_qkv=args.fuse_qkv,
        attention=args.attention,
    )
    # Everything cheap first: the weight folders' layout, then --out and run.json (a changed setting
    # on --resume, a shard with other weights), so a mistake fails before minutes of model loading.
    settings = settings.resolved()
    paths = find_arc2face_files(args.arc2face, args.sd15)
    check_resolution(settings.resolution, read_json(paths.unet / "config.json"), read_json(paths.vae / "config.json"))  # warned here, not after loading
    fr_model = resolve_model_path(args.fr_model) if args.fr_model else None  # a run folder or checkpoints/latest, too
    if args.lcm_lora:
        from hyperface.generation.lora import check_lora_file

        check_lora_file(args.lcm_lora)  # its header: before hashing and loading gigabytes of weights
    if args.detector and args.align != "detect":
        raise HyperfaceError(f"--detector is only used with --align detect (got --align {args.align})")
    if args.detector and not Path(args.detector).is_file():
        raise HyperfaceError(f"--detector file not found: {args.detector} (det_10g.onnx from insightface's buffalo_l pack)")
    if shard.count > 1 and args.overwrite:
        raise HyperfaceError("--overwrite with several shards would let each rank delete the others' work: empty --out once "
                             "yourself (or choose another), then start the shards")
    if args.max_attempts is not None and args.min_similarity is None:
        log.warning("--max-attempts only matters with --min-similarity: without a filter every render is kept (K per identity)")
    models: dict = {}

    def describe_models() -> dict:
        """Called by open_run once --out is known to be usable: hashing reads every weight file."""
        log.info("fingerprinting the weights (SHA-256; about a second per GB)")
        files = weight_files(paths)
        models.update({
            "generator": sampler_facts(settings, resolve_dtype(settings.dtype, device)),
            "lcm_lora": Path(args.lcm_lora).name if args.lcm_lora else None,
            "fr_model": fr_model.name if fr_model else None,
            # compared on resume and by every shard: one dataset, one set of models
            "weights": {
                "arc2face": files_sha256(files["arc2face"], Path(args.arc2face)),
                "sd15": files_sha256(files["sd15"], Path(args.sd15)),
                "fr_model": file_sha256(fr_model) if fr_model else None,
                "lcm_lora": file_sha256(args.lcm_lora) if args.lcm_lora else None,
                # --align detect: whose crops (only then, so runs without a detector compare as before)
                **({"detector": file_sha256(args.detector)} if args.detector else {}),
            },
            "model_paths": {
                "arc2face": str(Path(args.arc2face).resolve()), "sd15": str(Path(args.sd15).resolve()),
                "fr_model": str(fr_model.resolve()) if fr_model else None,
                "lcm_lora": str(Path(args.lcm_lora).resolve()) if args.lcm_lora else None,
                **({"detector": str(Path(args.detector).resolve())} if args.detector else {}),
            },
        })
        return models

    identities_path = str(Path(args.identities).resolve())
    out_dir, _ = open_run(
        args.out, embeddings, config, embedding_dim=IDENTITY_DIM, formats=args.format, shard=shard, align_mode=args.align,
        resume=args.resume, overwrite=args.overwrite, identities_path=identities_path, run_info=describe_models,
    )

    def render() -> int:  # the rest, once --out is claimed
        finished = finished_run(out_dir)
        if finished:
            # the same settings (open_run checked run.json): nothing to render, no model to load; a rank
            # requeued after the merge (its parts deleted by --no-keep-parts) renders nothing again
            log.info("%s already holds the finished dataset (%d images); nothing to resume", out_dir, finished.get("num_images", 0))
            return 0

        aligner = make_aligner(args.align, detector=args.detector)
        embed_fn, fr_info = (None, None)
        if args.fr_model:
            embed_fn, fr_info = load_embed_fn(fr_model, device=str(device), embedding_dim=IDENTITY_DIM)  # before the generator
        generator = Arc2FaceGenerator.from_pretrained(args.arc2face, args.sd15, settings, device=device, warn_resolution=False)
        log.info(
            "generating %d identities x %d images (shard %d/%d) on %s: %s",
            embeddings.shape[0], config.images_per_identity, shard.index, shard.count, device, generator.params,
        )
        summary = generate_dataset(  # --out is claimed and run.json checked above: continue in it
            generator, embeddings, out_dir, config,
            formats=args.format, shard=shard, aligner=aligner, align_mode=args.align, embed_fn=embed_fn,
            resume=True, identities_path=identities_path, run_info=models, keep_parts=args.keep_parts,
        )
        log.info(
            "shard %s: rendered %d images this run in %.1f s (%s renders/s)",
            summary["shard"], summary["rendered_this_run"], summary["seconds_this_run"], summary["renders_per_second"],
        )
        if fr_info:
            log.info("quality filter: %s", fr_info)
        if "dataset" in summary:
            report_dataset(summary["dataset"], "wrote")
        else:
            log.info(
                "shard %s done (%d identities); once every shard is done run: hyperface generate --merge --out %s",
                summary["shard"], summary["identities_done"], args.out,
            )
        return 0

    try:  # open_run holds the shard's lock: let it go on every way out (main() may run in-process)
        return render()
    finally:
        release_shard(out_dir, shard)
