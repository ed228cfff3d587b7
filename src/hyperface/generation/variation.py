"""Intra-class variation: every image is a pure function of (global seed, identity, image index).

The per-image seed is a hash of the triple, so shards, retries and reruns never collide and any
single image can be regenerated alone. It seeds both the diffusion noise and the perturbation of the
identity embedding (a rotation by a fixed angle in a random direction, or Gaussian noise of a given
scale), which is normalised back onto the unit sphere.
"""

from __future__ import annotations

import math

import hashlib
from dataclasses import dataclass

import numpy as np

from hyperface.common.errors import HyperfaceError

PERTURBATIONS = ("angle", "noise", "none")


def image_seed(global_seed: int, identity: int, image_index: int) -> int:
    """A 63-bit seed for one image, independent of batch, shard and order."""
    key = f"hyperface-generate:{int(global_seed)}:{int(identity)}:{int(image_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Perturbation:
    """How an identity embedding is varied per image.

    - ``angle``: rotate by exactly ``scale`` degrees towards a random direction orthogonal to the
      reference (every image's conditioning has cosine cos(scale) to the reference);
    - ``noise``: add isotropic Gaussian noise with per-coordinate std ``scale / sqrt(d)`` (so
      ``scale`` is the expected noise norm), then renormalise;
    - ``none``: the reference itself; variation comes from the diffusion seed alone.
    """

    kind: str = "angle"
    scale: float = 10.0

    def __post_init__(self):
        if self.kind not in PERTURBATIONS:
            raise HyperfaceError(f"unknown --perturbation {self.kind!r}; choose from {', '.join(PERTURBATIONS)}")
        if not math.isfinite(self.scale) or self.scale < 0 or (self.kind == "angle" and self.scale > 90):  # NaN too
            raise HyperfaceError(f"--perturbation-scale must be in [0, 90] degrees for angle, >= 0 for noise; got {self.scale}")

    def apply(self, reference: np.ndarray, seed: int) -> np.ndarray:
        """Perturb one unit vector ``reference`` (d,) with randomness drawn from ``seed``; unit output."""
        reference = np.asarray(reference, dtype=np.float64)
        reference = reference / np.linalg.norm(reference)
        if self.kind == "none" or self.scale == 0:
            return reference.astype(np.float32)
        rng = np.random.default_rng(seed)
        direction = rng.standard_normal(reference.shape[0])
        if self.kind == "angle":
            direction -= direction.dot(reference) * reference  # orthogonal to the reference
            direction /= np.linalg.norm(direction)
            theta = np.deg2rad(self.scale)
            out = np.cos(theta) * reference + np.sin(theta) * direction
        else:
            out = reference + direction * (self.scale / np.sqrt(reference.shape[0]))
        return (out / np.linalg.norm(out)).astype(np.float32)


__all__ = ["PERTURBATIONS", "Perturbation", "image_seed"]
