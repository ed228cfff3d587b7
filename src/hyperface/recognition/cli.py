"""``hyperface embed``: embed a folder / list / RecordIO of face images with a face recognition model."""

from __future__ import annotations

import argparse

EPILOG = """\
modes (pick one; default: detect, which needs --detector):
  --detector det_10g.onnx   photos: SCRFD finds faces + 5 landmarks, the largest face is aligned
                            to the ArcFace 112x112 template
  --aligned                 images already aligned to 112x112 (other square sizes are resized)
  --crop ffhq               face-centred FFHQ-style generator outputs (StyleGAN, Arc2Face; 512 or
                            1024 px): a fixed crop, no detector

outputs (--out FOLDER writes these names inside it; --out g.npy writes g.npy, g.index.txt, ...):
  gallery.npy            float32 (M, D), L2-normalised rows
  gallery.index.txt      line i = source of row i
  gallery.rejected.tsv   path<TAB>reason for unreadable images and images without a face
  gallery.aligned.jpg    32 of the faces as the model saw them (check the alignment by eye)
  gallery.landmarks.npy  with --detector: each row's 5 landmarks (report turns them into head pose)
  manifest.json          parameters, model input convention, counts, timings (--out FOLDER);
  g.manifest.json        the same for --out g.npy, so several galleries can share a folder

models: insightface packs (buffalo_l/w600k_r50.onnx, antelopev2/glintr100.onnx), Arc2Face's
arcface.onnx (Hugging Face FoivosPar/Arc2Face), an arcface_torch backbone.pth (iResNet r18..r200, MobileFaceNet
or ViT vit_t..vit_l, arch read from the weights), or an AdaFace IR / IR-SE network (its .ckpt, e.g. adaface_ir50_ms1mv2.ckpt;
fed BGR, as AdaFace's inference.py). insightface and Arc2Face models are RGB.

examples:
  hyperface embed gen_images/ --model arcface.onnx --crop ffhq --out runs/gallery/gallery.npy
  hyperface embed photos/ --model w600k_r50.onnx --detector det_10g.onnx --out g.npy --device cuda
  hyperface embed faces.lst --model backbone.pth --aligned --flip --out g.npy
  hyperface embed data/faces_webface/ --model backbone.pth --aligned --out g.npy   # RecordIO
  hyperface embed gen_images/ --model arcface.onnx --crop ffhq --out g.npy --resume  # after a kill
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from hyperface.cli import HelpFormatter

    parser = subparsers.add_parser(
        "embed",
        help="embed face images with a face recognition model (gallery for packing)",
        description=(
            "Embed every image under IMAGES with a face recognition model and write L2-normalised\n"
            "embeddings, an index, the list of rejected inputs and manifest.json. Streams any number\n"
            "of images with parallel decoding and resumes after a kill (--resume)."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("images", metavar="IMAGES", help="folder (recursive), list file (.txt/.lst, one path per line), RecordIO (train.rec or its folder), "
                        "or a `hyperface generate` output folder (its rec/, else images/)")
    parser.add_argument("--model", required=True, metavar="PATH", help="face recognizer: .onnx, iResNet .pth/.pt/.safetensors, or a `hyperface train` run folder")
    parser.add_argument("--arch", default=None, help="arch of a PyTorch file, to check it: iResNet r18, r34, r50, r100, r200, MobileFaceNet mbf / mbf_large, ViT vit_t / vit_s / vit_b / vit_l, or AdaFace ir_50, ir_101, ir_se_50, ...; default: read from the weights")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--detector", metavar="PATH", help="SCRFD .onnx with landmarks (det_10g.onnx, scrfd_10g_bnkps.onnx)")
    mode.add_argument("--aligned", action="store_true", help="images are already aligned 112x112 faces")
    mode.add_argument("--crop", choices=["ffhq"], help="fixed crop for face-centred FFHQ-style images")
    parser.add_argument("--out", required=True, metavar="PATH", help="output .npy path (or folder: writes gallery.npy inside)")
    parser.add_argument("--batch-size", type=int, default=64, help="faces per forward pass (default: 64)")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding/aligning images (default: 4)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--flip", action="store_true", help="add the mirrored face's features before normalising")
    parser.add_argument("--fp16", action="store_true", help="PyTorch models on CUDA: autocast the trunk to fp16 (refused on the CPU and for ONNX models)")
    parser.add_argument("--bgr", action="store_true", help="the model was trained on BGR input (insightface/Arc2Face models are RGB; AdaFace IR networks "
                             "are recognised by their keys and fed BGR without this flag)")
    parser.add_argument("--det-threshold", type=float, default=0.5, help="detector score threshold (default: 0.5)")
    parser.add_argument("--det-size", type=int, default=640, help="detector input size for dynamic-size models (default: 640)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="inputs per saved chunk; a kill loses at most one (default: 4096)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run with the same --out (and the same images and settings)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run at --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hyperface.common.errors import HyperfaceError, check_option
    from hyperface.common.io import check_output_file
    from hyperface.common.runtime import get_logger
    from hyperface.recognition.detection import load_detector
    from hyperface.recognition.embed import GalleryPaths, check_output, embed_images
    from hyperface.recognition.images import open_image_source
    from hyperface.recognition.preprocess import FacePreprocessor
    from hyperface.recognition.recognizers import load_recognizer, resolve_model_path

    log = get_logger("hyperface.embed")
    # numeric options, checked before any model loads
    check_option("--batch-size", args.batch_size, lambda v: v >= 1, "at least 1", integer=True)
    check_option("--workers", args.workers, lambda v: v >= 1, "at least 1", integer=True)
    check_option("--chunk-size", args.chunk_size, lambda v: v >= 1, "at least 1", integer=True)
    check_option("--det-size", args.det_size, lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32 (SCRFD's coarsest stride; 128 for its five-level models)", integer=True)
    check_option("--det-threshold", args.det_threshold, lambda v: 0 <= v <= 1, "a score in [0, 1]")
    mode = "aligned" if args.aligned else "ffhq" if args.crop == "ffhq" else "detect"
    if mode == "detect" and not args.detector:
        raise HyperfaceError(
            "choose how to find faces: --detector det_10g.onnx (SCRFD from insightface's buffalo_l pack) for "
            "photos, --aligned for 112x112 aligned crops, or --crop ffhq for face-centred generator outputs"
        )
    out_paths = GalleryPaths.from_out(args.out)
    if not out_paths.embeddings.is_dir():  # a folder in its place: check_output below names what to do
        check_output_file(out_paths.embeddings, "--out")  # writable, before models load
    if not args.overwrite:  # fail before loading models if --out holds a previous run
        check_output(out_paths, resume=args.resume)
    source = open_image_source(args.images)
    recognizer = load_recognizer(
        args.model,
        arch=args.arch,
        device=args.device,
        flip=args.flip,
        batch_size=args.batch_size,
        channel_order="BGR" if args.bgr else None,  # None: the file's own convention (AdaFace: BGR)
        fp16=args.fp16,
    )
    detector = None
    if mode == "detect":
        detector = load_detector(
            args.detector, device=args.device, input_size=(args.det_size, args.det_size), score_threshold=args.det_threshold
        )
    preprocessor = FacePreprocessor(mode, detector=detector, size=recognizer.input_size[0])
    log.info("embedding %d images from %s with %r", len(source), args.images, recognizer)
    params = {
        "model": str(args.model),
        "arch": args.arch,
        "mode": mode,
        "detector": args.detector,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "flip": args.flip,
        "fp16": args.fp16,
        "bgr": args.bgr,
        "det_threshold": args.det_threshold,
        "det_size": args.det_size,
        "chunk_size": args.chunk_size,
        "images": str(Path(args.images).resolve()),  # `hyperface report` reads labels from it
    }
    result = embed_images(
        source,
        recognizer,
        preprocessor,
        args.out,
        workers=args.workers,
        chunk_size=args.chunk_size,
        resume=args.resume,
        overwrite=args.overwrite,
        manifest_params=params,
        manifest_inputs={"model": resolve_model_path(args.model), "detector": args.detector},  # the weights file, hashed
        show_progress=False if args.no_progress else None,
    )
    log.info(
        "wrote %s: %d embeddings (%d-d), %d rejected (%s) in %.1f s",
        result.paths.embeddings,
        result.embedded,
        result.embedding_size,
        result.rejected,
        result.paths.rejected.name,
        result.seconds,
    )
    return 0
