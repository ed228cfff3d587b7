"""Cyclic orbit codes: pure packing with N points made of K = ceil(N / d) representatives and all
their cyclic coordinate shifts.

Shifting coordinates is an orthogonal map, so the cosine between two points of the code depends
only on the two representatives and the relative shift: the K^2 d / 2 distinct values are cyclic
cross-correlations, all of them from one FFT per representative. A step therefore costs
O(K^2 d log d) instead of O(N^2 d), about d times less work for the same number of degrees of
freedom per constraint. Steps become cheap enough for an exact quasi-Newton finish (L-BFGS on
the smooth objective, annealing the temperature), which the unconstrained solver cannot afford
at N = 10,000. The result is better as well as faster:
N = 10,000, d = 512 reaches 87.03 deg in under a minute on 2 CPU cores, against 86.89 deg for the
unconstrained solver in the same time.

The symmetry is the price: identities come in orbits of d cyclic shifts of one vector. That is
harmless for pure packing, but it is not what a gallery term wants (each identity near its own
face), so ``symmetry="auto"`` uses it only for pure packing of at least 12 d points
(``CYCLIC_MIN_POINTS_PER_DIM``), from a random start.

Objective and schedule are the unconstrained solver's (see :mod:`hyperface.packing.solver`):
T * logsumexp of all pair cosines, projected Adam with the step as an angle / sqrt(d), then
L-BFGS stages at a temperature that shrinks by ``POLISH_DECAY`` per stage.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from hyperface.common.runtime import get_logger
from hyperface.packing.solver import PackConfig, advance, anneal_schedule, budget_progress, report_first_step, sphere_adam_step

log = get_logger("hyperface.packing")

#: Adam's share of a --time-budget (the rest polishes with L-BFGS).
ADAM_SHARE = 0.5
#: Temperature factor between L-BFGS stages, and the iterations each stage may take.
POLISH_DECAY = 0.7
POLISH_ITERATIONS = 100
#: Polish stops after this many stages (or once a stage gains less than POLISH_TOLERANCE in cosine).
POLISH_MAX_STAGES = 40
POLISH_TOLERANCE = 1e-7
#: Correlation entries evaluated at once (K x K x d grows as N^2 / d): 2^26 floats, 256 MiB.
BLOCK_ELEMENTS = 1 << 26
#: ... on a CPU at most this many: each block's buffers are fresh mmap'd memory there (glibc maps
#: anything over 32 MiB anew), and at 2^26 faulting their pages in took 3/4 of the time (N = 200,000,
#: d = 512: 3.0 s an evaluation, 2.2 s of it in the kernel; 0.67 s with 2^20-entry blocks).
CPU_BLOCK_ELEMENTS = 1 << 20


def num_representatives(num_points: int, dim: int) -> int:
    return math.ceil(num_points / dim)


def expand_orbits(reps: torch.Tensor | np.ndarray, num_points: int) -> np.ndarray:
    """(K, d) representatives -> the first ``num_points`` of their K * d cyclic shifts, float32.

    Row k * d + s is representative k rolled by s coordinates.
    """
    reps = torch.as_tensor(reps, dtype=torch.float32).cpu()
    num_reps, dim = reps.shape
    if num_points > num_reps * dim:
        raise ValueError(f"{num_reps} representatives in {dim}-d give at most {num_reps * dim} points, not {num_points}")
    shift_index = (torch.arange(dim)[None, :] - torch.arange(dim)[:, None]) % dim  # [s, t] -> (t - s) mod d
    out = np.empty((num_points, dim), dtype=np.float32)
    chunk = max(1, (1 << 24) // (dim * dim))  # orbits per gather: 64 MiB of float32 at a time
    for k0 in range(0, num_reps, chunk):
        start = k0 * dim
        if start >= num_points:
            break
        rolled = reps[k0 : k0 + chunk][:, shift_index].reshape(-1, dim)  # row (k, s) = reps[k] rolled by s
        take = min(len(rolled), num_points - start)
        out[start : start + take] = rolled[:take].numpy()
    return out


def _blocks(num_reps: int, dim: int, device: torch.device | str = "cpu") -> list[tuple[int, int]]:
    elements = BLOCK_ELEMENTS if torch.device(device).type == "cuda" else min(BLOCK_ELEMENTS, CPU_BLOCK_ELEMENTS)
    rows = max(1, elements // (num_reps * dim))
    return [(k0, min(num_reps, k0 + rows)) for k0 in range(0, num_reps, rows)]


def _block_correlations(spectrum: torch.Tensor, k0: int, k1: int, dim: int) -> torch.Tensor:
    """corr[k - k0, l, s] = <y_k, roll(y_l, -s)> for k in [k0, k1), every l and s, with the
    trivial entries (k = l, s = 0: a point with itself) set to -inf."""
    corr = torch.fft.irfft(spectrum[k0:k1].conj()[:, None, :] * spectrum[None, :, :], n=dim, dim=2)
    rows = torch.arange(k1 - k0, device=corr.device)
    return corr.index_put((rows, rows + k0, torch.zeros_like(rows)), torch.tensor(-math.inf, dtype=corr.dtype, device=corr.device))


def orbit_pair_stats(reps: torch.Tensor | np.ndarray, num_points: int, thresholds: tuple[float, ...] = (0.3, 0.4)):
    """:func:`~hyperface.packing.geometry.pair_stats` of ``expand_orbits(reps, num_points)`` from the
    representatives alone, exact (float64 correlations), without its N^2 d all-pairs pass.

    Every point of a full orbit sees the same cosines (a cyclic shift is an isometry), so its
    nearest neighbour and its pairs above a threshold come from the K^2 d correlations. Only the
    last orbit may be cut short (N not a multiple of d): what a point sees of it is a circular
    window of its correlations, taken with a sliding window. At N = 1M, d = 512 this is seconds
    instead of hours on a CPU. ``nn_index`` is not computed (None).
    """
    from hyperface.packing.geometry import PairStats

    reps64 = torch.as_tensor(np.asarray(reps, dtype=np.float32)).double().cpu()
    num_reps, dim = reps64.shape
    last = num_points - (num_reps - 1) * dim  # points in the last orbit, 1..d
    if not 1 <= last <= dim:
        raise ValueError(f"{num_reps} representatives in {dim}-d do not give {num_points} points")
    full = num_reps if last == dim else num_reps - 1  # orbits with all d shifts
    spectrum = torch.fft.rfft(reps64, dim=1)
    nn_full = np.empty(num_reps)  # best cosine to any point of a full orbit, per representative
    count_full = {t: np.zeros(num_reps, dtype=np.int64) for t in thresholds}
    window = np.empty((num_reps, dim)) if full < num_reps else None  # best cosine into the cut orbit, per shift
    window_count = {t: np.zeros((num_reps, dim), dtype=np.int64) for t in thresholds} if full < num_reps else {}
    for k0, k1 in _blocks(num_reps, dim):
        corr = _block_correlations(spectrum, k0, k1, dim).numpy()  # [k, l, u] = cos((k, s), (l, s - u))
        seen = corr[:, :full].reshape(k1 - k0, -1)
        nn_full[k0:k1] = seen.max(axis=1) if full else -math.inf
        for t in thresholds:
            count_full[t][k0:k1] = (seen > t).sum(axis=1)
        if window is not None:
            # point (k, s) sees the cut orbit's shifts s' < last, i.e. u = s - s' in the circular
            # window [s - last + 1, s]: slide a window of `last` over the extended correlations
            c = corr[:, full]
            ext = np.concatenate([c[:, dim - (last - 1) :], c], axis=1) if last > 1 else c
            view = np.lib.stride_tricks.sliding_window_view(ext, last, axis=1)  # (k, d, last)
            window[k0:k1] = view.max(axis=2)
            for t in thresholds:
                window_count[t][k0:k1] = (view > t).sum(axis=2)
    sizes = np.full(num_reps, dim)
    sizes[-1] = last
    nn_parts, counts = [], {t: 0 for t in thresholds}
    for k in range(num_reps):
        best = np.full(sizes[k], nn_full[k])
        if window is not None:
            best = np.maximum(best, window[k, : sizes[k]])
        nn_parts.append(best)
        for t in thresholds:  # ordered pairs: every unordered pair is counted from both ends
            counts[t] += int(sizes[k]) * int(count_full[t][k]) + (int(window_count[t][k, : sizes[k]].sum()) if window is not None else 0)
    return PairStats(
        nn_cos=torch.from_numpy(np.concatenate(nn_parts)).float(), nn_index=None,
        pairs_above={t: c // 2 for t, c in counts.items()}, num_pairs=num_points * (num_points - 1) // 2,
    )


def max_cosine(reps: torch.Tensor) -> float:
    """The largest cosine between two distinct points of the code (exact, in reps' dtype)."""
    with torch.no_grad():
        num_reps, dim = reps.shape
        spectrum = torch.fft.rfft(reps, dim=1)
        return max(float(_block_correlations(spectrum, k0, k1, dim).max()) for k0, k1 in _blocks(num_reps, dim, reps.device))


def smooth_max(params: torch.Tensor, temperature: float, *, normalize: bool) -> tuple[float, float]:
    """T * logsumexp of every pair cosine of the code, and its gradient into ``params.grad``.

    Each unordered pair of points appears d times per ordered pair of orbits, which shifts the
    value by a constant only. When the correlations fit one block this is one autograd pass;
    otherwise two passes over row blocks keep memory at one block whatever K: the first streams
    the max and the normaliser, the second back-propagates each block's share (exp((c - lse) / T)
    is the softmax weight, so its gradient is the block's part of the total). Returns (value, max
    cosine).
    """
    num_reps, dim = params.shape
    blocks = _blocks(num_reps, dim, params.device)

    def unit() -> torch.Tensor:
        return params / params.norm(dim=1, keepdim=True) if normalize else params

    params.grad = None
    if len(blocks) == 1:
        corr = _block_correlations(torch.fft.rfft(unit(), dim=1), 0, num_reps, dim)
        value = temperature * torch.logsumexp(corr.flatten() / temperature, 0)
        value.backward()
        return value.item(), corr.detach().max().item()
    with torch.no_grad():
        spectrum = torch.fft.rfft(unit(), dim=1)
        peak, total = -math.inf, 0.0
        for k0, k1 in blocks:
            corr = _block_correlations(spectrum, k0, k1, dim)
            block_peak = corr.max().item()
            if block_peak > peak:  # rescale what was summed against the old peak
                total *= math.exp((peak - block_peak) / temperature)
                peak = block_peak
            total += torch.exp((corr - peak) / temperature).sum().item()
    lse = peak + temperature * math.log(total)
    for k0, k1 in blocks:
        corr = _block_correlations(torch.fft.rfft(unit(), dim=1), k0, k1, dim)
        (temperature * torch.exp((corr - lse) / temperature).sum()).backward()
    return lse, peak


class _OutOfTime(Exception):
    """Raised inside an L-BFGS closure once the time budget is spent."""


def pack_cyclic(
    cfg: PackConfig,
    *,
    time_budget: float | None,
    seed: int,
    device: torch.device,
    state: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: float = 60.0,
    log_every: int | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
    stop: Any = None,
    warn_slow: bool = True,
) -> dict[str, Any]:
    """Optimise a cyclic orbit code for ``cfg`` (resolved); returns representatives, points, history
    and counts.

    Adam runs ``cfg.steps`` steps, or ``ADAM_SHARE`` of ``time_budget`` (one restart's share), with
    the unconstrained solver's schedule; then, unless ``cfg.polish_steps == 0``, L-BFGS stages
    (float64) run until they converge or the budget is spent (a stage the budget cuts short is in
    the history too, marked ``partial``). ``save(state)`` is called every
    ``checkpoint_every`` seconds, after each polish stage and on Ctrl-C; passing that ``state``
    back continues the run (bit-identically with ``steps``). Deterministic for a seed and device
    with ``steps``. Once ``stop.requested`` (SIGTERM, Ctrl-C), saves and raises KeyboardInterrupt
    at the end of the Adam step or L-BFGS evaluation. ``warn_slow``: warn when the first Adam step
    takes much of the budget (:func:`~hyperface.packing.solver.report_first_step`).
    """
    num_points, dim, steps, polish = cfg.num_identities, int(cfg.dim), cfg.steps, cfg.polish_steps != 0  # type: ignore[arg-type]
    num_reps = num_representatives(num_points, dim)
    generator = torch.Generator().manual_seed(seed)
    reps = torch.randn(num_reps, dim, generator=generator, dtype=torch.float32)
    params = torch.nn.Parameter((reps / reps.norm(dim=1, keepdim=True)).to(device))
    optimizer = torch.optim.Adam([params], lr=1e-3, betas=(0.9, 0.99), eps=1e-12)
    adam_budget = None if time_budget is None else ADAM_SHARE * time_budget
    history: list[dict[str, float]] = []
    best_cos, best = math.inf, params.detach().clone()
    step, elapsed, stages = 0, 0.0, 0
    polish_v: torch.Tensor | None = None
    polish_temperature, _ = anneal_schedule(cfg, 1.0, dim)
    converged = False
    if state is not None:
        with torch.no_grad():
            params.copy_(state["params"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, stages = int(state["step"]), float(state["elapsed"]), int(state["stages"])
        history, best_cos, best = list(state["history"]), float(state["best_cos"]), state["best"].to(device)
        polish_v = state["polish_v"].to(device) if state["polish_v"] is not None else None
        polish_temperature, converged = float(state["polish_temperature"]), bool(state["converged"])
    def snapshot() -> dict[str, Any]:
        return {"params": params.detach().cpu(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                "stages": stages, "history": history, "best_cos": best_cos, "best": best.cpu(),
                "polish_v": None if polish_v is None else polish_v.cpu(), "polish_temperature": polish_temperature,
                "converged": converged}

    def record(phase: str, cos: float, temperature: float, **extra: float) -> None:
        entry = {"step": step, "seconds": round(elapsed, 3), "phase": phase,
                 "min_angle_deg": math.degrees(math.acos(min(1.0, max(-1.0, cos)))), "temperature": temperature, **extra}
        history.append(entry)
        if callback is not None:
            callback(entry)

    def fraction() -> float:
        return step / steps if steps is not None else elapsed / adam_budget  # type: ignore[operator]

    # In seconds the bar spans the whole budget, the L-BFGS finish included.
    bar = budget_progress(steps, time_budget, step if steps else elapsed, desc="pack (cyclic)")
    last_save = time.perf_counter()
    first_step = True
    try:
        while polish_v is None and fraction() < 1.0:
            t0 = time.perf_counter()
            temperature, lr = anneal_schedule(cfg, fraction(), dim)
            _, cos = smooth_max(params, temperature, normalize=False)
            if cos < best_cos:
                best_cos, best = cos, params.detach().clone()
            sphere_adam_step(params, params.grad, optimizer, lr)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            every = log_every or max(1, (steps or 3000) // 300)
            if step == 1 or step % every == 0:
                record("adam", cos, temperature, lr=lr)
                bar.set_postfix(angle=f"{math.degrees(math.acos(min(1.0, cos))):.3f}", refresh=False)
            advance(bar, 1 if steps else dt)
            if first_step:
                first_step = False
                report_first_step(bar, dt, cfg, adam_budget=adam_budget if warn_slow else None, device=device)
            if save is not None and time.perf_counter() - last_save >= checkpoint_every:
                save(snapshot())
                last_save = time.perf_counter()
            if stop is not None and stop.requested:
                raise KeyboardInterrupt  # the step is complete: the handler below saves it
        if polish_v is None:
            final = max_cosine(params.detach())
            if final < best_cos:
                best_cos, best = final, params.detach().clone()
            # L-BFGS on unconstrained v (points v / |v|), float64: the smooth objective is resolved
            # to ~1e-7 in cosine here, below what float32 correlations can tell apart.
            polish_v = best.double().clone()
            if save is not None:
                save(snapshot())
        deadline = None if time_budget is None else time.perf_counter() + max(0.0, time_budget - elapsed)
        while polish and not converged and stages < POLISH_MAX_STAGES and (deadline is None or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            v = torch.nn.Parameter(polish_v.clone())
            lbfgs = torch.optim.LBFGS([v], lr=1, max_iter=POLISH_ITERATIONS, history_size=20,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)

            def closure(t: float = polish_temperature) -> torch.Tensor:
                if stop is not None and stop.requested:
                    raise KeyboardInterrupt  # saved below with polish_v, this stage's start
                if deadline is not None and time.perf_counter() > deadline:
                    raise _OutOfTime
                value, _ = smooth_max(v, t, normalize=True)
                return torch.tensor(value, dtype=torch.float64)

            out_of_time = False
            try:
                lbfgs.step(closure)
            except _OutOfTime:  # keep the stage's last point only if it is better (checked below)
                out_of_time = True
            candidate = v.detach() / v.detach().norm(dim=1, keepdim=True)
            cos = max_cosine(candidate)
            stage_seconds = time.perf_counter() - t0
            elapsed += stage_seconds
            if not steps:
                advance(bar, stage_seconds)
            if out_of_time:
                if cos < best_cos:
                    best_cos, best = cos, candidate.float()
                # on the curve too, to the end of the budget: the angle the run keeps (a stage cut short
                # can stop on a line-search trial point, worse than its start)
                record("polish", best_cos, polish_temperature, stage=stages + 1, partial=True)
                break
            # All state first, then report: an interrupt inside the callback saves a consistent state.
            stages += 1
            converged = best_cos - cos < POLISH_TOLERANCE and stages > 3
            polish_v = candidate
            if cos < best_cos:
                best_cos, best = cos, candidate.float()
            stage_temperature, polish_temperature = polish_temperature, polish_temperature * POLISH_DECAY
            record("polish", cos, stage_temperature, stage=stages)
            if save is not None:
                save(snapshot())
    except KeyboardInterrupt:
        if save is not None:
            save(snapshot())
        raise
    finally:
        bar.close()
    best = best.float()
    return {
        "representatives": best.cpu(),
        "points": expand_orbits(best, num_points),
        "history": history,
        "adam_steps": step,
        "polish_stages": stages,
        "seconds": elapsed,
        "max_cosine": max_cosine(best.double()),
    }
