"""After rendering: align each image to the 112x112 ArcFace crop, and score it with an FR model.

Alignment modes:

- ``ffhq`` (default): Arc2Face renders face-centred, FFHQ-aligned images, so a fixed crop puts the
  landmarks on the ArcFace template without a detector (and never fails on a tight crop);
- ``detect``: SCRFD landmarks + similarity transform (``--detector det_10g.onnx``); an image where no
  face is found falls back to the fixed crop and is counted in the statistics;
- ``none``: keep the full render; the quality filter still scores its fixed crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from hyperface.common.errors import HyperfaceError

ALIGN_MODES = ("ffhq", "detect", "none")

#: ``aligner(image_rgb) -> (stored image, 112x112 crop for the FR model, no_face flag)``.
Aligner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, bool]]
#: ``embed_fn(uint8 (N,112,112,3) RGB) -> (N, D)`` embeddings (normalised here).
EmbedFn = Callable[[np.ndarray], np.ndarray]


def make_aligner(mode: str = "ffhq", *, detector: str | Path | None = None, size: int = 112) -> Aligner:
    """Build the post-render aligner for ``mode`` (see the module docstring)."""
    if mode not in ALIGN_MODES:
        raise HyperfaceError(f"unknown --align {mode!r}; choose from {', '.join(ALIGN_MODES)}")
    from hyperface.recognition.alignment import crop_ffhq

    if mode == "detect":
        if detector is None:
            raise HyperfaceError("--align detect needs --detector det_10g.onnx (insightface buffalo_l pack); or use --align ffhq")
        from hyperface.recognition.detection import load_detector
        from hyperface.recognition.preprocess import FacePreprocessor

        preprocessor = FacePreprocessor("detect", detector=load_detector(detector), size=size)

        def align_detect(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
            face = preprocessor(image)
            if face is None:
                crop = crop_ffhq(image, size=size)
                return crop, crop, True
            return face, face, False

        return align_detect
    if detector is not None:
        raise HyperfaceError(f"--detector is only used with --align detect (got --align {mode})")

    def align_fixed(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        crop = crop_ffhq(image, size=size)
        return (image if mode == "none" else crop), crop, False

    return align_fixed


def load_embed_fn(fr_model: str | Path, *, device: str = "cpu", embedding_dim: int | None = None) -> tuple[EmbedFn, dict]:
    """An ``embed_fn`` from an FR model file (ONNX or iResNet .pth) via hyperface.recognition;
    ``embedding_dim``: the identities' dimension, checked now rather than at the first batch."""
    from hyperface.recognition import load_recognizer

    recognizer = load_recognizer(fr_model, device=device)
    if embedding_dim is not None and recognizer.embedding_size != embedding_dim:
        raise HyperfaceError(
            f"--fr-model {fr_model} gives {recognizer.embedding_size}-d embeddings but the identities are "
            f"{embedding_dim}-d: use the FR model the identities came from (for Arc2Face: its arcface.onnx)"
        )
    size = getattr(recognizer, "input_size", 112)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if int(size) != 112:
        raise HyperfaceError(f"--fr-model {fr_model} takes {size}px faces; the quality filter feeds 112x112 ArcFace crops")
    info = recognizer.describe() if hasattr(recognizer, "describe") else {"path": str(fr_model)}

    def embed_or_zero(crops: np.ndarray) -> np.ndarray:
        # A render the model returns NaN/inf features for scores cosine 0 (rejected at any positive
        # threshold) instead of stopping a long run; a whole batch of them is still an error.
        embeddings, good = recognizer.embed_valid(crops)
        out = np.zeros((len(crops), recognizer.embedding_size), dtype=np.float32)
        out[good] = embeddings
        return out

    return embed_or_zero, info


def cosine_to_references(embed_fn: EmbedFn, crops: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Cosine similarity between each crop's embedding and its identity's reference embedding."""
    features = np.asarray(embed_fn(crops), dtype=np.float32)
    if features.shape[0] != crops.shape[0]:
        raise HyperfaceError(f"the FR model returned {features.shape[0]} embeddings for {crops.shape[0]} faces")
    if features.shape[1] != references.shape[1]:
        raise HyperfaceError(
            f"the FR model gives {features.shape[1]}-d embeddings but the identities are {references.shape[1]}-d: "
            "use the FR model the identities came from (for Arc2Face: its arcface.onnx)"
        )
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    refs = references / np.linalg.norm(references, axis=1, keepdims=True)
    return np.einsum("nd,nd->n", features, refs)


__all__ = ["ALIGN_MODES", "Aligner", "EmbedFn", "cosine_to_references", "load_embed_fn", "make_aligner"]
