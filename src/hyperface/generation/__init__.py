"""Generation stage: identity embeddings -> a face-recognition dataset rendered with Arc2Face.

- :class:`IdentityGenerator`: the interface (embeddings + seeds -> images); :class:`Arc2FaceGenerator`
  is its implementation (:mod:`hyperface.generation.arc2face`).
- :func:`generate_dataset` / :func:`render_shard` / :func:`merge_parts`: batched, filtered, sharded,
  resumable rendering into an image folder and/or insightface RecordIO (:mod:`.dataset`).
- :func:`image_seed` and :class:`Perturbation`: per-image determinism and intra-class variation.

Heavy dependencies (torch, diffusers, transformers) are imported when used, not here.
"""

from hyperface.generation.base import IdentityGenerator
from hyperface.generation.dataset import FORMATS, GenerationConfig, Shard, generate_dataset, merge_parts, render_shard
from hyperface.generation.variation import PERTURBATIONS, Perturbation, image_seed


def __getattr__(name: str):
    # Arc2Face pulls in torch/diffusers/transformers: import it lazily.
    if name in ("Arc2FaceGenerator", "Arc2FaceSettings", "Arc2FacePromptEncoder", "load_arc2face_components"):
        from hyperface.generation import arc2face

        return getattr(arc2face, name)
    raise AttributeError(f"module 'hyperface.generation' has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "PERTURBATIONS",
    "Arc2FaceGenerator",
    "Arc2FacePromptEncoder",
    "Arc2FaceSettings",
    "GenerationConfig",
    "IdentityGenerator",
    "Perturbation",
    "Shard",
    "generate_dataset",
    "image_seed",
    "load_arc2face_components",
    "merge_parts",
    "render_shard",
]
