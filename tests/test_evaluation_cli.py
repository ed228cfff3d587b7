"""`hyperface evaluate` end to end: a random-weight iResNet saved as backbone.pth, a .bin the test writes."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from hyperface.cli import main
from hyperface.recognition.iresnet import iresnet
from verification_fixtures import write_noisy_pairs_bin


def _reference_accuracy(embeddings, issame):
    """Straightforward insightface protocol: squared L2, 10 contiguous folds, thresholds 0..4 step 0.01."""
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)
    accs = []
    for test in np.array_split(np.arange(dist.size), 10):
        train = np.setdiff1d(np.arange(dist.size), test)
        train_acc = [np.mean(np.less(dist[train], t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean(np.less(dist[test], best) == issame[test]))
    return float(np.mean(accs)), float(np.std(accs))


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    torch.manual_seed(0)
    model = iresnet("r_tiny", embedding_size=64).eval()
    path = tmp_path_factory.mktemp("model") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_evaluate_cli_matches_independent_computation(tiny_backbone, tmp_path, capsys):
    model, model_path = tiny_backbone
    faces, issame = write_noisy_pairs_bin(tmp_path / "lfw.bin", 20, seed=1, noise=30)
    write_noisy_pairs_bin(tmp_path / "cfp_fp.bin", 10, seed=2, noise=30)
    out = tmp_path / "report.json"
    code = main(["evaluate", str(model_path), str(tmp_path / "lfw.bin"), str(tmp_path / "cfp_fp.bin"),
                 "--json", str(out), "--device", "cpu", "--batch-size", "16"])
    assert code == 0
    table = capsys.readouterr().out
    assert "lfw" in table and "cfp_fp" in table and "+-" in table
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == {"lfw", "cfp_fp"}
    assert report["versions"]["torch"] == torch.__version__ and report["results"]["lfw"]["num_pairs"] == 20
    from hyperface.common.io import file_sha256

    assert report["inputs"]["model"] == {"path": str(model_path.resolve()), "sha256": file_sha256(model_path)}
    assert report["inputs"]["bins"][1]["sha256"] == file_sha256(tmp_path / "cfp_fp.bin")

    # independent: the model by hand ((x - 127.5) / 127.5, NCHW), raw features of image + mirror, normalise
    def features(images):
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
        with torch.no_grad():
            return model((x - 127.5) / 127.5).numpy()

    fused = features(faces) + features(faces[:, :, ::-1].copy())
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    accuracy, std = _reference_accuracy(fused, issame)
    assert report["accuracy"]["lfw"] == pytest.approx(accuracy, abs=1e-9)
    assert report["results"]["lfw"]["std"] == pytest.approx(std, abs=1e-9)


def test_evaluate_cli_errors(tiny_backbone, tmp_path, capsys):
    _, model_path = tiny_backbone
    assert main(["evaluate", str(model_path), str(tmp_path / "missing.bin")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["evaluate", str(model_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["evaluate", str(model_path), str(tmp_path / "missing.bin"), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    write_noisy_pairs_bin(tmp_path / "ok.bin", 4, seed=1)
    assert main(["evaluate", str(model_path), str(tmp_path / "ok.bin"), "--json", str(tmp_path / "afile" / "r.json")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err  # before the evaluation, not after
    for flag, value, rule in (("--batch-size", "0", "at least 1"), ("--folds", "1", "at least 2")):
        assert main(["evaluate", str(model_path), str(tmp_path / "missing.bin"), flag, value]) == 2
        assert f"{flag} must be {rule}, got {value}" in capsys.readouterr().err

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([b"a", Payload()], [True])))
    assert main(["evaluate", str(model_path), str(tmp_path / "evil.bin"), "--device", "cpu"]) == 2
    assert "could run code" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_evaluate_onnx_export_agrees_with_backbone(tiny_backbone, tmp_path):
    """The same network as an ONNX file (insightface's torch2onnx signature) gives the same report."""
    import warnings

    from hyperface.evaluation import evaluate_model

    model, model_path = tiny_backbone
    onnx_path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(onnx_path), input_names=["input.1"],
                          output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}},
                          opset_version=11, dynamo=False)
    write_noisy_pairs_bin(tmp_path / "agedb_30.bin", 10, seed=4, noise=30)
    from_pth = evaluate_model(model_path, [tmp_path / "agedb_30.bin"], device="cpu")
    from_onnx = evaluate_model(onnx_path, [tmp_path / "agedb_30.bin"], device="cpu")
    assert from_onnx["accuracy"] == from_pth["accuracy"]
    a, b = from_onnx["results"]["agedb_30"], from_pth["results"]["agedb_30"]
    assert a["fold_thresholds"] == b["fold_thresholds"] and a["xnorm"] == pytest.approx(b["xnorm"], rel=1e-4)


def _train_run_folder(model, root):
    """The layout `hyperface train` leaves while it trains (no backbone.pth yet), written by its own helpers."""
    from hyperface.training.checkpoint import checkpoint_name, publish_checkpoint, save_safetensors

    step = root / "checkpoints" / checkpoint_name(6)
    step.mkdir(parents=True)
    save_safetensors(model.state_dict(), step / "backbone.safetensors", metadata={"arch": "r_tiny"})
    publish_checkpoint(root, step, {"step": 6, "arch": "r_tiny", "embedding_size": 64})
    return root


def test_evaluate_accepts_what_train_writes(tiny_backbone, tmp_path, capsys):
    model, model_path = tiny_backbone
    write_noisy_pairs_bin(tmp_path / "lfw.bin", 20, seed=1, noise=30)
    run = _train_run_folder(model, tmp_path / "run")
    latest = run / "checkpoints" / "latest"
    step = run / "checkpoints" / "step-000000006"
    reference = None
    for given in (model_path, latest, run, run / "checkpoints", step, step / "backbone.safetensors"):
        out = tmp_path / f"{given.name}.json"
        assert main(["evaluate", str(given), str(tmp_path / "lfw.bin"), "--device", "cpu", "--json", str(out)]) == 0, given
        report = json.loads(out.read_text())
        reference = reference or report["accuracy"]
        assert report["accuracy"] == reference, given
        if given != model_path:
            assert report["model"]["path"] == str(step / "backbone.safetensors"), given
            # the weights' own checksum, never the pointer file's or none for a folder
            from hyperface.common.io import file_sha256

            assert report["inputs"]["model"]["sha256"] == file_sha256(step / "backbone.safetensors"), given
    capsys.readouterr()

    # A pointer to a checkpoint that is gone, and a folder holding no model, say what to pass.
    latest.write_text("step-000000099\n")
    assert main(["evaluate", str(latest), str(tmp_path / "lfw.bin"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "step-000000099" in err and "backbone.safetensors" in err and "unknown model file type" not in err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), str(tmp_path / "lfw.bin"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/latest" in err and "backbone.pth" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "notes").write_text("hello")
    assert main(["evaluate", str(tmp_path / "notes"), str(tmp_path / "lfw.bin"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "type ''" not in err and "backbone.pth" in err and "checkpoints/latest" in err


def test_evaluate_help_describes_what_train_writes(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "checkpoint.pt" not in text and ".ckpt" not in text
    assert "backbone.safetensors" in text and "checkpoints/latest" in text and "--export" in text


def test_the_table_marks_a_val_whose_far_missed_the_target():
    from hyperface.evaluation.runner import format_table

    row = {"accuracy": 0.9, "std": 0.01, "best_threshold": 1.2, "far_target": 1e-3}
    table = format_table({"results": {"tiny": {**row, "num_pairs": 40, "val": 1.0, "far": 0.1},
                                      "cfp_fp": {**row, "num_pairs": 7000, "val": 0.5, "far": 0.0011}}})
    lines = table.splitlines()
    assert lines[1].endswith("100.00*") and lines[2].endswith("50.00")  # 1.1e-3 is the target, reached
    assert lines[-1] == "* FAR reached instead of 1e-3 (too few impostor pairs per fold): tiny 0.1"
