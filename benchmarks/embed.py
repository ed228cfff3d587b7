"""Embedding throughput: batched ``Recognizer.embed`` vs the common per-image loop, same run.

An r50-sized iResNet with random weights (same FLOPs as insightface's w600k_r50 / arcface_torch r50;
weights don't change speed) embeds the same aligned 112x112 faces twice:

- baseline: one face per call, the loop most scripts write (``for img in faces: model(img)``),
- ours: ``Recognizer.embed`` on the whole list, in batches of ``--batch-size``.

Prints images/s for both and the ratio. CPU by default (keep ``--images`` small: r50 is ~6 GFLOPs a
face); ``--device cuda`` for a GPU (add ``--fp16`` for autocast), ``--backend onnx`` to time the
onnxruntime path on a freshly exported graph instead of PyTorch.

    python benchmarks/embed.py                      # ~1-2 min on 2 CPU cores
    python benchmarks/embed.py --device cuda --images 2048 --batch-size 256 --fp16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from hyperface.recognition.iresnet import iresnet  # noqa: E402
from hyperface.recognition.recognizers import OnnxRecognizer, TorchRecognizer  # noqa: E402


def finite_random_iresnet(arch: str, *, fp16: bool = False, seed: int = 0):
    """A random-weight iResNet in eval mode whose features stay finite: insightface's N(0, 0.1) conv
    init blows activations up through 24 residual blocks; a fan-in scaled init does not."""
    torch.manual_seed(seed)
    model = iresnet(arch, fp16=fp16).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            module.weight.data.mul_(0.5)
    return model


def build(args, tmp: str):
    model = finite_random_iresnet(args.arch, fp16=args.fp16)
    if args.backend == "torch":
        return TorchRecognizer(model, device=args.device, batch_size=args.batch_size, arch=args.arch)
    path = os.path.join(tmp, f"{args.arch}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, torch.zeros(1, 3, 112, 112), path, input_names=["input.1"], output_names=["embedding"],
            dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}}, opset_version=11, dynamo=False,
        )
    return OnnxRecognizer(path, device=args.device, batch_size=args.batch_size)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="r50")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--fp16", action="store_true", help="CUDA autocast (torch backend)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(args.images, 112, 112, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        recognizer = build(args, tmp)
        recognizer.embed(faces[: min(args.batch_size, args.images)])  # warm up: allocator, kernels, threads
        recognizer.embed(faces[:1])

        loop = []
        loop_s = timed(lambda: loop.extend(recognizer.embed(face[None])[0] for face in faces))
        batched = {}
        batched_s = timed(lambda: batched.setdefault("e", recognizer.embed(faces)))

    # Same numbers either way (batching must not change results beyond float noise).
    diff = float(np.abs(np.stack(loop) - batched["e"]).max())
    assert np.isfinite(batched["e"]).all() and np.allclose(np.linalg.norm(batched["e"], axis=1), 1, atol=1e-3)
    where = f"{args.backend} on {args.device}" + (" fp16" if args.fp16 else "")
    print(f"{args.arch} ({where}, torch threads {torch.get_num_threads()}), {args.images} faces 112x112")
    print(f"  per-image loop   : {args.images / loop_s:8.1f} img/s  ({loop_s:.2f} s)")
    print(f"  batched (B={args.batch_size:<4d}) : {args.images / batched_s:8.1f} img/s  ({batched_s:.2f} s)")
    print(f"  speed-up         : {loop_s / batched_s:8.2f}x   (max |diff| between the two: {diff:.2e})")


if __name__ == "__main__":
    main()
