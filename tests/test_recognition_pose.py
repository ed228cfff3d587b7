"""Head pose from 5 landmarks: planted rotations come back, wherever and however large the face is."""

from __future__ import annotations

import numpy as np
import pytest

from hyperface.common.errors import HyperfaceError
from hyperface.recognition.alignment import ARCFACE_TEMPLATE
from hyperface.recognition.pose import estimate_pose, project


def test_planted_rotations_are_recovered_anywhere_in_the_picture():
    rng = np.random.default_rng(0)
    angles = np.stack([rng.uniform(-60, 60, 40), rng.uniform(-25, 25, 40), rng.uniform(-30, 30, 40)], axis=1)
    landmarks = np.stack([project(a, size=rng.uniform(20, 400), centre=tuple(rng.uniform(0, 2000, 2))) for a in angles])
    estimated = estimate_pose(landmarks)
    np.testing.assert_allclose(estimated, angles, atol=1.5)
    assert np.abs(estimated - angles).mean() < 0.5


def test_conventions_frontal_template_and_mirror():
    frontal = estimate_pose(ARCFACE_TEMPLATE[None])[0]
    assert abs(frontal[0]) < 2 and abs(frontal[2]) < 2  # insightface's aligned face looks straight ahead
    turned = project((30, 0, 0))  # towards the image's right: the nose right of the eyes' midpoint
    assert turned[2, 0] > turned[:2, 0].mean()
    looking_up = project((0, 15, 0))
    assert (looking_up[2, 1] - looking_up[:2, 1].mean()) < (project((0, 0, 0))[2, 1] - project((0, 0, 0))[:2, 1].mean())
    tilted = project((0, 0, 20))  # clockwise: the image-left eye higher (smaller y)
    assert tilted[0, 1] < tilted[1, 1]
    # the mirror image of a face turned and tilted one way is turned and tilted the other way
    face = project((25, 10, 12))
    mirrored = face.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    mirrored = mirrored[[1, 0, 2, 4, 3]]  # image-left and image-right points swap
    np.testing.assert_allclose(estimate_pose(mirrored[None])[0], [-25, 10, -12], atol=1.0)


def test_missing_landmarks_and_bad_shapes():
    rows = np.stack([project((10, 0, 0)), np.full((5, 2), np.nan)])
    out = estimate_pose(rows)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    with pytest.raises(HyperfaceError, match=r"landmarks must be \(N, 5, 2\)"):
        estimate_pose(np.zeros((3, 4, 2)))


def test_points_that_are_no_face_give_nan():
    same = np.tile([[50.0, 50.0]], (5, 1))
    line = np.stack([np.linspace(10, 90, 5), np.full(5, 50.0)], axis=1)  # all on one horizontal line
    column = np.stack([np.full(5, 50.0), np.linspace(10, 90, 5)], axis=1)
    out = estimate_pose(np.stack([same, line, column, project((20, 5, 5))]))
    assert np.isnan(out[:3]).all() and np.isfinite(out[3]).all()
