"""Face recognition: models (ONNX, PyTorch iResNet and AdaFace IR), detection, alignment and ``hyperface embed``.

>>> from hyperface.recognition import load_recognizer
>>> recognizer = load_recognizer("w600k_r50.onnx", device="cpu", flip=True)
>>> embeddings = recognizer.embed(faces)  # uint8 (N, 112, 112, 3) aligned RGB -> float32 (N, 512) unit rows

Names are imported lazily so ``hyperface --help`` (which imports ``hyperface.recognition.cli``)
does not pay for torch, onnxruntime or OpenCV.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IRESNET_ARCHS": "iresnet",
    "IResNet": "iresnet",
    "infer_arch": "iresnet",
    "iresnet_from_state_dict": "iresnet",
    "AdaFaceIR": "adaface_ir",
    "adaface_ir_from_state_dict": "adaface_ir",
    "Recognizer": "recognizers",
    "OnnxRecognizer": "recognizers",
    "TorchRecognizer": "recognizers",
    "load_recognizer": "recognizers",
    "ARCFACE_TEMPLATE": "alignment",
    "align_face": "alignment",
    "crop_ffhq": "alignment",
    "estimate_similarity": "alignment",
    "Detector": "detection",
    "Face": "detection",
    "load_detector": "detection",
    "FacePreprocessor": "preprocess",
    "open_image_source": "images",
    "decode_image": "images",
    "embed_images": "embed",
    "estimate_pose": "pose",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"hyperface.recognition.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'hyperface.recognition' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
