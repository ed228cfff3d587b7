"""`hyperface dataset pairs`: verification .bin files drawn from a dataset's identities."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError
from hyperface.datasets import ImageFolderDataset
from hyperface.evaluation.pairs import sample_pairs
from hyperface.evaluation.verification import evaluate_images, load_bin, read_bin


def _labels(identities: int, per_identity: int) -> np.ndarray:
    return np.repeat(np.arange(identities), per_identity)


def test_pairs_are_laid_out_like_lfw_with_identity_disjoint_folds():
    labels = _labels(40, 5)
    pairs, issame = sample_pairs(labels, 200, seed=3)
    assert pairs.shape == (200, 2) and issame.tolist() == ([True] * 10 + [False] * 10) * 10
    assert (labels[pairs[issame, 0]] == labels[pairs[issame, 1]]).all() and (pairs[:, 0] != pairs[:, 1]).all()
    assert (labels[pairs[~issame, 0]] != labels[pairs[~issame, 1]]).all()
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 200  # no pair twice
    fold_identities = [set(labels[pairs[20 * f : 20 * f + 20]].ravel().tolist()) for f in range(10)]
    assert all(not (a & b) for i, a in enumerate(fold_identities) for b in fold_identities[i + 1 :])
    again, _ = sample_pairs(labels, 200, seed=3)
    other, _ = sample_pairs(labels, 200, seed=4)
    assert np.array_equal(pairs, again) and not np.array_equal(pairs, other)


@pytest.mark.parametrize(
    "labels, pairs, message",
    [
        (_labels(40, 5), 210, "multiple of 20"),
        (_labels(15, 5), 20, "15 identities are too few"),
        (_labels(40, 1), 20, "distinct genuine pairs"),
        (_labels(20, 2), 60, "allow 2 distinct genuine pairs, 3 are needed"),
    ],
)
def test_impossible_requests_are_refused(labels, pairs, message):
    with pytest.raises(HyperfaceError, match=message):
        sample_pairs(labels, pairs, seed=0)


def test_a_request_at_capacity_uses_every_genuine_pair_once():
    labels = _labels(20, 2)  # two identities a fold, one genuine pair each
    pairs, issame = sample_pairs(labels, 40, seed=0)
    assert sorted(map(tuple, pairs[issame].tolist())) == [(2 * i, 2 * i + 1) for i in range(20)]


@pytest.fixture
def faces(tmp_path):
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for identity in range(30):
        base = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        (root / f"{identity:06d}").mkdir(parents=True)
        for j in range(4):  # images of one identity: small variations of one picture
            image = np.clip(base.astype(int) + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"{identity:06d}" / f"{j}.png"), image)
    return root


def test_cli_writes_a_bin_that_reads_back_and_evaluates(faces, tmp_path, capsys):
    out = tmp_path / "holdout.bin"
    assert main(["dataset", "pairs", str(faces), "--out", str(out), "--pairs", "100", "--from-identity", "8"]) == 0
    bins, issame = read_bin(out)
    assert len(bins) == 200 and issame.sum() == 50
    listing = (tmp_path / "holdout.pairs.tsv").read_text().splitlines()
    assert listing[0] == "image_a\timage_b\tsame" and len(listing) == 101
    folder = ImageFolderDataset(faces)
    for (a, b, same), i in zip((line.split("\t") for line in listing[1:]), range(100)):
        assert bins[2 * i] == (faces / a).read_bytes() and bins[2 * i + 1] == (faces / b).read_bytes()
        assert (a.split("/")[0] == b.split("/")[0]) == bool(int(same)) == bool(issame[i])
        assert int(a.split("/")[0]) >= 8 and int(b.split("/")[0]) >= 8
    manifest = json.loads((tmp_path / "holdout.manifest.json").read_text())
    assert manifest["stage"] == "pairs" and manifest["counts"]["identity_range"] == [8, 29]
    assert manifest["source"]["fingerprint"] == folder.fingerprint()

    def pixels(images: np.ndarray) -> np.ndarray:  # an "FR model" that sees the pictures themselves
        return images.reshape(len(images), -1).astype(np.float32) - 127.5

    result = evaluate_images(pixels, *load_bin(out), flip=False)
    assert result.num_pairs == 100 and result.accuracy > 0.95  # same-identity images are near copies here
    assert main(["dataset", "pairs", str(faces), "--out", str(out), "--pairs", "100"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["dataset", "pairs", str(faces), "--out", str(faces / "x.bin"), "--pairs", "100"]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert main(["dataset", "pairs", str(faces), "--out", str(tmp_path / "y.bin"), "--pairs", "30"]) == 2
    assert "--pairs must be a positive multiple of 20" in capsys.readouterr().err


def test_unreadable_images_never_reach_the_bin(faces, tmp_path):
    for identity in range(0, 30, 3):  # a broken file in every third identity
        (faces / f"{identity:06d}" / "9.jpg").write_bytes(b"\xff\xd8\xff" + b"broken")
    out = tmp_path / "p.bin"
    assert main(["dataset", "pairs", str(faces), "--out", str(out), "--pairs", "200"]) == 0
    images, issame = load_bin(out)  # every image decodes
    assert images.shape[0] == 400 and issame.sum() == 100
    left_out = json.loads((tmp_path / "p.manifest.json").read_text())["counts"]["unreadable_left_out"]
    assert left_out and all(name.endswith("/9.jpg") for name in left_out)
    assert "9.jpg" not in (tmp_path / "p.pairs.tsv").read_text()


def test_identities_with_one_image_do_not_starve_a_fold_of_genuine_pairs():
    labels = np.r_[np.repeat(np.arange(20), 3), np.arange(20, 40)]  # 20 identities of 3 images, 20 of one
    for seed in range(20):
        pairs, issame = sample_pairs(labels, 40, seed=seed)
        assert (labels[pairs[issame, 0]] == labels[pairs[issame, 1]]).all()


def test_pairs_never_replace_another_tools_files(faces, tmp_path, capsys):
    out = tmp_path / "emb.bin"
    (tmp_path / "emb.manifest.json").write_text('{"stage": "embed"}')  # embed --out emb.npy writes this name
    assert main(["dataset", "pairs", str(faces), "--out", str(out), "--pairs", "100", "--overwrite"]) == 2
    assert "belongs to `hyperface embed`" in capsys.readouterr().err
    assert json.loads((tmp_path / "emb.manifest.json").read_text()) == {"stage": "embed"} and not out.exists()
    assert main(["dataset", "convert", str(faces), "--out", str(tmp_path / "conv")]) == 0
    assert main(["dataset", "pairs", str(tmp_path / "conv"), "--out", str(tmp_path / "conv" / "p.bin"), "--pairs", "100"]) == 2
    assert "inside the dataset" in capsys.readouterr().err  # a convert output folder is the dataset too


def test_unreadable_images_are_named_when_too_few_remain(tmp_path, capsys):
    root = tmp_path / "zeros"
    for identity in range(25):
        (root / f"{identity:03d}").mkdir(parents=True)
        for j in range(2):
            (root / f"{identity:03d}" / f"{j}.jpg").write_bytes(b"")
    assert main(["dataset", "pairs", str(root), "--out", str(tmp_path / "z.bin"), "--pairs", "20"]) == 2
    err = capsys.readouterr().err
    assert "unreadable image(s) were left out, e.g." in err and ".jpg" in err and not (tmp_path / "z.bin").exists()
