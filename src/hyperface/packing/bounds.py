"""Limits to print beside a packing: the best any code could do, and what random points give.

- :func:`levenshtein_bound_deg`: an upper bound on the minimum pairwise angle of ``N`` points on the
  sphere ``S^(d-1)``, from Delsarte's linear-programming bound with normalised Gegenbauer
  polynomials. Levenshtein's bounds are the optimal LP solutions of each degree, so solving the LP
  numerically with enough degrees reproduces them (d=512: N=1e4 -> 88.64, 1e5 -> 87.62,
  1e6 -> 86.96 degrees; d=3, N=12 -> 63.43, the icosahedron, which attains it).
- :func:`random_min_angle_deg`: the expected minimum angle of ``N`` independent uniform points.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _lp_code_size_bound(dim: int, max_cos: float, degree: int, grid: int) -> float:
    """Delsarte LP: max size of a code in S^(dim-1) with all pair cosines <= max_cos."""
    from scipy.optimize import linprog
    from scipy.special import eval_gegenbauer

    lam = (dim - 2) / 2.0
    # Dense near max_cos, where the constraint binds, and uniform in angle over the rest.
    ts = np.concatenate(
        [np.linspace(-1.0, max_cos, grid), np.cos(np.linspace(math.acos(max_cos), math.pi, grid))]
    )
    if dim == 2:  # Gegenbauer with lambda=0 degenerates: use Chebyshev T_k(t) = cos(k acos t)
        basis = np.stack([np.cos(k * np.arccos(ts)) for k in range(1, degree + 1)], axis=1)
    else:
        basis = np.stack(
            [eval_gegenbauer(k, lam, ts) / eval_gegenbauer(k, lam, 1.0) for k in range(1, degree + 1)], axis=1
        )
    # f(t) = 1 + sum_k f_k P_k(t) <= 0 on [-1, max_cos], f_k >= 0  =>  N <= f(1) = 1 + sum_k f_k.
    result = linprog(
        np.ones(degree), A_ub=basis, b_ub=-np.ones(len(ts)), bounds=[(0, None)] * degree, method="highs"
    )
    return 1.0 + result.fun if result.status == 0 else math.inf


def lp_degree(num_points: int, dim: int) -> int:
    """Polynomial degree the LP needs: Levenshtein's bound for N points uses a degree that grows like
    N^(1/(d-1)), so 12 suffices from d ~ 8 up (d = 512: the published values), but not in low
    dimensions (d = 3, N = 1000: 20.06 degrees at degree 12, 6.94 at 64). Capped at 64 (~10 s)."""
    return int(min(64, max(12, math.ceil(2.0 * num_points ** (1.0 / max(1, dim - 1))))))


@functools.lru_cache(maxsize=256)
def levenshtein_bound_deg(num_points: int, dim: int, degree: int | None = None, grid: int = 1500) -> float:
    """Upper bound (degrees) on the minimum pairwise angle of ``num_points`` unit vectors in R^dim
    (``degree``: of the LP's polynomials, default :func:`lp_degree`)."""
    if num_points < 2 or dim < 2:
        raise ValueError("need at least 2 points in at least 2 dimensions")
    degree = lp_degree(num_points, dim) if degree is None else degree
    if num_points <= dim + 1:  # the regular simplex is optimal and known in closed form
        return math.degrees(math.acos(-1.0 / (num_points - 1)))
    if dim == 2:
        return 360.0 / num_points
    lo, hi = -1.0 / (num_points - 1), 1.0  # LP(lo) < N <= LP(hi)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _lp_code_size_bound(dim, mid, degree, grid) >= num_points:
            hi = mid
        else:
            lo = mid
    return math.degrees(math.acos(hi))


@functools.lru_cache(maxsize=256)
def random_min_angle_deg(num_points: int, dim: int) -> float:
    """Expected minimum pairwise angle (degrees) of ``num_points`` i.i.d. uniform unit vectors.

    Treats the N(N-1)/2 pair angles as independent (accurate for the large-N tail that sets the
    minimum): P(min angle > a) = (1 - p(a))^M with p(a) = P(one pair's angle < a), integrated over a
    grid geometric in the angle. (A grid uniform in the cosine could not resolve angles below ~0.1
    degree: d = 2, N = 1000 gave 0.128 instead of 0.00036 degrees.)
    """
    from scipy.special import betainc

    pairs = num_points * (num_points - 1) / 2.0
    angles = np.concatenate([[0.0], np.geomspace(1e-12, math.pi, 20001)])
    # One pair: P(angle < a) = 0.5 * I_{sin^2 a}((d-1)/2, 1/2) up to 90 degrees, symmetric above.
    half = 0.5 * betainc((dim - 1) / 2.0, 0.5, np.sin(angles) ** 2)
    below = np.where(angles <= math.pi / 2, half, 1.0 - half)
    with np.errstate(divide="ignore"):
        survive = np.exp(pairs * np.log1p(-np.minimum(below, 1.0)))
    return math.degrees(float(np.trapezoid(survive, angles)))
