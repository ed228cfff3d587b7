"""The interface every identity-conditioned face generator implements.

A generator turns one conditioning embedding and one seed per image into one RGB image each. The
dataset runner (:mod:`hyperface.generation.dataset`) only talks to this interface, so adding another
generator (a different diffusion model, a GAN) is one new module with one class.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class IdentityGenerator(Protocol):
    """Renders faces from FR embeddings.

    ``generate(embeddings, seeds)``: ``embeddings`` is (B, embedding_dim) float32, unit rows (one per
    image, already perturbed for intra-class variation); ``seeds`` holds B ints, the diffusion seed of
    each image. Returns B uint8 RGB arrays (H, W, 3). Image ``i`` must depend only on
    ``(embeddings[i], seeds[i])``, never on the rest of the batch, so any image can be regenerated
    alone (up to floating-point noise).
    """

    embedding_dim: int
    resolution: int

    def generate(self, embeddings: np.ndarray, seeds: Sequence[int]) -> list[np.ndarray]: ...


__all__ = ["IdentityGenerator"]
