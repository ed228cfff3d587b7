"""IJB-B/C 1:1: template pooling vs a loop re-implementation, sklearn-style ROC by hand, a tiny release folder."""

from __future__ import annotations

import numpy as np
import pytest

from hyperface.common.errors import HyperfaceError
from hyperface.evaluation.ijb import (
    evaluate_ijb,
    ijb_image_features,
    read_ijb_meta,
    roc_curve,
    tar_at_far,
    template_features,
)


def _loop_template_features(feats, templates, medias):
    """insightface's image2template_feature, written as plain loops."""
    out = []
    unique = sorted(set(templates.tolist()))
    for t in unique:
        rows = np.flatnonzero(templates == t)
        media_feats = []
        for m in sorted(set(medias[rows].tolist())):
            media_rows = rows[medias[rows] == m]
            media_feats.append(feats[media_rows].mean(axis=0))
        summed = np.sum(media_feats, axis=0)
        out.append(summed / np.linalg.norm(summed))
    return np.array(out), np.array(unique)


def test_template_pooling_matches_loops():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((40, 8)).astype(np.float32)
    templates = rng.integers(100, 110, 40)
    medias = rng.integers(0, 4, 40)
    got, unique = template_features(feats, templates, medias)
    expected, expected_unique = _loop_template_features(feats, templates, medias)
    assert unique.tolist() == expected_unique.tolist()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_pair_scores_in_chunks_are_the_cosines():
    from hyperface.evaluation.ijb import pair_scores

    rng = np.random.default_rng(1)
    feats = rng.standard_normal((12, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    unique = np.arange(100, 112)
    t1, t2 = rng.integers(100, 112, 50), rng.integers(100, 112, 50)
    expected = np.einsum("nd,nd->n", feats[t1 - 100], feats[t2 - 100])
    for chunk in (7, 16_384):  # chunks that end mid-list, and one chunk
        np.testing.assert_allclose(pair_scores(feats, unique, t1, t2, chunk=chunk), expected, atol=1e-12)


def test_roc_and_tar_at_far_by_hand():
    # sklearn's roc_curve keeps corners only: fpr [0,0,0,.25,.25,1], tpr [0,1/3,2/3,2/3,1,1]
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4])
    labels = np.array([1, 1, 0, 1, 0, 0, 0])
    fpr, tpr, thresholds = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.25, 0.25, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert thresholds[0] == np.inf and thresholds[-1] == 0.4
    tars, auc = tar_at_far(labels, scores, far_targets=(1e-6, 0.1, 0.25))
    assert tars == pytest.approx({"1e-06": 2 / 3, "1e-01": 2 / 3, "2e-01": 1.0})  # nearest FAR, larger TAR on ties
    assert auc == pytest.approx(0.25 * 2 / 3 + 0.75 * 1.0)
    with pytest.raises(HyperfaceError, match="genuine"):
        roc_curve(np.zeros(3), np.arange(3.0))


def test_sampled_roc_is_the_best_tar_at_or_below_each_far():
    from hyperface.evaluation.ijb import ROC_FARS, _read_roc

    rng = np.random.default_rng(3)
    labels = (rng.random(4000) < 0.2).astype(np.int8)
    scores = np.round(rng.standard_normal(4000) + 1.5 * labels, 2)  # rounded: tied scores too
    tars, auc, roc = _read_roc(labels, scores)
    assert (tars, auc) == tar_at_far(labels, scores)
    assert roc["far"] == pytest.approx(ROC_FARS.tolist())
    # brute force: accept when score >= t, for every t; keep the best TAR whose FAR stays within each point
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    thresholds = np.r_[np.inf, np.unique(scores)]
    far = np.array([(impostor >= t).mean() for t in thresholds])
    tar = np.array([(genuine >= t).mean() for t in thresholds])
    expected = [tar[far <= target].max() for target in ROC_FARS]
    assert roc["tar"] == pytest.approx(expected)
    assert roc["tar"][-1] == 1.0 and 0 < roc["tar"][40] < 1  # FAR 1e-2: neither empty nor everything


def _pixel_embed(images: np.ndarray) -> np.ndarray:
    pooled = images.reshape(len(images), 8, 14, 8, 14, 3).mean(axis=(2, 4)).reshape(len(images), -1) - 127.5
    weights = np.random.default_rng(42).standard_normal((pooled.shape[1], 32))
    return (pooled @ weights).astype(np.float32)


def _write_release(root, *, identities=6, templates_per_id=2, faces_per_template=3, seed=0):
    """A miniature IJB-C folder: faces pasted into larger crops, landmarks = ArcFace template + offset."""
    import cv2

    from hyperface.recognition.alignment import ARCFACE_TEMPLATE

    rng = np.random.default_rng(seed)
    folder = root / "IJBC"
    (folder / "meta").mkdir(parents=True)
    (folder / "loose_crop").mkdir()
    tid_lines, lmk_lines, crops = [], [], {}
    template_identity = {}
    image = 0
    for identity in range(identities):
        base = rng.integers(0, 256, (112, 112, 3)).astype(np.int16)
        for t in range(templates_per_id):
            template_id = 1000 + identity * 10 + t
            template_identity[template_id] = identity
            for f in range(faces_per_template):
                image += 1
                face = np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
                dx, dy = (int(v) for v in rng.integers(0, 18, 2))
                canvas = np.zeros((130, 130, 3), dtype=np.uint8)
                canvas[dy : dy + 112, dx : dx + 112] = face
                name = f"{image}.png"  # lossless, so alignment can be checked exactly
                cv2.imwrite(str(folder / "loose_crop" / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
                media = template_id * 10 + (0 if f < 2 else 1)  # two frames of one video + one photo
                tid_lines.append(f"{name} {template_id} {media}")
                points = " ".join(f"{v:.4f}" for v in (ARCFACE_TEMPLATE + [dx, dy]).reshape(-1))
                lmk_lines.append(f"{name} {points} {0.5 + 0.5 * rng.random():.4f}")
                crops[name] = face
    ids = sorted(template_identity)
    pair_lines = [f"{a} {b} {int(template_identity[a] == template_identity[b])}" for i, a in enumerate(ids) for b in ids[i + 1 :]]
    (folder / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (folder / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (folder / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    # 1:N lists: G1 = first template of identities 0..2, G2 = of the rest, probes = the second templates
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SUBJECT_ID2\n"
    names_of = {}
    for line in tid_lines:
        name, template, _ = line.split()
        names_of.setdefault(int(template), []).append(name)
    def rows(templates):
        return header + "".join(f"{t},{template_identity[t] + 500},{n},x\n" for t in templates for n in names_of[t])
    firsts = [1000 + i * 10 for i in range(identities)]
    if templates_per_id >= 2:
        (folder / "meta" / "ijbc_1N_gallery_G1.csv").write_text(rows(firsts[: identities // 2]))
        (folder / "meta" / "ijbc_1N_gallery_G2.csv").write_text(rows(firsts[identities // 2 :]))
        (folder / "meta" / "ijbc_1N_probe_mixed.csv").write_text(rows([t + 1 for t in firsts]))
    return folder, crops


def test_ijb_crops_are_insightfaces_bit_for_bit(tmp_path):
    """Loose crops of rotated, scaled faces with fractional landmarks, aligned as insightface's IJB
    scripts do (re-typed below: float32 landmarks and a float32 template built from the 96x112 points,
    scikit-image's fit, warpAffine of the BGR image, then RGB). A float64 fit, or the 112x112 template
    (one float32 step off at the right mouth corner), changes a few pixels of nearly every crop."""
    import cv2
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(3)
    folder = tmp_path / "IJBC"
    (folder / "meta").mkdir(parents=True)
    (folder / "loose_crop").mkdir()
    centred = np.array([[-17.7, -20.3], [17.5, -20.5], [0.0, -0.3], [-14.5, 20.4], [14.7, 20.2]])
    lines = []
    for i in range(8):
        height, width = (int(v) for v in rng.integers(150, 260, 2))
        coarse = rng.integers(0, 256, (height // 6, width // 6, 3)).astype(np.uint8)
        bgr = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.9, 2.5)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = centred @ rotation.T + [width / 2, height / 2] + rng.normal(0, 1.5, (5, 2))
        cv2.imwrite(str(folder / "loose_crop" / f"{i}.png"), bgr)
        lines.append(f"{i}.png " + " ".join(f"{v:.3f}" for v in points.reshape(-1)) + f" {rng.uniform(0.5, 1):.4f}")
    (folder / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    (folder / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(f"{i}.png {i // 2} {i}\n" for i in range(8)))
    (folder / "meta" / "ijbc_template_pair_label.txt").write_text("0 1 0\n2 3 0\n")
    crops = []

    def capture(images):
        crops.append(images.copy())
        return np.ones((len(images), 4), dtype=np.float32)

    ijb_image_features(capture, read_ijb_meta(folder, "IJBC"), batch_size=3, flip=False)
    template = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
                        dtype=np.float32)
    template[:, 0] += 8.0
    for crop, line in zip(np.concatenate(crops), lines):
        fields = line.split()
        landmarks = np.array([float(v) for v in fields[1:-1]], dtype=np.float32).reshape(5, 2)
        if hasattr(SimilarityTransform, "from_estimate"):
            fit = SimilarityTransform.from_estimate(landmarks, template)
        else:  # pragma: no cover - older scikit-image
            fit = SimilarityTransform()
            fit.estimate(landmarks, template)
        warped = cv2.warpAffine(cv2.imread(str(folder / "loose_crop" / fields[0])), fit.params[0:2, :], (112, 112), borderValue=0.0)
        np.testing.assert_array_equal(crop, cv2.cvtColor(warped, cv2.COLOR_BGR2RGB))


def _insightface_1n(probe_feats, gallery_feats, mask):
    """insightface ijb_1n.py's evaluation(), as loops: ranks by argsort, FPIR by the k-th largest negative."""
    import heapq
    import math

    similarity = probe_feats @ gallery_feats.T
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranks = {str(k): float(np.mean([mask[i] in order[i, :k] for i in range(len(mask))])) for k in (1, 5, 10)}
    positives = np.array([similarity[i, mask[i]] for i in range(len(mask))])
    negatives = [similarity[i, j] for i in range(len(mask)) for j in range(similarity.shape[1]) if j != mask[i]]
    top = heapq.nlargest(math.ceil(len(mask) * 0.1), negatives)
    tpir = {}
    for fpir, key in ((0.01, "1e-02"), (0.1, "1e-01")):
        threshold = top[math.ceil(len(mask) * fpir) - 1]
        tpir[key] = float(np.sum(positives > threshold) / len(mask))
    return ranks, tpir


def test_identification_matches_insightfaces_loops_across_chunks():
    from hyperface.evaluation.ijb import identification_scores

    rng = np.random.default_rng(7)
    subjects = np.arange(60) + 100
    gallery = rng.standard_normal((60, 16))
    probe_subject = rng.integers(0, 60, 300)
    probes = gallery[probe_subject] + 1.2 * rng.standard_normal((300, 16))
    feats = np.concatenate([gallery, probes])
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    templates = np.arange(360) + 5000
    lists = {"gallery": (np.repeat(templates[:60], 2), np.repeat(subjects, 2)),  # two faces per template row
             "probe": (templates[60:], subjects[probe_subject])}
    result = identification_scores(feats, templates, lists, chunk=64)  # 5 chunks: the negatives pool across them
    ranks, tpir = _insightface_1n(feats[60:], feats[:60], probe_subject)
    assert result["rank"] == pytest.approx(ranks) and result["tpir_at_fpir"] == pytest.approx(tpir)
    assert 0.2 < ranks["1"] < ranks["5"] < ranks["10"] < 1 and 0 < tpir["1e-02"] < tpir["1e-01"] < 1  # informative
    assert result["num_probes"] == 300 and result["num_gallery"] == 60
    bad = {**lists, "probe": (templates[60:], np.full(300, 999))}
    with pytest.raises(HyperfaceError, match="probe subject 999 has 0 gallery templates"):
        identification_scores(feats, templates, bad)


def test_evaluate_ijb_on_tiny_release(tmp_path):
    folder, crops = _write_release(tmp_path)
    meta = read_ijb_meta(tmp_path, "IJBC")  # the parent folder works too
    assert len(meta.image_names) == 36 and meta.pair_label.sum() == 6 and meta.pair_label.size == 66
    feats = ijb_image_features(_pixel_embed, meta, batch_size=5)
    # alignment undoes the paste offset: features equal those of the original faces (+ mirror), exactly for integer offsets
    faces = np.stack([crops[n] for n in meta.image_names])
    direct = _pixel_embed(faces) + _pixel_embed(faces[:, :, ::-1].copy())
    cos = np.sum(feats * direct, 1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(direct, axis=1)
    assert cos.min() > 0.9999
    result = evaluate_ijb(_pixel_embed, folder, "IJBC", batch_size=8)
    assert result.num_templates == 12 and result.num_pairs == 66 and result.num_images == 36
    assert set(result.tar_at_far) == {"1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}
    assert result.tar_at_far["1e-01"] == 1.0 and result.auc > 0.99
    assert len(result.roc["far"]) == len(result.roc["tar"]) == 61 and result.roc["tar"][-1] == 1.0
    # independent pipeline: loops over templates/media, cosine, same ROC reading
    weighted = feats * meta.faceness[:, None]
    tfeats, unique = _loop_template_features(weighted, meta.templates, meta.medias)
    index = {t: i for i, t in enumerate(unique.tolist())}
    scores = np.array([tfeats[index[a]] @ tfeats[index[b]] for a, b in zip(meta.pair_t1, meta.pair_t2)])
    assert tar_at_far(meta.pair_label, scores)[0] == pytest.approx(result.tar_at_far)
    assert result.identification is None  # 1:N only when asked

    # 1:N on the same features: the second template of each identity against the first ones
    ident = evaluate_ijb(_pixel_embed, folder, "IJBC", batch_size=8, identification=True).identification
    gallery_ids, probe_ids = [1000 + i * 10 for i in range(6)], [1001 + i * 10 for i in range(6)]
    ranks, tpir = _insightface_1n(tfeats[[index[t] for t in probe_ids]], tfeats[[index[t] for t in gallery_ids]], list(range(6)))
    assert ident["rank"] == pytest.approx(ranks) and ident["tpir_at_fpir"] == pytest.approx(tpir)
    assert ident["rank"]["1"] == 1.0 and ident["num_probes"] == 6 and ident["num_gallery"] == 6
    (folder / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(HyperfaceError, match="ijbc_1N_gallery_G2.csv"):
        evaluate_ijb(_pixel_embed, folder, "IJBC", identification=True)


def test_ijb_meta_errors(tmp_path):
    with pytest.raises(HyperfaceError, match="IJBC release folder"):
        read_ijb_meta(tmp_path, "IJBC")
    folder, _ = _write_release(tmp_path, identities=2, templates_per_id=1, faces_per_template=1)
    (folder / "loose_crop" / "2.png").unlink()
    embedded = []
    with pytest.raises(HyperfaceError, match=r"1 of the 2 faces .* e\.g\. 2\.png"):  # found before any embedding
        evaluate_ijb(lambda images: embedded.append(len(images)) or _pixel_embed(images), folder, "IJBC")
    assert embedded == []
    lines = (folder / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()
    (folder / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(HyperfaceError, match="same order"):
        read_ijb_meta(folder, "IJBC")
    with pytest.raises(HyperfaceError, match="IJBB or IJBC"):
        read_ijb_meta(folder, "IJBX")


def test_ijb_meta_values_are_checked_with_their_line(tmp_path):
    folder, _ = _write_release(tmp_path, identities=2, templates_per_id=1, faces_per_template=2)
    meta = folder / "meta"
    pairs, scores = meta / "ijbc_template_pair_label.txt", meta / "ijbc_name_5pts_score.txt"
    good_pairs, good_scores = pairs.read_bytes(), scores.read_text()
    assert read_ijb_meta(folder, "IJBC").pair_t1.tolist() == [1000]  # the fast parser, on a good file

    lines = good_scores.splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + " nan"  # a NaN faceness score would turn every TAR into noise
    scores.write_text("\n".join(lines) + "\n")
    with pytest.raises(HyperfaceError, match=r"name_5pts_score.txt line 2: a faceness score is NaN or inf"):
        read_ijb_meta(folder, "IJBC")
    lines = good_scores.splitlines()
    lines[0] = lines[0].replace(lines[0].split()[3], "inf", 1)
    scores.write_text("\n".join(lines) + "\n")
    with pytest.raises(HyperfaceError, match="line 1: a landmark is NaN or inf"):
        read_ijb_meta(folder, "IJBC")
    scores.write_text(good_scores)

    pairs.write_bytes(good_pairs + b"1000 10x0 0\n")
    with pytest.raises(HyperfaceError, match="pair 2 holds a non-numeric value"):
        read_ijb_meta(folder, "IJBC")
    pairs.write_bytes(good_pairs + b"1000 \xff\xfe 0\n")
    with pytest.raises(HyperfaceError, match="line 2 is not text"):
        read_ijb_meta(folder, "IJBC")
    pairs.write_bytes(good_pairs + b"1000 1010\n")
    with pytest.raises(HyperfaceError, match="line 2: expected at least 3 columns"):
        read_ijb_meta(folder, "IJBC")


def test_a_killed_ijb_run_resumes_from_its_cached_blocks(tmp_path, monkeypatch):
    from hyperface.evaluation import ijb

    monkeypatch.setattr(ijb, "CACHE_BLOCK", 10)  # 36 faces: blocks of 10, 10, 10, 6
    folder, _ = _write_release(tmp_path)
    meta = read_ijb_meta(folder, "IJBC")
    expected = ijb_image_features(_pixel_embed, meta, batch_size=4)
    seen = []

    def dies_in_block_3(images):
        seen.append(len(images))
        if sum(seen) > 2 * 25:  # image + mirror: 25 faces embedded, the third block unfinished
            raise KeyboardInterrupt
        return _pixel_embed(images)

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        ijb_image_features(dies_in_block_3, meta, batch_size=5, cache_dir=cache)
    assert sorted(p.name for p in cache.glob("*.npy")) == ["features-00000000-00000010.npy", "features-00000010-00000020.npy"]
    resumed = []

    def counting(images):
        resumed.append(len(images))
        return _pixel_embed(images)

    np.testing.assert_array_equal(ijb_image_features(counting, meta, batch_size=5, cache_dir=cache), expected)
    assert sum(resumed) == 2 * 16  # only the last two blocks, image and mirror
    result = evaluate_ijb(counting, folder, "IJBC", cache_dir=cache)  # all cached now: nothing embedded
    assert sum(resumed) == 2 * 16 and result.num_images == 36


def test_the_cli_cache_is_keyed_by_the_model(tmp_path):
    from hyperface.evaluation.runner import _ijb_cache_key
    from recognition_fixtures import make_tiny_iresnet, save_backbone

    folder, _ = _write_release(tmp_path, identities=2, templates_per_id=1, faces_per_template=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = save_backbone(make_tiny_iresnet(seed=1), tmp_path / "a" / "backbone.pth")
    b = save_backbone(make_tiny_iresnet(seed=2), tmp_path / "b" / "backbone.pth")
    key = _ijb_cache_key(a, folder, "IJBC", True)
    assert key == _ijb_cache_key(tmp_path / "a", folder, "IJBC", True)  # the run folder names the same weights
    assert key != _ijb_cache_key(b, folder, "IJBC", True) and key != _ijb_cache_key(a, folder, "IJBC", False)


def test_cli_ijb_1n_prints_identification_and_needs_ijb(tmp_path, capsys):
    import json

    from hyperface.cli import main
    from recognition_fixtures import make_tiny_iresnet, save_backbone

    folder, _ = _write_release(tmp_path, identities=4, templates_per_id=2, faces_per_template=1)
    model = save_backbone(make_tiny_iresnet(seed=1), tmp_path / "backbone.pth")
    assert main(["evaluate", str(model), "--ijb-1n"]) == 2
    assert "--ijb-1n needs --ijb DIR" in capsys.readouterr().err
    assert main(["evaluate", str(model), "--ijb", str(folder), "--ijb-1n", "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    ident = json.loads((tmp_path / "r.json").read_text())["ijb"]["identification"]
    line = next(row for row in table.splitlines() if row.startswith("IJBC 1:N"))
    assert f"rank-1 {100 * ident['rank']['1']:.2f}" in line and "TPIR@FPIR=1e-02" in line
    assert "(4 probe templates against 4 gallery templates)" in table


def test_identification_ties_duplicates_and_ijbb_lists(tmp_path):
    from hyperface.evaluation.ijb import identification_scores, read_identification_lists

    # hand case: 2 gallery templates, 3 probes; probe 2's mated score equals the only kept negative
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    probes = np.array([[1.0, 0.0], [0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]])
    feats = np.concatenate([gallery, probes])
    templates = np.array([10, 11, 20, 21, 22])
    lists = {"gallery": (np.array([10, 11]), np.array([1, 2])), "probe": (np.array([20, 21, 22]), np.array([1, 2, 1]))}
    out = identification_scores(feats, templates, lists)
    # non-mated scores: 0, 0, 0.707; ceil(3 x 0.1) = 1 -> threshold 0.707; mated 1, 1, 0.707: strictly above -> 2 of 3.
    # Probe 2's mate ties with the other gallery template: a tie ranks against the probe (rank 2)
    assert out["tpir_at_fpir"]["1e-01"] == pytest.approx(2 / 3) and out["rank"]["1"] == pytest.approx(2 / 3)
    assert out["rank"]["5"] == 1.0
    collapsed = identification_scores(np.ones((5, 2)) / np.sqrt(2), templates, lists)  # every score equal
    assert collapsed["rank"]["1"] == 0.0 and collapsed["tpir_at_fpir"]["1e-01"] == 0.0
    dup = {**lists, "gallery": (np.array([10, 11]), np.array([1, 1]))}
    with pytest.raises(HyperfaceError, match="probe subject 1 has 2 gallery templates"):
        identification_scores(feats, templates, dup)
    meta = tmp_path / "IJBB" / "meta"
    meta.mkdir(parents=True)
    for name, rows in (("S1", "10,1,a.jpg\n"), ("S2", "11,2,b.jpg\n"), ("probe_mixed", "20,1,c.jpg\n")):
        file = f"ijbb_1N_{'gallery_' + name if name != 'probe_mixed' else name}.csv"
        (meta / file).write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + rows)
    read = read_identification_lists(tmp_path, "IJBB")
    assert read["gallery"][0].tolist() == [10, 11] and read["probe"][1].tolist() == [1]


def test_star_marks_only_fars_below_one_impostor_pair():
    from hyperface.evaluation.runner import format_table

    ijb = {"target": "IJBC", "tar_at_far": {"1e-02": 0.9, "1e-03": 0.8}, "num_templates": 1, "num_pairs": 1,
           "num_images": 1, "auc": 0.9, "num_impostor_pairs": 100}
    text = format_table({"ijb": ijb})
    assert "90.00*" not in text and "80.00*" in text  # 1e-2 x 100 = exactly one pair: measured


def test_release_mistakes_are_found_before_any_face_is_embedded(tmp_path):
    folder, _ = _write_release(tmp_path, identities=2, templates_per_id=2, faces_per_template=1)
    meta = folder / "meta"
    files = {name: (meta / name).read_text() for name in
             ("ijbc_template_pair_label.txt", "ijbc_name_5pts_score.txt", "ijbc_face_tid_mid.txt", "ijbc_1N_probe_mixed.csv")}
    embedded = []

    def counting(images):
        embedded.append(len(images))
        return _pixel_embed(images)

    def fails(match, identification=False):
        with pytest.raises(HyperfaceError, match=match):
            evaluate_ijb(counting, folder, "IJBC", identification=identification)
        assert embedded == []
        for name, text in files.items():
            (meta / name).write_text(text)

    (meta / "ijbc_template_pair_label.txt").write_text(files["ijbc_template_pair_label.txt"] + "1000 1001 2\n")
    fails(r"pair 7 has label 2")
    (meta / "ijbc_template_pair_label.txt").write_text(files["ijbc_template_pair_label.txt"] + "1000 4242 0\n")
    fails(r"pair 7 names template 4242, which has no faces")
    lines = files["ijbc_name_5pts_score.txt"].splitlines()
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join([lines[0] + " 0.5", *lines[1:]]) + "\n")
    fails(r"name_5pts_score.txt line 1: expected 12 columns, got 13")
    lines = files["ijbc_face_tid_mid.txt"].splitlines()
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join([*lines[:2], lines[2].replace(" 1010 ", " 10x0 "), *lines[3:]]) + "\n")
    fails(r"face_tid_mid.txt line 3: a non-numeric value")
    (meta / "ijbc_1N_probe_mixed.csv").write_text(files["ijbc_1N_probe_mixed.csv"] + "777,500,x.png,x\n")
    fails(r"1:N probe list names templates without faces", identification=True)
    (meta / "ijbc_1N_probe_mixed.csv").write_text(files["ijbc_1N_probe_mixed.csv"] + "1000,999,1.png,x\n")
    fails(r"probe subject 999 has 0 gallery templates", identification=True)
    evaluate_ijb(counting, folder, "IJBC", identification=True)  # the restored release runs
    assert sum(embedded) == 2 * 4


def test_nan_features_stop_the_ijb_run_with_the_image_named(tmp_path):
    folder, _ = _write_release(tmp_path, identities=2, templates_per_id=2, faces_per_template=2)

    def one_nan(images):
        feats = _pixel_embed(images)
        feats[-1, 3] = np.nan  # the last face of each batch, as an fp16 overflow would
        return feats

    with pytest.raises(HyperfaceError, match=r"features for IJB image 4\.png \(1 of a batch of 4\) are NaN/inf"):
        evaluate_ijb(one_nan, folder, "IJBC", batch_size=4)
