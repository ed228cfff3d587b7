"""Training throughput (images/s) of hyperface's step vs a plain eager fp16 loop, in the same run.

    python benchmarks/train.py                      # CPU: r50, small batch, a few steps (~1-2 min)
    python benchmarks/train.py --device cuda        # GPU: r50 112x112, batch 256, bf16 + channels_last
    python benchmarks/train.py --device cuda --compile

Both loops train the same iResNet on the same random 112x112 batches with the same loss (ArcFace,
partial-FC head at rate 1.0, 10k classes), SGD, and backbone gradient clipping at 5:

- baseline (how insightface's arcface_torch runs): ``iresnet(fp16=True)`` (fp16 autocast in the
  trunk, fc in fp32), NCHW, the head's matmul under fp16 autocast, GradScaler. On the CPU, where
  fp16 autocast is not a thing, the baseline is the same loop in fp32.
- ours: :func:`hyperface.training.trainer.train_step` exactly as ``hyperface train`` runs it:
  channels_last, ``--amp`` autocast (bf16 on CUDA by default), optional ``torch.compile``.

Data loading is excluded (both loops read a batch already on the device), so the ratio measures
the model step. The two loops alternate in rounds and each keeps its best round, so drift (other
jobs, clocks) hits both alike. Prints both rates and the ratio ours / baseline.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from hyperface.common.runtime import resolve_device
from hyperface.recognition.iresnet import iresnet
from hyperface.training.losses import ArcFaceMargin, PartialFC
from hyperface.training.trainer import _amp_dtype, _to_input, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_step(backbone, head, optimizer, scaler, images, labels, device, fp16: bool) -> torch.Tensor:
    """arcface_torch's step: normalised float NCHW input, fp16 trunk (the backbone's flag), fp16 head."""
    x = _to_input(images, device, channels_last=False)
    embeddings = backbone(x)
    with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
        loss = head(embeddings, labels)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="r50")
    parser.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 4 on CPU")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: 30 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 10 CUDA, 1 CPU)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per loop (default: 2)")
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"), help="ours (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our backbone")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (256 if cuda else 4)
    steps = args.steps or (30 if cuda else 2)
    warmup = args.warmup or (10 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, device=device)
    labels = torch.randint(0, args.classes, (batch,), device=device)

    # Baseline: arcface_torch style.
    base_backbone = iresnet(args.arch, fp16=cuda).to(device)
    base_head = PartialFC(ArcFaceMargin(), 512, args.classes, sample_rate=1.0).to(device)
    base_opt = torch.optim.SGD(list(base_backbone.parameters()) + list(base_head.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    base_scaler = torch.amp.GradScaler(device.type, growth_interval=100, enabled=cuda)

    # Ours: what `hyperface train` runs.
    amp_dtype = _amp_dtype(args.amp, device)
    our_backbone = iresnet(args.arch).to(device).to(memory_format=torch.channels_last)
    our_head = PartialFC(ArcFaceMargin(), 512, args.classes, sample_rate=1.0).to(device)
    our_opt = torch.optim.SGD(list(our_backbone.parameters()) + list(our_head.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    our_scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    our_model = torch.compile(our_backbone) if args.compile else our_backbone

    def run_baseline():
        return baseline_step(base_backbone, base_head, base_opt, base_scaler, images, labels, device, fp16=cuda)

    def run_ours():
        return train_step(
            our_model, our_head, our_opt, our_scaler, images, labels, device=device, amp_dtype=amp_dtype,
            channels_last=True, clip_params=our_backbone.parameters(), clip_grad_norm=5.0,
        )

    loops = {"baseline": run_baseline, "ours": run_ours}
    best = {name: 0.0 for name in loops}
    for name, fn in loops.items():  # warm up (cudnn autotune, compile) outside the timing
        for _ in range(warmup):
            fn()
        _sync(device)
    for _ in range(args.rounds):
        for name, fn in loops.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                loss = fn()
            _sync(device)
            elapsed = time.perf_counter() - start
            if not torch.isfinite(loss):
                raise SystemExit(f"{name}: loss is not finite ({float(loss)})")
            best[name] = max(best[name], steps * batch / elapsed)

    base_desc = "eager fp16 autocast + GradScaler, NCHW" if cuda else "eager fp32, NCHW (no fp16 on CPU)"
    ours_desc = f"channels_last, amp={str(amp_dtype).replace('torch.', '') if amp_dtype else 'none'}" + (", torch.compile" if args.compile else "")
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device: {name}; arch {args.arch}, 112x112, batch {batch}, {args.classes} classes, {steps} steps x {args.rounds} rounds")
    print(f"baseline ({base_desc}): {best['baseline']:.1f} img/s")
    print(f"ours     ({ours_desc}): {best['ours']:.1f} img/s")
    print(f"ratio ours/baseline: {best['ours'] / best['baseline']:.2f}x")


if __name__ == "__main__":
    main()
