"""The whole pipeline through the command line, each stage reading the files the previous one wrote:
pack -> generate (tiny Arc2Face) -> train -> embed the generated set -> evaluate on a .bin -> report."""

from __future__ import annotations

import json
import numpy as np

from generation_fixtures import session_tiny_models
from hyperface.cli import main
from hyperface.datasets import RecordIODataset
from verification_fixtures import write_verification_bin


def test_pack_generate_train_embed_evaluate(tmp_path):
    models = session_tiny_models()
    ids = tmp_path / "pack"
    assert main(["pack", "--identities", "6", "--dim", "512", "--steps", "300", "--out", str(ids), "--no-plot"]) == 0
    metrics = json.loads((ids / "metrics.json").read_text())
    assert metrics["min_angle_deg"] > 101.0  # 6 points in 512-d: the simplex, 101.54 deg

    data = tmp_path / "data"
    assert main(["generate", str(ids), "--arc2face", str(models.arc2face_dir),
                 "--sd15", str(models.sd15_dir), "--steps", "2", "--resolution", "32", "--device", "cpu",
                 "-k", "4", "--batch-size", "8", "--format", "both", "--out", str(data)]) == 0
    rec = RecordIODataset(data / "rec")
    assert len(rec) == 24 and np.bincount(rec.labels).tolist() == [4] * 6

    run = tmp_path / "train"
    # the generate output folder itself stands for its dataset (rec/), in train, embed and report
    assert main(["train", str(data), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64",
                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]) == 0
    assert (run / "backbone.pth").is_file()

    gallery = tmp_path / "gallery.npy"
    assert main(["embed", str(data), "--model", str(run / "backbone.pth"), "--aligned",
                 "--out", str(gallery), "--device", "cpu", "--no-progress"]) == 0
    embeddings = np.load(gallery)
    assert embeddings.shape == (24, 64)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)

    # a verification set from the generated images: 6 same-identity pairs, 6 different-identity pairs
    images = np.stack([rec[i][0] for i in range(len(rec))])
    labels = rec.labels
    pairs, issame = [], []
    for identity in range(6):
        same = np.flatnonzero(labels == identity)
        other = np.flatnonzero(labels == (identity + 1) % 6)
        pairs += [images[same[0]], images[same[1]], images[same[2]], images[other[0]]]
        issame += [True, False]
    bin_path = tmp_path / "synthetic.bin"
    write_verification_bin(bin_path, np.stack(pairs), issame)
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(run / "backbone.pth"), str(bin_path), "--json", str(report), "--device", "cpu",
                 "--folds", "2"]) == 0
    result = json.loads(report.read_text())["results"]["synthetic"]
    assert result["num_pairs"] == 12 and len(result["fold_accuracies"]) == 2
    # the same protocol on embeddings of the pair images made here (trained model, flip fusion)
    from hyperface.evaluation.verification import evaluate_embeddings
    from hyperface.recognition import load_recognizer

    fused = load_recognizer(run / "backbone.pth", flip=True).embed(np.stack(pairs))
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    assert result["accuracy"] == evaluate_embeddings(fused, np.array(issame), nfolds=2).accuracy
    # and the dataset report on the same embeddings (labels found through the embed manifest)
    stats_dir = tmp_path / "report"
    assert main(["report", str(gallery), "--out", str(stats_dir), "--device", "cpu", "--no-plot",
                 "--genuine-pairs", "100", "--impostor-pairs", "1000"]) == 0
    stats = json.loads((stats_dir / "report.json").read_text())
    assert stats["num_identities"] == 6 and stats["images_per_identity"]["min"] == 4
    for stage_dir in (ids, data, run, stats_dir):
        assert json.loads((stage_dir / "manifest.json").read_text())["status"] == "complete"
