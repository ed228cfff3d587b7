"""Verification .bin files as insightface stores them: a pickle of (encoded images, issame list)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from hyperface.datasets import encode_image


def write_verification_bin(path: Path, images: np.ndarray, issame, protocol: int = 2) -> None:
    """``images`` (2N, H, W, 3) uint8 RGB, pair i = images[2i], images[2i+1]; PNG-encoded like the real files' JPEGs."""
    bins = [encode_image(image, image_format="png") for image in images]
    Path(path).write_bytes(pickle.dumps((bins, [bool(s) for s in issame]), protocol=protocol))


def write_noisy_pairs_bin(path: Path, n_pairs: int, seed: int, noise: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A .bin whose 'same' pairs are one random face plus +-noise and 'different' pairs are unrelated."""
    rng = np.random.default_rng(seed)
    issame = np.arange(n_pairs) % 2 == 0
    faces = []
    for same in issame:
        base = rng.integers(0, 256, (112, 112, 3)).astype(np.int16)
        other = base + rng.integers(-noise, noise + 1, base.shape) if same else rng.integers(0, 256, base.shape)
        faces += [np.clip(base, 0, 255).astype(np.uint8), np.clip(other, 0, 255).astype(np.uint8)]
    faces = np.stack(faces)
    write_verification_bin(path, faces, issame)
    return faces, issame
