"""From a decoded photo to the aligned 112x112 face a recognizer takes, in one of three modes.

- ``detect``: SCRFD finds faces and landmarks; the largest face is aligned to the ArcFace template,
  as insightface's ``norm_crop`` aligns it, bit for bit. For arbitrary photos.
- ``aligned``: the image already is an ArcFace-aligned crop (112x112, or a square multiple such as
  224, which is resized).
- ``ffhq``: the image is a face-centred FFHQ-style generator output (StyleGAN, Arc2Face; any
  square resolution); a fixed crop, no detector. What galleries usually are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.runtime import get_logger

MODES = ("detect", "aligned", "ffhq")

#: Reason strings written to the rejected list.
NO_FACE = "no face detected"

#: How detect mode picks and aligns a face (stated in the manifest; a resume compares it).
DETECT_ALIGNMENT = (
    "the largest box (Arc2Face's rule: float32 area, the last of equal areas) aligned as insightface's "
    "norm_crop (float32 landmarks, float32 similarity fit)"
)


class FacePreprocessor:
    """Callable: RGB uint8 image -> aligned RGB uint8 (size, size, 3) face, or None (see :meth:`process`)."""

    def __init__(self, mode: str = "detect", detector=None, size: int = 112, min_image_size: int = 16):
        if mode not in MODES:
            raise HyperfaceError(f"unknown preprocessing mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "detect" and detector is None:
            raise HyperfaceError(
                "face detection needs a detector: pass --detector det_10g.onnx (insightface buffalo_l pack), "
                "or --aligned for 112x112 aligned crops, or --crop ffhq for face-centred generator outputs"
            )
        self.mode = mode
        self.detector = detector
        self.size = int(size)
        self.min_image_size = int(min_image_size)
        self._warned_aligned_input = False

    def process(self, image_rgb: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """``(face, None)`` on success, ``(None, reason)`` when the image has no usable face."""
        face, reason, _ = self.process_with_landmarks(image_rgb)
        return face, reason

    def process_with_landmarks(self, image_rgb: np.ndarray) -> tuple[np.ndarray | None, str | None, np.ndarray | None]:
        """:meth:`process` plus the detected face's 5 landmarks in the image's pixels (detect mode;
        None in the other modes, which know no landmarks)."""
        import cv2

        from hyperface.recognition.alignment import align_face, crop_ffhq

        h, w = image_rgb.shape[:2]
        if min(h, w) < self.min_image_size:
            return None, f"image too small ({w}x{h})", None
        if self.mode == "aligned":
            if (h, w) == (self.size, self.size):
                return np.ascontiguousarray(image_rgb), None, None
            if abs(h - w) > 0.02 * max(h, w):
                return None, f"not an aligned square crop ({w}x{h}); use the detector instead of --aligned", None
            interp = cv2.INTER_AREA if h > self.size else cv2.INTER_LINEAR
            return cv2.resize(image_rgb, (self.size, self.size), interpolation=interp), None, None
        if self.mode == "ffhq":
            if (h, w) == (self.size, self.size) and not self._warned_aligned_input:
                self._warned_aligned_input = True  # once a run (a race between workers at worst repeats it)
                get_logger("hyperface.embed").warning(
                    "a %dx%d image with --crop ffhq: that crop is for face-centred renders (512 or 1024 px) and "
                    "zooms an already aligned face further in; for aligned crops use --aligned", w, h,
                )
            return crop_ffhq(image_rgb, size=self.size), None, None
        face = self.detector.largest(image_rgb)
        if face is None:
            return None, NO_FACE, None
        landmarks = np.asarray(face.landmarks, dtype=np.float32).reshape(5, 2)
        return align_face(image_rgb, face.landmarks, size=self.size), None, landmarks

    def __call__(self, image_rgb: np.ndarray) -> np.ndarray | None:
        return self.process(image_rgb)[0]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"mode": self.mode, "size": self.size}
        if self.detector is not None and self.mode == "detect":
            info["alignment"] = DETECT_ALIGNMENT
            info["detector"] = self.detector.describe()
        return info


__all__ = ["DETECT_ALIGNMENT", "FacePreprocessor", "MODES", "NO_FACE"]
