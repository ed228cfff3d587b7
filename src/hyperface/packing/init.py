"""Starting points for packing: gallery rows (the paper's choice), random, a binary code, or a
cross-polytope (optimal for d + 1 < N <= 2d)."""

from __future__ import annotations

import math

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import duplicate_rows

INIT_METHODS = ("gallery", "random", "binary", "orthoplex")

# Primitive polynomials over GF(2) (bit masks, including x^m); primitivity is re-checked at run time.
_PRIMITIVE_POLYNOMIALS = {
    2: 0b111,
    3: 0b1011,
    4: 0b10011,
    5: 0b100101,
    6: 0b1000011,
    7: 0b10001001,
    8: 0b100011101,
    9: 0b1000010001,
    10: 0b10000001001,
    11: 0b100000000101,
    12: 0b1000001010011,
    13: 0b10000000011011,
    14: 0b100010001000011,
}


def random_init(num: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform points on the sphere (normalised Gaussians)."""
    x = rng.standard_normal((num, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gallery_init(num: int, gallery: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``num`` distinct gallery rows chosen at random (the paper's initialisation)."""
    check_init("gallery", num, gallery.shape[1], gallery.shape[0])
    rows = np.sort(rng.choice(gallery.shape[0], size=num, replace=False))
    x = np.array(gallery[rows], dtype=np.float32)
    # Identical rows (a gallery with duplicates) would have zero relative gradient forever.
    dup = duplicate_rows(x)
    if dup.any():
        x[dup] += 1e-3 * rng.standard_normal((int(dup.sum()), x.shape[1])).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _gf_log_tables(m: int) -> tuple[np.ndarray, np.ndarray]:
    q = 1 << m
    poly = _PRIMITIVE_POLYNOMIALS[m]
    exp = np.zeros(2 * q, dtype=np.int64)
    log = np.zeros(q, dtype=np.int64)
    value = 1
    for i in range(q - 1):
        if i > 0 and value == 1:
            raise AssertionError(f"polynomial {poly:#b} is not primitive for GF(2^{m})")
        exp[i] = value
        log[value] = i
        value <<= 1
        if value & q:
            value ^= poly
    exp[q - 1 : 2 * (q - 1)] = exp[: q - 1]
    return exp, log


def binary_code_capacity(dim: int) -> int:
    m = int(round(math.log2(dim))) if dim > 0 else 0
    # m >= 3: in GF(4) every nonzero cube is 1, so the cosets collapse.
    return 2 * dim * dim if (1 << m) == dim and m >= 3 and m in _PRIMITIVE_POLYNOMIALS else 0


def binary_code_init(num: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Points from the dual of the 2-error-correcting BCH code, extended to length ``dim = 2^m``.

    Codewords are c_{a,b}(x) = Tr(a x + b x^3) over x in GF(2^m), mapped to +-1/sqrt(dim); with
    their negatives that is 2 dim^2 points whose cosines (antipodes aside) are 0 or +-2^ceil(m/2+1)/dim
    (d=512: 2^19 points with |cos| <= 1/16, 86.42 degrees). Whole cosets (fixed b) are taken first; a
    seeded coordinate permutation and sign flip (an isometry) varies the code with the seed.
    """
    check_init("binary", num, dim)
    m = int(round(math.log2(dim)))
    q = dim
    exp, log = _gf_log_tables(m)
    elems = np.arange(q)

    def gf_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        out = exp[(log[a] + log[b]) % (q - 1)]
        return np.where((a == 0) | (b == 0), 0, out)

    # Absolute trace Tr(y) = y + y^2 + ... + y^(2^(m-1)), which lies in GF(2) = {0, 1}.
    trace = np.zeros(q, dtype=np.int64)
    power = elems.copy()
    for _ in range(m):
        trace ^= power
        power = gf_mul(power, power)
    trace_ax = trace[gf_mul(elems[:, None], elems[None, :])]  # [a, x] -> Tr(a x)
    cubes = gf_mul(gf_mul(elems, elems), elems)
    num_cosets = math.ceil(num / (2 * q))
    blocks = []
    for b in range(num_cosets):
        bits = trace_ax ^ (trace_ax[b][cubes][None, :] if b else 0)
        signs = (1 - 2 * bits).astype(np.float32)
        blocks.append(np.stack([signs, -signs], axis=1).reshape(2 * q, q))
    x = np.concatenate(blocks)[:num] / np.float32(math.sqrt(q))
    perm = rng.permutation(q)
    flips = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=q)
    return np.ascontiguousarray(x[:, perm] * flips[None, :])


def orthoplex_init(num: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` <= 2d vertices of a randomly rotated cross-polytope (+-e_i): every pair at 90 or 180
    degrees. For d + 1 < N <= 2d that is the optimum (Rankin: no N > d + 1 points beat 90 degrees)."""
    check_init("orthoplex", num, dim)
    axes = np.arange(num) // 2
    signs = np.where(np.arange(num) % 2 == 0, 1.0, -1.0)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return np.ascontiguousarray((signs[:, None] * rotation[axes]).astype(np.float32))


def check_init(method: str, num: int, dim: int, gallery_rows: int | None = None) -> None:
    """Raise HyperfaceError if ``method`` cannot start ``num`` points in ``dim``-d (checked before a
    run touches its output folder; ``gallery_rows``: the gallery's size, None without one)."""
    if method not in INIT_METHODS:
        raise HyperfaceError(f"unknown --init {method!r}: choose one of {', '.join(INIT_METHODS)}")
    if method == "gallery":
        if gallery_rows is None:
            raise HyperfaceError("--init gallery needs --gallery G.npy (or choose --init random/binary)")
        if num > gallery_rows:
            raise HyperfaceError(
                f"--init gallery needs at least as many gallery embeddings as identities "
                f"({gallery_rows} < {num}): embed more images, or use --init random"
            )
    elif method == "binary":
        capacity = binary_code_capacity(dim)
        if capacity == 0:
            raise HyperfaceError(
                f"--init binary needs a power-of-two dimension between 8 and 16384, got {dim}; use --init random"
            )
        if num > capacity:
            raise HyperfaceError(f"--init binary gives at most {capacity} points in {dim}-d, asked for {num}")
    elif method == "orthoplex" and num > 2 * dim:
        raise HyperfaceError(f"--init orthoplex holds at most 2d = {2 * dim} points, not {num}")


def initial_points(
    method: str, num: int, dim: int, rng: np.random.Generator, gallery: np.ndarray | None = None
) -> np.ndarray:
    check_init(method, num, dim, None if gallery is None else gallery.shape[0])
    if method == "gallery":
        return gallery_init(num, gallery, rng)
    if method == "random":
        return random_init(num, dim, rng)
    if method == "binary":
        return binary_code_init(num, dim, rng)
    return orthoplex_init(num, dim, rng)
