"""hyperface report: statistics against brute force, leakage, label mapping, CLI, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError
from hyperface.datasets import ImageFolderWriter, RecordIOWriter
from hyperface.report import dataset_stats, labels_for_embeddings, run_report
from hyperface.report.stats import Classes, class_centroids, sample_pairs, verification_stats
from recognition_fixtures import make_tiny_iresnet, random_faces, save_backbone


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(num_classes: int, per_class, dim: int = 32, spread: float = 0.5, seed: int = 0):
    """Unit embeddings around random class centres; ``per_class`` an int or a list of counts."""
    rng = np.random.default_rng(seed)
    counts = [per_class] * num_classes if isinstance(per_class, int) else list(per_class)
    centres = unit(rng.standard_normal((num_classes, dim)))
    labels = np.repeat(np.arange(num_classes), counts)
    emb = unit(centres[labels] + spread * rng.standard_normal((len(labels), dim)) / np.sqrt(dim))
    perm = rng.permutation(len(labels))  # rows need not be grouped by class
    return emb[perm], labels[perm], centres


@pytest.mark.parametrize("row_chunk", [65536, 5])  # one chunk; chunks smaller than a class (offsets)
def test_class_statistics_equal_brute_force(monkeypatch, row_chunk):
    from hyperface.report import stats as stats_module

    monkeypatch.setattr(stats_module, "ROW_CHUNK", row_chunk)
    emb, labels, _ = clustered(7, [1, 2, 3, 5, 8, 4, 6], spread=0.8)
    classes = Classes.of(labels)
    centroids, intra = class_centroids(emb, classes)
    for c, label in enumerate(classes.labels):
        rows = emb[labels == label].astype(np.float64)
        if len(rows) == 1:
            assert np.isnan(intra[c])
            continue
        gram = rows @ rows.T
        n = len(rows)
        assert intra[c] == pytest.approx((gram.sum() - np.trace(gram)) / (n * (n - 1)), abs=1e-5)
        mean = rows.sum(0)
        assert np.allclose(centroids[c], mean / np.linalg.norm(mean), atol=1e-5)

    stats = dataset_stats(emb, labels, genuine_pairs=500, impostor_pairs=2000)
    gram = centroids.astype(np.float64) @ centroids.T
    np.fill_diagonal(gram, -np.inf)
    assert np.allclose(stats.nearest_identity, gram.max(axis=1), atol=1e-5)
    report = stats.report
    assert report["num_identities"] == 7 and report["num_images"] == len(labels)
    assert report["images_per_identity"] == {"min": 1, "mean": pytest.approx(29 / 7), "max": 8}
    assert report["intra_class"]["mean_pair_cosine_per_identity"]["mean"] == pytest.approx(np.nanmean(intra), abs=1e-6)
    # per-row passes, by brute force: each image's cosine to its centroid and to a target row
    to_centroid = np.einsum("nd,nd->n", emb, centroids[classes.inverse])
    assert report["intra_class"]["image_to_centroid_cosine"]["mean"] == pytest.approx(to_centroid.mean(), abs=1e-6)
    targets = unit(np.random.default_rng(3).normal(size=(labels.max() + 1, emb.shape[1])))
    with_targets = dataset_stats(emb, labels, identities=targets, genuine_pairs=10, impostor_pairs=10).report
    expected = np.einsum("nd,nd->n", emb, targets[labels])
    assert with_targets["target"]["image_to_target_cosine"]["mean"] == pytest.approx(expected.mean(), abs=1e-6)
    assert with_targets["target"]["image_to_target_cosine"]["min"] == pytest.approx(expected.min(), abs=1e-6)


def test_unique_identities_follow_vec2faces_count():
    """Vec2Face's inter-separability-measurement.py: np.triu(sim > t, k=1).sum(axis=0) == 0."""
    from hyperface.report.stats import earlier_max_cosine

    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((300, 32)))  # 32-d: about 1 % of pairs above 0.4
    sim = centres.astype(np.float64) @ centres.T
    expected = int((np.triu(sim > 0.4, k=1).sum(axis=0) == 0).sum())
    earlier = earlier_max_cosine(centres, rows=37, cols=50)  # tiles that do not divide 300
    assert int((earlier <= 0.4).sum()) == expected and 20 < expected < 280
    np.testing.assert_allclose(earlier[1:], [sim[j, :j].max() for j in range(1, 300)], atol=1e-5)
    assert earlier[0] == -1.0
    labels = np.repeat(np.arange(300), 2)
    emb = np.repeat(centres, 2, axis=0)
    report = dataset_stats(emb, labels, genuine_pairs=10, impostor_pairs=10).report
    assert report["inter_class"]["unique_identities"]["count"] == expected
    assert dataset_stats(emb, labels, unique_threshold=1.0, genuine_pairs=10, impostor_pairs=10).report[
        "inter_class"]["unique_identities"]["count"] == 300


def test_sampled_pairs_are_genuine_or_impostor_and_never_self():
    # classes 3 and 4 have one image: never in a genuine pair; 200 more rows make the set too big to enumerate
    labels = np.r_[[0, 0, 1, 2, 2, 2, 3, 1, 4], 5 + np.arange(200)]
    classes = Classes.of(labels)
    genuine, impostor = sample_pairs(classes, 5000, 5000, np.random.default_rng(1))
    assert genuine.shape == (5000, 2) and impostor.shape == (5000, 2)
    assert (labels[genuine[:, 0]] == labels[genuine[:, 1]]).all()
    assert (genuine[:, 0] != genuine[:, 1]).all()
    assert set(genuine.ravel().tolist()) == {0, 1, 2, 3, 4, 5, 7}  # every eligible image is drawn
    assert (labels[impostor[:, 0]] != labels[impostor[:, 1]]).all()


def test_small_sets_use_every_pair_once():
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 1, 4])
    genuine, impostor = sample_pairs(Classes.of(labels), 5000, 5000, np.random.default_rng(1))
    assert sorted(map(tuple, genuine.tolist())) == [(0, 1), (2, 7), (3, 4), (3, 5), (4, 5)]
    assert len(impostor) == 36 - 5 and len(set(map(tuple, impostor.tolist()))) == 31
    assert (labels[impostor[:, 0]] != labels[impostor[:, 1]]).all()
    some, _ = sample_pairs(Classes.of(labels), 3, 5000, np.random.default_rng(1))  # more than asked: a subset
    assert len(some) == 3 and set(map(tuple, some.tolist())) <= set(map(tuple, genuine.tolist()))


def test_sampled_genuine_pairs_are_uniform_over_pairs_whatever_the_class_sizes():
    """Sampled pairs estimate what enumerating every pair gives: an identity of n images holds
    n(n - 1)/2 genuine pairs. (Drawing the first image uniformly weighted it by n instead: here a
    genuine mean of 0.45 and an EER of 33 % sampled against 0.89 and 0.5 % enumerated.)"""
    rng = np.random.default_rng(0)
    loose = unit(rng.standard_normal((200, 64)))  # 100 identities of 2 unrelated images: 100 pairs
    tight = unit(unit(rng.standard_normal((1, 64))) + 0.05 * rng.standard_normal((200, 64)))  # 1 of 200: 19,900 pairs
    emb, labels = np.r_[loose, tight], np.r_[np.repeat(np.arange(100), 2), np.full(200, 100)]
    exact = dataset_stats(emb, labels).report["verification"]  # 79,800 pairs in all: enumerated
    assert exact["genuine_pairs"] == 20_000
    sampled = dataset_stats(emb, labels, genuine_pairs=20_000, impostor_pairs=20_000).report["verification"]
    assert sampled["genuine_cosine"]["mean"] == pytest.approx(exact["genuine_cosine"]["mean"], abs=0.01)
    assert sampled["eer"] == pytest.approx(exact["eer"], abs=0.003)
    # and pair by pair: each of the 985 pairs of uneven classes drawn about equally often
    labels = np.r_[np.repeat(np.arange(5), [1, 2, 5, 9, 40]), 5 + np.arange(1000)]  # 1,057 rows: sampled
    genuine, _ = sample_pairs(Classes.of(labels), 200_000, 0, np.random.default_rng(2))
    per_pair = np.unique(np.sort(genuine, axis=1), axis=0, return_counts=True)[1]
    expected = 200_000 / (1 + 10 + 36 + 780)  # 242 draws a pair (the 2-image identity's one pair got 7,100)
    assert len(per_pair) == 827 and 0.7 * expected < per_pair.min() and per_pair.max() < 1.3 * expected


def test_verification_statistics():
    rng = np.random.default_rng(0)
    gen, imp = rng.uniform(0.6, 0.9, 1000), rng.uniform(-0.2, 0.3, 100_000)
    separable = verification_stats(gen, imp)
    assert separable["eer"] == 0.0
    threshold = separable["eer_threshold"]
    assert (gen >= threshold).all() and not (imp >= threshold).any()
    assert separable["tar_at_far"]["0.0001"]["tar"] == 1.0
    # a hand case a thinned ROC gets wrong (it drops the crossing: 0.10): FRR 0.2 -> 0.2 while FAR
    # 0 -> 1/3 across thresholds 0.8 -> 0.3; they meet 60 % of the way, at 0.2
    hand = verification_stats(np.array([-0.3, 0.8, 1.5, 1.6, 3.6]), np.array([0.1, 0.2, 0.3]))
    assert hand["eer"] == pytest.approx(0.2) and hand["eer_threshold"] == 0.3
    same = verification_stats(rng.normal(0, 1, 20_000), rng.normal(0, 1, 20_000))
    assert same["eer"] == pytest.approx(0.5, abs=0.02)
    assert abs(same["d_prime"]) < 0.05
    assert "0.0001" not in same["tar_at_far"]  # 2 impostors above FAR 1e-4 cannot be read off 20k pairs
    # TAR at FAR 1e-2 against a direct count at the reported threshold
    gen, imp = rng.normal(1.0, 1.0, 5000), rng.normal(0.0, 1.0, 50_000)
    shifted = verification_stats(gen, imp)
    # closed forms for N(1, 1) vs N(0, 1): d' = 1, EER = Phi(-1/2) = 0.3085 at threshold 1/2
    assert shifted["d_prime"] == pytest.approx(1.0, abs=0.04)
    assert shifted["eer"] == pytest.approx(0.3085, abs=0.01) and shifted["eer_threshold"] == pytest.approx(0.5, abs=0.05)
    # unequal spreads: d' = (1 - 0) / sqrt((1 + 4) / 2)
    assert verification_stats(gen, rng.normal(0.0, 2.0, 50_000))["d_prime"] == pytest.approx(1 / np.sqrt(2.5), abs=0.03)
    entry = shifted["tar_at_far"]["0.01"]
    assert (imp >= entry["threshold"]).mean() <= 0.01
    assert entry["tar"] == pytest.approx((gen >= entry["threshold"]).mean(), abs=1e-9)
    # 100 tied top impostor scores: the FAR jumps from 0 to 1e-2, so FAR 1e-3 has no reading
    tied = np.r_[np.full(100, 0.9), rng.uniform(-0.2, 0.3, 9900)]
    result = verification_stats(rng.uniform(0.5, 0.85, 1000), tied)["tar_at_far"]
    assert "0.001" not in result and "0.01" in result


@pytest.mark.parametrize("base_chunk", [262_144, 100])  # one block; the reference read 100 rows at a time
def test_leakage_flags_exactly_the_planted_identities(tmp_path, monkeypatch, base_chunk):
    from hyperface.report import stats as stats_module

    monkeypatch.setattr(stats_module, "BASE_CHUNK", base_chunk)
    emb, labels, centres = clustered(40, 6, dim=64, spread=0.3, seed=2)
    rng = np.random.default_rng(3)
    leaked = [3, 17, 29]
    reference = unit(np.concatenate([rng.standard_normal((500, 64)), centres[leaked] + 0.05 * rng.standard_normal((3, 64))]))
    np.save(tmp_path / "emb.npy", emb)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "ref.npy", reference)
    np.save(tmp_path / "ids.npy", centres)
    report = run_report(tmp_path / "emb.npy", tmp_path / "out", labels=tmp_path / "labels.npy",
                        identities=tmp_path / "ids.npy", reference=tmp_path / "ref.npy", leak_threshold=0.6,
                        genuine_pairs=1000, impostor_pairs=5000)
    assert report["leakage"]["identities_at_or_above"] == 3
    rows = (tmp_path / "out" / "leakage.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["label", "nearest_reference_row", "cosine", "at_or_above_threshold"]
    top = [line.split("\t") for line in rows[1:4]]
    assert sorted(int(r[0]) for r in top) == leaked
    assert sorted(int(r[1]) for r in top) == [500, 501, 502]
    assert all(r[3] == "1" for r in top) and rows[4].split("\t")[3] == "0"
    # images sit near their own centre: consistency with the targets is high, and exact per image
    target = report["target"]["image_to_target_cosine"]
    assert target["mean"] == pytest.approx(float(np.einsum("nd,nd->n", emb, centres[labels]).mean()), abs=1e-6)
    assert target["p5"] > 0.9
    assert report["verification"]["eer"] < 0.01
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "report"
    assert set(manifest["outputs"]) == {"report.json", "leakage.tsv", "report.png"}
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000


def test_report_is_deterministic_for_a_seed(tmp_path):
    emb, labels, _ = clustered(20, 5, seed=4)
    a = dataset_stats(emb, labels, genuine_pairs=300, impostor_pairs=3000, seed=7).report
    b = dataset_stats(emb, labels, genuine_pairs=300, impostor_pairs=3000, seed=7).report
    c = dataset_stats(emb, labels, genuine_pairs=300, impostor_pairs=3000, seed=8).report
    assert a == b and a["verification"] != c["verification"]


def _write_dataset(root, fmt: str, num_classes: int = 4, per_class: int = 3):
    faces = random_faces(num_classes * per_class, seed=5)
    if fmt == "folder":
        with ImageFolderWriter(root) as writer:
            for i, face in enumerate(faces):
                writer.add(face, i // per_class, index=i % per_class)
        return root
    with RecordIOWriter(root) as writer:
        for i, face in enumerate(faces):
            writer.add(face, i // per_class)
    return root / "train.rec"


def test_closest_pairs_are_the_most_similar_pairs_even_in_a_cluster():
    # three near-duplicate identities: all three of their pairs outrank every other pair, though
    # each identity's single nearest neighbour names only two of them
    from hyperface.report.stats import closest_pairs, nearest

    rng = np.random.default_rng(4)
    centroids = rng.standard_normal((23, 16))
    centroids[:3] = centroids[0] + 0.1 * rng.standard_normal((3, 16))
    centroids = unit(centroids).astype(np.float32)
    gram = centroids.astype(np.float64) @ centroids.T.astype(np.float64)
    upper = np.triu_indices(23, 1)
    order = np.argsort(-gram[upper], kind="stable")[:10]
    expected = [(int(upper[0][o]), int(upper[1][o])) for o in order]
    got = closest_pairs(*nearest(centroids, centroids, k=10, exclude_self=True), 10)
    assert [(a, b) for a, b, _ in got] == expected
    assert {(a, b) for a, b, _ in got[:3]} == {(0, 1), (0, 2), (1, 2)}
    np.testing.assert_allclose([c for _, _, c in got], gram[upper][order], atol=1e-5)


@pytest.mark.parametrize("fmt", ["folder", "rec"])
def test_embed_then_report_cli(tmp_path, fmt, capsys):
    data = _write_dataset(tmp_path / "data", fmt)
    model = save_backbone(make_tiny_iresnet(), tmp_path / "backbone.pth")
    assert main(["embed", str(data), "--model", str(model), "--aligned", "--out", str(tmp_path / "emb"),
                 "--no-progress", "--workers", "1"]) == 0
    labels, used = labels_for_embeddings(tmp_path / "emb" / "gallery.npy")  # dataset found via the embed manifest
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert used.resolve() == data.resolve()
    ids = unit(np.random.default_rng(0).standard_normal((4, 512)))
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "emb"), "--out", str(out), "--identities", str(tmp_path / "ids.npy"),
                 "--genuine-pairs", "200", "--impostor-pairs", "2000"]) == 0
    printed = capsys.readouterr().out
    assert "12 images of 4 identities" in printed and "EER" in printed
    report = json.loads((out / "report.json").read_text())
    # 12 images have 66 pairs, fewer than asked: every pair once (4 x 3 genuine, 54 impostor)
    assert report["num_identities"] == 4 and report["verification"]["genuine_pairs"] == 12
    from hyperface.common.io import file_sha256

    assert report["embedding_model"]["sha256"] == file_sha256(model)  # the FR model behind the numbers
    assert report["embedding_model"]["path"] == str(model.resolve())
    assert report["verification"]["impostor_pairs"] == 54
    # the closest pair and the loosest identity, against brute force on the embeddings
    emb = np.load(tmp_path / "emb" / "gallery.npy").astype(np.float64)
    labels = np.asarray(labels)
    centroids = np.stack([emb[labels == c].mean(0) for c in range(4)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    gram = centroids @ centroids.T
    np.fill_diagonal(gram, -2)
    a, b = np.unravel_index(np.argmax(gram), gram.shape)
    closest = report["inter_class"]["closest_pairs"][0]
    assert sorted(closest["labels"]) == sorted([int(a), int(b)]) and closest["cosine"] == pytest.approx(gram[a, b], abs=1e-5)
    intra = [np.mean([emb[i] @ emb[j] for i in np.flatnonzero(labels == c) for j in np.flatnonzero(labels == c) if i < j]) for c in range(4)]
    assert report["intra_class"]["loosest_identities"][0]["label"] == int(np.argmin(intra))
    # identities.jpg shows the images behind those rows: pair rows first, then the loosest
    from hyperface.datasets import open_dataset
    from hyperface.datasets.codec import decode_image
    from hyperface.datasets.preview import LABEL_WIDTH

    sheet = decode_image((out / "identities.jpg").read_bytes()).astype(np.int16)
    shown_pairs = min(4, len(report["inter_class"]["closest_pairs"]))
    assert sheet.shape == ((2 * shown_pairs + 4) * 112, LABEL_WIDTH + 8 * 112, 3)
    source = open_dataset(data)
    first_label = closest["labels"][0]
    first_image = next(source[i][0] for i in range(len(source)) if source.labels[i] == first_label)
    assert np.abs(sheet[:111, LABEL_WIDTH : LABEL_WIDTH + 112] - first_image[:111].astype(np.int16)).mean() < 6
    loosest_row = 2 * shown_pairs
    loosest_label = report["intra_class"]["loosest_identities"][0]["label"]
    loosest_image = next(source[i][0] for i in range(len(source)) if source.labels[i] == loosest_label)
    tile = sheet[loosest_row * 112 : loosest_row * 112 + 111, LABEL_WIDTH : LABEL_WIDTH + 112]
    assert np.abs(tile - loosest_image[:111].astype(np.int16)).mean() < 6
    # the same report again refuses to overwrite silently, and --overwrite gives the same numbers
    assert main(["report", str(tmp_path / "emb"), "--out", str(out)]) == 2
    capsys.readouterr()
    assert main(["report", str(tmp_path / "emb"), "--out", str(out), "--overwrite", "--identities", str(tmp_path / "ids.npy"),
                 "--genuine-pairs", "200", "--impostor-pairs", "2000", "--no-plot"]) == 0
    assert json.loads((out / "report.json").read_text()) == report
    # what it says it wrote is what is there
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"written: {out}/report.json"
    assert not (out / "report.png").exists()


def test_report_bad_input(tmp_path, capsys):
    emb, labels, _ = clustered(3, 4)
    np.save(tmp_path / "emb.npy", emb)
    np.save(tmp_path / "short.npy", labels[:-1])
    np.save(tmp_path / "one.npy", np.zeros(len(labels), dtype=np.int64))
    np.save(tmp_path / "float.npy", labels.astype(np.float32))
    np.save(tmp_path / "negative.npy", np.r_[labels[:-1], -1])
    np.save(tmp_path / "ids16.npy", unit(np.ones((3, 16))))
    np.save(tmp_path / "nan.npy", np.full((4, 32), np.nan, dtype=np.float32))
    cases = {
        "short.npy": "12 rows but there are 11 labels",
        "one.npy": "at least 2 identities",
        "float.npy": "1-D integer array",
        "negative.npy": "row 11 is -1",
    }
    for name, message in cases.items():
        with pytest.raises(HyperfaceError, match=message):
            run_report(tmp_path / "emb.npy", tmp_path / f"out-{name}", labels=tmp_path / name)
    with pytest.raises(HyperfaceError, match="index.txt not found"):
        run_report(tmp_path / "emb.npy", tmp_path / "out-noindex")
    np.save(tmp_path / "labels.npy", labels)
    with pytest.raises(HyperfaceError, match="identities have dimension 16"):
        run_report(tmp_path / "emb.npy", tmp_path / "out-dim", labels=tmp_path / "labels.npy", identities=tmp_path / "ids16.npy")
    assert main(["report", str(tmp_path / "nan.npy"), "--labels", str(tmp_path / "labels.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "NaN/inf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are known to be good
    assert not (tmp_path / "out-dim").exists()  # identity checks run before the output folder exists, too
    np.savez(tmp_path / "archive.npz", labels=labels)
    (tmp_path / "empty.npy").touch()
    for name, message in {"archive.npz": "archive of several arrays", "empty.npy": "cannot read labels"}.items():
        assert main(["report", str(tmp_path / "emb.npy"), "--labels", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_dataset_stats_refuses_non_finite_inputs():
    """The CLI's loaders refuse NaN rows; called directly, a NaN row must not turn into numbers
    (it made its identity vanish from the intra-class summary, every nearest-identity cosine NaN,
    and a NaN reference row reported 0 leaked identities)."""
    emb, labels, centres = clustered(6, 5)
    bad = emb.copy()
    bad[np.flatnonzero(labels == 4)[0], 3] = np.nan
    with pytest.raises(HyperfaceError, match="NaN/inf values in rows of 1 identities \\(labels 4\\)"):
        dataset_stats(bad, labels, genuine_pairs=10, impostor_pairs=10)
    reference = np.r_[centres, unit(np.ones((3, 32)))]
    reference[7, 0] = np.nan
    with pytest.raises(HyperfaceError, match="reference has NaN/inf values \\(row 7\\)"):
        dataset_stats(emb, labels, reference=reference, genuine_pairs=10, impostor_pairs=10)
    identities = centres.copy()
    identities[2, 5] = np.inf
    with pytest.raises(HyperfaceError, match="identities have NaN/inf values in row\\(s\\) \\[2\\]"):
        dataset_stats(emb, labels, identities=identities, genuine_pairs=10, impostor_pairs=10)


def test_report_reads_a_reference_folder_and_warns_about_surplus_identities(tmp_path, hyperface_log):
    emb, labels, _ = clustered(3, 4)
    np.save(tmp_path / "emb.npy", emb)
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "real").mkdir()  # what `hyperface embed ... --out real/` leaves
    np.save(tmp_path / "real" / "gallery.npy", unit(np.random.default_rng(1).normal(size=(20, 32))))
    np.save(tmp_path / "ids.npy", unit(np.random.default_rng(2).normal(size=(5, 32))))  # 5 rows for 3 classes
    run_report(tmp_path / "emb.npy", tmp_path / "out", labels=tmp_path / "labels.npy", reference=tmp_path / "real",
               identities=tmp_path / "ids.npy", plot=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["leakage"]["reference_rows"] == 20
    assert any("has 5 rows but the labels stop at 2" in r.getMessage() for r in hyperface_log)


def test_pose_statistics_from_the_landmarks_embed_kept(tmp_path, capsys):
    from hyperface.recognition.pose import project

    rng = np.random.default_rng(2)
    emb, labels, _ = clustered(4, 30, seed=2)
    yaw = np.where(labels < 2, 0.0, rng.uniform(-60, 60, len(labels)))  # two frontal identities, two turning
    landmarks = np.stack([project((y, 0, 0), size=80, centre=(200, 150)) for y in yaw]).astype(np.float32)
    landmarks[5] = np.nan  # a row the detector gave no landmarks for (an older embed run's chunk)
    np.save(tmp_path / "e.npy", emb)
    np.save(tmp_path / "e.landmarks.npy", landmarks)
    np.save(tmp_path / "l.npy", labels)
    assert main(["report", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "l.npy"), "--out", str(tmp_path / "r"), "--no-plot"]) == 0
    pose = json.loads((tmp_path / "r" / "report.json").read_text())["pose"]
    known = np.isfinite(landmarks).all(axis=(1, 2))
    assert pose["faces_with_pose"] == known.sum() == len(labels) - 1
    for band in ("15", "30", "45"):
        # within two faces: an estimate 1 deg off moves a face sitting on a band edge
        assert pose["abs_yaw_above"][band] == pytest.approx(np.mean(np.abs(yaw[known]) > int(band)), abs=2.01 / known.sum())
    spreads = [np.std(yaw[known & (labels == c)]) for c in range(4)]
    assert pose["identity_yaw_std_deg"]["max"] == pytest.approx(max(spreads), abs=1.5)
    assert pose["identity_yaw_std_deg"]["min"] < 1.0  # the frontal identities
    assert "pose          yaw p5" in capsys.readouterr().out
    np.save(tmp_path / "e.landmarks.npy", landmarks[:10])
    assert main(["report", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "l.npy"), "--out", str(tmp_path / "r2")]) == 2
    assert "landmarks for 120 embeddings" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # refused before the output folder


def test_pose_stats_edges():
    from hyperface.report.stats import Classes, _unique_identities, pose_stats

    labels = np.array([0, 0, 1, 2, 2])
    pose = np.array([[30.0, 0, 0], [-30.0, 0, 0], [45.0, 0, 0], [10.0, 0, 0], [14.0, 0, 0]])
    stats = pose_stats(pose, Classes.of(labels))
    assert stats["abs_yaw_above"] == {"15": 0.6, "30": 0.2, "45": 0.0}  # strictly beyond each band
    assert stats["identity_yaw_std_deg"]["max"] == pytest.approx(30.0)  # identity 1 (one face) has no spread
    assert stats["identity_yaw_std_deg"]["min"] == pytest.approx(2.0)
    assert _unique_identities(np.array([-1.0, 0.4, 0.5, 0.39]), 0.4)["count"] == 3  # at the threshold is unique


def test_report_keeps_binned_distributions(tmp_path):
    from hyperface.report.stats import HISTOGRAM_BINS, HISTOGRAM_RANGE

    emb, labels, _ = clustered(12, [1, 3, 4, 5, 2, 6, 3, 3, 4, 2, 5, 4], seed=2)
    real = unit(np.random.default_rng(3).standard_normal((30, 32)))
    stats = dataset_stats(emb, labels, reference=real, genuine_pairs=100, impostor_pairs=400, seed=0)
    hist = stats.report["histograms"]
    assert hist["bins"] == HISTOGRAM_BINS and tuple(hist["range"]) == HISTOGRAM_RANGE
    for name, values in {"genuine": stats.genuine, "impostor": stats.impostor, "nearest_identity": stats.nearest_identity,
                         "leakage": stats.leakage, "intra_identity": stats.intra_mean[np.isfinite(stats.intra_mean)]}.items():
        expected, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
        assert hist[name] == expected.tolist(), name
    assert sum(hist["intra_identity"]) == 11  # the single-image identity has no pair
    assert "target" not in hist  # no --identities


def _saved_report(tmp_path, name, *, spread, seed, reference=None, leak_threshold=0.4):
    emb, labels, _ = clustered(10, 6, spread=spread, seed=seed)
    np.save(tmp_path / f"{name}-emb.npy", emb)
    np.save(tmp_path / f"{name}-labels.npy", labels)
    run_report(tmp_path / f"{name}-emb.npy", tmp_path / name, labels=tmp_path / f"{name}-labels.npy", reference=reference,
               leak_threshold=leak_threshold, genuine_pairs=100, impostor_pairs=1000, plot=False)
    return json.loads((tmp_path / name / "report.json").read_text())


def test_compare_reports_side_by_side(tmp_path, capsys):
    from hyperface.report.compare import comparison_rows, read_dataset_reports

    np.save(tmp_path / "real.npy", unit(np.random.default_rng(9).standard_normal((40, 32))))
    tight = _saved_report(tmp_path, "tight", spread=0.3, seed=1, reference=tmp_path / "real.npy")
    loose = _saved_report(tmp_path, "loose", spread=1.5, seed=2, reference=tmp_path / "real.npy", leak_threshold=0.3)
    assert main(["report", "--compare", str(tmp_path / "tight"), str(tmp_path / "loose" / "report.json"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    header, *rows = printed.splitlines()
    assert header.split() == ["tight", "loose"]
    row = {line[:26].strip(): line[26:].split() for line in rows if not line.startswith("note")}
    expected = [tight["intra_class"]["mean_pair_cosine_per_identity"]["mean"], loose["intra_class"]["mean_pair_cosine_per_identity"]["mean"]]
    assert [float(v) for v in row["intra: mean pair cosine"]] == pytest.approx(expected, abs=6e-4)
    assert float(row["intra: mean pair cosine"][0]) > float(row["intra: mean pair cosine"][1])  # tight is tighter
    assert [float(v) for v in row["EER (%)"]] == pytest.approx([100 * tight["verification"]["eer"], 100 * loose["verification"]["eer"]], abs=6e-3)
    assert row["identities"] == ["10", "10"] and row["images"] == ["60", "60"]
    assert "different --leak-threshold: tight 0.4, loose 0.3" in printed
    assert "reference sets" not in printed  # the same real.npy behind both
    cmp = tmp_path / "cmp"
    assert (cmp / "comparison.txt").read_text().splitlines()[0] == header
    assert (cmp / "comparison.png").stat().st_size > 10_000
    manifest = json.loads((cmp / "manifest.json").read_text())
    assert manifest["stage"] == "report" and manifest["outputs"] == ["comparison.txt", "comparison.png"]
    assert set(manifest["inputs"]) == {"tight", "loose"}
    # a dataset reported now, beside an earlier one; a report seen through another FR model is flagged
    loose["embedding_model"] = {"path": "/models/other.onnx", "sha256": "b" * 64}
    (tmp_path / "loose" / "report.json").write_text(json.dumps(loose))
    tight_report = json.loads((tmp_path / "tight" / "report.json").read_text())
    tight_report["embedding_model"] = {"path": "/models/w600k_r50.onnx", "sha256": "a" * 64}
    (tmp_path / "tight" / "report.json").write_text(json.dumps(tight_report))
    entries = read_dataset_reports([tmp_path / "tight", tmp_path / "loose"])
    assert dict(comparison_rows(entries))["identities"] == ["10", "10"]
    emb, labels, _ = clustered(8, 5, seed=5)
    np.save(tmp_path / "new-emb.npy", emb)
    np.save(tmp_path / "new-labels.npy", labels)
    assert main(["report", str(tmp_path / "new-emb.npy"), "--labels", str(tmp_path / "new-labels.npy"), "--out", str(tmp_path / "new"),
                 "--genuine-pairs", "50", "--impostor-pairs", "500", "--compare", str(tmp_path / "tight"), str(tmp_path / "loose")]) == 0
    printed = capsys.readouterr().out
    assert "40 images of 8 identities" in printed
    table = (tmp_path / "new" / "comparison.txt").read_text()
    assert table.splitlines()[0].split() == ["new", "tight", "loose"]
    assert "different FR models saw these datasets" in table and "w600k_r50.onnx" in table
    assert table.rstrip("\n") in printed
    assert set(json.loads((tmp_path / "new" / "manifest.json").read_text())["outputs"]) >= {"report.json", "comparison.txt", "comparison.png"}


def test_compare_reports_bad_input(tmp_path, capsys):
    _saved_report(tmp_path, "a", spread=0.5, seed=1)
    _saved_report(tmp_path, "b", spread=0.5, seed=2)
    (tmp_path / "emb").mkdir()
    np.save(tmp_path / "emb" / "gallery.npy", unit(np.ones((2, 4))))
    (tmp_path / "broken.json").write_text("{\"num_images\": 3")
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    text_mean = json.loads((tmp_path / "b" / "report.json").read_text())
    text_mean["intra_class"]["image_to_centroid_cosine"]["mean"] = "x"
    (tmp_path / "text_mean.json").write_text(json.dumps(text_mean))
    old = json.loads((tmp_path / "b" / "report.json").read_text())
    old.pop("histograms")  # a report written before reports kept them: in the table, not the figure
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(old))
    a, b, o = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "o")
    cases = [
        (["--compare", a, str(tmp_path / "emb"), "--out", o], "embeddings, not a report"),
        (["--compare", a, str(tmp_path / "missing"), "--out", o], "no such file or folder"),
        (["--compare", a, str(tmp_path / "broken.json"), "--out", o], "not a readable JSON report"),
        (["--compare", a, str(tmp_path / "other.json"), "--out", o], "no num_images"),
        (["--compare", a, str(tmp_path / "text_mean.json"), "--out", o], "missing or not a number (ValueError"),
        (["--compare", a, "--out", o], "needs two reports or more"),
        (["--compare", a, b, "--identities", "x.npy", "--out", o], "--identities describe(s) a dataset"),
        (["--compare", a, b, "--out", a, "--overwrite"], "is also a --compare report"),
        (["--out", o], "give EMBEDDINGS"),
    ]
    for args, message in cases:
        assert main(["report", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert (tmp_path / "a" / "report.json").exists()
    assert not (tmp_path / "o").exists()
    np.save(tmp_path / "e.npy", unit(np.random.default_rng(0).standard_normal((6, 8))))
    np.save(tmp_path / "l.npy", np.array([0, 0, 1, 1, 2, 2]))
    assert main(["report", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "l.npy"), "--seed", "-1", "--out", o]) == 2
    assert "--seed must be an integer from 0 to" in capsys.readouterr().err
    assert main(["report", "--compare", str(tmp_path / "a"), str(tmp_path / "old"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "comparison.png").exists()  # drawn from the report that has histograms
    assert "old" in capsys.readouterr().out


def test_report_finds_every_image_embed_took_whatever_its_format(tmp_path):
    import cv2

    faces = random_faces(4, seed=8)
    for k, (face, ext) in enumerate(zip(faces, [".gif", ".tif", ".png", ".ppm"])):
        (tmp_path / "data" / f"{k // 2:06d}").mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(ext, cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
        (tmp_path / "data" / f"{k // 2:06d}" / f"{k}{ext}").write_bytes(data.tobytes())
    model = save_backbone(make_tiny_iresnet(), tmp_path / "backbone.pth")
    assert main(["embed", str(tmp_path / "data"), "--model", str(model), "--aligned", "--out", str(tmp_path / "emb"),
                 "--no-progress", "--workers", "1"]) == 0
    labels, _ = labels_for_embeddings(tmp_path / "emb" / "gallery.npy")
    assert labels.tolist() == [0, 0, 1, 1]


def test_embeddings_of_an_image_list_or_a_flat_folder_point_to_labels(tmp_path):
    """Embeddings of an image list or a folder without class sub-folders carry no identities: the
    error says to give them with --labels, instead of "dataset not found" for a file that exists."""
    import cv2

    flat = tmp_path / "photos"
    flat.mkdir()
    for k, face in enumerate(random_faces(3, seed=9)):
        cv2.imwrite(str(flat / f"{k}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    (tmp_path / "faces.lst").write_text("".join(f"{flat / f'{k}.png'}\n" for k in range(3)))
    model = save_backbone(make_tiny_iresnet(), tmp_path / "backbone.pth")
    for source, what in ((tmp_path / "faces.lst", "the image list"), (flat, "a folder without class sub-folders")):
        out = tmp_path / f"emb-{source.stem}"
        assert main(["embed", str(source), "--model", str(model), "--aligned", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
        with pytest.raises(HyperfaceError, match=f"{what}.*--labels LABELS.npy"):
            labels_for_embeddings(out / "gallery.npy")
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(HyperfaceError, match="name image files, but .*train.rec is a RecordIO file"):
        labels_for_embeddings(out / "gallery.npy", tmp_path / "train.rec")


def test_the_plot_keeps_values_below_its_usual_range(tmp_path):
    """Histograms start at -0.3 unless something plotted is lower: then at that value (an identity
    whose two images point apart, intra -1, used to drop out of report.png)."""
    from hyperface.report.plots import histogram_bins, plot_report

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.repeat(np.arange(20), 2)
    emb[1] = -emb[0]  # identity 0: two opposite images
    stats = dataset_stats(emb, labels, genuine_pairs=10, impostor_pairs=10)
    assert stats.intra_mean[0] == pytest.approx(-1.0, abs=1e-5)
    bins = histogram_bins(stats)
    assert bins[0] <= -1.0 and bins[-1] == pytest.approx(1.0) and np.allclose(np.diff(bins), 0.01)
    from types import SimpleNamespace

    usual = SimpleNamespace(impostor=np.array([-0.2, 0.1]), genuine=np.array([0.6]), intra_mean=np.array([np.nan, 0.7]),
                            nearest_identity=np.array([0.2]), target_similarity=None, leakage=None)
    assert histogram_bins(usual)[0] == pytest.approx(-0.3) and len(histogram_bins(usual)) == 131
    assert plot_report(tmp_path / "report.png", stats).is_file()
