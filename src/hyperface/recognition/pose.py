"""Head pose (yaw, pitch, roll) from the 5 landmarks a detector gives, to measure how much pose a
dataset holds (synthetic sets tend to be frontal: the CFP-FP and CPLFW gap).

The 5 points (eye centres, nose tip, mouth corners, in SCRFD's order: image-left eye first) are
matched to a generic 3D face by ``cv2.solvePnP`` under a nearly orthographic camera centred on the
face, so the answer does not depend on where the face sits in the picture or on a lens. A generic
face is not the subject's: the angles are approximate (good for distributions and spreads, a few
degrees off for one face), and 5 points cannot separate pitch well from face shape.

Conventions: degrees; yaw > 0 when the face turns towards the image's right, pitch > 0 when it looks
up, roll > 0 when it tilts clockwise in the image.
"""

from __future__ import annotations

import numpy as np

from hyperface.common.errors import HyperfaceError

#: A generic face's 5 points (x right, y up, z towards the camera; nose tip at the origin), in the
#: units of the widely used 6-point head-pose model (eye centres between its eye corners).
FACE_MODEL_5 = np.array(
    [
        (-155.0, 170.0, -125.0),  # image-left eye centre
        (155.0, 170.0, -125.0),  # image-right eye centre
        (0.0, 0.0, 0.0),  # nose tip
        (-150.0, -150.0, -125.0),  # image-left mouth corner
        (150.0, -150.0, -125.0),  # image-right mouth corner
    ],
    dtype=np.float64,
)
#: Focal length in face widths: a far camera, nearly orthographic (perspective changes angles < 1 deg).
_FOCAL_FACES = 20.0


def _camera(points: np.ndarray) -> tuple[np.ndarray, float]:
    centre = points.mean(axis=0)
    size = max(float(np.ptp(points[:, 0])), float(np.ptp(points[:, 1])), 1e-6)
    focal = _FOCAL_FACES * size
    return np.array([[focal, 0, centre[0]], [0, focal, centre[1]], [0, 0, 1]], dtype=np.float64), focal


def project(angles_deg: np.ndarray, *, size: float = 60.0, centre: tuple[float, float] = (56.0, 56.0)) -> np.ndarray:
    """Landmarks (5, 2) of :data:`FACE_MODEL_5` turned by (yaw, pitch, roll), as the same camera sees
    them (for tests and for reading the conventions)."""
    rotation = _rotation(*np.radians(np.asarray(angles_deg, dtype=np.float64)))
    model = FACE_MODEL_5 @ rotation.T
    scale = size / float(np.ptp(FACE_MODEL_5[:, 0]))
    depth = _FOCAL_FACES * float(np.ptp(FACE_MODEL_5[:, 0]))  # the model's width times the focal factor
    x = model[:, 0] * depth / (depth - model[:, 2])
    y = model[:, 1] * depth / (depth - model[:, 2])
    return np.stack([centre[0] + scale * x, centre[1] - scale * y], axis=1)  # image y runs down


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Model-to-camera rotation: roll about the view axis, then pitch about x, then yaw about y."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # the nose tip up: looking up is positive
    r_roll = np.array([[cr, sr, 0], [-sr, cr, 0], [0, 0, 1]])  # clockwise in the image (y down) is positive
    return r_yaw @ r_pitch @ r_roll


def _angles(rotation: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`_rotation` (yaw, pitch, roll in radians)."""
    pitch = np.arcsin(np.clip(rotation[1, 2], -1.0, 1.0))
    yaw = np.arctan2(rotation[0, 2], rotation[2, 2])
    roll = np.arctan2(-rotation[1, 0], rotation[1, 1])
    return float(yaw), float(pitch), float(roll)


def _degenerate(face: np.ndarray) -> bool:
    """Points that are no face: (nearly) one point, or eyes and mouth on one line."""
    eyes, mouth = face[1] - face[0], (face[3] + face[4]) / 2 - (face[0] + face[1]) / 2
    size = max(float(np.ptp(face[:, 0])), float(np.ptp(face[:, 1])))
    area = abs(float(eyes[0] * mouth[1] - eyes[1] * mouth[0]))  # twice the eyes-mouth triangle's area
    return size < 1e-3 or area < 0.05 * size * size


def estimate_pose(landmarks: np.ndarray) -> np.ndarray:
    """(N, 3) float32 yaw, pitch, roll in degrees for (N, 5, 2) image landmarks; NaN rows, and points
    that cannot be a face (all in one place, eyes and mouth on a line), give NaN."""
    import cv2

    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 3 or points.shape[1:] != (5, 2):
        raise HyperfaceError(f"landmarks must be (N, 5, 2), got shape {points.shape}")
    out = np.full((len(points), 3), np.nan, dtype=np.float32)
    # solvePnP works in a camera whose y runs down and z forwards: the model's y and z are flipped to match
    model = FACE_MODEL_5 * np.array([1.0, -1.0, -1.0])
    flip = np.diag([1.0, -1.0, -1.0])
    for i, face in enumerate(points):
        if not np.isfinite(face).all() or _degenerate(face):
            continue
        camera, focal = _camera(face)
        distance = focal * float(np.ptp(FACE_MODEL_5[:, 0])) / max(float(np.ptp(face[:, 0])), 1e-6)
        ok, rvec, _ = cv2.solvePnP(model, face, camera, None, rvec=np.zeros(3), tvec=np.array([0.0, 0.0, distance]),
                                   useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok:
            continue
        rotation_cv, _ = cv2.Rodrigues(rvec)
        out[i] = np.degrees(_angles(flip @ rotation_cv @ flip))
    return out


__all__ = ["FACE_MODEL_5", "estimate_pose", "project"]
