"""Face alignment: 5 landmarks -> similarity transform -> the ArcFace 112x112 crop.

Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth corner,
in image pixel coordinates (x, y), "left" meaning the left side of the image (the subject's right).
This is the order SCRFD predicts and the ArcFace template uses.

The transform is scikit-image's least-squares similarity (Umeyama) fit, the warp OpenCV's
``warpAffine``, the same pairing insightface's ``face_align.norm_crop`` uses. Like theirs, the fit runs
in the precision of the points it is given: SCRFD's landmarks are float32 and so is the template, so a
detected face is fitted in float32, as insightface fits it (a float64 fit moves the matrix by ~1e-5 px,
enough to change a grey level in a few pixels of most crops).
"""

from __future__ import annotations

import numpy as np

from hyperface.common.errors import HyperfaceError

#: The standard ArcFace 5-point template for 112x112 crops (insightface ``arcface_dst``).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def estimate_similarity(landmarks5: np.ndarray, template: np.ndarray | None = None) -> np.ndarray:
    """2x3 similarity matrix (rotation, uniform scale, translation) mapping ``landmarks5`` onto ``template``.

    Least-squares fit over the 5 points; ``template`` defaults to :data:`ARCFACE_TEMPLATE`. float32
    points onto a float32 template are fitted in float32 (scikit-image computes in its inputs'
    precision: insightface's ``estimate_norm`` on SCRFD's landmarks); anything else in float64.
    """
    from skimage.transform import SimilarityTransform

    src = _check_landmarks(landmarks5)
    dst = ARCFACE_TEMPLATE if template is None else _as_float(np.asarray(template))
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:  # pragma: no cover - older scikit-image
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok or not np.isfinite(tform.params).all():
        raise HyperfaceError("cannot fit a similarity transform to these landmarks (are they all the same point?)")
    return tform.params[:2].astype(np.float64)


def arcface_template(size: int = 112) -> np.ndarray:
    """The ArcFace 5-point template for a ``size`` x ``size`` crop, float32, computed as insightface's
    ``estimate_norm`` computes it (scaled, then moved right, each step rounded to float32)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * np.float32(size / 112.0)
    ratio = size / 128.0
    template = ARCFACE_TEMPLATE * np.float32(ratio)
    template[:, 0] += np.float32(8.0 * ratio)
    return template


def align_face(image_rgb: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image_rgb`` so its 5 landmarks land on the ArcFace template; uint8 (size, size, 3).

    Other sizes follow insightface's ``estimate_norm``: a multiple of 112 scales the template (224: a
    2x crop, same framing); otherwise it is scaled by size/128 and moved right by 8 * size/128 (the
    128 px convention some recognizers use). float32 landmarks (the detector's) give insightface's
    ``norm_crop`` bit for bit: the fit runs in float32 as theirs does (see :func:`estimate_similarity`).
    """
    import cv2

    matrix = estimate_similarity(landmarks5, arcface_template(size))
    image = _check_image(image_rgb)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def _ffhq_quad(landmarks5: np.ndarray) -> np.ndarray:
    """FFHQ's crop square for a face (NVlabs ffhq-dataset ``recreate_aligned_images``): corners
    top-left, bottom-left, bottom-right, top-right, from the eye and mouth centres."""
    lm = np.asarray(landmarks5, dtype=np.float64)
    eye_avg = (lm[0] + lm[1]) / 2
    mouth_avg = (lm[3] + lm[4]) / 2
    eye_to_eye = lm[1] - lm[0]
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def ffhq_template(size: int = 1024) -> np.ndarray:
    """Where a face with ArcFace-template proportions sits in a ``size``x``size`` FFHQ-aligned image.

    FFHQ aligns every face by the rule in :func:`_ffhq_quad`; applying that rule to the ArcFace
    template and mapping its square onto the output image gives the 5 points that FFHQ-style images
    (and generators trained on them: StyleGAN, Arc2Face) place faces at.
    """
    quad = _ffhq_quad(ARCFACE_TEMPLATE)
    side = np.hypot(*(quad[3] - quad[0]))  # quad edge length
    # The quad is a rotated square; map its top-left corner to (0, 0) and its edges to the axes.
    ex = (quad[3] - quad[0]) / side
    ey = (quad[1] - quad[0]) / side
    rel = ARCFACE_TEMPLATE.astype(np.float64) - quad[0]
    return (np.stack([rel @ ex, rel @ ey], axis=1) * (size / side)).astype(np.float32)


def crop_ffhq(image_rgb: np.ndarray, size: int = 112) -> np.ndarray:
    """Fixed ArcFace crop of a face-centred FFHQ-aligned image (any resolution, e.g. 512 or 1024).

    No detector: the landmarks are taken to be where FFHQ alignment puts them
    (:func:`ffhq_template`). Non-square images are centre-cropped to a square first.
    """
    image = _check_image(image_rgb)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    # float64 points: this fixed crop has no insightface counterpart, and keeps the fit it always had
    return align_face(image, ffhq_template(side).astype(np.float64), size=size)


def _as_float(points: np.ndarray) -> np.ndarray:
    """float32 points stay float32 (scikit-image then fits in float32, as insightface's float32 data
    does); any other type becomes float64."""
    return points if points.dtype == np.float32 else points.astype(np.float64)


def _check_landmarks(landmarks5: np.ndarray) -> np.ndarray:
    lm = _as_float(np.asarray(landmarks5))
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise HyperfaceError(f"expected 5 finite (x, y) landmarks, shape (5, 2); got {lm.shape}")
    return lm


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise HyperfaceError(f"expected an RGB uint8 image (H, W, 3), got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


__all__ = ["ARCFACE_TEMPLATE", "align_face", "crop_ffhq", "estimate_similarity", "ffhq_template"]
