"""``hyperface pack``: choose identity embeddings by hypersphere packing."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  # pure packing, CPU, no downloads: 1,000 identities in 512-d for 30 seconds
  hyperface pack --identities 1000 --dim 512 --time-budget 30 --out runs/pack-1k

  # dense pure packing (N >= 12 d) is a cyclic orbit code by default: 87.03 deg in ~45 s on 2 cores
  hyperface pack --identities 10000 --dim 512 --time-budget 60 --out runs/pack-10k

  # the paper's setting: start from a gallery of face embeddings and stay near it
  hyperface embed faces/ --model arcface.onnx --crop ffhq --out gallery.npy
  hyperface pack --identities 10000 --gallery gallery.npy --reg-weight 0.3 --steps 2000 --out runs/hf-10k

  # continue a run that was interrupted (Ctrl-C or a kill)
  hyperface pack --identities 10000 --gallery gallery.npy --reg-weight 0.3 --steps 2000 --out runs/hf-10k --resume

outputs in --out: identities.npy (float32 N x d, unit rows), metrics.json, history.json,
pack.png, manifest.json (and representatives.npy for a cyclic code). --steps runs are deterministic for a seed and device; --time-budget
runs stop by the clock, so the number of steps (and the result) varies with the machine.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from hyperface.cli import HelpFormatter

    p = subparsers.add_parser(
        "pack",
        help="choose N identity embeddings that maximise the minimum pairwise angle",
        description=(
            "Choose N unit vectors (identity embeddings) that maximise the minimum pairwise angle, "
            "optionally staying near a gallery of real-looking face embeddings (HyperFace's "
            "packing problem). Prints the result beside the Levenshtein bound and the value for "
            "random points."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--identities", "-n", type=int, required=True, metavar="N", help="number of identities to pack")
    space = p.add_mutually_exclusive_group(required=True)
    space.add_argument("--dim", "-d", type=int, metavar="D", help="embedding dimension (pure packing, no gallery)")
    space.add_argument("--gallery", metavar="G.npy", help="(M, d) face embeddings: initial points and regulariser "
                                                          "(a .npy, or the folder `hyperface embed` wrote; any float "
                                                          "dtype, rows are L2-normalised on load)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (must be empty or new)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, metavar="K", help="optimisation steps (default 1000; 0 writes the starting points unoptimised, with their metrics: "
                                                          "the no-optimisation baseline of an ablation)")
    budget.add_argument("--time-budget", type=float, metavar="SEC",
                        help="optimise for this many seconds instead, the final polish included")
    p.add_argument("--reg-weight", type=float, default=None, metavar="A",
                   help="weight of the mean squared distance to the nearest gallery embedding, traded against "
                        "the max cosine (default: 0.3 with --gallery, 0 without; 0 with a gallery only starts "
                        "from it; larger stays nearer the faces: BENCHMARKS.md has the sweep)")
    p.add_argument("--init", choices=["auto", "gallery", "random", "binary", "orthoplex"], default="auto",
                   help="starting points; auto (default): gallery with --gallery, else random (or orthoplex where it is optimal). gallery rows, random, "
                        "a binary-code construction for power-of-two d (86.4 deg for d=512 before optimising), or "
                        "orthoplex: cross-polytope vertices, 90 deg, optimal and the default for d+1 < N <= 2d")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available; the default), cpu, cuda, cuda:N")
    p.add_argument("--restarts", type=int, default=1, help="independent starts; the best wins (small hard cases; default 1)")
    continuation = p.add_mutually_exclusive_group()
    continuation.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    continuation.add_argument("--overwrite", action="store_true", help="replace a previous hyperface run in --out")
    adv = p.add_argument_group("solver (the defaults suit d=64..1024; 10^6 identities want a GPU)")
    adv.add_argument("--mode", choices=["auto", "exact", "neighbors", "stochastic"], default="auto",
                     help="auto (default) = exact. exact (any N): all pairs every step, tiled; neighbors: per-identity top-k "
                          "lists refreshed from a tiled Gram pass (cheap, weak once dense); stochastic: a random "
                          "mini-batch of identities per step (the paper's variant)")
    adv.add_argument("--symmetry", choices=["auto", "none", "cyclic"], default="auto",
                     help="cyclic: the identities are the cyclic coordinate shifts of ceil(N/d) vectors (a cyclic "
                          "orbit code): about d times cheaper steps and an exact L-BFGS finish, better for dense pure "
                          "packing (N=10k, d=512: 87.03 vs 86.89 deg in 60 s on 2 CPU cores). auto (default): cyclic "
                          "for pure packing from a random start with N >= 12 d, else none")
    adv.add_argument("--neighbors", type=int, default=256, help="k for --mode neighbors (default 256)")
    adv.add_argument("--refresh-every", type=int, default=20, help="steps between neighbour-list refreshes (default 20)")
    adv.add_argument("--batch-size", type=int, default=4096, help="identities per step for --mode stochastic (default 4096)")
    adv.add_argument("--step-angle", type=float, default=0.2, help="initial step, radians per identity (default 0.2)")
    adv.add_argument("--temperature-start", type=float, default=0.5, help="soft-max temperature x sqrt(d) at the start (default 0.5)")
    adv.add_argument("--temperature-end", type=float, default=0.02, help="... and at the end (default 0.02)")
    adv.add_argument("--polish-steps", type=int, default=None,
                     help="exact line-search steps at the end (default 300 for N <= 2048, else 0); with "
                          "--symmetry cyclic, 0 turns off its L-BFGS finish")
    adv.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                     help="matrix products' precision (default auto: bfloat16 on CUDA and on CPUs where it is faster, else float32)")
    adv.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SEC", help="seconds between checkpoints (default 60)")
    adv.add_argument("--no-plot", action="store_true", help="skip pack.png")
    p.set_defaults(func=run)


def out_of_memory(exc: BaseException, args: argparse.Namespace) -> BaseException:
    """A failed allocation as one line that says what to change; any other error as it was.

    numpy raises MemoryError, torch a RuntimeError ("can't allocate memory" on a CPU,
    torch.OutOfMemoryError on a GPU). The unconstrained solver keeps about six N x d float32 arrays
    (points, gradient, Adam's two moments, the best iterate, a temporary)."""
    from pathlib import Path

    import torch

    from hyperface.common.errors import HyperfaceError, exception_summary
    from hyperface.packing.solver import CHECKPOINT_NAME

    text = str(exc)
    if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return exc
    size = f"{args.identities} identities" + (f" in {args.dim}-d" if args.dim else "")
    each = f"; {args.identities} x {args.dim} float32 is {args.identities * args.dim * 4 / 2**30:.1f} GiB a copy" if args.dim else ""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = first if isinstance(exc, MemoryError) and first else exception_summary(exc) if first else type(exc).__name__
    checkpoint = Path(args.out) / CHECKPOINT_NAME
    again = f"; --resume continues from {checkpoint}" if checkpoint.is_file() else ""
    return HyperfaceError(
        f"not enough memory to pack {size} ({detail}){each}: pack fewer identities, or use a machine "
        f"(or --device) with more memory{again}"
    )


def run(args: argparse.Namespace) -> int:
    from hyperface.packing.metrics import format_metrics
    from hyperface.packing.pipeline import run_pack
    from hyperface.packing.solver import PackConfig

    config = PackConfig(
        num_identities=args.identities,
        dim=args.dim,
        steps=args.steps,
        time_budget=args.time_budget,
        init=args.init,
        reg_weight=args.reg_weight,
        seed=args.seed,
        mode=args.mode,
        step_angle=args.step_angle,
        temperature_start=args.temperature_start,
        temperature_end=args.temperature_end,
        neighbors=args.neighbors,
        refresh_every=args.refresh_every,
        batch_size=args.batch_size,
        restarts=args.restarts,
        polish_steps=args.polish_steps,
        compute_dtype=args.compute_dtype,
        device=args.device,
        symmetry=args.symmetry,
    )
    try:
        metrics = run_pack(
            config,
            args.out,
            gallery_path=args.gallery,
            overwrite=args.overwrite,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            plot=not args.no_plot,
        )
    except (MemoryError, RuntimeError) as exc:
        raise out_of_memory(exc, args) from exc
    print(format_metrics(metrics))
    print(f"identities: {args.out}/identities.npy ({metrics['num_identities']} x {metrics['dim']})")
    return 0
