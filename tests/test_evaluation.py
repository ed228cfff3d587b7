"""Verification protocol against an independent re-implementation; safe .bin loading."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from hyperface.common.errors import HyperfaceError
from hyperface.datasets import encode_image
from verification_fixtures import write_noisy_pairs_bin
from hyperface.evaluation.verification import (
    evaluate_bin,
    evaluate_embeddings,
    kfold_splits,
    load_bin,
    read_bin,
)


# --- an independent, straightforward version of insightface's calculate_roc ------------------------
def _reference_accuracy(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10):
    thresholds = np.arange(0, 4, 0.01)
    e1, e2 = embeddings[0::2], embeddings[1::2]
    dist = np.sum(np.square(e1 - e2), 1)
    folds = np.array_split(np.arange(len(dist)), nfolds)
    accuracies, best_thresholds = [], []

    def accuracy(threshold, d, same):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, same))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(same)))
        return float(tp + tn) / d.size

    for test in folds:
        train = np.setdiff1d(np.arange(len(dist)), test)
        train_acc = [accuracy(t, dist[train], issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        best_thresholds.append(best)
        accuracies.append(accuracy(best, dist[test], issame[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies)), best_thresholds


def _random_pairs(n_pairs: int, dim: int, seed: int, noise: float = 0.9):
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    a = rng.standard_normal((n_pairs, dim))
    b = np.where(issame[:, None], a + noise * rng.standard_normal((n_pairs, dim)), rng.standard_normal((n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim), dtype=np.float32)
    emb[0::2], emb[1::2] = a, b
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, issame


@pytest.mark.parametrize("n_pairs,seed", [(600, 0), (347, 1)])
def test_accuracy_matches_independent_implementation(n_pairs, seed):
    emb, issame = _random_pairs(n_pairs, 32, seed)
    result = evaluate_embeddings(emb, issame)
    accuracy, std, thresholds = _reference_accuracy(emb, issame)
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert result.std == pytest.approx(std, abs=1e-12)
    assert result.fold_thresholds == pytest.approx(thresholds, abs=1e-12)
    assert 0.6 < result.accuracy < 1.0  # informative: neither chance nor trivially perfect
    assert result.num_pairs == n_pairs
    assert 0.0 <= result.val <= 1.0 and result.far <= 0.01


def test_hand_checked_case():
    """Two folds of five pairs with known squared distances (off the 0.01 grid).

    Fold A: same 0.105, 0.105, diff 3.005, 3.005, same 3.505.  Fold B: same 0.105, diff 3.005 x3, diff 0.055.
    Training on B, accuracy 0.8 first at threshold 0.00 (ties later) -> fold A accuracy 2/5.
    Training on A, accuracy 0.8 first at threshold 0.11 -> fold B accuracy 4/5.
    """
    dists = [0.105, 0.105, 3.005, 3.005, 3.505, 0.105, 3.005, 3.005, 3.005, 0.055]
    issame = np.array([True, True, False, False, True, True, False, False, False, False])
    emb = np.zeros((20, 2))
    for i, d in enumerate(dists):
        cos = 1 - d / 2
        emb[2 * i] = (1.0, 0.0)
        emb[2 * i + 1] = (cos, np.sqrt(1 - cos**2))
    result = evaluate_embeddings(emb, issame, nfolds=2)
    assert result.fold_thresholds == pytest.approx([0.0, 0.11])
    assert result.fold_accuracies == pytest.approx([0.4, 0.8])
    assert result.accuracy == pytest.approx(0.6) and result.std == pytest.approx(0.2)
    assert result.best_threshold == pytest.approx(0.055)
    # the histogram kept for plots: cosines 0.9475 (x3, same), 0.9725 (diff), -0.5025 (x5 diff), -0.7525 (same)
    hist = result.similarity_histogram
    genuine, impostor = np.asarray(hist["genuine"]), np.asarray(hist["impostor"])
    assert genuine.size == impostor.size == 100 and genuine.sum() == 4 and impostor.sum() == 6
    assert genuine[97] == 3 and genuine[12] == 1  # bin i covers [-1 + 0.02 i, -1 + 0.02 (i + 1))
    assert impostor[98] == 1 and impostor[24] == 5 and impostor.nonzero()[0].tolist() == [24, 98]


def test_val_at_far_hand_checked():
    """insightface's calculate_val on two folds of four pairs (squared distances off the 0.001 grid).

    Fold A: same 0.1, 0.5, diff 1.0005, 2.0005.  Fold B: same 0.2, 1.5, diff 0.8005, 3.0005.
    FAR target 0.25, between two FAR values: training on B interpolates between 0.800 (FAR 0) and
    0.801 (FAR 0.5) to 0.8005 -> fold A: VAL 2/2, FAR 0/2; training on A gives 1.0005 -> fold B:
    VAL 1/2, FAR 1/2.
    FAR target 0.5, which the training folds hit exactly: interp1d's spline takes the LAST threshold
    with that FAR, 3.000 on B (-> fold A: VAL 2/2, FAR 2/2) and 2.000 on A (-> fold B: VAL 2/2, FAR 1/2).
    """
    dists = [0.1, 0.5, 1.0005, 2.0005, 0.2, 1.5, 0.8005, 3.0005]
    issame = np.array([True, True, False, False, True, True, False, False])
    emb = np.zeros((16, 2))
    for i, d in enumerate(dists):
        cos = 1 - d / 2
        emb[2 * i] = (1.0, 0.0)
        emb[2 * i + 1] = (cos, np.sqrt(1 - cos**2))
    between = evaluate_embeddings(emb, issame, nfolds=2, far_target=0.25)
    assert (between.val, between.val_std, between.far) == pytest.approx((0.75, 0.25, 0.25))
    exact = evaluate_embeddings(emb, issame, nfolds=2, far_target=0.5)
    assert (exact.val, exact.val_std, exact.far) == pytest.approx((1.0, 0.0, 0.75))
    # a FAR target no training fold reaches gives threshold 0: nothing accepted
    strict = evaluate_embeddings(emb, issame, nfolds=2, far_target=1.5)
    assert (strict.val, strict.far) == (0.0, 0.0)


def test_threshold_at_far_is_insightfaces_slinear_spline():
    """The (FAR, threshold) spline insightface fits with interp1d(..., 'slinear'), on a curve with
    repeated FAR values: exact hits take the last threshold of the run, others interpolate across it."""
    from hyperface.evaluation.verification import _threshold_at_far

    far = np.array([0, 0, 0, 0.1, 0.1, 0.2, 0.4])
    thresholds = np.arange(far.size, dtype=np.float64)
    assert _threshold_at_far(far, thresholds, 0.1) == 4.0
    assert _threshold_at_far(far, thresholds, 0.0) == 2.0
    assert _threshold_at_far(far, thresholds, 0.05) == pytest.approx(2.5)  # between (0, 2) and (0.1, 3)
    assert _threshold_at_far(far, thresholds, 0.3) == pytest.approx(5.5)
    assert _threshold_at_far(far, thresholds, 0.4) == 6.0  # the largest FAR, once: its own threshold
    assert _threshold_at_far(far, thresholds, 0.5) == 0.0
    # the largest FAR repeated: the spline's last interval is empty and evaluates to 0 there
    repeated = np.array([0, 0, 0, 0.1, 0.1, 0.2, 0.4, 0.4])
    assert _threshold_at_far(repeated, np.arange(8.0), 0.4) == 0.0
    assert _threshold_at_far(repeated, np.arange(8.0), 0.1) == 4.0


def test_threshold_at_far_agrees_with_scipys_spline_on_random_curves():
    """Where SciPy still builds the spline insightface's interp1d built, the two agree everywhere."""
    from scipy import interpolate

    from hyperface.evaluation.verification import _threshold_at_far

    rng = np.random.default_rng(0)
    for _ in range(300):
        far = np.sort(rng.choice([0.0, 0.1, 0.2, 0.25, 0.5, 0.75, 1.0], size=int(rng.integers(4, 12))))
        far[0] = 0.0
        thresholds = np.arange(far.size, dtype=np.float64) * 0.01
        spline = interpolate.BSpline(np.r_[far[0], far, far[-1]], thresholds, 1)
        for target in np.r_[far, rng.uniform(0, far.max(), 3)]:
            assert _threshold_at_far(far, thresholds, float(target)) == float(spline(target))  # to the last bit


def test_val_threshold_is_the_splines_to_the_last_bit():
    """insightface's interp1d('slinear') threshold is a spline value; linear interpolation written
    another way rounds differently (in about a third of LFW-sized folds), and a pair sitting exactly
    on the spline's threshold then lands on its other side. Fold B's FAR steps from 0 to 1/3 at
    0.7613, so at FAR 0.3 the spline gives 0.7618999999999999 (not 0.7619), and a genuine pair of
    fold A has exactly that distance: insightface does not accept it (fold A: VAL 1/2, not 2/2)."""
    from scipy.interpolate import BSpline

    on_the_threshold = 0.8728688332160794  # its square rounds to the spline's threshold
    fold_a = [on_the_threshold, np.sqrt(0.05), np.sqrt(3.9), np.sqrt(3.95)]
    fold_b = [np.sqrt(0.05), np.sqrt(3.3415), np.sqrt(0.7613), np.sqrt(3.3357)]
    issame = np.array([True, True, False, False, True, False, False, False])
    emb = np.zeros((16, 1))
    emb[1::2, 0] = fold_a + fold_b
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    grid = np.arange(0, 4, 0.001)

    def spline_threshold(d, same):  # insightface's calculate_val on one training fold
        far = np.array([np.sum(np.less(d[~same], t)) / np.sum(~same) for t in grid])
        return float(BSpline(np.r_[far[0], far, far[-1]], grid, 1)(0.3))

    trained_on_b, trained_on_a = spline_threshold(dist[4:], issame[4:]), spline_threshold(dist[:4], issame[:4])
    assert dist[0] == trained_on_b == 0.7618999999999999
    vals = [np.mean(np.less(dist[:4][issame[:4]], trained_on_b)), np.mean(np.less(dist[4:][issame[4:]], trained_on_a))]
    assert vals == [0.5, 1.0]
    result = evaluate_embeddings(emb, issame, nfolds=2, far_target=0.3)
    assert (result.val, result.val_std) == (0.75, 0.25)


def test_kfold_is_contiguous_like_sklearn():
    splits = kfold_splits(23, 10)
    assert [len(test) for _, test in splits] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.concatenate([test for _, test in splits]).tolist() == list(range(23))
    for train, test in splits:
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(23))
    with pytest.raises(HyperfaceError):
        evaluate_embeddings(np.ones((3, 4)), np.array([True]))


# --- .bin files ------------------------------------------------------------------------------------
def _faces(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(count)]


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2 writes for (list of str, list of bool) at protocol 2: BINSTRING opcodes."""
    out = b"\x80\x02(("
    for blob in bins:
        out += b"T" + struct.pack("<i", len(blob)) + blob
    out += b"l("
    for same in issame:
        out += b"\x88" if same else b"\x89"
    return out + b"lt."


@pytest.mark.parametrize("flavour", ["py3", "py3-protocol2", "py2", "numpy-bools", "numpy-array"])
def test_load_bin_reads_every_pickle_flavour(tmp_path, flavour):
    faces = _faces(4, seed=0)
    bins = [encode_image(f, image_format="png") for f in faces]
    issame = [True, False]
    path = tmp_path / "set.bin"
    if flavour == "py3":
        path.write_bytes(pickle.dumps((bins, issame), protocol=4))
    elif flavour == "py3-protocol2":
        data = pickle.dumps((bins, issame), protocol=2)
        assert b"_codecs" in data
        path.write_bytes(data)
    elif flavour == "py2":
        path.write_bytes(_py2_pickle(bins, issame))
    elif flavour == "numpy-bools":
        path.write_bytes(pickle.dumps((bins, list(np.array(issame))), protocol=2))
    else:
        path.write_bytes(pickle.dumps((bins, np.array(issame)), protocol=4))
    images, same = load_bin(path)
    assert images.shape == (4, 112, 112, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.stack(faces))
    assert same.dtype == bool and same.tolist() == issame


def test_bin_images_of_other_sizes_are_resized_like_insightface(tmp_path):
    """insightface: mx.image.resize_short(img, 112) (bicubic, short side to 112) when the width is not
    112. Square images match cv2's bicubic resize; a non-square one is then centre-cropped."""
    import cv2

    rng = np.random.default_rng(4)
    square = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, (150, 100, 3), dtype=np.uint8)
    narrow_enough = rng.integers(0, 256, (130, 112, 3), dtype=np.uint8)  # width 112: insightface does not resize
    blobs = [encode_image(image, image_format="png") for image in (square, tall, narrow_enough)]
    path = tmp_path / "sizes.bin"
    path.write_bytes(pickle.dumps((blobs + blobs[:1], [True, True]), protocol=4))
    images, _ = load_bin(path)
    np.testing.assert_array_equal(images[0], cv2.resize(square, (112, 112), interpolation=cv2.INTER_CUBIC))
    resized = cv2.resize(tall, (112, 112 * 150 // 100), interpolation=cv2.INTER_CUBIC)  # (168, 112)
    np.testing.assert_array_equal(images[1], resized[28:140])
    np.testing.assert_array_equal(images[2], narrow_enough[9:121])


def test_flip_fusion_and_distances_are_float64_like_insightface(tmp_path):
    """insightface sums the two passes' features in float64 arrays and normalises them in float64."""
    from hyperface.evaluation.verification import embed_pairs

    faces = np.stack(_faces(4, seed=5))
    fused, _ = embed_pairs(_pixel_embed, faces, batch_size=3)
    assert fused.dtype == np.float64
    expected = _pixel_embed(faces).astype(np.float64) + _pixel_embed(faces[:, :, ::-1, :].copy())
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_array_equal(fused, expected)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (eval, (f"open({str(self.target)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_bin_is_refused_without_running(tmp_path, payload, protocol):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"x", payload(target)], [True]), protocol=protocol))
    with pytest.raises(HyperfaceError, match="could run code"):
        read_bin(path)
    assert not target.exists()


@pytest.mark.parametrize(
    "obj,match",
    [
        ({"bins": []}, "pair"),
        (([b"a", b"b", b"c"], [True]), "two images per pair"),
        (([b"a", 3], [True]), "not encoded image bytes"),
        (([b"a", b"b"], ["yes"]), "booleans"),
        (([], []), "two images per pair"),
    ],
)
def test_wrong_structure_is_a_clear_error(tmp_path, obj, match):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(HyperfaceError, match=match):
        read_bin(path)


def test_truncated_or_missing_bin(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps(([b"abc", b"def"], [True]))[:-5])
    with pytest.raises(HyperfaceError, match="not a readable.*it is truncated"):
        read_bin(path)
    path.write_bytes(b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"abc")  # a bytes object of 4 EiB
    with pytest.raises(HyperfaceError, match="not a readable.*more memory than this machine has"):
        read_bin(path)
    with pytest.raises(HyperfaceError, match="not found"):
        read_bin(tmp_path / "lfw.bin")
    path.write_bytes(pickle.dumps(([b"abc", b"def"], [True])))
    with pytest.raises(HyperfaceError, match="not a decodable"):
        load_bin(path)


def _pixel_embed(images: np.ndarray) -> np.ndarray:
    """A deterministic, not flip-invariant 'model': a fixed random projection of 8x8-pooled pixels."""
    pooled = images.reshape(len(images), 8, 14, 8, 14, 3).mean(axis=(2, 4)).reshape(len(images), -1) - 127.5
    weights = np.random.default_rng(42).standard_normal((pooled.shape[1], 24)) * np.linspace(0.2, 2.0, pooled.shape[1])[:, None]
    return (pooled @ weights).astype(np.float32)


def test_evaluate_bin_matches_independent_pipeline(tmp_path):
    path = tmp_path / "pairs.bin"
    faces, issame = write_noisy_pairs_bin(path, 40, seed=3)
    result = evaluate_bin(_pixel_embed, path, batch_size=7)
    stacked = np.stack(faces)
    fused = _pixel_embed(stacked) + _pixel_embed(stacked[:, :, ::-1, :].copy())
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    accuracy, std, thresholds = _reference_accuracy(fused, issame)
    assert result.accuracy == pytest.approx(accuracy, abs=1e-9) and result.std == pytest.approx(std, abs=1e-9)
    assert result.fold_thresholds == pytest.approx(thresholds)
    assert result.accuracy > 0.9 and result.name == "pairs"
    norms = np.linalg.norm(np.concatenate([_pixel_embed(stacked), _pixel_embed(stacked[:, :, ::-1, :].copy())]), axis=1)
    assert result.xnorm == pytest.approx(norms.mean(), rel=1e-5)  # insightface's XNorm: both passes
    no_flip = evaluate_bin(_pixel_embed, path, batch_size=64, flip=False)
    plain = _pixel_embed(stacked)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    assert no_flip.accuracy == pytest.approx(_reference_accuracy(plain, issame)[0], abs=1e-9)


def test_val_is_not_reported_for_a_set_of_one_kind_of_pair():
    from hyperface.evaluation.runner import format_table
    from hyperface.evaluation.verification import evaluate_embeddings

    rng = np.random.default_rng(5)
    embeddings = rng.standard_normal((40, 8))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    result = evaluate_embeddings(embeddings, np.ones(20, dtype=bool))  # insightface divides by zero here
    assert result.val is None and result.val_std is None and result.far is None and 0 < result.accuracy <= 1
    line = format_table({"results": {"all_same": result.to_dict()}}).splitlines()[1]
    assert line.split()[-1] == "-"
