"""Alignment against known landmark geometry, and SCRFD decoding on a graph with SCRFD's outputs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from recognition_fixtures import expected_face, grey_image, make_scrfd_onnx, plant_face, random_faces

from hyperface.common.errors import HyperfaceError
from hyperface.recognition.alignment import ARCFACE_TEMPLATE, align_face, crop_ffhq, estimate_similarity, ffhq_template
from hyperface.recognition.detection import anchor_centers, load_detector, nms
from hyperface.recognition.preprocess import FacePreprocessor


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


@pytest.mark.parametrize("scale,angle,tx,ty", [(2.5, 17.0, 140.0, 60.0), (0.8, -40.0, 10.0, 90.0), (4.0, 180.0, 500.0, 420.0)])
def test_similarity_maps_transformed_template_back_exactly(scale, angle, tx, ty):
    forward = _similarity(scale, angle, tx, ty)
    landmarks = _apply(forward, ARCFACE_TEMPLATE.astype(np.float64))
    matrix = estimate_similarity(landmarks)
    np.testing.assert_allclose(_apply(matrix, landmarks), ARCFACE_TEMPLATE, atol=1e-4)
    # it is the inverse similarity: scale 1/scale, rotation -angle
    np.testing.assert_allclose(np.hypot(*matrix[:, 0]), 1.0 / scale, rtol=1e-6)
    rotation = matrix[:, :2] * scale
    np.testing.assert_allclose(rotation, _similarity(1.0, -angle, 0, 0)[:, :2], atol=1e-6)


def test_align_face_recovers_the_aligned_crop():
    face = random_faces(1, seed=7)[0]
    forward = _similarity(2.0, 25.0, 120.0, 40.0)
    photo = cv2.warpAffine(face, forward, (400, 380), flags=cv2.INTER_CUBIC)
    landmarks = _apply(forward, ARCFACE_TEMPLATE.astype(np.float64))
    aligned = align_face(photo, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    inner = (slice(6, -6), slice(6, -6))  # borders see the photo's black margin through interpolation
    err = np.abs(aligned[inner].astype(int) - face[inner].astype(int))
    assert err.mean() < 2.0 and err.max() < 30, (err.mean(), err.max())
    # a 224 crop is the same framing at twice the resolution
    big = align_face(photo, landmarks, size=224)
    assert np.abs(cv2.resize(big, (112, 112), interpolation=cv2.INTER_AREA)[inner].astype(int) - face[inner]).mean() < 3.0
    with pytest.raises(HyperfaceError, match="5 finite"):
        align_face(photo, landmarks[:4])


def _ffhq_align(photo: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """FFHQ's alignment rule (NVlabs ffhq-dataset), written out independently for the test."""
    eye_l, eye_r, _, mouth_l, mouth_r = landmarks
    eye_avg, mouth_avg = (eye_l + eye_r) / 2, (mouth_l + mouth_r) / 2
    eye_to_eye, eye_to_mouth = eye_r - eye_l, mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y]).astype(np.float32)
    square = np.float32([[0, 0], [0, size], [size, size]])
    return cv2.warpAffine(photo, cv2.getAffineTransform(quad[:3], square), (size, size), flags=cv2.INTER_CUBIC)


def test_ffhq_crop_matches_landmark_alignment():
    face = random_faces(1, seed=11)[0]
    forward = _similarity(3.0, -12.0, 150.0, 120.0)
    photo = cv2.warpAffine(face, forward, (640, 640), flags=cv2.INTER_CUBIC)
    landmarks = _apply(forward, ARCFACE_TEMPLATE.astype(np.float64))
    for size in (512, 1024):
        ffhq_image = _ffhq_align(photo, landmarks, size)
        crop = crop_ffhq(ffhq_image)
        inner = (slice(8, -8), slice(8, -8))
        err = np.abs(crop[inner].astype(int) - face[inner].astype(int))
        assert err.mean() < 3.0, (size, err.mean())
    tpl = ffhq_template(1024)
    assert abs(tpl[:2, 0].mean() - 512) < 2 and abs(tpl[0, 1] - tpl[1, 1]) < 1  # eyes level, centred
    assert tpl[0, 1] < tpl[2, 1] < tpl[3, 1]  # eyes above nose above mouth


# ---------------------------------------------------------------------------------------------
# SCRFD


@pytest.fixture(scope="module")
def scrfd(tmp_path_factory):
    return make_scrfd_onnx(tmp_path_factory.mktemp("det") / "det_10g.onnx", input_size=160)


def test_anchor_centres_and_nms():
    centres = anchor_centers(2, 3, 8, 2)
    np.testing.assert_array_equal(centres[:4], [[0, 0], [0, 0], [8, 0], [8, 0]])  # x first, anchors adjacent
    np.testing.assert_array_equal(centres[6], [0, 8])  # row-major
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float32)
    assert nms(boxes, np.array([0.9, 0.95, 0.5]), 0.4).tolist() == [1, 2]
    # insightface counts pixels inclusively: IoU 0.412 here (0.391 without +1), so one box goes
    near = np.array([[0, 0, 20, 20], [8.75, 0, 28.75, 20]], dtype=np.float32)
    assert nms(near, np.array([0.9, 0.8]), 0.4).tolist() == [0]


@pytest.mark.parametrize("height,width,rows,cols", [(2000, 3000, 106, 160), (3000, 2000, 160, 106), (333, 1000, 53, 160), (100, 100, 160, 160)])
def test_letterbox_is_insightfaces(scrfd, height, width, rows, cols):
    # SCRFD.detect: the long side fills the input, the other side is truncated (not rounded), and
    # detections map back by new_height / height, so boxes land on insightface's coordinates.
    detector = load_detector(scrfd)
    canvas, scale = detector._letterbox(np.full((height, width, 3), 200, np.uint8))
    filled = np.argwhere(canvas[..., 0] > 0)
    assert (filled[:, 0].max() + 1, filled[:, 1].max() + 1) == (rows, cols)
    assert scale == rows / height


def _insightface_template(size: int) -> np.ndarray:
    """insightface's ``estimate_norm`` template, re-stated: float32 ``arcface_dst * ratio``, then
    ``dst[:, 0] += diff_x`` in place (float32) for the 128-based sizes."""
    if size % 112 == 0:
        ratio, diff_x = size / 112.0, 0.0
    else:
        ratio = size / 128.0
        diff_x = 8.0 * ratio
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += diff_x
    return dst


def _insightface_norm_crop(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface's ``face_align.norm_crop``, re-stated: scikit-image's similarity fit of the
    landmarks as given (SCRFD's are float32) onto the float32 template, then ``cv2.warpAffine``."""
    from skimage.transform import SimilarityTransform

    dst = _insightface_template(size)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        matrix = SimilarityTransform.from_estimate(landmarks, dst).params[0:2, :]
    else:  # pragma: no cover - older scikit-image
        tform = SimilarityTransform()
        tform.estimate(landmarks, dst)
        matrix = tform.params[0:2, :]
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def test_templates_for_other_crop_sizes_follow_insightface():
    from hyperface.recognition.alignment import arcface_template

    np.testing.assert_allclose(arcface_template(224), ARCFACE_TEMPLATE * 2)
    np.testing.assert_allclose(arcface_template(128), ARCFACE_TEMPLATE + [8.0, 0.0])
    np.testing.assert_allclose(arcface_template(256), ARCFACE_TEMPLATE * 2 + [16.0, 0.0])
    for size in (112, 128, 160, 224, 256):  # and to the bit: float32, rounded where insightface rounds
        template = arcface_template(size)
        assert template.dtype == np.float32
        np.testing.assert_array_equal(template, _insightface_template(size))


@pytest.mark.parametrize("size", [112, 128])
def test_detected_landmarks_are_aligned_as_insightfaces_norm_crop(size):
    # SCRFD's landmarks are float32 and so is insightface's template: scikit-image then fits in
    # float32. A float64 fit moves the matrix by ~1e-5 px, which changes a grey level here and there.
    rng = np.random.default_rng(5)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (0, 0), 1.5)
    float64_fit_differs = 0
    for _ in range(12):
        forward = _similarity(rng.uniform(0.8, 3.0), rng.uniform(-30.0, 30.0), *rng.uniform([80, 60], [400, 250]))
        landmarks = (_apply(forward, ARCFACE_TEMPLATE.astype(np.float64)) + rng.normal(0, 2, (5, 2))).astype(np.float32)
        expected = _insightface_norm_crop(photo, landmarks, size)
        np.testing.assert_array_equal(align_face(photo, landmarks, size=size), expected)
        float64_fit_differs += not np.array_equal(align_face(photo, landmarks.astype(np.float64), size=size), expected)
    assert float64_fit_differs > 0  # the check can tell the two fits apart


@pytest.mark.parametrize("shape,order", [((160, 160), None), ((200, 320), None), ((320, 320), [6, 0, 4, 8, 1, 5, 2, 7, 3])])
def test_scrfd_decodes_planted_faces(tmp_path, scrfd, shape, order):
    model_path = scrfd if order is None else make_scrfd_onnx(tmp_path / "shuffled.onnx", output_order=order)
    detector = load_detector(model_path)
    assert detector.input_size == (160, 160)
    scale = 160 / max(shape)  # letterbox factor
    image = grey_image(*shape)
    plant_face(image, 8, row=3, col=5, scale=scale)
    plant_face(image, 32, row=2, col=1, scale=scale)
    faces = detector.detect(image)
    assert len(faces) == 2  # two anchors per location collapse to one face by NMS
    largest = detector.largest(image)
    box, landmarks = expected_face(32, 2, 1, scale)
    np.testing.assert_allclose(largest.box, box, atol=1e-3)
    np.testing.assert_allclose(largest.landmarks, landmarks, atol=1e-3)
    assert largest.score > 0.99
    small = min(faces, key=lambda f: f.area)
    box, landmarks = expected_face(8, 3, 5, scale)
    np.testing.assert_allclose(small.box, box, atol=1e-3)
    np.testing.assert_allclose(small.landmarks, landmarks, atol=1e-3)
    assert detector.detect(grey_image(*shape)) == []


def test_scrfd_five_level_models_decode_strides_64_and_128(tmp_path):
    # insightface's SCRFD with 15 outputs: strides 8..128, one anchor per location
    from recognition_fixtures import SCRFD_STRIDES_5

    detector = load_detector(make_scrfd_onnx(tmp_path / "scrfd_5.onnx", input_size=256, strides=SCRFD_STRIDES_5))
    assert detector.strides == SCRFD_STRIDES_5 and detector.input_size == (256, 256)
    image = grey_image(256, 256)
    planted = {8: (3, 5), 64: (2, 0), 128: (0, 1)}
    for stride, (row, col) in planted.items():
        plant_face(image, stride, row=row, col=col)
    faces = sorted(detector.detect(image), key=lambda f: f.area)
    assert len(faces) == 3  # one anchor per location: one detection per planted face
    for face, (stride, (row, col)) in zip(faces, sorted(planted.items())):
        box, landmarks = expected_face(stride, row, col)
        np.testing.assert_allclose(face.box, box, atol=1e-3)
        np.testing.assert_allclose(face.landmarks, landmarks, atol=1e-3)
    # its anchor grid needs an input size that is a multiple of 128
    with pytest.raises(HyperfaceError, match="not a multiple of 128"):
        load_detector(make_scrfd_onnx(tmp_path / "scrfd_5_224.onnx", input_size=224, strides=SCRFD_STRIDES_5))
    # a five-level detector without landmarks (10 outputs) cannot align faces
    no_kps = make_scrfd_onnx(tmp_path / "scrfd_5_nokps.onnx", input_size=256, strides=SCRFD_STRIDES_5, output_order=list(range(10)))
    with pytest.raises(HyperfaceError, match="10 outputs: a detector without landmarks"):
        load_detector(no_kps)


def test_face_preprocessor_modes(scrfd):
    detector = load_detector(scrfd)
    image = grey_image(160, 160)
    plant_face(image, 16, row=4, col=4)
    pre = FacePreprocessor("detect", detector=detector)
    face, reason = pre.process(image)
    assert reason is None and face.shape == (112, 112, 3)
    _, landmarks = expected_face(16, 4, 4)
    np.testing.assert_array_equal(face, align_face(image, landmarks))
    assert pre.process(grey_image(160, 160)) == (None, "no face detected")
    aligned = FacePreprocessor("aligned")
    crop = random_faces(1)[0]
    assert aligned(crop) is crop or np.array_equal(aligned(crop), crop)
    assert aligned(cv2.resize(crop, (224, 224))).shape == (112, 112, 3)
    assert aligned.process(np.zeros((112, 200, 3), np.uint8))[1].startswith("not an aligned square crop")
    assert FacePreprocessor("ffhq")(np.zeros((512, 512, 3), np.uint8)).shape == (112, 112, 3)
    assert FacePreprocessor("ffhq").process(np.zeros((8, 8, 3), np.uint8))[1].startswith("image too small")
    with pytest.raises(HyperfaceError, match="--detector"):
        FacePreprocessor("detect")


def test_detect_mode_is_arc2faces_largest_face_aligned_by_norm_crop(scrfd):
    # Arc2Face: faces = sorted(app.get(img), key=bbox area)[-1]; of two boxes of one size (same
    # stride, same score) that is the later in detection order (highest score first, then anchor order).
    detector = load_detector(scrfd)
    image = cv2.GaussianBlur(np.random.default_rng(2).integers(0, 256, (160, 160, 3), dtype=np.uint8), (0, 0), 1.0)
    plant_face(image, 16, row=1, col=1)
    plant_face(image, 16, row=5, col=4)
    faces = detector.detect(image)
    assert len(faces) == 2 and faces[0].score == faces[1].score
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas[0] == areas[1]
    chosen = detector.largest(image)
    np.testing.assert_array_equal(chosen.box, faces[1].box)
    np.testing.assert_array_equal(chosen.box, expected_face(16, 5, 4)[0])
    # and it is aligned from the detector's float32 landmarks as insightface aligns it
    assert chosen.landmarks.dtype == np.float32
    crop, reason = FacePreprocessor("detect", detector=detector).process(image)
    assert reason is None
    np.testing.assert_array_equal(crop, _insightface_norm_crop(image, chosen.landmarks))


def test_detector_errors(tmp_path, scrfd):
    from recognition_fixtures import export_onnx, make_tiny_iresnet

    with pytest.raises(HyperfaceError, match="not found.*det_10g.onnx"):
        load_detector(tmp_path / "missing" / "det_10g.onnx")
    recognizer = export_onnx(make_tiny_iresnet(), tmp_path / "rec.onnx")
    with pytest.raises(HyperfaceError, match="an SCRFD detector with landmarks has 9"):
        load_detector(recognizer)
