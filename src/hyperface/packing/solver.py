"""The packing optimiser: N unit vectors with the largest minimum pairwise angle, near a gallery.

Objective:

    T * log sum_{i<j} exp(cos(x_i, x_j) / T)   +   reg_weight * mean_i ||x_i - g(i)||^2

the first term a soft maximum of all pair cosines (-> the max cosine, i.e. the min angle, as the
temperature T is annealed geometrically towards zero), the second the squared distance of each
identity to its nearest gallery embedding g(i) (the "face manifold" term of the paper).
Projected Adam: the gradient is projected onto each point's tangent plane, Adam steps, and points
are renormalised onto the sphere. The step size is an angle: ``step_angle / sqrt(d)`` per
coordinate, so the default works for every dimension.

Three ways to visit pairs (``mode``), none of which materialises N x N:

- ``exact``: every step visits all pairs once, in symmetric block tiles (exact gradient; the GEMMs
  and the elementwise passes run in bfloat16 where that is faster, float32 below a temperature of
  0.01 / sqrt(d); the max cosine that picks the best iterate is always taken in float32).
  Best quality per step; cost N^2 d per step. Runs of N <= 2048 end with an exact polish.
- ``neighbors``: each identity keeps its top-k nearest identities, refreshed every
  ``refresh_every`` steps from a tiled Gram pass; a step costs N k d. Cheap, but weak once the
  packing is dense (most pairs near the max are not in anyone's list): for quick early spreading
  of very large N on small hardware, not for final quality.
- ``stochastic``: the paper's mini-batch variant: each step updates a random batch of identities
  against all others. Cheaper steps, lower quality per second than ``exact`` here.

``auto`` is ``exact``.

``symmetry="cyclic"`` (:mod:`hyperface.packing.cyclic`, chosen by ``auto`` for dense pure packing)
restricts the points to cyclic shifts of a few representatives, which makes steps about d times
cheaper and affords an exact L-BFGS finish.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hyperface.common.errors import HyperfaceError, check_option, exception_summary
from hyperface.common.io import array_sha256, atomic_write
from hyperface.common.manifest import describe_changes
from hyperface.common.runtime import StopRequest, get_logger, progress, resolve_device, show_progress_now
from hyperface.packing.geometry import TILE_ELEMENTS, tiled_topk
from hyperface.packing.init import check_init, initial_points

log = get_logger("hyperface.packing")

MODES = ("auto", "exact", "neighbors", "stochastic")
SYMMETRIES = ("auto", "none", "cyclic")
#: ``reg_weight`` when a gallery is given and none is named: on BENCHMARKS.md's sweep (N = 2,000, d = 512)
#: it keeps identities at mean cosine 0.94 to their nearest face for 85.2 deg (88.6 without the term).
GALLERY_REG_WEIGHT = 0.3

#: ``symmetry="auto"`` picks cyclic orbit codes for pure packing from this many points per dimension:
#: there they beat the unconstrained solver (N/d = 15.6: +0.10..0.13 deg at d = 64..256; N = 10,000,
#: d = 512: 87.03 vs 86.89 deg in 60 s); at N/d <= 9 the unconstrained solver is as good or better.
CYCLIC_MIN_POINTS_PER_DIM = 12
CHECKPOINT_NAME = "checkpoint.pt"
#: Up to this many identities the run ends with an exact polish (see :func:`_polish`) ...
POLISH_AUTO_MAX = 2048
#: ... of this many steps, unless --polish-steps says otherwise.
POLISH_AUTO_STEPS = 300
#: The cyclic solver's precision, whatever --compute-dtype says (it is the unconstrained solver's option).
CYCLIC_PRECISION = "float32 (Adam), float64 (L-BFGS polish)"
#: Below this temperature (in units of 1/sqrt(d)) GEMMs run in float32 whatever compute_dtype says.
BF16_MIN_TEMPERATURE = 0.01
#: ... and while the max cosine is this close to 0 (N up to a few d: simplex, cross-polytope), where
#: bfloat16's rounding of the inputs (~2^-9 / sqrt(d) per cosine) hides which pair is the closest.
BF16_MIN_ABS_COSINE = 0.01
#: With a --time-budget, the polish's share of it (Adam gets the rest): the polish used to run after
#: the budget, and at N = 1000, d = 64 its 300 steps took 10 s more than a 3 s budget.
POLISH_SHARE = 0.25
#: Largest --seed: restarts add 1,000,003 per restart, and torch seeds must fit in 64 bits.
MAX_SEED = 2**62
#: A first step that takes this share of Adam's part of a --time-budget or more (fewer than 10 steps
#: fit; N = 50,000, d = 512, --symmetry none on a CPU: one step took 49 s of a 5 s budget) is warned
#: about: the budget is read between steps, so the run overruns it by up to a step.
SLOW_STEP_SHARE = 0.1
#: A first step this slow (seconds) logs a progress line at once where there is no terminal, instead
#: of after $HYPERFACE_PROGRESS_SECONDS (and a step that ends after them).
EARLY_PROGRESS_SECONDS = 1.0


def check_checkpoint_every(seconds: float) -> None:
    """``checkpoint_every`` is seconds between checkpoints: inf means none until the end or Ctrl-C."""
    check_option("--checkpoint-every", seconds, lambda v: v > 0, "a positive number of seconds")


#: The option that sets each :func:`config_key` field (step_floor and gallery_candidates have none).
CONFIG_FLAGS = {"num_identities": "--identities", **{key: "--" + key.replace("_", "-") for key in (
    "dim", "init", "reg_weight", "seed", "mode", "steps", "time_budget", "restarts", "symmetry", "step_angle",
    "temperature_start", "temperature_end", "neighbors", "refresh_every", "batch_size", "polish_steps", "compute_dtype")}}


def resume_mismatch(where: str | Path, before: dict[str, Any], after: dict[str, Any]) -> HyperfaceError:
    """The error for ``--resume`` with settings other than the run's, naming only what changed, by
    the option that sets it (``--seed 0 -> 3``)."""
    def flags(settings: dict[str, Any]) -> dict[str, Any]:
        return {CONFIG_FLAGS.get(key, key): value for key, value in settings.items()}

    return HyperfaceError(
        f"cannot --resume {where}: it was started with other settings ({describe_changes(flags(before), flags(after))}); "
        "use the same settings or --overwrite"
    )


@dataclass
class PackConfig:
    """Parameters of one packing run. ``dim`` is taken from the gallery when one is given."""

    num_identities: int
    dim: int | None = None
    steps: int | None = None
    time_budget: float | None = None
    init: str = "auto"
    #: None: GALLERY_REG_WEIGHT with a gallery (the paper regularises towards it), 0 without.
    reg_weight: float | None = None
    seed: int = 0
    mode: str = "auto"
    step_angle: float = 0.2
    step_floor: float = 1e-3
    temperature_start: float = 0.5
    temperature_end: float = 0.02
    neighbors: int = 256
    refresh_every: int = 20
    batch_size: int = 4096
    gallery_candidates: int = 8
    restarts: int = 1
    polish_steps: int | None = None
    compute_dtype: str = "auto"
    device: str = "auto"
    symmetry: str = "auto"

    def resolved(self, gallery: np.ndarray | None) -> "PackConfig":
        """Fill the ``auto`` fields and check the values; raises HyperfaceError on bad input."""
        cfg = dataclasses.replace(self)
        check_option("--identities", cfg.num_identities, lambda v: v >= 2, "at least 2", integer=True)
        if gallery is not None:
            if cfg.dim is not None and cfg.dim != gallery.shape[1]:
                raise HyperfaceError(f"--dim {cfg.dim} does not match the gallery's dimension {gallery.shape[1]}")
            cfg.dim = int(gallery.shape[1])
        if cfg.dim is None:
            raise HyperfaceError("give --dim D (at least 2) or --gallery G.npy")
        check_option("--dim", cfg.dim, lambda v: v >= 2, "at least 2", integer=True)
        if cfg.symmetry not in SYMMETRIES:
            raise HyperfaceError(f"unknown --symmetry {cfg.symmetry!r}: choose one of {', '.join(SYMMETRIES)}")
        pure = gallery is None and cfg.init in ("auto", "random") and cfg.mode in ("auto", "exact")
        if cfg.steps == 0:  # the starting points as they are (a baseline): no orbit code to build
            if cfg.symmetry == "cyclic":
                raise HyperfaceError("--steps 0 writes the starting points unoptimised; it takes --symmetry none (or auto)")
            cfg.symmetry = "none"
        if cfg.symmetry == "auto":
            cfg.symmetry = "cyclic" if pure and cfg.num_identities >= CYCLIC_MIN_POINTS_PER_DIM * cfg.dim else "none"
        elif cfg.symmetry == "cyclic" and not pure:
            raise HyperfaceError(
                "--symmetry cyclic is for pure packing from a random start with --mode exact: identities come in "
                "orbits of cyclic shifts, which a gallery term cannot keep near their own faces; use --symmetry none"
            )
        if cfg.init == "auto":  # between d + 1 and 2d points the cross-polytope is already optimal
            orthoplex = cfg.dim + 1 < cfg.num_identities <= 2 * cfg.dim and cfg.symmetry == "none"
            cfg.init = "gallery" if gallery is not None else "orthoplex" if orthoplex else "random"
        check_init(cfg.init, cfg.num_identities, cfg.dim, None if gallery is None else gallery.shape[0])
        if cfg.reg_weight is None:
            cfg.reg_weight = GALLERY_REG_WEIGHT if gallery is not None else 0.0
        check_option("--reg-weight", cfg.reg_weight, lambda v: 0 <= v < math.inf, "a finite number >= 0")
        if cfg.reg_weight > 0 and gallery is None:
            raise HyperfaceError("--reg-weight needs --gallery G.npy (the embeddings to stay near)")
        if cfg.steps is None and cfg.time_budget is None:
            cfg.steps = 1000
        if cfg.steps is not None:
            check_option("--steps", cfg.steps, lambda v: v >= 0, "0 (the starting points, not optimised) or more", integer=True)
        if cfg.time_budget is not None:
            check_option("--time-budget", cfg.time_budget, lambda v: 0 < v < math.inf, "a positive, finite number of seconds")
        if cfg.polish_steps is not None:  # None: the default for N
            check_option("--polish-steps", cfg.polish_steps, lambda v: v >= 0, "0 or more", integer=True)
        check_option("--seed", cfg.seed, lambda v: 0 <= v <= MAX_SEED, "an integer from 0 to 2^62", integer=True)
        check_option("--restarts", cfg.restarts, lambda v: v >= 1, "at least 1", integer=True)
        check_option("--neighbors", cfg.neighbors, lambda v: v >= 1, "at least 1", integer=True)
        check_option("--refresh-every", cfg.refresh_every, lambda v: v >= 1, "at least 1 (steps)", integer=True)
        check_option("--batch-size", cfg.batch_size, lambda v: v >= 1, "at least 1", integer=True)
        check_option("gallery_candidates", cfg.gallery_candidates, lambda v: v >= 1, "at least 1", integer=True)
        check_option("--step-angle", cfg.step_angle, lambda v: 0 < v <= math.pi, "in (0, pi] radians")
        check_option("step_floor", cfg.step_floor, lambda v: 0 <= v <= 1, "in [0, 1]")
        check_option("--temperature-start", cfg.temperature_start, lambda v: 0 < v < math.inf, "a positive, finite number")
        check_option("--temperature-end", cfg.temperature_end, lambda v: 0 < v <= cfg.temperature_start,
               f"in (0, --temperature-start {cfg.temperature_start:g}]")
        if cfg.mode not in MODES:
            raise HyperfaceError(f"unknown --mode {cfg.mode!r}: choose one of {', '.join(MODES)}")
        if cfg.mode == "auto":
            # Exact at every size: near the optimum a large share of all pairs sits close to the max
            # cosine, which top-k lists cannot see (N=10k, d=512, 60 s: exact 86.9 deg, stochastic
            # 84.8, neighbors 81.7). 10^6 identities cost ~10^15 flop a step: minutes on one GPU.
            cfg.mode = "exact"
        return cfg


@dataclass
class PackResult:
    points: np.ndarray  # (N, d) float32 unit rows
    config: PackConfig
    history: list[dict[str, float]] = field(default_factory=list)
    steps_done: int = 0
    seconds: float = 0.0
    best_step: int = 0
    restart: int = 0
    compute_dtype: str = "float32"
    representatives: np.ndarray | None = None  # cyclic symmetry: the (K, d) orbit representatives


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read from its flags.

    A flag, not a timing, so the choice (and so the result) is the same on every run of a machine.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def choose_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bfloat16 GEMMs on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise HyperfaceError(f"unknown compute dtype {name!r}: auto, float32 or bfloat16")
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


class _Objective:
    """Computes the loss gradient for one step; holds the neighbour and gallery caches."""

    def __init__(self, cfg: PackConfig, gallery: torch.Tensor | None, dtype: torch.dtype, generator: torch.Generator):
        self.cfg = cfg
        self.gallery = gallery
        self.dtype = dtype
        self.generator = generator
        self.neighbor_index: torch.Tensor | None = None
        self.gallery_index: torch.Tensor | None = None
        self.reference_cos = 0.0

    def refresh(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if cfg.mode == "neighbors":
            k = min(cfg.neighbors, x.shape[0] - 1)
            _, self.neighbor_index = tiled_topk(x, x, k, exclude_self=True, compute_dtype=self.dtype)
        if self.gallery is not None and cfg.reg_weight > 0:
            k = min(cfg.gallery_candidates, self.gallery.shape[0])
            _, self.gallery_index = tiled_topk(x, self.gallery, k, compute_dtype=self.dtype)

    def gradient(self, x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
        """(gradient (N, d), approximate max cosine)."""
        cfg = self.cfg
        if cfg.mode == "neighbors":
            grad, max_cos, total_weight = self._neighbor_gradient(x, temperature)
            rows = torch.arange(x.shape[0], device=x.device)
        else:
            if cfg.mode == "stochastic" and cfg.batch_size < x.shape[0]:
                rows = torch.randperm(x.shape[0], generator=self.generator)[: cfg.batch_size].to(x.device)
                rows = rows.sort().values
            else:
                rows = torch.arange(x.shape[0], device=x.device)
            grad, max_cos, total_weight = self._dense_gradient(x, rows, temperature)
        # Normalise by Z, the sum of exp((cos - ref)/T) over unordered pairs, so the packing term's
        # gradient is exactly that of T*logsumexp (~ max cosine) and reg_weight trades max cosine
        # against mean squared gallery distance as documented. ``total_weight`` sums the weights of
        # each visited row's pairs: every pair twice over all N rows; B sampled rows see B/N of that.
        grad /= max(total_weight * x.shape[0] / (2.0 * rows.shape[0]), 1e-30)
        self.reference_cos = max_cos
        if self.gallery_index is not None:
            grad[rows] += self._gallery_gradient(x, rows)
        return grad, max_cos

    def _dense_gradient(self, x: torch.Tensor, rows: torch.Tensor, temperature: float):
        num, dim = x.shape
        # bfloat16 rounds cosines by ~2^-9/sqrt(d): fine while T and the max cosine are well above
        # that, not after (reference_cos is the last step's max; 0 before the first step).
        coarse_ok = temperature * math.sqrt(dim) >= BF16_MIN_TEMPERATURE and abs(self.reference_cos) >= BF16_MIN_ABS_COSINE
        dtype = self.dtype if coarse_ok else torch.float32
        xc = x.to(dtype)
        grad = torch.zeros_like(x)
        # Max cosine and total weight stay on the device until the end: one host sync per step,
        # not two per tile (on a GPU the syncs would stall the launch queue thousands of times).
        max_cos = torch.full((), -1.0, device=x.device)
        total = torch.zeros((), device=x.device)

        def weights_of(sims: torch.Tensor, row_points: torch.Tensor, col_points: torch.Tensor) -> torch.Tensor:
            # Pair weights exp((cos - ref)/T), the gradient of T*logsumexp over pairs up to 1/Z;
            # ref is last step's max, which keeps exp() in range without a second pass. Kept in
            # the GEMM dtype: in bfloat16 these elementwise passes cost 5x less.
            if sims.dtype == torch.float32:
                torch.maximum(max_cos, sims.max(), out=max_cos)
            else:  # the max decides the best iterate: take its pair's cosine in float32, not rounded
                flat = sims.argmax()
                row, col = flat // sims.shape[1], flat % sims.shape[1]
                torch.maximum(max_cos, (row_points[row] * col_points[col]).sum(), out=max_cos)
            w = sims.sub_(self.reference_cos).mul_(1.0 / temperature).clamp_(max=60.0).exp_()
            return w

        if rows.shape[0] == num:
            # All pairs: visit each block pair once (I <= J); W is symmetric, so the block serves
            # both I's rows (W X_J) and J's rows (W^T X_I). Half the work of full row tiles.
            # Big blocks on a GPU (kernel launches, not FLOPs, limit small ones); cache-sized on a CPU.
            block = 8192 if x.is_cuda else int(max(64, min(2048, math.isqrt(TILE_ELEMENTS // 4))))
            starts = list(range(0, num, block))
            for bi, i0 in enumerate(starts):
                xi = xc[i0 : i0 + block]
                for j0 in starts[bi:]:
                    xj = xc[j0 : j0 + block]
                    sims = xi @ xj.T
                    if i0 == j0:
                        sims.fill_diagonal_(-float("inf"))
                    w = weights_of(sims, x[i0 : i0 + block], x[j0 : j0 + block])
                    total.add_(w.sum(dtype=torch.float32), alpha=1 if i0 == j0 else 2)
                    grad[i0 : i0 + block] += (w @ xj).float()
                    if i0 != j0:
                        grad[j0 : j0 + block] += (w.T @ xi).float()
        else:  # a mini-batch of rows against everyone
            tile = int(max(1, min(4096, TILE_ELEMENTS // 4 // num)))
            for start in range(0, rows.shape[0], tile):
                idx = rows[start : start + tile]
                sims = xc[idx] @ xc.T
                sims[torch.arange(idx.shape[0], device=x.device), idx] = -float("inf")
                w = weights_of(sims, x[idx], x)
                total.add_(w.sum(dtype=torch.float32))
                grad[idx] += (w @ xc).float()
        return grad, float(max_cos), float(total)

    def smooth_value(self, x: torch.Tensor, temperature: float, with_grad: bool = True):
        """Exact T*logsumexp over all pairs (+ gallery term) and its gradient, in x's dtype."""
        num = x.shape[0]
        tile = int(max(1, min(4096, TILE_ELEMENTS // 4 // num)))
        parts, grad = [], torch.zeros_like(x) if with_grad else None
        for start in range(0, num, tile):
            sims = x[start : start + tile] @ x.T
            r = torch.arange(sims.shape[0], device=x.device)
            sims[r, r + start] = -float("inf")
            parts.append(torch.logsumexp(sims / temperature, dim=1))
            if with_grad:
                grad[start : start + tile] = torch.softmax(sims / temperature, dim=1) @ x
        row_lse = torch.cat(parts)
        total = torch.logsumexp(row_lse, dim=0)  # every pair twice: log 2 shifts the value only
        value = float(temperature * (total - math.log(2.0)))
        if with_grad:
            grad *= torch.exp(row_lse - total)[:, None] * 2.0  # d/dx_i of T*log sum_{i<j} exp(c/T)
        if self.gallery_index is not None:
            cand = self.gallery.to(x.dtype)[self.gallery_index]
            sims = torch.einsum("nd,nkd->nk", x, cand)
            best, arg = sims.max(dim=1)
            value += self.cfg.reg_weight * float((2.0 - 2.0 * best).mean())
            if with_grad:
                nearest = cand[torch.arange(num, device=x.device), arg]
                grad += (-2.0 * self.cfg.reg_weight / num) * nearest
        return value, grad

    def _neighbor_gradient(self, x: torch.Tensor, temperature: float):
        assert self.neighbor_index is not None
        num, dim = x.shape
        k = self.neighbor_index.shape[1]
        grad = torch.zeros_like(x)
        max_cos, total_weight = -1.0, 0.0
        ref = self.reference_cos
        chunk = int(max(1, min(num, TILE_ELEMENTS // (k * dim))))
        xc = x.to(self.dtype)
        for start in range(0, num, chunk):
            xn = xc[self.neighbor_index[start : start + chunk]]  # (c, k, d)
            sims = torch.einsum("cd,ckd->ck", xc[start : start + chunk], xn).float()
            max_cos = max(max_cos, float(sims.max()))
            # Neighbour lists are nearly symmetric, so each row's own pairs give its gradient.
            weights = sims.sub_(ref).div_(temperature).clamp_(max=60.0).exp_()
            total_weight += float(weights.sum())
            grad[start : start + chunk] += torch.einsum("ck,ckd->cd", weights.to(self.dtype), xn).float()
        return grad, max_cos, total_weight

    def _nearest_in_gallery(self, x: torch.Tensor, rows: torch.Tensor, *, vectors: bool = True):
        """Yield (first position in ``rows``, best cosine, nearest candidate or None) chunk by chunk:
        the candidates of all rows at once would be an (N, k, d) copy, 16 GB at N = 1M."""
        assert self.gallery is not None and self.gallery_index is not None
        chunk = int(max(1, TILE_ELEMENTS // (self.gallery_index.shape[1] * x.shape[1])))
        for start in range(0, rows.shape[0], chunk):
            r = rows[start : start + chunk]
            cand = self.gallery[self.gallery_index[r]]  # (c, kc, d)
            best, arg = torch.einsum("cd,ckd->ck", x[r], cand).max(dim=1)
            yield start, best, cand[torch.arange(r.shape[0], device=x.device), arg] if vectors else None

    def _gallery_gradient(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # d/dx ||x - g||^2 = 2 (x - g); the radial part vanishes in the tangent projection.
        out = torch.empty(rows.shape[0], x.shape[1], device=x.device)
        for start, _, nearest in self._nearest_in_gallery(x, rows):
            out[start : start + nearest.shape[0]] = (-2.0 * self.cfg.reg_weight / x.shape[0]) * nearest
        return out

    def gallery_penalty(self, x: torch.Tensor) -> float:
        """Mean squared distance to the nearest gallery candidate (0 without a gallery term)."""
        if self.gallery_index is None:
            return 0.0
        rows = torch.arange(x.shape[0], device=x.device)
        total = sum(float((2.0 - 2.0 * best).sum()) for _, best, _ in self._nearest_in_gallery(x, rows, vectors=False))
        return total / x.shape[0]


def anneal_schedule(cfg: PackConfig, progress_frac: float, dim: int) -> tuple[float, float]:
    """(temperature, learning rate) at a fraction of the budget; both scale with 1/sqrt(d)."""
    p = min(max(progress_frac, 0.0), 1.0)
    scale = 1.0 / math.sqrt(dim)
    temperature = scale * cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** p
    lr = scale * cfg.step_angle * (cfg.step_floor + (1.0 - cfg.step_floor) * 0.5 * (1.0 + math.cos(math.pi * p)))
    return temperature, lr


def sphere_adam_step(points: torch.nn.Parameter, grad: torch.Tensor, optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Projected Adam on unit rows: drop the radial part of ``grad`` (in place), step, renormalise."""
    x = points.detach()
    grad -= (grad * x).sum(dim=1, keepdim=True) * x
    points.grad = grad
    optimizer.param_groups[0]["lr"] = lr
    optimizer.step()
    with torch.no_grad():
        points.div_(points.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _polish(
    objective: _Objective,
    x: torch.Tensor,
    temperature: float,
    steps: int,
    *,
    deadline: float | None = None,
    stop: Any = None,
    on_step: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Finish with exact gradient descent on the smooth objective, Armijo steps, T halving.

    Adam's normalised steps stall a few hundredths of a degree short of a minimax optimum; this
    converges to it (the simplex optimum to 0.0001 degree; hard Tammes cases can end in a local
    optimum; d + 1 < N <= 2d starts at the optimal cross-polytope). Dense and float64 (float32 above 256 points), so it is
    meant for N up to a few thousand. Stops early at ``deadline`` (a ``time.perf_counter()``
    value); raises KeyboardInterrupt once ``stop.requested``; ``on_step(seconds)`` after each step.
    """
    x = x.double() if x.shape[0] <= 256 else x.float()
    # Unit rows in the polish's own precision: float32 rows have norms 1 +- 1e-7, and every
    # candidate below is normalised, so an unnormalised start can score below any unit point
    # (N = 2: cos -1.0000001) and no step passes the line search.
    x = x / x.norm(dim=1, keepdim=True)
    if deadline is not None and time.perf_counter() >= deadline:
        return x.float()
    eta = 1.0
    value, grad = objective.smooth_value(x, temperature)
    last = time.perf_counter()
    for _ in range(steps):
        if stop is not None and stop.requested:
            raise KeyboardInterrupt  # the caller's checkpoint is from before the polish
        if deadline is not None and last >= deadline:
            break
        grad -= (grad * x).sum(dim=1, keepdim=True) * x
        slope = float((grad * grad).sum())
        if slope < 1e-30:
            break
        while eta > 1e-14:
            candidate = x - eta * grad
            candidate /= candidate.norm(dim=1, keepdim=True)
            new_value, _ = objective.smooth_value(candidate, temperature, with_grad=False)
            if new_value <= value - 1e-4 * eta * slope:
                break
            eta *= 0.5
        else:
            break
        improvement = value - new_value
        x = candidate
        eta *= 2.0
        if improvement < 1e-6 * temperature:  # converged at this temperature: sharpen
            temperature *= 0.5
        value, grad = objective.smooth_value(x, temperature)
        now = time.perf_counter()
        if on_step is not None:
            on_step(now - last)
        last = now
    return x.float()


def budget_progress(steps: int | None, seconds: float | None, done: float, desc: str):
    """The run's progress bar: in steps, or in seconds of the time budget as "1.2/3.0 s"."""
    if steps is not None:
        return progress(total=steps, initial=int(done), desc=desc, unit="step")
    # tqdm would print the float count raw ("0.16259006100153783/3") and a meaningless s/s rate.
    return progress(total=seconds, initial=min(done, seconds), desc=desc, unit="s",
                    bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}{postfix}]")


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def report_first_step(bar: Any, seconds: float, cfg: PackConfig, *, adam_budget: float | None, device: torch.device,
                      cyclic_hint: bool = False) -> None:
    """Call once, after the first optimisation step of a run (``seconds`` long): a slow step shows
    the progress line at once (see :data:`EARLY_PROGRESS_SECONDS`), and one that takes a large share
    of the --time-budget (:data:`SLOW_STEP_SHARE` of ``adam_budget``, Adam's part of one restart's
    budget; None: no warning) is one warning: how long a step takes, how long the optimisation will really take (the
    budget is read between steps), and what would help (``cyclic_hint``: --symmetry auto would pick a
    cyclic orbit code for these settings)."""
    if seconds >= EARLY_PROGRESS_SECONDS:
        show_progress_now(bar)
    if cfg.time_budget is None or adam_budget is None or seconds < SLOW_STEP_SHARE * adam_budget:
        return
    budget = cfg.time_budget / cfg.restarts
    steps = max(1, math.ceil(adam_budget / seconds))  # Adam steps while its share is not spent
    expected = max(budget, steps * seconds)
    share = adam_budget / budget  # Adam's part: the rest is the polish's
    restarts = f" (each of the {cfg.restarts} restarts)" if cfg.restarts > 1 else ""
    fits = f"{steps} step fits" if steps == 1 else f"about {steps} steps fit"
    overrun = (f", and the optimisation will take about {_seconds(expected)}{restarts}, not {_seconds(budget)}: "
               "the budget is checked between steps" if expected > 1.05 * budget else "")
    hints = (["--symmetry auto (a cyclic orbit code for these settings: steps about d times cheaper)"] if cyclic_hint else []) + (
        ["a GPU (--device cuda)"] if device.type == "cpu" else []) + [
        f"a larger --time-budget (about {_seconds(100 * seconds / share * cfg.restarts)} for 100 steps)"]
    log.warning(
        "the first optimisation step took %s (N = %d, d = %d, on %s), %.0f%% of the %s --time-budget%s: %s%s; "
        "for a better packing use %s", _seconds(seconds), cfg.num_identities, cfg.dim, device, 100 * seconds / budget,
        _seconds(budget), restarts, fits, overrun, ", or ".join(hints),
    )


def advance(bar: Any, amount: float) -> None:
    """Advance ``bar`` without passing its total (a budget's last step ends a little past it)."""
    bar.update(min(amount, max(0.0, bar.total - bar.n)))


def _polish_steps(cfg: PackConfig) -> int:
    """The unconstrained solver's exact polish steps for a resolved ``cfg``: --polish-steps, by default
    POLISH_AUTO_STEPS up to POLISH_AUTO_MAX identities; none for --mode stochastic or --steps 0 (the
    start, untouched)."""
    steps = cfg.polish_steps if cfg.polish_steps is not None else (POLISH_AUTO_STEPS if cfg.num_identities <= POLISH_AUTO_MAX else 0)
    return steps if cfg.mode != "stochastic" and cfg.steps != 0 else 0


def resolved_settings(cfg: PackConfig, device: torch.device) -> dict[str, Any]:
    """What the settings a resolved ``cfg`` still leaves to the run come to on ``device``: the device,
    the matrix products' precision (``compute_dtype``: the GEMM dtype --compute-dtype picks; the cyclic
    solver's own precision whatever the option) and the polish (``polish_steps``, or for a cyclic code
    ``lbfgs_polish``). The manifest records them beside the given values, and ``--resume`` compares
    ``compute_dtype`` through them."""
    if cfg.symmetry == "cyclic":
        return {"device": str(device), "compute_dtype": CYCLIC_PRECISION, "lbfgs_polish": cfg.polish_steps != 0}
    dtype = str(choose_compute_dtype(cfg.compute_dtype, device)).replace("torch.", "")
    return {"device": str(device), "compute_dtype": dtype, "polish_steps": _polish_steps(cfg)}


def config_key(cfg: PackConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: every setting the result depends on (not
    the device: a run may move to another one)."""
    keys = ("num_identities", "dim", "init", "reg_weight", "seed", "mode", "steps", "time_budget", "restarts", "symmetry",
            "step_angle", "step_floor", "temperature_start", "temperature_end", "neighbors", "refresh_every", "batch_size",
            "gallery_candidates", "polish_steps", "compute_dtype")
    return {k: getattr(cfg, k) for k in keys}


class _Shown(str):
    """A value a resume error shows as written (:func:`describe_changes` shows values by repr)."""

    def __repr__(self) -> str:
        return str(self)


def settings_changes(
    stored: dict[str, Any], now: dict[str, Any], stored_resolved: dict[str, Any] | None = None,
    now_resolved: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before, after): the settings of ``now`` (a :func:`config_key`) that differ from ``stored`` (a
    checkpoint's or finished run's); both empty when the run may continue. A key an older version
    did not store is not held against the run. ``compute_dtype`` is compared as resolved on each
    run's device (``*_resolved``: :func:`resolved_settings`) where both sides have it: ``auto`` that
    picks float32 is ``float32``, and ``auto`` on a device where it picks another dtype is a change,
    shown as ``auto (float32 on cpu) -> auto (bfloat16 on cuda)``; ``polish_steps`` likewise, as the
    polish it came to (:func:`_same_polish`)."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    resolved = (stored_resolved or {}).get("compute_dtype") and (now_resolved or {}).get("compute_dtype") and (
        stored.get("symmetry") == now.get("symmetry"))  # another solver: the symmetry is the change to name
    for key, value in now.items():
        if key not in stored:
            continue
        old = stored[key]
        if key == "compute_dtype" and resolved:
            if stored_resolved["compute_dtype"] == now_resolved["compute_dtype"]:  # type: ignore[index]
                continue
            old, value = _dtype_shown(old, stored_resolved), _dtype_shown(value, now_resolved)  # type: ignore[arg-type]
        elif old == value or (key == "polish_steps" and _same_polish(stored_resolved, now_resolved)):
            continue
        before[key], after[key] = old, value
    return before, after


def _same_polish(stored: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    """Whether two runs' polish came out the same (the steps it ran, or a cyclic code's L-BFGS on or
    off), where both recorded it: --polish-steps given as what its default comes to is no change."""
    for name in ("polish_steps", "lbfgs_polish"):
        if stored and now and name in stored and name in now:
            return stored[name] == now[name]
    return False


def _dtype_shown(given: Any, resolved: dict[str, Any]) -> _Shown:
    if given != "auto":
        return _Shown(given)
    return _Shown(f"auto ({resolved['compute_dtype']} on {resolved.get('device', 'an unknown device')})")


def pack(
    config: PackConfig,
    gallery: np.ndarray | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: float = 60.0,
    resume: bool = False,
    log_every: int | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> PackResult:
    """Optimise a packing and return the best iterate found.

    ``gallery`` must hold unit rows (see :func:`hyperface.common.io.load_embeddings`). "Best" is
    the lowest max cosine + reg_weight x mean squared gallery distance. With ``restarts`` > 1 each
    restart gets an equal share of the budget and a different seed; the best restart wins. With
    ``checkpoint_dir``, state is saved atomically every ``checkpoint_every`` seconds, on Ctrl-C
    or SIGTERM and at the end; ``resume=True`` continues from it (the same parameters are required).
    SIGTERM and a first Ctrl-C stop at the end of the current step, checkpoint and raise
    KeyboardInterrupt. ``history`` (and ``callback``) get an entry every ``log_every`` steps
    (default: about 300 entries per run).
    """
    cfg = config.resolved(gallery)
    check_checkpoint_every(checkpoint_every)
    device = resolve_device(cfg.device)
    dtype = choose_compute_dtype(cfg.compute_dtype, device)
    resolved = resolved_settings(cfg, device)
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(device) if gallery is not None else None
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None

    state: dict[str, Any] | None = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as exc:  # a checkpoint is written atomically, so this is real damage
            raise HyperfaceError(f"cannot read checkpoint {ckpt_path} ({exception_summary(exc)}); remove it or use --overwrite") from exc
        if not isinstance(state, dict) or "config_key" not in state or "restart" not in state:
            raise HyperfaceError(f"{ckpt_path} is not a hyperface pack checkpoint; remove it or use --overwrite")
        # what the chosen solver reads back; a checkpoint from before --symmetry existed has no
        # symmetry in its config_key, so the settings check alone lets it reach the other solver
        needs = ("run", "best_reps", "best_cos", "best_info") if cfg.symmetry == "cyclic" else (
            "run", "best_points", "best_score", "best_restart", "best_steps", "best_history")
        missing = [key for key in needs if key not in state]
        other = "none" if cfg.symmetry == "cyclic" else "cyclic"
        if missing and "symmetry" not in state["config_key"] and ("best_points" if other == "none" else "best_reps") in state:
            raise HyperfaceError(f"{ckpt_path} is a --symmetry {other} run (an older hyperface chose it for these "
                                 f"settings): add --symmetry {other} to continue it")
        if missing:
            raise HyperfaceError(
                f"{ckpt_path} cannot be continued as a --symmetry {cfg.symmetry} run (it lacks {', '.join(missing)}: "
                "another solver or another version of hyperface wrote it); pack again with --overwrite"
            )
        before, after = settings_changes(state["config_key"], config_key(cfg), state.get("resolved"), resolved)
        if before:
            raise resume_mismatch(ckpt_path.parent, before, after)
        log.info("resuming restart %d at step %d", state["restart"], (state["run"] or {}).get("step", 0))

    stop = StopRequest(log)
    try:
        if cfg.symmetry == "cyclic":
            return _pack_cyclic_restarts(cfg, device, ckpt_path, state, checkpoint_every, log_every, callback, stop,
                                         resolved=resolved)
        return _pack_restarts(cfg, gallery, gallery_t, device, dtype, ckpt_path, state, checkpoint_every, log_every,
                              callback, stop, resolved=resolved)
    finally:
        stop.restore()


def _pack_restarts(
    cfg: PackConfig,
    gallery: np.ndarray | None,
    gallery_t: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    ckpt_path: Path | None,
    state: dict[str, Any] | None,
    checkpoint_every: float,
    log_every: int | None,
    callback: Callable[[dict[str, float]], None] | None,
    stop: Any,
    *,
    resolved: dict[str, Any],
) -> PackResult:
    """``symmetry="none"``: each restart optimises all N points; the lowest exact score wins.
    ``resolved``: :func:`resolved_settings`, kept in each checkpoint (``--resume`` compares it)."""
    best: PackResult | None = None
    best_score = math.inf
    first = 0
    gallery_sha = array_sha256(gallery) if gallery is not None else None
    if state is not None:
        # the checkpoint was regularised towards one gallery: continuing towards another is another run
        if state.get("gallery_sha256", gallery_sha) != gallery_sha:  # checkpoints before this field: unknown
            raise HyperfaceError(
                f"cannot --resume {ckpt_path.parent if ckpt_path else 'the run'}: it was started with another "
                "gallery (its content differs); resume with the original --gallery, or --overwrite"
            )
        first = int(state["restart"])
        if state["best_points"] is not None:
            best = PackResult(points=state["best_points"].numpy(), config=cfg, history=state["best_history"],
                              restart=int(state["best_restart"]), steps_done=int(state["best_steps"]))
            best_score = float(state["best_score"])

    for restart in range(first, cfg.restarts):
        def save(run_state: dict[str, Any], restart: int = restart) -> None:
            if ckpt_path is None:
                return
            payload = {
                "config_key": config_key(cfg),
                "resolved": resolved,
                "gallery_sha256": gallery_sha,
                "restart": restart,
                "run": run_state,
                "best_points": None if best is None else torch.from_numpy(best.points),
                "best_score": best_score,
                "best_restart": 0 if best is None else best.restart,
                "best_steps": 0 if best is None else best.steps_done,
                "best_history": [] if best is None else best.history,
            }
            with atomic_write(ckpt_path, "wb") as handle:
                torch.save(payload, handle)

        run_state = state["run"] if state is not None and restart == first else None
        result, score = _pack_once(cfg, gallery, gallery_t, device, dtype, restart, run_state, save,
                                   checkpoint_every, log_every, callback, stop, warn_slow=restart == first)
        if score < best_score:
            best, best_score = result, score
        if cfg.restarts > 1:
            log.info("restart %d/%d: score %.6f (best %.6f; score = max cosine + reg_weight x gallery term)",
                     restart + 1, cfg.restarts, score, best_score)
    assert best is not None
    best.compute_dtype = str(dtype).replace("torch.", "")
    return best


def _pack_cyclic_restarts(
    cfg: PackConfig,
    device: torch.device,
    ckpt_path: Path | None,
    state: dict[str, Any] | None,
    checkpoint_every: float,
    log_every: int | None,
    callback: Callable[[dict[str, float]], None] | None,
    stop: Any = None,
    *,
    resolved: dict[str, Any],
) -> PackResult:
    """``symmetry="cyclic"``: each restart optimises a cyclic orbit code; the lowest max cosine wins.
    ``resolved``: :func:`resolved_settings`, kept in each checkpoint (``--resume`` compares it)."""
    from hyperface.packing.cyclic import expand_orbits, pack_cyclic

    num = cfg.num_identities
    best_reps, best_cos, best_info = None, math.inf, {}
    first = 0
    if state is not None:
        first = int(state["restart"])
        if state["best_reps"] is not None:
            best_reps, best_cos, best_info = state["best_reps"], float(state["best_cos"]), dict(state["best_info"])
    for restart in range(first, cfg.restarts):
        def save(run_state: dict[str, Any] | None, restart: int = restart) -> None:
            if ckpt_path is None:
                return
            payload = {"config_key": config_key(cfg), "resolved": resolved, "restart": restart, "run": run_state,
                       "best_reps": best_reps, "best_cos": best_cos, "best_info": best_info}
            with atomic_write(ckpt_path, "wb") as handle:
                torch.save(payload, handle)

        run = pack_cyclic(
            cfg, time_budget=None if cfg.time_budget is None else cfg.time_budget / cfg.restarts,
            seed=cfg.seed + 1_000_003 * restart, device=device,
            state=state["run"] if state is not None and restart == first else None,
            save=save, checkpoint_every=checkpoint_every, log_every=log_every, callback=callback, stop=stop,
            warn_slow=restart == first,
        )
        if run["max_cosine"] < best_cos:
            best_reps, best_cos = run["representatives"], run["max_cosine"]
            best_info = {"history": run["history"], "steps": run["adam_steps"], "seconds": run["seconds"],
                         "restart": restart, "polish_stages": run["polish_stages"]}
        if cfg.restarts > 1:
            log.info("restart %d/%d: max cosine %.6f (best %.6f)", restart + 1, cfg.restarts, run["max_cosine"], best_cos)
        if restart + 1 < cfg.restarts:
            save(None, restart + 1)  # no run state: a resume starts the next restart afresh
    assert best_reps is not None
    return PackResult(
        points=expand_orbits(best_reps, num), config=cfg, history=best_info["history"], steps_done=best_info["steps"],
        seconds=best_info["seconds"], best_step=best_info["steps"], restart=best_info["restart"],
        compute_dtype=CYCLIC_PRECISION, representatives=best_reps.numpy(),
    )


def _pack_once(
    cfg: PackConfig,
    gallery: np.ndarray | None,
    gallery_t: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    restart: int,
    state: dict[str, Any] | None,
    save: Callable[[dict[str, Any]], None],
    checkpoint_every: float,
    log_every: int | None,
    callback: Callable[[dict[str, float]], None] | None,
    stop: Any = None,
    warn_slow: bool = True,
) -> tuple[PackResult, float]:
    """One optimisation from one start; returns (best iterate, its exact score). ``warn_slow``: warn
    when a step takes much of the budget (see :func:`report_first_step`; once a run, not per restart)."""
    num, dim = cfg.num_identities, int(cfg.dim)  # type: ignore[arg-type]
    seed = cfg.seed + 1_000_003 * restart
    generator = torch.Generator().manual_seed(seed)
    if state is None:
        x0 = torch.from_numpy(initial_points(cfg.init, num, dim, np.random.default_rng(seed), gallery))
    else:
        x0 = state["points"]
    points = torch.nn.Parameter(x0.to(device=device, dtype=torch.float32).contiguous())
    optimizer = torch.optim.Adam([points], lr=1e-3, betas=(0.9, 0.99), eps=1e-12)
    objective = _Objective(cfg, gallery_t, dtype, generator)
    step, elapsed, history = 0, 0.0, []
    best_points, best_score, best_step = points.detach().clone(), math.inf, 0
    # a run killed after its last checkpoint (while its metrics or files were written): best_points
    # is already polished and chosen; polishing it again would not give the uninterrupted run's bits
    finished = bool(state.get("finished", False)) if state is not None else False
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = int(state["step"]), float(state["elapsed"]), list(state["history"])
        best_points, best_score, best_step = state["best_points"].to(device), float(state["best_score"]), int(state["best_step"])
        generator.set_state(state["generator"])
        objective.reference_cos = float(state["reference_cos"])

    def run_state(done: bool = False) -> dict[str, Any]:
        return {
            "points": points.detach().cpu(), "optimizer": optimizer.state_dict(), "step": step,
            "elapsed": elapsed, "history": history, "best_points": best_points.cpu(),
            "best_score": best_score, "best_step": best_step, "generator": generator.get_state(),
            "reference_cos": objective.reference_cos, "finished": done,
        }

    budget = cfg.time_budget / cfg.restarts if cfg.time_budget is not None else None
    polish_steps = _polish_steps(cfg)
    polishing = polish_steps > 0
    # The polish is part of the optimisation, so of the budget: Adam leaves it its share.
    adam_budget = budget * (1.0 - POLISH_SHARE) if budget is not None and polishing else budget

    def fraction() -> float:
        if cfg.steps is not None:
            return step / cfg.steps if cfg.steps else 1.0
        return elapsed / adam_budget  # type: ignore[operator]

    bar = budget_progress(cfg.steps, budget, step if cfg.steps else elapsed,
                          desc="pack" + (f" {restart + 1}/{cfg.restarts}" if cfg.restarts > 1 else ""))
    last_save, last_log = time.perf_counter(), elapsed
    polish_seconds = 0.0
    first_step = True
    # pure packing that --symmetry auto would have made a cyclic orbit code: --symmetry none was asked for
    cyclic_hint = (gallery is None and cfg.symmetry == "none" and cfg.init == "random" and cfg.mode == "exact"
                   and num >= CYCLIC_MIN_POINTS_PER_DIM * dim)
    try:
        while fraction() < 1.0:
            t0 = time.perf_counter()
            temperature, lr = anneal_schedule(cfg, fraction(), dim)
            x = points.detach()
            needs_lists = cfg.mode == "neighbors" or cfg.reg_weight > 0
            if needs_lists and (step % cfg.refresh_every == 0 or (objective.neighbor_index is None and objective.gallery_index is None)):
                objective.refresh(x)
            grad, max_cos = objective.gradient(x, temperature)
            penalty = objective.gallery_penalty(x)
            score = max_cos + cfg.reg_weight * penalty  # of the iterate before this update
            if score < best_score and cfg.mode != "stochastic":
                best_points, best_score, best_step = x.clone(), score, step
            sphere_adam_step(points, grad, optimizer, lr)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            # About 300 history points per run (for the convergence plot) unless told otherwise.
            due = (step % log_every == 0) if log_every else (
                step % max(1, cfg.steps // 300) == 0 if cfg.steps else elapsed - last_log >= adam_budget / 300  # type: ignore[operator]
            )
            if due or step == 1 or fraction() >= 1.0:
                last_log = elapsed
                entry = {
                    "step": step - 1, "seconds": round(elapsed, 3),
                    "min_angle_deg": math.degrees(math.acos(min(1.0, max(-1.0, max_cos)))),
                    "gallery_penalty": penalty, "temperature": temperature, "lr": lr,
                }
                history.append(entry)
                bar.set_postfix(angle=f"{entry['min_angle_deg']:.3f}", refresh=False)
                if callback is not None:
                    callback(entry)
            advance(bar, 1 if cfg.steps else dt)
            if first_step:
                first_step = False
                report_first_step(bar, dt, cfg, adam_budget=adam_budget if warn_slow else None, device=device,
                                  cyclic_hint=cyclic_hint)
            if time.perf_counter() - last_save >= checkpoint_every:
                save(run_state())
                last_save = time.perf_counter()
            if stop is not None and stop.requested:
                raise KeyboardInterrupt  # the step is complete: the handler below checkpoints it

        final = points.detach()
        if finished:
            final = best_points
        elif cfg.mode == "stochastic":  # batch maxima are not global: keep the last iterate
            best_points, best_step = final, step
        if polishing and not finished:
            save(run_state())  # the polish keeps no checkpoints: a kill during it resumes from here
            temperature, _ = anneal_schedule(cfg, 1.0, dim)
            start = best_points if best_score < math.inf else final
            if cfg.reg_weight > 0:
                objective.refresh(start.float())
            t0 = time.perf_counter()
            deadline = None if budget is None else t0 + max(0.0, budget - elapsed)
            final = _polish(objective, start.float(), temperature, polish_steps, deadline=deadline, stop=stop,
                            on_step=None if cfg.steps else (lambda seconds: advance(bar, seconds)))
            # Not added to elapsed, which the checkpoint keeps: a resume redoes the whole polish.
            polish_seconds = time.perf_counter() - t0
    except KeyboardInterrupt:
        save(run_state())  # during the polish too: it changes none of this state
        raise
    finally:
        bar.close()

    # Score the candidates exactly (float32, all pairs) and keep the better. Often they are one
    # (--steps 0, --mode stochastic, a resumed finished run): one all-pairs pass, not two (at
    # N = 200,000, d = 512 on a CPU each is minutes).
    if torch.equal(best_points.float(), final.float()):
        final_exact, final_max_cos = _exact_score(objective, final)
        best_points, best_exact, best_step = final, final_exact, step
    else:
        best_exact, _ = _exact_score(objective, best_points)
        final_exact, final_max_cos = _exact_score(objective, final)
        if final_exact <= best_exact:
            best_points, best_exact, best_step = final, final_exact, step
    if polish_seconds > 0:  # the polish's result, so the convergence curve reaches the end of the run
        history.append({"step": step, "seconds": round(elapsed + polish_seconds, 3), "phase": "polish",
                        "min_angle_deg": math.degrees(math.acos(min(1.0, max(-1.0, final_max_cos))))})
    save(run_state(done=True))
    result = PackResult(points=best_points.float().cpu().numpy(), config=cfg, history=history,
                        steps_done=step, seconds=elapsed + polish_seconds, best_step=best_step, restart=restart)
    return result, best_exact


def _exact_score(objective: _Objective, x: torch.Tensor) -> tuple[float, float]:
    """(the objective over all pairs, exactly; the max cosine alone)."""
    from hyperface.packing.geometry import pair_stats

    x = x.float()
    max_cos = float(pair_stats(x, ()).nn_cos.max())
    score = max_cos
    if objective.cfg.reg_weight > 0:
        objective.refresh(x)
        score += objective.cfg.reg_weight * objective.gallery_penalty(x)
    return score, max_cos
