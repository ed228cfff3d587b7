"""Face detection with SCRFD ONNX models (insightface packs: det_10g.onnx, scrfd_10g_bnkps.onnx).

We decode SCRFD's raw outputs ourselves rather than depend on the ``insightface`` package: its wheel
requires ``opencv-python`` (which clashes with the ``opencv-python-headless`` we use: both install
``cv2``) plus ``requests`` and model-package/licence machinery, for what is ~100 lines of decoding.

SCRFD, as insightface runs it (model_zoo/scrfd.py):

- input: the image letterboxed into the model's input size (default 640x640): resized keeping its
  aspect ratio, pasted at the top-left of a black canvas; float NCHW RGB ``(x - 127.5) / 128``;
- outputs, per stride 8, 16, 32: scores (A, 1), box distances (A, 4), landmark offsets (A, 10),
  optionally with a leading batch axis; A = (H/stride) * (W/stride) * 2 anchors, anchors of one
  location adjacent, locations row-major. The five-level variants (15 outputs) add strides 64 and
  128 with one anchor per location;
- decoding: anchor centre (x, y) = (col, row) * stride; box = centre -/+ distance * stride
  (left, top, right, bottom); landmark k = centre + offset_k * stride; then score threshold, NMS at
  IoU 0.4, and division by the letterbox scale.

This module groups the outputs by their last dimension (1/4/10) and orders each group by anchor
count, so graphs that list their outputs in another order decode the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hyperface.common.errors import HyperfaceError

DETECTOR_SOURCES = (
    "use an SCRFD detector with landmarks from an insightface model pack (buffalo_l/det_10g.onnx or "
    "antelopev2/scrfd_10g_bnkps.onnx, from the insightface model zoo; non-commercial licence)"
)


@dataclass
class Face:
    """One detected face in the original image's pixel coordinates."""

    box: np.ndarray  # (4,) x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth, right mouth

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2, y2) from anchor points (A, 2) and (left, top, right, bottom) distances."""
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Keypoints (A, K, 2) from anchor points (A, 2) and (dx, dy) offsets (A, 2K)."""
    offsets = distance.reshape(distance.shape[0], -1, 2)
    return points[:, None, :] + offsets


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height*width*num_anchors, 2) anchor centres (x, y): row-major locations, anchors adjacent."""
    ys, xs = np.mgrid[:height, :width]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, num_anchors, axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first.

    Pixel-inclusive areas (width = x2 - x1 + 1), as insightface's SCRFD, so the same faces survive.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class Detector:
    """An SCRFD face detector with 5-point landmarks, run by onnxruntime.

    Args:
        path: the ``.onnx`` file (``det_10g.onnx``, ``scrfd_*_bnkps.onnx``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        input_size: (width, height) to letterbox into when the graph's size is dynamic.
        score_threshold: minimum face score (insightface default 0.5).
        nms_threshold: IoU above which lower-scored overlapping boxes are dropped (0.4).
    """

    #: Feature strides by output count (insightface's SCRFD: 3 levels x 2 anchors, or 5 levels x 1).
    STRIDES_BY_OUTPUTS = {9: (8, 16, 32), 15: (8, 16, 32, 64, 128)}

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        input_size: tuple[int, int] = (640, 640),
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        num_threads: int | None = None,
    ):

        from hyperface.recognition.recognizers import open_onnx_session

        self.path = Path(path)
        if not self.path.is_file():
            raise HyperfaceError(f"face detector not found: {self.path}; {DETECTOR_SOURCES}")
        self.session, self.device = open_onnx_session(self.path, device, num_threads, what="detector ")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        if len(shape) != 4 or shape[1] != 3:
            raise HyperfaceError(
                f"{self.path.name} is not an SCRFD detector: expected one (1, 3, H, W) input, got "
                f"{[(i.name, i.shape) for i in inputs]}; {DETECTOR_SOURCES}"
            )
        self.input_name = inputs[0].name
        if isinstance(shape[2], int) and isinstance(shape[3], int):
            self.input_size = (int(shape[3]), int(shape[2]))  # the graph fixes it
        else:
            self.input_size = (int(input_size[0]), int(input_size[1]))
        if len(outputs) not in self.STRIDES_BY_OUTPUTS:
            hint = (
                f" ({len(outputs)} outputs: a detector without landmarks; alignment needs a *_bnkps / det_10g model)"
                if len(outputs) in (6, 10) else ""
            )
            raise HyperfaceError(
                f"{self.path.name} has {len(outputs)} outputs; an SCRFD detector with landmarks has 9 (scores, "
                f"boxes, landmarks for strides 8/16/32) or 15 (strides 8 to 128){hint}; {DETECTOR_SOURCES}"
            )
        self.strides = self.STRIDES_BY_OUTPUTS[len(outputs)]
        coarsest = max(self.strides)
        if self.input_size[0] % coarsest or self.input_size[1] % coarsest:
            # the anchor grid is size // stride, as insightface decodes; the network's is ceil(size / stride)
            raise HyperfaceError(
                f"{self.path.name}: input size {self.input_size[0]}x{self.input_size[1]} is not a multiple of {coarsest}, "
                f"the detector's coarsest stride: use --det-size 640 or another multiple of {coarsest}"
            )
        self.output_names = [o.name for o in outputs]

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        import cv2

        # insightface's SCRFD.detect exactly: the long side fills the input, the other is truncated,
        # and boxes map back by new_height / height (so the same pixels and coordinates come out).
        width, height = self.input_size
        h, w = image.shape[:2]
        if h / w > height / width:
            new_h, new_w = height, max(1, int(height / (h / w)))
        else:
            new_w, new_h = width, max(1, int(width * (h / w)))
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        return canvas, new_h / h

    def _group_outputs(self, raw: list[np.ndarray]) -> dict[int, list[np.ndarray]]:
        """{last dim: [one array per stride, finest first]} from the raw outputs."""
        groups: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for array in raw:
            array = np.asarray(array, dtype=np.float32)
            if array.ndim == 3:  # batched export: (1, A, C)
                array = array[0]
            if array.ndim != 2 or array.shape[1] not in groups:
                raise HyperfaceError(f"{self.path.name}: unexpected SCRFD output shape {array.shape}")
            groups[array.shape[1]].append(array)
        for dim, arrays in groups.items():
            if len(arrays) != len(self.strides):
                raise HyperfaceError(
                    f"{self.path.name}: expected {len(self.strides)} outputs with last dimension {dim}, got {len(arrays)}; "
                    "not an SCRFD detector with landmarks"
                )
            arrays.sort(key=lambda a: -a.shape[0])  # most anchors = finest stride (8)
        return groups

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, highest score first, in the image's pixel coordinates."""
        image = np.asarray(image_rgb)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise HyperfaceError(f"detector expects an RGB uint8 (H, W, 3) image, got {image.shape} {image.dtype}")
        canvas, scale = self._letterbox(image)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        raw = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        groups = self._group_outputs(raw)

        width, height = self.input_size
        all_scores, all_boxes, all_kps = [], [], []
        for level, stride in enumerate(self.strides):
            scores = groups[1][level][:, 0]
            rows, cols = height // stride, width // stride
            num_anchors = scores.shape[0] // max(rows * cols, 1)
            if num_anchors < 1 or rows * cols * num_anchors != scores.shape[0]:
                raise HyperfaceError(
                    f"{self.path.name}: stride {stride} has {scores.shape[0]} anchors, not a multiple of the "
                    f"{rows}x{cols} grid of a {width}x{height} input"
                )
            keep = np.flatnonzero(scores >= self.score_threshold)
            if keep.size == 0:
                continue
            centres = anchor_centers(rows, cols, stride, num_anchors)[keep]
            all_scores.append(scores[keep])
            all_boxes.append(distance2bbox(centres, groups[4][level][keep] * stride))
            all_kps.append(distance2kps(centres, groups[10][level][keep] * stride))
        if not all_scores:
            return []
        scores = np.concatenate(all_scores)
        boxes = np.concatenate(all_boxes) / scale
        kps = np.concatenate(all_kps) / scale
        keep = nms(boxes, scores, self.nms_threshold)
        return [Face(box=boxes[i].astype(np.float32), score=float(scores[i]), landmarks=kps[i].astype(np.float32)) for i in keep]

    def largest(self, image_rgb: np.ndarray) -> Face | None:
        """The detected face with the largest box, or None.

        Arc2Face's rule (its README and demo, on insightface's faces): ``sorted(faces, key=area)[-1]``
        with the area ``(x2 - x1) * (y2 - y1)`` of the float32 box, so among boxes of equal area the
        last in detection order wins, as there.
        """
        faces = self.detect(image_rgb)
        # not Face.area (clamped, a Python float): the float32 product decides ties as Arc2Face's does
        return sorted(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))[-1] if faces else None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "scrfd-onnx",
            "path": str(self.path),
            "device": self.device,
            "input_size": list(self.input_size),
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
        }


def load_detector(path: str | os.PathLike, **kwargs: Any) -> Detector:
    """Load an SCRFD face detector (see :class:`Detector` for options)."""
    path = Path(path)
    if path.suffix.lower() != ".onnx" and path.is_file():
        raise HyperfaceError(f"--detector {path}: expected an SCRFD .onnx model; {DETECTOR_SOURCES}")
    return Detector(path, **kwargs)


__all__ = ["DETECTOR_SOURCES", "Detector", "Face", "anchor_centers", "distance2bbox", "distance2kps", "load_detector", "nms"]
