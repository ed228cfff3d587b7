"""Images per second of `hyperface generate`'s Arc2Face sampler against the reference recipe.

Both sides use the same SD1.5-sized random-weight models (UNet 320/640/1280/1280 with 768-d cross
attention, the SD1.5 VAE, a CLIP ViT-L/14 text encoder; built in code, nothing downloaded) and the
same Arc2Face defaults (DPM-Solver++, 25 steps, guidance 3.0, 512 px):

- reference: Arc2Face's demo recipe, one identity per diffusers ``StableDiffusionPipeline`` call with
  ``num_images_per_prompt=4`` (fp16 on CUDA), images returned as PIL;
- hyperface: :class:`~hyperface.generation.Arc2FaceGenerator`, many identities per batch, guidance in
  one batched UNet forward, SDPA attention; optionally also with ``channels_last``, fused QKV
  projections and ``torch.compile`` (default or max-autotune mode) to measure what they buy.

Run on a GPU (the issue's goal: >= 3x the reference on an H100)::

    python benchmarks/generate.py --device cuda --images 128 --variants base@64,channels_last+compile+fuse_qkv@64

On a CPU full size is very slow; ``--small`` shrinks the models, resolution and steps::

    python benchmarks/generate.py --device cpu --small

The reference is timed before the first variant and after each one (it is partly host-bound and
varies between runs); each variant's ratio is against the mean of the two reference rounds around
it. The last line printed is the best ratio hyperface / reference (images per second).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny tokenizer writer


def sd15_sized_components(small: bool, device: torch.device, dtype: torch.dtype):
    """Random-weight SD1.5 UNet / VAE and CLIP-L text encoder (or their --small versions)."""
    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the GPU: ~1B parameters are slow to init on a CPU
        return _build(small, device, dtype)


def _build(small: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from generation_fixtures import write_sd15_scheduler, write_tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from hyperface.generation.arc2face import Arc2FaceComponents

    if small:
        unet_channels, vae_channels, layers, text_layers, text_heads, text_ffn = (32, 64, 64, 64), (32, 64, 64, 64), 1, 2, 4, 256
    else:  # SD1.5 / CLIP ViT-L/14 sizes
        unet_channels, vae_channels, layers, text_layers, text_heads, text_ffn = (320, 640, 1280, 1280), (128, 256, 512, 512), 2, 12, 12, 3072
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    folder = Path(tempfile.mkdtemp(prefix="hyperface-bench-"))
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")  # token ids differ, the compute does not
    write_sd15_scheduler(folder / "scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(vocab_size, 49408),
            hidden_size=768,
            intermediate_size=text_ffn,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    import json

    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return Arc2FaceComponents(tokenizer, text_encoder, unet, vae, scheduler_config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_identities(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 512)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_reference(components, args, device, dtype):
    """Arc2Face's demo: one identity per StableDiffusionPipeline call, 4 images per prompt.

    Returns a function that times one round (``args.images`` images) and returns images per second;
    the pipeline is built and warmed up once.
    """
    from diffusers import StableDiffusionPipeline

    from hyperface.generation.arc2face import Arc2FacePromptEncoder, make_scheduler

    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=make_scheduler("dpm", components.scheduler_config),  # Arc2Face's DPM-Solver++ (as ours)
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    encoder = Arc2FacePromptEncoder(components.tokenizer, components.text_encoder)
    identities = random_identities(max(1, args.images // 4) + 1, seed=1)

    def one_identity(embedding: np.ndarray) -> None:
        prompt_embeds = encoder.encode(embedding[None]).to(dtype)
        pipeline(
            prompt_embeds=prompt_embeds,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=4,
            height=args.resolution,
            width=args.resolution,
        )

    def time_round() -> float:
        synchronize(device)
        started = time.perf_counter()
        for embedding in identities[:-1]:
            one_identity(embedding)
        synchronize(device)
        return 4 * (len(identities) - 1) / (time.perf_counter() - started)

    one_identity(identities[-1])  # warm-up
    return time_round


#: Variant options -> what they switch on. "autotune" is torch.compile's max-autotune mode (with
#: CUDA graphs and diffusers' inductor flags); "autotune_nocg" the same without CUDA graphs;
#: "cd_tune" the default compile mode with inductor's coordinate-descent tuning of its generated
#: (normalisation, elementwise) kernels and 1x1 convolutions as matmuls (compiling took over 5
#: minutes on an H100); "mm1x1" only the latter, 1x1 convolutions as matmuls; "freeze" inductor's
#: freezing (weights folded in as constants, convolution weights in their best layout) (all three
#: process-wide once set, so put them last);
#: "cudnn_attn" / "flash_attn" / "efficient_attn" are ``--attention cudnn`` / ``flash`` / ``efficient``: SDPA
#: tries that kernel first (head dim 40 at SD1.5's first level is padded by flash attention).
VARIANT_OPTIONS = ("channels_last", "compile", "fuse_qkv", "autotune", "autotune_nocg", "cd_tune", "mm1x1", "freeze",
                   "cudnn_attn", "flash_attn", "efficient_attn")

#: `hyperface generate --attention` for each attention option of a variant.
ATTENTION_OPTIONS = {"cudnn_attn": "cudnn", "flash_attn": "flash", "efficient_attn": "efficient"}


def parse_variant(variant: str, default_batch: int) -> tuple[set[str], int]:
    """"channels_last+compile@64" -> ({"channels_last", "compile"}, 64); "base" -> (set(), default)."""
    name, _, batch = variant.partition("@")
    options = {o for o in name.split("+") if o and o != "base"}
    unknown = options - set(VARIANT_OPTIONS)
    if unknown:
        raise SystemExit(f"unknown variant option(s) {sorted(unknown)}: use base or {', '.join(VARIANT_OPTIONS)}, "
                         "joined by +, optional @BATCH")
    return options, int(batch) if batch else default_batch


def variant_settings(options: set[str]) -> dict:
    """Arc2FaceSettings keyword arguments for a variant's options."""
    mode = "max-autotune" if "autotune" in options else "max-autotune-no-cudagraphs" if "autotune_nocg" in options else "default"
    return {
        "channels_last": "channels_last" in options,
        "compile": bool(options & {"compile", "autotune", "autotune_nocg", "cd_tune", "mm1x1", "freeze"}),
        "compile_mode": mode,
        "fuse_qkv": "fuse_qkv" in options,
        "attention": next((ATTENTION_OPTIONS[o] for o in sorted(options) if o in ATTENTION_OPTIONS), "auto"),
    }


def bench_hyperface(components, args, device, variant: str, record: dict | None = None) -> float:
    from hyperface.generation.arc2face import Arc2FaceGenerator, Arc2FaceSettings

    options, batch = parse_variant(variant, args.batch_size)
    settings = Arc2FaceSettings(steps=args.steps, guidance_scale=args.guidance, resolution=args.resolution, **variant_settings(options))
    if options & {"cd_tune", "mm1x1", "freeze"}:
        import torch._inductor.config as inductor_config

        inductor_config.conv_1x1_as_mm = bool(options & {"cd_tune", "mm1x1"}) or inductor_config.conv_1x1_as_mm
        inductor_config.coordinate_descent_tuning = "cd_tune" in options or inductor_config.coordinate_descent_tuning
        inductor_config.freezing = "freeze" in options or inductor_config.freezing
    if settings.compile:
        # Every variant compiles its own graphs: dynamo caches compiled frames on the shared modules'
        # code, and an earlier variant's graph (another SDPA kernel choice, say) must not be reused.
        torch._dynamo.reset()
    generator = Arc2FaceGenerator(components, settings, device=device)
    if args.profile:
        rate = _profile_generator(generator, settings, device, batch, record if record is not None else {})
    else:
        rate = _time_generator(generator, settings, args, device, batch)
    if settings.channels_last:  # leave the shared modules as they were
        components.unet.to(memory_format=torch.contiguous_format)
        components.vae.to(memory_format=torch.contiguous_format)
    if settings.fuse_qkv:
        components.unet.unfuse_qkv_projections()
        components.vae.unfuse_qkv_projections()
    return rate


def _warm_up(generator, settings, identities, batch: int) -> None:
    generator.generate_array(identities[:batch], list(range(batch)))  # warm-up (and compile)
    if settings.compile:  # a second warm-up: compile may specialise on the second call
        generator.generate_array(identities[:batch], list(range(batch)))


def _time_generator(generator, settings, args, device, batch: int) -> float:
    identities = random_identities(args.images + batch, seed=2)
    _warm_up(generator, settings, identities, batch)
    synchronize(device)
    started = time.perf_counter()
    done = 0
    while done < args.images:
        chunk = identities[batch + done : batch + done + batch]
        generator.generate_array(chunk, list(range(done, done + len(chunk))))
        done += len(chunk)
    synchronize(device)
    return done / (time.perf_counter() - started)


#: Kernel (CUDA) or operator (CPU) name patterns -> where the time goes, first match wins. Inductor's
#: generated kernels first: their names list the operators they fused ("triton_poi_fused_clone_
#: convolution_native_group_norm_silu" is a normalisation, not a convolution); then attention, since
#: cuDNN's attention kernels are also "fprop" kernels.
KERNEL_CATEGORIES = (
    ("fused by inductor", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")),
    ("normalisation", ("norm", "welford", "reduce")),
    ("elementwise / fused", ("triton", "elementwise", "vectorized", "aten::")),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return "other"


def sdpa_eligibility(device, dtype, batch: int) -> None:
    """Which SDPA kernels torch deems usable for SD1.5's attentions, in diffusers' layouts (with the
    reasons, as warnings, where one is not): separate Q/K/V projections, fused QKV, cross-attention."""
    import warnings

    from torch.backends import cuda as backends

    rows, heads, dim, tokens = 2 * batch, 8, 40, 4096  # first level: 64x64 latents, 320 channels
    with torch.device(device):
        separate = torch.randn(rows, tokens, heads * dim, dtype=dtype).view(rows, tokens, heads, dim).transpose(1, 2)
        qkv = torch.randn(rows, tokens, 3 * heads * dim, dtype=dtype)
        fused = [t.reshape(rows, tokens, heads, dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]
        context = torch.randn(rows, 77, heads * dim, dtype=dtype).view(rows, 77, heads, dim).transpose(1, 2)
    layouts = {"self-attention, separate projections": (separate, separate, separate),
               "self-attention, fused QKV": tuple(fused),
               "cross-attention (77 keys)": (separate, context, context)}
    for name, (q, k, v) in layouts.items():
        params = backends.SDPAParams(q, k, v, None, 0.0, False, False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = {kernel: bool(check(params, True)) for kernel, check in (
                ("flash", backends.can_use_flash_attention), ("efficient", backends.can_use_efficient_attention),
                ("cudnn", backends.can_use_cudnn_attention))}
        print(f"  SDPA kernels usable for {name} ({tuple(q.shape)}, head dim {dim}): "
              + ", ".join(f"{kernel} {'yes' if ok else 'no'}" for kernel, ok in usable.items()))
        for warning in caught:
            print(f"    why not: {str(warning.message).strip()[:200]}")


def _profile_generator(generator, settings, device, batch: int, record: dict) -> float:
    """One batch under torch.profiler (after the warm-up): device time by kernel category and the top
    kernels, printed and put in ``record``. Returns the profiled batch's images per second (profiling
    overhead included)."""
    from torch.profiler import ProfilerActivity, profile

    identities = random_identities(2 * batch, seed=2)
    _warm_up(generator, settings, identities, batch)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=[activity]) as prof:
        generator.generate_array(identities[batch:], list(range(batch)))
        synchronize(device)
    elapsed = time.perf_counter() - started
    times = {}
    for event in prof.key_averages():
        self_time = getattr(event, "self_device_time_total", 0) if device.type == "cuda" else event.self_cpu_time_total
        if self_time > 0:
            times[event.key] = times.get(event.key, 0.0) + self_time / 1e3  # ms
    total = sum(times.values()) or 1.0
    by_category = {}
    for name, ms in times.items():
        by_category[kernel_category(name)] = by_category.get(kernel_category(name), 0.0) + ms
    print(f"  profile: {total:.0f} ms of {'device' if device.type == 'cuda' else 'CPU'} time in one batch of {batch} "
          f"({elapsed:.1f} s wall); by category:")
    for category, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"    {category:<22} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
    print("  top kernels:")
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {100 * ms / total:5.1f}%  [{kernel_category(name)}] {name[:110]}")
    attention = sorted(((ms, name) for name, ms in times.items() if kernel_category(name) == "attention"), reverse=True)
    print("  attention kernels (which SDPA kernel ran): " + "; ".join(f"{name[:80]} {ms:.0f} ms" for ms, name in attention))
    if generator._cudagraphs:
        print("  (CUDA graphs: kernels replayed inside a graph may not be attributed)")
    record.update({"total_ms": total, "wall_s": elapsed, "categories_ms": by_category,
                   "attention_kernels_ms": {name: ms for ms, name in attention},
                   "top_kernels_ms": dict(sorted(times.items(), key=lambda kv: -kv[1])[:40])})
    return batch / elapsed


def write_json(path: Path | None, figures: dict) -> None:
    if path is not None:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1, default=float) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small models, 64 px, 4 steps (CPU smoke run)")
    parser.add_argument("--batch-size", type=int, default=None, help="hyperface images per batch (default: 32 on CUDA, 8 on CPU)")
    parser.add_argument("--images", type=int, default=None, help="images timed per side (default: 128 on CUDA, 16 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="default 25 (Arc2Face); 4 with --small")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--resolution", type=int, default=None, help="default 512; 64 with --small")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    parser.add_argument(
        "--variants", default="base",
        help="comma list; each is base or options joined by + (channels_last, compile, fuse_qkv, autotune, "
             "autotune_nocg, cd_tune, mm1x1, freeze, cudnn_attn, flash_attn, efficient_attn), with an optional @BATCH (e.g. base,base@64,channels_last+compile+fuse_qkv@64)",
    )
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: profile one batch of each variant (device time by kernel category, top "
                             "kernels); the reference is not run")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures here (profiles by variant, or rates, reference rounds and ratios)")
    args = parser.parse_args()

    from hyperface.common.runtime import resolve_device
    from hyperface.generation.arc2face import resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (32 if cuda else 8)
    args.images = args.images or (128 if cuda else 16)
    args.steps = args.steps or (4 if args.small else 25)
    args.resolution = args.resolution or (64 if args.small else 512)
    if device.type == "cpu" and not args.small:
        print("note: full SD1.5 size on a CPU takes minutes per image; consider --small", file=sys.stderr)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    components = sd15_sized_components(args.small, device, dtype)
    facts = {"name": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
             "dtype": str(dtype), "steps": args.steps, "resolution": args.resolution, "small": args.small}
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}) dtype={dtype} "
        f"models={'small' if args.small else 'SD1.5-sized'} steps={args.steps} guidance={args.guidance} "
        f"resolution={args.resolution} images={args.images}"
    )
    if args.profile:
        if cuda:
            try:  # a diagnostic: an older torch without these APIs must not cost the profile
                sdpa_eligibility(device, dtype, args.batch_size)
            except (AttributeError, RuntimeError, TypeError) as exc:
                print(f"  (SDPA eligibility check unavailable: {exc})")
        profiles = {}
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            print(f"hyperface {variant} (batch {parse_variant(variant, args.batch_size)[1]}):", flush=True)
            profiles[variant] = {}
            rate = bench_hyperface(components, args, device, variant, profiles[variant])
            profiles[variant]["img_per_s_profiled"] = rate
            print(f"  {rate:.3f} img/s while profiled", flush=True)
            write_json(args.json, {"device": facts, "profiles": profiles})  # after each: a later variant may not finish
        return
    time_reference = make_reference(components, args, device, dtype)
    # The reference recipe is partly bound by the host (small batches: Python and kernel launches), so
    # it varies with the machine's state: 3.03 to 3.88 img/s in three runs on one H100. It is timed
    # before the first variant and after each one, and each variant is compared with the mean of the
    # two reference rounds around it.
    references = [time_reference()]
    print(f"reference (1 identity x 4 images per pipeline call): {references[0]:.3f} img/s", flush=True)
    results, rates = {}, {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        rate = bench_hyperface(components, args, device, variant)
        print(f"hyperface {variant} (batch {parse_variant(variant, args.batch_size)[1]} across identities): "
              f"{rate:.3f} img/s", flush=True)
        references.append(time_reference())
        print(f"reference again: {references[-1]:.3f} img/s", flush=True)
        results[variant] = rate / (0.5 * (references[-2] + references[-1]))
        rates[variant] = rate
        write_json(args.json, {"device": facts, "references": references, "rates": rates, "ratios": results})
    spread = (max(references) - min(references)) / min(references)
    print(f"reference rounds: {', '.join(f'{r:.3f}' for r in references)} img/s (spread {100 * spread:.0f}%)")
    for variant, ratio in results.items():
        print(f"ratio {variant}/reference (the reference rounds around it): {ratio:.2f}x")
    best = max(results, key=results.get)
    print(f"speedup (best: {best}): {results[best]:.2f}x")

if __name__ == "__main__":
    main()
