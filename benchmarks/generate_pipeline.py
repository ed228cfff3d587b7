"""`hyperface generate`'s whole loop (render, align, FR filter, encode, journal): images/s with the
post-processing of one batch overlapped with the next render, against the sequential loop.

The SD1.5-sized random-weight Arc2Face of ``benchmarks/generate.py`` renders; the quality filter
embeds each 112x112 crop with a random-weight iResNet (r50 by default) on ``--fr-device`` -- on the
CPU by default, the case where the GPU would otherwise wait longest (an FR model or a detector
running through onnxruntime's CPU provider). ``--min-similarity -1`` keeps every render, so both
loops render exactly the same images and only the scheduling differs. The sequential loop is timed
before and after the overlapped one; the ratio is against their mean.

    python benchmarks/generate_pipeline.py --device cuda                       # ~3 min on an H100
    python benchmarks/generate_pipeline.py --device cuda --fr-device cuda      # FR model on the GPU too
    python benchmarks/generate_pipeline.py --device cpu --small                # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model builders of generate.py and embed.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def fr_embed_fn(arch: str, device: str, batch_size: int):
    from embed import finite_random_iresnet

    from hyperface.recognition.recognizers import TorchRecognizer

    return TorchRecognizer(finite_random_iresnet(arch), device=device, batch_size=batch_size, arch=arch).embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small models, 64 px, 4 steps (CPU smoke run)")
    parser.add_argument("--images", type=int, default=None, help="images per timed run (default: 128 on CUDA, 16 on CPU)")
    parser.add_argument("--images-per-identity", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--fr-arch", default="r50", help="iResNet of the quality filter (default: r50)")
    parser.add_argument("--fr-device", default="cpu", help="where the filter's FR model runs (default: cpu)")
    args = parser.parse_args()

    from generate import random_identities, sd15_sized_components

    from hyperface.common.runtime import resolve_device
    from hyperface.generation.arc2face import Arc2FaceGenerator, Arc2FaceSettings, resolve_dtype
    from hyperface.generation.dataset import GenerationConfig, render_shard

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    images = args.images or (128 if cuda else 16)
    batch = args.batch_size or (64 if cuda else 8)
    k = args.images_per_identity
    components = sd15_sized_components(args.small, device, resolve_dtype("auto", device))
    settings = Arc2FaceSettings(steps=4 if args.small else 25, resolution=64 if args.small else 512,
                                channels_last=cuda, fuse_qkv=True)
    generator = Arc2FaceGenerator(components, settings, device=device)
    embed_fn = fr_embed_fn(args.fr_arch, args.fr_device, batch)
    config = GenerationConfig(images_per_identity=k, batch_size=batch, min_similarity=-1.0)
    print(f"device={device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}) "
          f"{'small' if args.small else 'SD1.5-sized'} models, batch {batch}, {images} images a run, "
          f"filter: {args.fr_arch} on {args.fr_device}", flush=True)

    with tempfile.TemporaryDirectory(prefix="hyperface-pipeline-bench-") as tmp:
        def run(name: str, overlap: bool, identities) -> float:
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            summary = render_shard(generator, identities, Path(tmp) / name, config, embed_fn=embed_fn,
                                   show_progress=False, overlap=overlap)
            seconds = time.perf_counter() - started
            if summary["rendered_this_run"] != len(identities) * k:  # every render kept: both loops do the same work
                raise SystemExit(f"{name}: {summary['rendered_this_run']} renders for {len(identities) * k} images")
            return len(identities) * k / seconds

        run("warm-up", True, random_identities(max(1, batch // k), seed=9))  # cuDNN autotuning, allocator
        identities = random_identities(max(1, images // k), seed=10)
        before = run("sequential-1", False, identities)
        print(f"sequential loop: {before:.3f} img/s", flush=True)
        overlapped = run("overlapped", True, identities)
        print(f"overlapped loop: {overlapped:.3f} img/s", flush=True)
        after = run("sequential-2", False, identities)
        print(f"sequential loop again: {after:.3f} img/s", flush=True)
    print(f"ratio overlapped / sequential: {overlapped / (0.5 * (before + after)):.2f}x")


if __name__ == "__main__":
    main()
