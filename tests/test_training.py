"""End-to-end training on a small synthetic face-like dataset the test writes (CPU, tiny iResNet).

The dataset: 8 "identities", each a fixed pattern (shape, place, size, two colours); every image
adds a random colour cast, position jitter and pixel noise, so an untrained network confuses
identities through the nuisance and a trained one must learn to ignore it. Held-out images of the
same identities form a verification .bin evaluated with the insightface protocol.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from hyperface.cli import main as cli_main
from hyperface.common.errors import HyperfaceError
from hyperface.datasets import RecordIOWriter
from hyperface.datasets.codec import encode_image
from hyperface.evaluation.verification import evaluate_bin
from hyperface.recognition.iresnet import iresnet
from hyperface.training import TrainConfig, export_backbone, learning_rate, train
from hyperface.training.checkpoint import load_safetensors, latest_checkpoint
from hyperface.training.trainer import make_embed_fn

CLASSES, TRAIN_PER_CLASS, HELD_PER_CLASS, PAIRS = 8, 24, 8, 80
TINY = dict(arch="r_tiny", embedding_size=64, workers=0, log_every=3, checkpoint_every=0)


def _face_like(label: int, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    ident = np.random.default_rng(1000 + label)
    fg = ident.integers(0, 256, 3).astype(np.float32)
    bg = ident.integers(0, 256, 3).astype(np.float32)
    cx, cy = ident.integers(35, 77, 2)
    radius = int(ident.integers(14, 26))
    cast = rng.normal(0, 40, 3)  # per-image nuisance the model must learn to ignore
    image = np.empty((size, size, 3), np.float32)
    image[:] = bg + cast
    centre = (int(cx + rng.integers(-5, 6)), int(cy + rng.integers(-5, 6)))
    colour = (fg + cast).tolist()
    shape = label % 4
    if shape == 0:
        cv2.circle(image, centre, radius, colour, -1)
    elif shape == 1:
        cv2.rectangle(image, (centre[0] - radius, centre[1] - radius), (centre[0] + radius, centre[1] + radius), colour, -1)
    elif shape == 2:
        cv2.line(image, (centre[0] - radius, centre[1] - radius), (centre[0] + radius, centre[1] + radius), colour, 7)
    else:
        cv2.ellipse(image, centre, (radius, radius // 2), 30, 0, 360, colour, -1)
    image += rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(0)
    held: dict[int, list[np.ndarray]] = {}
    with RecordIOWriter(root / "train") as writer:
        for label in range(CLASSES):
            for _ in range(TRAIN_PER_CLASS):
                writer.add(_face_like(label, rng), label)
            held[label] = [_face_like(label, rng) for _ in range(HELD_PER_CLASS)]
    pair_rng = np.random.default_rng(1)
    bins, issame = [], []
    for k in range(PAIRS):
        a = int(pair_rng.integers(CLASSES))
        same = k % 2 == 0
        b = a if same else int((a + pair_rng.integers(1, CLASSES)) % CLASSES)
        i, j = pair_rng.choice(HELD_PER_CLASS, 2, replace=False)
        bins += [encode_image(held[a][i], image_format="png"), encode_image(held[b][j], image_format="png")]
        issame.append(same)
    with open(root / "heldout.bin", "wb") as handle:
        pickle.dump((bins, issame), handle)
    return {"data": root / "train", "bin": root / "heldout.bin", "root": root}


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_training_lowers_loss_and_learns_to_verify_held_out_faces(synthetic, tmp_path):
    torch.manual_seed(0)
    untrained = iresnet("r_tiny", embedding_size=64)
    before = evaluate_bin(make_embed_fn(untrained, torch.device("cpu"), None, False), synthetic["bin"]).accuracy

    run = tmp_path / "run"
    config = TrainConfig(
        data=str(synthetic["data"]), out=str(run), epochs=8, batch_size=32, warmup_epochs=1, milestones=(6,),
        val_bins=(str(synthetic["bin"]),), device="cpu", **TINY,
    )
    result = train(config)

    assert result.steps == 8 * (CLASSES * TRAIN_PER_CLASS // 32)
    losses = _losses(run)
    assert np.mean(losses[-2:]) < 0.3 * np.mean(losses[:2]), losses
    after = result.val["heldout"]
    assert after >= 0.85 and after >= before + 0.1, (before, after)
    # The same number, recomputed independently from the exported insightface state dict.
    exported = iresnet("r_tiny", embedding_size=64)
    exported.load_state_dict(torch.load(run / "backbone.pth", weights_only=True))
    again = evaluate_bin(make_embed_fn(exported, torch.device("cpu"), None, False), synthetic["bin"]).accuracy
    assert again == pytest.approx(after)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["verification"]["heldout"] == after
    # metrics.jsonl: "epoch" is the 1-based epoch of the step, on loss and validation lines alike
    per_epoch = CLASSES * TRAIN_PER_CLASS // 32
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val" in r] == list(range(1, 9))
    assert manifest["margin"] == {"s": 64.0, "m": 0.5} and manifest["params"]["margin_s"] is None  # resolved beside the flags
    assert all(r["epoch"] == -(-r["step"] // per_epoch) for r in rows)
    assert (run / "metrics.png").read_bytes().startswith(b"\x89PNG") and manifest["outputs"]["curves"] == "metrics.png"


def test_metrics_plot_draws_what_the_log_holds(tmp_path, monkeypatch):
    from hyperface.training import plots

    lines = [{"step": s, "epoch": 1 + (s > 4), "loss": 10.0 / s, "lr": 0.1, "images_per_s": 100.0 + s} for s in range(1, 9)]
    lines.insert(4, {"step": 4, "epoch": 1, "val": {"lfw": 0.6, "agedb_30": 0.55}})
    lines.append({"step": 8, "epoch": 2, "val": {"lfw": 0.75}})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "epoch": 2, "lo'  # a line a kill cut short
    (tmp_path / "metrics.jsonl").write_text(text)
    figures = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    assert plots.plot_metrics(tmp_path) == tmp_path / "metrics.png"
    loss_ax, lr_ax, speed_ax, val_ax = figures[0].axes
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), [10.0 / s for s in range(1, 9)])
    assert loss_ax.get_yscale() == "log"  # losses fall over orders of magnitude
    np.testing.assert_allclose(speed_ax.lines[0].get_xdata(), range(1, 9))
    assert [line.get_xdata()[0] for line in loss_ax.lines[1:]] == [5]  # the epoch boundary
    lfw, agedb = val_ax.lines
    np.testing.assert_allclose(lfw.get_ydata(), [60.0, 75.0])
    np.testing.assert_allclose(agedb.get_ydata(), [55.0])
    assert [t.get_text() for t in val_ax.get_legend().get_texts()] == ["lfw 75.00%", "agedb_30 55.00%"]
    import os

    odd = tmp_path / os.fsdecode(b"run-\xff")  # a run folder whose name is not UTF-8
    odd.mkdir()
    (odd / "metrics.jsonl").write_text(text)
    assert plots.plot_metrics(odd) == odd / "metrics.png" and figures[-1]._suptitle.get_text().startswith("run-\ufffd")
    assert "step 8" in figures[0]._suptitle.get_text()


def test_resume_after_interruption_matches_uninterrupted_run(synthetic, tmp_path):
    common = dict(
        data=str(synthetic["data"]), epochs=2, batch_size=24, loss="adaface", augment="adaface", augment_p=0.5,
        partial_fc=0.5, device="cpu", arch="r_tiny", embedding_size=64, log_every=2, seed=3,
        dropout=0.2,  # dropout draws from the global RNG: a resume must restore it exactly
    )
    reference = train(TrainConfig(out=str(tmp_path / "reference"), workers=0, checkpoint_every=0, **common))
    steps_per_epoch = CLASSES * TRAIN_PER_CLASS // 24
    assert reference.steps == 2 * steps_per_epoch

    class Killed(Exception):
        pass

    def kill_at_step_7(step: int, info: dict) -> None:
        if step == 7:
            raise Killed  # as if the process died: no checkpoint for steps 6-7
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Killed):
        train(TrainConfig(out=str(interrupted), workers=0, checkpoint_every=5, **common), on_step=kill_at_step_7)
    assert latest_checkpoint(interrupted).name == "step-000000005"  # mid-epoch checkpoint
    with open(interrupted / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 8, "lo')  # a line the kill cut short
    # Resume (with worker processes this time: the batches must not depend on them).
    resumed = train(TrainConfig(out=str(interrupted), workers=2, checkpoint_every=5, resume=True, **common))
    assert resumed.steps == reference.steps

    ref_state = torch.load(tmp_path / "reference" / "backbone.pth", weights_only=True)
    new_state = torch.load(interrupted / "backbone.pth", weights_only=True)
    assert ref_state.keys() == new_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], new_state[key]), key
    ref_head = load_safetensors(latest_checkpoint(tmp_path / "reference") / "head-rank0.safetensors")
    new_head = load_safetensors(latest_checkpoint(interrupted) / "head-rank0.safetensors")
    for key in ("weight", "margin.batch_mean", "margin.batch_std"):
        assert torch.equal(ref_head[key], new_head[key]), key
    assert float(new_head["margin.batch_mean"]) != 20.0  # the AdaFace EMA did move
    steps_logged = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged))  # replayed steps are not logged twice
    # the logged losses too: the window open at the step-5 checkpoint (logged at 6) is restored
    assert _losses(interrupted) == _losses(tmp_path / "reference")


def test_resume_refuses_changed_settings(synthetic, tmp_path):
    run = tmp_path / "run"
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, max_steps=2, device="cpu", **TINY)
    train(TrainConfig(**base))
    with pytest.raises(HyperfaceError, match="not empty"):
        train(TrainConfig(**base))
    with pytest.raises(HyperfaceError, match="loss 'arcface' -> 'cosface'"):
        train(TrainConfig(**{**base, "loss": "cosface"}, resume=True))
    with pytest.raises(HyperfaceError, match=r"lr 0\.1 -> 0\.5"):
        train(TrainConfig(**{**base, "lr": 0.5}, resume=True))
    with pytest.raises(HyperfaceError, match="margin_gradient 'exact' -> 'straight-through'"):
        train(TrainConfig(**{**base, "margin_gradient": "straight-through"}, resume=True))
    with pytest.raises(HyperfaceError, match="head_init 'normal' -> 'unit'"):
        train(TrainConfig(**{**base, "head_init": "unit"}, resume=True))
    with pytest.raises(HyperfaceError, match="bn_weight_decay True -> False"):
        train(TrainConfig(**{**base, "bn_weight_decay": False}, resume=True))
    # a checkpoint from before --margin-gradient, --head-init or --bn-weight-decay existed resumes:
    # each setting had its default then
    meta_path = latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("margin_gradient", "head_init", "bn_weight_decay"):
        del meta["config"][key]
    meta_path.write_text(json.dumps(meta))
    assert train(TrainConfig(**{**base, "max_steps": 3}, resume=True)).steps == 3
    with pytest.raises(HyperfaceError, match="--margin-gradient straight-through is for --loss arcface"):
        TrainConfig(**{**base, "loss": "cosface", "margin_gradient": "straight-through"}).resolved()


def test_a_bad_val_bin_fails_before_training_and_the_corrected_command_just_runs(synthetic, tmp_path):
    run = tmp_path / "run"
    not_a_bin = tmp_path / "detector.onnx"
    not_a_bin.write_bytes(b"\x08\x07onnx graph bytes, not a pickle")
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, max_steps=2, device="cpu", **TINY)
    with pytest.raises(HyperfaceError, match="detector.onnx"):
        train(TrainConfig(**base, val_bins=(str(not_a_bin),)))
    assert latest_checkpoint(run) is None and not (run / "metrics.jsonl").exists()
    import pickle

    bins, issame = pickle.loads(synthetic["bin"].read_bytes())
    too_few = tmp_path / "few.bin"
    too_few.write_bytes(pickle.dumps((bins[:18], issame[:9])))  # 9 pairs: not enough for 10 folds
    with pytest.raises(HyperfaceError, match="few.bin holds 9 pair.*10 folds"):
        train(TrainConfig(**base, val_bins=(str(too_few),)))
    assert latest_checkpoint(run) is None and not (run / "metrics.jsonl").exists()
    assert train(TrainConfig(**base, val_bins=(str(synthetic["bin"]),))).steps == 2  # no --resume/--overwrite needed


def test_a_damaged_newest_checkpoint_names_the_one_to_resume_from(synthetic, tmp_path):
    run = tmp_path / "run"
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, device="cpu", **{**TINY, "checkpoint_every": 1})
    train(TrainConfig(**base, max_steps=3))
    newest = latest_checkpoint(run)
    weights = newest / "backbone.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk error after the run wrote it
    with pytest.raises(HyperfaceError, match=r"write step-000000002 into .*latest") as error:
        train(TrainConfig(**base, max_steps=4, resume=True))
    assert str(newest) in str(error.value)
    (run / "checkpoints" / "latest").write_text("step-000000002\n")  # as the message says
    assert train(TrainConfig(**base, max_steps=4, resume=True)).steps == 4
    # Another world size is named as such, before any rank looks for its own (missing) shard files.
    newest = latest_checkpoint(run)
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    (newest / "head-rank0.safetensors").unlink()
    with pytest.raises(HyperfaceError, match="world size 2 -> 1"):
        train(TrainConfig(**base, max_steps=5, resume=True))


def test_resume_checks_the_data_by_content_not_by_path(synthetic, tmp_path):
    import shutil

    from hyperface.datasets import RecordIODataset

    run = tmp_path / "run"
    moved = tmp_path / "copied-to-local-disk"
    shutil.copytree(synthetic["data"], moved)
    base = dict(out=str(run), epochs=1, batch_size=32, max_steps=2, device="cpu", **TINY)
    train(TrainConfig(data=str(synthetic["data"]), **base))
    fingerprint = json.loads((latest_checkpoint(run) / "meta.json").read_text())["data_fingerprint"]
    assert fingerprint == RecordIODataset(moved).fingerprint()

    # The same classes and image count, one image rendered differently: another dataset.
    other = tmp_path / "rendered-again"
    source = RecordIODataset(synthetic["data"])
    with RecordIOWriter(other) as writer:
        for index in range(len(source)):
            image, label = source[index]
            writer.add(255 - image if index == 5 else image, label)
    assert RecordIODataset(other).labels.tolist() == source.labels.tolist()
    with pytest.raises(HyperfaceError, match="dataset's content differs"):
        train(TrainConfig(data=str(other), **{**base, "max_steps": 3}, resume=True))
    assert latest_checkpoint(run).name == "step-000000002"  # nothing trained on it

    # A copy of the same data at another path resumes.
    assert train(TrainConfig(data=str(moved), **{**base, "max_steps": 3}, resume=True)).steps == 3
    assert json.loads((run / "manifest.json").read_text())["data_fingerprint"] == fingerprint
    # A checkpoint from before the fingerprint existed resumes (its data is unknown, not different).
    meta_path = latest_checkpoint(run) / "meta.json"
    meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != "data_fingerprint"}))
    assert train(TrainConfig(data=str(other), **{**base, "max_steps": 4}, resume=True)).steps == 4


def test_resume_of_a_finished_run_checks_settings_and_keeps_its_manifest(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, device="cpu", **TINY)
    done = train(TrainConfig(**base))
    assert done.steps == CLASSES * TRAIN_PER_CLASS // 32
    manifest, backbone = (run / "manifest.json").read_bytes(), (run / "backbone.pth").read_bytes()
    assert json.loads(manifest)["status"] == "complete" and json.loads(manifest)["params"]["lr"] == 0.1

    # A changed setting is refused as for an unfinished run, before anything is written.
    code = cli_main(["train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64",
                     "--epochs", "1", "--batch-size", "32", "--workers", "0", "--device", "cpu", "--log-every", "3",
                     "--checkpoint-every", "0", "--resume", "--lr", "0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lr 0.1 -> 0.5" in err and len(err.strip().splitlines()) == 1
    assert (run / "manifest.json").read_bytes() == manifest

    # The same settings: nothing to train, and the run's facts stay as they were.
    again = train(TrainConfig(**base, resume=True))
    assert again.nothing_to_do and again.steps == done.steps and again.last_loss == pytest.approx(done.last_loss)
    assert (run / "manifest.json").read_bytes() == manifest
    assert (run / "backbone.pth").read_bytes() == backbone
    # ArcFace's own margin and scale named explicitly are the same settings; another margin is not
    assert train(TrainConfig(**base, margin_m=0.5, margin_s=64.0, resume=True)).nothing_to_do
    with pytest.raises(HyperfaceError, match=r"margin_m 0.5 -> 0.45"):
        train(TrainConfig(**base, margin_m=0.45, resume=True))


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("lr", -1.0, "--lr"),
        ("lr", float("nan"), "--lr"),
        ("workers", -1, "--workers"),
        ("max_steps", 0, "--max-steps"),
        ("epochs", 0, "--epochs"),
        ("batch_size", 1, "--batch-size"),
        ("embedding_size", 0, "--embedding-size"),
        ("dropout", 1.0, "--dropout"),
        ("partial_fc", 0.0, "--partial-fc"),
        ("margin_s", -64.0, "--margin-s"),
        ("margin_m", -0.1, "--margin-m"),
        ("weight_decay", -5e-4, "--weight-decay"),
        ("momentum", 1.5, "--momentum"),
        ("gamma", 0.0, "--gamma"),
        ("poly_power", 0.0, "--poly-power"),
        ("warmup_epochs", -1.0, "--warmup-epochs"),
        ("warmup_epochs", 30.0, "--warmup-epochs"),
        ("clip_grad_norm", -1.0, "--clip-grad-norm"),
        ("augment_p", 2.0, "--augment-p"),
        ("val_every", -1, "--val-every"),
        ("checkpoint_every", -5, "--checkpoint-every"),
        ("keep_checkpoints", -1, "--keep-checkpoints"),
        ("log_every", 0, "--log-every"),
        ("seed", -1, "--seed"),
        ("milestones", (12, 0), "--milestones"),
    ],
)
def test_numeric_options_out_of_range_are_refused_naming_the_flag(field, value, flag):
    with pytest.raises(HyperfaceError, match=f"^{flag} must be"):
        TrainConfig(data="", out="", **{field: value}).resolved()


def test_cli_refuses_bad_numbers_before_touching_the_run_folder(synthetic, tmp_path, capsys):
    for flag, value in (("--lr", "-1"), ("--workers", "-1"), ("--max-steps", "0")):
        out = tmp_path / flag.strip("-")
        code = cli_main(["train", str(synthetic["data"]), "--out", str(out), "--device", "cpu", flag, value])
        err = capsys.readouterr().err
        assert code == 2 and f"error: {flag} must be" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def _train_log_lines(synthetic, run, monkeypatch, hyperface_log, progress_env: str) -> list[str]:
    monkeypatch.setenv("HYPERFACE_PROGRESS", progress_env)
    hyperface_log.clear()  # this run's lines only
    train(TrainConfig(data=str(synthetic["data"]), out=str(run), epochs=2, batch_size=32, max_steps=4,
                      device="cpu", **{**TINY, "log_every": 1}))
    messages = [r.getMessage() for r in hyperface_log]
    return [line for line in messages if line.startswith("step ") and " loss " in line]


def test_loss_is_logged_every_log_every_steps_when_there_is_no_progress_bar(synthetic, tmp_path, monkeypatch, hyperface_log):
    lines = _train_log_lines(synthetic, tmp_path / "batch-job", monkeypatch, hyperface_log, "0")
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], lines
    for line in lines:
        assert "epoch 1/2" in line and " lr " in line and "img/s" in line and " eta " in line, line
    losses = _losses(tmp_path / "batch-job")
    assert float(lines[0].split("loss ")[1].split()[0]) == pytest.approx(losses[0], abs=1e-4)
    # On a terminal (forced here) the progress bar shows the loss instead: no log lines.
    assert _train_log_lines(synthetic, tmp_path / "terminal", monkeypatch, hyperface_log, "1") == []


def test_cli_train_and_export_round_trip_through_recognizer_loader(synthetic, tmp_path):
    from hyperface.recognition import load_recognizer

    run = tmp_path / "cli-run"
    code = cli_main([
        "train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64",
        "--epochs", "1", "--batch-size", "32", "--max-steps", "2", "--workers", "0", "--device", "cpu",
        "--loss", "cosface", "--optimizer", "adamw",
    ])
    assert code == 0 and (run / "backbone.pth").is_file()
    assert json.loads((run / "manifest.json").read_text())["status"] == "partial"  # stopped by --max-steps
    assert cli_main(["train", "--export", str(run), "--out", str(tmp_path / "model.onnx")]) == 0
    before = (tmp_path / "model.onnx").read_bytes()
    assert cli_main(["train", "--export", str(run), "--out", str(tmp_path / "model.onnx")]) == 2  # never replaced unasked
    assert (tmp_path / "model.onnx").read_bytes() == before
    assert cli_main(["train", "--export", str(run), "--out", str(tmp_path / "model.onnx"), "--overwrite"]) == 0
    export_backbone(run / "checkpoints", tmp_path / "exported.pth")
    assert cli_main(["train", "--export", str(run / "checkpoints" / "latest"), "--out", str(tmp_path / "latest.pth")]) == 0
    latest, exported = (torch.load(tmp_path / name, weights_only=True) for name in ("latest.pth", "exported.pth"))
    assert latest.keys() == exported.keys() and all(torch.equal(latest[k], exported[k]) for k in latest)  # the pointer file works too

    images = np.stack([_face_like(k % CLASSES, np.random.default_rng(k)) for k in range(4)])
    model = iresnet("r_tiny", embedding_size=64).eval()
    model.load_state_dict(load_safetensors(latest_checkpoint(run) / "backbone.safetensors"))
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        expected = torch.nn.functional.normalize(model(x)).numpy()
    for path in (tmp_path / "exported.pth", run / "backbone.pth", tmp_path / "model.onnx"):
        recognizer = load_recognizer(path)
        assert recognizer.embedding_size == 64
        np.testing.assert_allclose(recognizer.embed(images), expected, atol=1e-4, err_msg=str(path))


def test_bad_inputs_are_clear_errors(synthetic, tmp_path):
    base = dict(data=str(synthetic["data"]), device="cpu", **TINY)
    with pytest.raises(HyperfaceError, match="larger than"):
        train(TrainConfig(out=str(tmp_path / "a"), batch_size=4096, **base))
    with pytest.raises(HyperfaceError, match=r"unknown --arch 'r51': choose one of r18, r34, r50, r100, r200, mbf, mbf_large"):
        train(TrainConfig(out=str(tmp_path / "b"), **{**base, "arch": "r51"}))
    assert not (tmp_path / "b").exists()  # refused before the output folder
    with pytest.raises(HyperfaceError, match="fp16 needs a CUDA"):
        train(TrainConfig(out=str(tmp_path / "c"), amp="fp16", **base))
    with pytest.raises(HyperfaceError, match="not found"):
        train(TrainConfig(out=str(tmp_path / "d"), **{**base, "data": str(tmp_path / "missing")}))
    with pytest.raises(HyperfaceError, match="export to a .pth"):
        export_backbone(_tiny_checkpoint(tmp_path), tmp_path / "m.bin")


def test_export_to_pt_is_the_state_dict_pth_is_and_embed_loads_it(tmp_path, capsys):
    from hyperface.recognition import load_recognizer

    checkpoint = _tiny_checkpoint(tmp_path)
    assert cli_main(["train", "--export", str(checkpoint), "--out", str(tmp_path / "model.pt")]) == 0
    export_backbone(checkpoint, tmp_path / "model.pth")
    pt, pth = (torch.load(tmp_path / name, weights_only=True) for name in ("model.pt", "model.pth"))
    assert pt.keys() == pth.keys() and all(torch.equal(pt[k], pth[k]) for k in pt)
    images = np.stack([_face_like(k, np.random.default_rng(k)) for k in range(3)])
    np.testing.assert_array_equal(load_recognizer(tmp_path / "model.pt").embed(images),
                                  load_recognizer(tmp_path / "model.pth").embed(images))
    # another suffix is refused by name before the checkpoint is read (this one does not exist)
    assert cli_main(["train", "--export", str(tmp_path / "missing"), "--out", str(tmp_path / "model.bin")]) == 2
    assert "export to a .pth or .pt (insightface state dict) or .onnx file" in capsys.readouterr().err


def _tiny_checkpoint(tmp_path: Path) -> Path:
    from hyperface.training.checkpoint import save_safetensors

    path = tmp_path / "tiny" / "backbone.safetensors"
    save_safetensors(iresnet("r_tiny", embedding_size=64).state_dict(), path)
    return path


def test_learning_rate_schedules():
    cfg = TrainConfig(data="", out="", lr=0.1, warmup_epochs=1, milestones=(3, 5)).resolved()
    lrs = [learning_rate(s, cfg, steps_per_epoch=10, total_steps=60) for s in range(60)]
    # linear warmup from 0, one step behind PolyScheduler's formula (two steps at 0), the base lr at step 11
    assert lrs[:3] == [0.0, 0.0, pytest.approx(0.01)] and lrs[10] == pytest.approx(0.09) and lrs[11] == pytest.approx(0.1)
    assert lrs[29] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01) and lrs[50] == pytest.approx(0.001)
    poly = TrainConfig(data="", out="", schedule="poly", lr=0.1).resolved()
    values = [learning_rate(s, poly, steps_per_epoch=10, total_steps=60) for s in range(60)]
    assert values[0] == values[1] == pytest.approx(0.1) and all(b < a for a, b in zip(values[1:], values[2:]))
    assert values[31] == pytest.approx(0.1 * 0.5**2)
    linear = TrainConfig(data="", out="", schedule="poly", lr=0.1, poly_power=1.0).resolved()
    assert learning_rate(31, linear, steps_per_epoch=10, total_steps=60) == pytest.approx(0.1 * 0.5)
    adamw = TrainConfig(data="", out="", optimizer="adamw").resolved()
    assert adamw.lr == 1e-3 and adamw.weight_decay == 0.05


class _PolyScheduler(torch.optim.lr_scheduler.LRScheduler):
    """insightface arcface_torch's lr_scheduler.PolyScheduler, as it reads (torch 2.13 no longer takes
    the verbose=False it passes to the base class)."""

    def __init__(self, optimizer, base_lr, max_steps, warmup_steps, last_epoch=-1):
        self.base_lr = base_lr
        self.warmup_lr_init = 0.0001
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.power = 2
        super().__init__(optimizer, -1)
        self.last_epoch = last_epoch

    def get_warmup_lr(self):
        alpha = float(self.last_epoch) / float(self.warmup_steps)
        return [self.base_lr * alpha for _ in self.optimizer.param_groups]

    def get_lr(self):
        if self.last_epoch == -1:
            return [self.warmup_lr_init for _ in self.optimizer.param_groups]
        if self.last_epoch < self.warmup_steps:
            return self.get_warmup_lr()
        alpha = pow(1 - float(self.last_epoch - self.warmup_steps) / float(self.max_steps - self.warmup_steps), self.power)
        return [self.base_lr * alpha for _ in self.optimizer.param_groups]


def _arcface_torch_step_lrs(base: float, passes_per_epoch: int, epochs: int, warmup_epochs: int, gradient_acc: int) -> list[float]:
    """The lr of each optimiser step of train_v2.py's loop: PolyScheduler stepped after every forward
    pass, the optimiser every gradient_acc-th."""
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    optimizer = torch.optim.SGD([param], lr=base, momentum=0.9)
    scheduler = _PolyScheduler(optimizer, base_lr=base, max_steps=passes_per_epoch * epochs,
                               warmup_steps=passes_per_epoch * warmup_epochs)
    used = []
    for global_step in range(1, passes_per_epoch * epochs + 1):
        if global_step % gradient_acc == 0:
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
        scheduler.step()
    return used


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # train_v2.py's order with gradient_acc > 1
@pytest.mark.parametrize("warmup_epochs, grad_accum", [(1, 1), (0, 1), (2, 1), (1, 2), (2, 4)])
def test_poly_schedule_is_arcface_torch_s_poly_scheduler_step_for_step(warmup_epochs, grad_accum):
    steps_per_epoch, epochs = 10, 6
    theirs = _arcface_torch_step_lrs(0.1, steps_per_epoch * grad_accum, epochs, warmup_epochs, grad_accum)
    cfg = TrainConfig(data="", out="", lr=0.1, schedule="poly", warmup_epochs=warmup_epochs, epochs=epochs,
                      grad_accum=grad_accum).resolved()
    ours = [learning_rate(s, cfg, steps_per_epoch, steps_per_epoch * epochs) for s in range(steps_per_epoch * epochs)]
    assert ours == theirs  # every lr, to the bit


def test_torchrun_ddp_shards_centres_resumes_and_matches_two_nodes(synthetic, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "-m", "hyperface", "train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny",
        "--embedding-size", "64", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--device", "cpu",
        "--loss", "adaface", "--partial-fc", "0.5", "--checkpoint-every", "4", "--log-every", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(extra: list[str]) -> subprocess.CompletedProcess:
        # A fresh port for every launch (the last one's store may still hold its port), and one more
        # try when the port was taken between picking and binding (seen once, on a loaded machine).
        # Timeouts are generous: two processes share two cores with whatever else runs.
        for attempt in range(2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                command[command.index("--master_port") + 1] = str(sock.getsockname()[1])
            done = subprocess.run(command + extra, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode == 0 or "address already in use" not in done.stderr.lower() or attempt:
                return done
        return done

    def failure(done: subprocess.CompletedProcess) -> str:  # a rank's own error comes early, torchrun's summary last
        return done.stderr if len(done.stderr) < 6000 else done.stderr[:3000] + "\n...\n" + done.stderr[-3000:]

    first = torchrun(["--max-steps", "5"])
    assert first.returncode == 0, failure(first)
    second = torchrun(["--resume"])
    assert second.returncode == 0, failure(second)
    assert second.stdout.count("trained 12 steps") == 1  # rank 0 only; 192 images / (2 x 16) x 2 epochs
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "complete" and manifest["resumed_from"]
    latest = latest_checkpoint(run)
    shards = [load_safetensors(latest / f"head-rank{r}.safetensors")["weight"] for r in range(2)]
    assert [s.shape[0] for s in shards] == [4, 4]  # 8 classes split over 2 ranks

    # The same job on two "nodes" (torchrun --nnodes 2, one process each, LOCAL_RANK 0 on both),
    # uninterrupted: it must end bit for bit where the interrupted-and-resumed single-node run did.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    train_args = command[command.index("-m", 3):]  # "-m hyperface train ..."
    train_args[train_args.index(str(run))] = str(tmp_path / "two-nodes")
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
             "--master_addr", "127.0.0.1", "--master_port", str(port), *train_args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    resumed = torch.load(run / "backbone.pth", weights_only=True)
    two_nodes = torch.load(tmp_path / "two-nodes" / "backbone.pth", weights_only=True)
    for key in resumed:
        assert torch.equal(resumed[key], two_nodes[key]), key
    assert json.loads((tmp_path / "two-nodes" / "manifest.json").read_text())["world_size"] == 2


def test_sigterm_checkpoints_the_current_step_then_stops(synthetic, tmp_path):
    import os
    import signal

    def terminate_at_step_3(step: int, info: dict) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, device="cpu", **TINY),
              on_step=terminate_at_step_3)
    assert latest_checkpoint(run).name == "step-000000003"  # no step lost (checkpoint_every=0)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    resumed = train(TrainConfig(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, device="cpu", resume=True, **TINY))
    assert resumed.steps == CLASSES * TRAIN_PER_CLASS // 32


def test_sigterm_to_the_whole_job_with_loader_workers_checkpoints_and_resumes(synthetic, tmp_path):
    """Slurm's scancel and time limit signal every process of the job: the DataLoader workers leave
    the SIGTERM to the main process, which checkpoints the current step and exits 130 (a worker dying
    of it once made the checkpoint fail with "DataLoader worker killed by signal")."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "hyperface", "train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny",
            "--embedding-size", "64", "--epochs", "30", "--max-steps", "20", "--batch-size", "8", "--workers", "2",
            "--device", "cpu", "--log-every", "1", "--checkpoint-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYPERFACE_PROGRESS": "0"}
    job = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_losses(run) if (run / "metrics.jsonl").is_file() else []) < 3:
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGTERM)  # the main process and both workers, as Slurm does
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, output
    assert "killed by signal" not in output and "stopped by a signal at step" in output
    stopped = int(latest_checkpoint(run).name.split("-")[1])
    assert 3 <= stopped < 20 and len(_losses(run)) == stopped  # the step under way when the signal came
    resumed = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped}" in resumed.stderr and len(_losses(run)) == 20


def test_loader_workers_still_end_when_their_own_process_ends_them(tmp_path):
    """A worker ignores an outside SIGTERM but not its parent's: multiprocessing ends persistent
    workers with SIGTERM at exit, and a process whose loader was never closed must still exit."""
    import subprocess
    import sys

    script = tmp_path / "leak.py"
    script.write_text(
        "import torch\n"
        "from hyperface.training.trainer import _leave_signals_to_main\n"
        "loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True,\n"
        "                                     worker_init_fn=_leave_signals_to_main)\n"
        "it = iter(loader); next(it)\n"
        "import multiprocessing; multiprocessing.active_children()  # the workers are alive\n"
        "LEAK = (loader, it)\n"
        "print('done', flush=True)\n"
    )
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0 and "done" in finished.stdout, finished.stderr


@pytest.mark.parametrize("every", [{"checkpoint_every": 1, "log_every": 1},
                                   {"checkpoint_every": 1, "log_every": 50, "val_every": 1}])
def test_a_diverged_run_stops_and_keeps_its_last_finite_checkpoint(synthetic, tmp_path, every):
    """An absurd learning rate: the loss goes NaN. Training stops with a clear error instead of
    running on, and never saves (so never prunes for) a checkpoint of NaN weights; also when a
    verification comes before the next loss log."""
    from hyperface.training.checkpoint import load_safetensors as load

    run = tmp_path / "run"
    val = {"val_bins": (str(synthetic["bin"]),)} if "val_every" in every else {}
    cfg = TrainConfig(data=str(synthetic["data"]), out=str(run), epochs=4, batch_size=32, device="cpu",
                      **{**TINY, **every}, **val, lr=1e6, clip_grad_norm=0.0)
    with pytest.raises(HyperfaceError, match="training diverged.*NaN/inf by step") as caught:
        train(cfg)
    kept = sorted((run / "checkpoints").glob("step-*"))
    assert kept and all(torch.isfinite(t).all() for path in kept for t in load(path / "backbone.safetensors").values())
    assert latest_checkpoint(run).name in str(caught.value)
    metrics = run / "metrics.jsonl"  # (none yet when the first log step was not reached)
    for line in metrics.read_text().splitlines() if metrics.exists() else []:  # strict JSON: no bare NaN written
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    assert not (run / "manifest.json").exists() and not (run / "backbone.pth").exists()


def test_resume_keeps_the_run_s_checkpointing_and_verification(synthetic, tmp_path, hyperface_log):
    """`train DATA --out RUN --resume` alone keeps how the run checkpoints, verifies and logs (not
    only what shapes the weights): a run that keeps every checkpoint is not pruned to two."""
    run = tmp_path / "run"
    common = ["train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64",
              "--epochs", "2", "--batch-size", "32", "--workers", "0", "--device", "cpu"]
    assert cli_main([*common, "--max-steps", "4", "--keep-checkpoints", "0", "--checkpoint-every", "2",
                     "--val-bin", str(synthetic["bin"]), "--val-every", "4"]) == 0
    assert cli_main([*common, "--max-steps", "8", "--resume"]) == 0
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == [f"step-{k:09d}" for k in (2, 4, 6, 8)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val" in r] == [4, 8]
    assert json.loads((run / "manifest.json").read_text())["verification"]  # the resumed run verified too


def test_resume_replaces_a_kept_setting_given_again_and_drops_a_vanished_val_bin(synthetic, tmp_path, hyperface_log):
    import shutil

    run, holdout = tmp_path / "run", tmp_path / "holdout.bin"
    shutil.copy(synthetic["bin"], holdout)
    common = ["train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64",
              "--epochs", "2", "--batch-size", "32", "--workers", "0", "--device", "cpu", "--checkpoint-every", "1"]
    assert cli_main([*common, "--max-steps", "2", "--keep-checkpoints", "0", "--val-bin", str(holdout)]) == 0
    holdout.unlink()
    assert cli_main([*common, "--max-steps", "5", "--keep-checkpoints", "2", "--resume"]) == 0
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # the new value, not the run's 0
    warned = [r.getMessage() for r in hyperface_log if r.levelno == logging.WARNING and "--val-bin" in r.getMessage()]
    assert len(warned) == 1 and "holdout.bin not found; resuming without" in warned[0]
    shutil.copy(synthetic["bin"], holdout)  # back, but `--val-bin` with no file says: no verification
    assert cli_main([*common, "--max-steps", "6", "--val-every", "1", "--val-bin", "--resume"]) == 0
    assert not [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]


def test_nan_features_in_a_verification_are_reported_as_divergence(synthetic, tmp_path, monkeypatch):
    """Finite weights can still overflow to NaN features: the verification's error becomes the
    divergence error (step, newest finite checkpoint, what to do), not 'embeddings contain NaN'."""
    import hyperface.evaluation.verification as verification

    def nan_features(*args, **kwargs):
        raise HyperfaceError("embeddings contain NaN/inf: check the model")

    monkeypatch.setattr(verification, "evaluate_images", nan_features)
    cfg = TrainConfig(data=str(synthetic["data"]), out=str(tmp_path / "run"), epochs=1, batch_size=32, device="cpu",
                      val_bins=(str(synthetic["bin"]),), **{**TINY, "val_every": 2, "checkpoint_every": 2})
    with pytest.raises(HyperfaceError, match="training diverged: .*by step 2; .*step-000000002"):
        train(cfg)


def test_resume_without_a_run_warns_that_it_starts_one(synthetic, tmp_path, hyperface_log):
    run = tmp_path / "typo"
    assert cli_main(["train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64",
                     "--batch-size", "32", "--max-steps", "1", "--workers", "0", "--device", "cpu", "--resume"]) == 0
    warned = [r.getMessage() for r in hyperface_log if r.levelno == logging.WARNING and "--resume" in r.getMessage()]
    assert len(warned) == 1 and "holds no run yet" in warned[0] and "arch r_tiny" in warned[0]


def test_a_kill_during_verification_verifies_that_step_on_resume(synthetic, tmp_path, monkeypatch):
    """A checkpoint is published before its verification runs; a kill in between must not lose the
    verification (nor leave a complete manifest without it)."""
    import hyperface.evaluation.verification as verification

    run = tmp_path / "run"
    cfg = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, device="cpu", val_bins=(str(synthetic["bin"]),), **TINY)
    real = verification.evaluate_images

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verification, "evaluate_images", killed)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg))
    assert latest_checkpoint(run).name == "step-000000006" and not (run / "manifest.json").exists()
    monkeypatch.setattr(verification, "evaluate_images", real)
    resumed = train(TrainConfig(**cfg, resume=True))
    assert resumed.val and json.loads((run / "manifest.json").read_text())["verification"] == resumed.val
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val" in r] == [6]


def test_a_resumed_run_drops_the_stale_export_of_its_earlier_stop(synthetic, tmp_path):
    """`--max-steps` writes backbone.pth; once the run goes on, `evaluate RUN` must not take that
    older file over the newer checkpoints."""
    from hyperface.recognition.recognizers import resolve_model_path

    run = tmp_path / "run"
    cfg = dict(data=str(synthetic["data"]), out=str(run), epochs=2, batch_size=32, device="cpu", **TINY)
    train(TrainConfig(**cfg, max_steps=2))
    assert resolve_model_path(run) == run / "backbone.pth"

    def stop_at_4(step: int, info: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**{**cfg, "checkpoint_every": 1}, resume=True), on_step=stop_at_4)
    assert not (run / "backbone.pth").exists()
    assert resolve_model_path(run) == latest_checkpoint(run) / "backbone.safetensors"


def test_pruning_never_counts_a_half_written_checkpoint_as_kept(tmp_path):
    from hyperface.training.checkpoint import prune_checkpoints

    folder = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, True), (8, False)):
        (folder / f"step-{step:09d}").mkdir(parents=True)
        if complete:
            (folder / f"step-{step:09d}" / "meta.json").write_text("{}")
    prune_checkpoints(folder, folder / "step-000000006", keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000003", "step-000000006"]


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc), parents first."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop(0))
        todo += children.get(found[-1], [])
    return found


def test_slurm_style_sigterm_to_every_process_of_a_torchrun_job_checkpoints_every_rank(synthetic, tmp_path):
    """scancel under torchrun: SIGTERM to the agent, both ranks and their loader workers at once. Each
    rank also gets the agent's own SIGTERM: still one clean stop, every rank at the same step, which
    is checkpointed (it was an abort: the second SIGTERM counted as a second Ctrl-C), within a few
    steps: not at the next --log-every step (1000 here, past the end; the ranks used to agree only there)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "ddp"
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "hyperface", "train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64",
         "--epochs", "500", "--max-steps", "4000", "--batch-size", "8", "--workers", "1", "--device", "cpu",
         "--log-every", "1000", "--checkpoint-every", "10", "--keep-checkpoints", "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HYPERFACE_PROGRESS": "0"}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run / "checkpoints" / "step-000000020").is_dir():
            time.sleep(0.05)
        # every process of the job, as Slurm does (torchrun puts each rank in a session of its own):
        # the ranks and their workers, then the agent, which sends each rank a second SIGTERM
        for pid in _descendants(job.pid)[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    stopped = [line for line in output.splitlines() if "stopped by a signal at step" in line]
    assert len(stopped) == 2 and "killed by signal" not in output, output[-3000:]
    steps = {int(line.split("at step ")[1].split()[0]) for line in stopped}
    assert len(steps) == 1, stopped  # both ranks stopped at one step
    step = steps.pop()
    assert 20 <= step < 1000 and latest_checkpoint(run).name == f"step-{step:09d}"
    assert {p.name for p in latest_checkpoint(run).iterdir()} >= {"head-rank0.safetensors", "head-rank1.safetensors"}


def test_a_loader_worker_stuck_in_a_read_ends_on_its_owner_s_sigterm_whatever_the_start_method(tmp_path):
    """The owner's SIGTERM (torch's worker shutdown, multiprocessing at exit) ends a worker that does
    not stop by itself, with fork and with forkserver (Python 3.14's default), where the worker's
    parent is the fork server, not the owner."""
    import subprocess
    import sys

    script = tmp_path / "stuck.py"
    script.write_text(
        "import functools, os, sys, time\n"
        "import torch\n"
        "from hyperface.training.trainer import _leave_signals_to_main\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i):\n"
        "        if i >= 2: time.sleep(60)  # stuck in a slow read\n"
        "        return i\n"
        "if __name__ == '__main__':\n"
        "    loader = torch.utils.data.DataLoader(Slow(), batch_size=2, num_workers=1, persistent_workers=True,\n"
        "        worker_init_fn=functools.partial(_leave_signals_to_main, owner=os.getpid()), multiprocessing_context=sys.argv[1])\n"
        "    it = iter(loader); next(it)\n"
        "    worker = it._workers[0]\n"
        "    worker.terminate()\n"
        "    try:\n"
        "        worker.join(10)\n"
        "    except RuntimeError:  # torch's SIGCHLD handler: 'worker killed by signal', as it was\n"
        "        worker.join(10)\n"
        "    print('alive' if worker.is_alive() else 'ended', flush=True)\n"
    )
    for method in ("fork", "forkserver"):
        done = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().endswith("ended"), (method, done.stdout, done.stderr[-2000:])


def test_a_second_sigterm_is_the_same_stop_and_a_second_ctrl_c_aborts():
    """Under Slurm + torchrun a rank gets SIGTERM twice (Slurm's, then the agent's): still one clean
    stop at the step's end; a second Ctrl-C is the user insisting."""
    import os
    import signal

    from hyperface.common.runtime import StopRequest

    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def test_pruning_never_leaves_a_partial_checkpoint_and_finishes_after_a_kill(tmp_path, monkeypatch):
    import shutil

    from hyperface.training import checkpoint as ckpt

    folder = tmp_path / "checkpoints"
    for n in (2, 4, 6, 8):
        (folder / ckpt.checkpoint_name(n)).mkdir(parents=True)
        (folder / ckpt.checkpoint_name(n) / "meta.json").write_text("{}")

    class Killed(Exception):
        pass

    def killed_mid_delete(path, ignore_errors=False):
        raise Killed  # as if the process died while deleting

    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    with pytest.raises(Killed):
        ckpt.prune_checkpoints(folder, folder / ckpt.checkpoint_name(8), keep=2)
    # the folder being deleted no longer looks like a checkpoint
    assert sorted(p.name for p in folder.glob("step-*")) == [ckpt.checkpoint_name(n) for n in (4, 6, 8)]
    monkeypatch.undo()
    ckpt.prune_checkpoints(folder, folder / ckpt.checkpoint_name(8), keep=2)  # what a resume does first
    assert sorted(p.name for p in folder.iterdir()) == [ckpt.checkpoint_name(n) for n in (6, 8)]


def test_a_subset_of_identities_and_images_trains_on_exactly_those(synthetic, tmp_path):
    """--identities N --images-per-identity K: the head has N classes, an epoch is N x K images (the
    first K of each identity), and a resume with another subset is refused as other data."""
    from hyperface.datasets import RecordIODataset

    run = tmp_path / "run"
    seen = []
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=10, device="cpu", identities=5,
                images_per_identity=4, **TINY)
    import hyperface.datasets.subset as subset

    original = subset.DatasetSubset.__getitem__
    subset.DatasetSubset.__getitem__ = lambda self, i: seen.append(int(self.indices[i])) or original(self, i)
    try:
        result = train(TrainConfig(**base))
    finally:
        subset.DatasetSubset.__getitem__ = original
    assert result.steps == 2  # 20 images, batch 10
    labels = RecordIODataset(synthetic["data"]).labels
    expected = [int(i) for c in range(5) for i in np.flatnonzero(labels == c)[:4]]
    assert seen[0] == expected[0]  # the dataset's first image, read once up front for its size
    assert sorted(seen[1:]) == expected  # then each picked image once per epoch, none outside the subset
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["num_classes"] == 5 and manifest["num_images"] == 20
    assert manifest["data_subset"]["of"] == {"identities": CLASSES, "images": CLASSES * TRAIN_PER_CLASS}
    from safetensors.torch import load_file

    centres = [v for v in load_file(latest_checkpoint(run) / "head-rank0.safetensors").values() if v.ndim == 2]
    assert [c.shape[0] for c in centres] == [5]  # one class centre per identity of the subset
    with pytest.raises(HyperfaceError, match=r"different settings \(images_per_identity 4 -> 3\);"):
        train(TrainConfig(**{**base, "images_per_identity": 3, "max_steps": 3}, resume=True))  # the flag named, not the data
    with pytest.raises(HyperfaceError, match="has 8 identities, fewer than the 9 asked for"):
        train(TrainConfig(**{**base, "identities": 9, "out": str(tmp_path / "too-many")}))
    with pytest.raises(HyperfaceError, match="--images-per-identity must be >= 1"):
        train(TrainConfig(**{**base, "images_per_identity": 0, "out": str(tmp_path / "zero")}))


def test_subset_picks_the_first_images_of_each_identity_in_reader_order():
    from hyperface.datasets.subset import DatasetSubset

    class Reader:
        labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
        num_classes = 3

        def fingerprint(self):
            return "full"

        def __len__(self):
            return self.labels.size

        def __getitem__(self, i):
            return np.full((2, 2, 3), i, np.uint8), int(self.labels[i])

    both = DatasetSubset(Reader(), identities=2, per_identity=2)
    assert both.indices.tolist() == [0, 1, 3, 4] and both.labels.tolist() == [0, 0, 1, 1] and both.num_classes == 2
    assert both[2][0][0, 0, 0] == 3 and both[2][1] == 1
    per = DatasetSubset(Reader(), per_identity=3)
    assert per.indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and per.num_classes == 3  # identity 1 keeps its 2
    assert DatasetSubset(Reader(), identities=1).indices.tolist() == [0, 1, 2, 9]
    assert DatasetSubset(Reader(), identities=3).indices.tolist() == list(range(10))  # all of them is allowed
    prints = {both.fingerprint(), per.fingerprint(), DatasetSubset(Reader(), identities=2).fingerprint(), "full"}
    assert len(prints) == 4


def test_grad_accum_takes_batch_size_times_k_images_per_step(synthetic, tmp_path):
    run = tmp_path / "run"
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=12, grad_accum=2, device="cpu", **TINY)
    result = train(TrainConfig(**base))
    assert result.steps == CLASSES * TRAIN_PER_CLASS // 24  # 192 images, 24 a step
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["params"]["grad_accum"] == 2 and manifest["steps_per_epoch"] == 8
    with pytest.raises(HyperfaceError, match=r"grad_accum 2 -> 3"):
        train(TrainConfig(**{**base, "grad_accum": 3, "epochs": 2}, resume=True))
    with pytest.raises(HyperfaceError, match=r"--batch-size 100 x --grad-accum 2 is larger than the 192 images"):
        train(TrainConfig(**{**base, "batch_size": 100, "out": str(tmp_path / "big")}))


def test_compiled_channels_last_training_matches_eager_and_saves_plain_weights(synthetic, tmp_path):
    """--compile --channels-last on the CPU (the r_tiny network once crashed there: torch's backward of
    an 8-channel convolution): the same losses as the eager run to rounding, and the saved backbone
    has the model's own key names (no torch.compile prefix), so it loads anywhere."""
    from hyperface.recognition import load_recognizer

    base = dict(data=str(synthetic["data"]), epochs=1, batch_size=16, max_steps=2, device="cpu", seed=3, **TINY)
    train(TrainConfig(**base, out=str(tmp_path / "eager")))
    train(TrainConfig(**base, out=str(tmp_path / "compiled"), compile=True, channels_last=True))
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-3)
    saved = load_safetensors(latest_checkpoint(tmp_path / "compiled") / "backbone.safetensors")
    assert saved.keys() == iresnet("r_tiny", embedding_size=64).state_dict().keys()
    faces = (np.random.default_rng(0).random((2, 112, 112, 3)) * 255).astype(np.uint8)
    assert np.isfinite(load_recognizer(tmp_path / "compiled" / "backbone.pth").embed(faces)).all()


def test_mobilefacenet_trains_exports_and_loads_back(synthetic, tmp_path):
    from hyperface.recognition import load_recognizer

    run = tmp_path / "mbf"
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, max_steps=3, device="cpu",
                **{**TINY, "arch": "mbf_tiny"})
    assert train(TrainConfig(**base)).steps == 3
    faces = (np.random.default_rng(0).random((4, 112, 112, 3)) * 255).astype(np.uint8)
    from_pth = load_recognizer(run / "backbone.pth")
    assert from_pth.describe()["kind"] == "torch-mobilefacenet" and from_pth.describe()["arch"] == "mbf_tiny"
    export_backbone(run, tmp_path / "mbf.onnx")
    np.testing.assert_allclose(load_recognizer(tmp_path / "mbf.onnx").embed(faces), from_pth.embed(faces), atol=1e-4)
    with pytest.raises(HyperfaceError, match="--dropout applies to iResNet"):
        train(TrainConfig(**{**base, "dropout": 0.2, "out": str(tmp_path / "d")}))


def test_vit_trains_with_arcface_torch_s_recipe_exports_and_loads_back(synthetic, tmp_path):
    from hyperface.recognition import load_recognizer

    run = tmp_path / "vit"
    assert cli_main([
        "train", str(synthetic["data"]), "--out", str(run), "--arch", "vit_tiny", "--embedding-size", "64", "--workers", "0",
        "--device", "cpu", "--epochs", "1", "--batch-size", "16", "--max-steps", "2", "--log-every", "1",
        "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.1", "--schedule", "poly", "--channels-last",
    ]) == 0
    losses = _losses(run)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((run / "config.json").read_text())["arch"] == "vit_tiny"
    faces = (np.random.default_rng(0).random((4, 112, 112, 3)) * 255).astype(np.uint8)
    from_pth = load_recognizer(run / "backbone.pth")
    assert from_pth.describe()["kind"] == "torch-vit" and from_pth.describe()["arch"] == "vit_tiny"
    assert cli_main(["train", "--export", str(run), "--out", str(tmp_path / "vit.onnx")]) == 0
    np.testing.assert_allclose(load_recognizer(tmp_path / "vit.onnx").embed(faces), from_pth.embed(faces), atol=1e-4)
    with pytest.raises(HyperfaceError, match="--dropout applies to iResNet's fc layer; vit_tiny has none"):
        train(TrainConfig(data=str(synthetic["data"]), out=str(tmp_path / "d"), device="cpu", **{**TINY, "arch": "vit_tiny", "dropout": 0.2}))


def test_cli_passes_the_new_training_options_and_resume_checks_them(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(synthetic["data"]), "--out", str(run), "--arch", "r_tiny", "--embedding-size", "64", "--workers", "0",
            "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--grad-accum", "2", "--interclass-filtering", "0.4",
            "--identities", "6", "--images-per-identity", "10", "--schedule", "poly", "--poly-power", "1", "--max-steps", "2"]
    assert cli_main(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["grad_accum"], config["interclass_filtering"], config["identities"], config["images_per_identity"]) == (2, 0.4, 6, 10)
    assert (config["schedule"], config["poly_power"]) == ("poly", 1.0)
    capsys.readouterr()
    changed = [a if a != "0.4" else "0.3" for a in args]
    assert cli_main([*changed[:-1], "3", "--resume"]) == 2
    assert "interclass_filtering 0.4 -> 0.3" in capsys.readouterr().err
    # the documented resume: DATA, --out and --resume (the run's settings come from its config.json)
    assert cli_main(["train", str(synthetic["data"]), "--out", str(run), "--resume", "--device", "cpu", "--workers", "0",
                     "--max-steps", "3"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert json.loads((run / "manifest.json").read_text())["params"]["grad_accum"] == 2
    # an abbreviated flag counts as given: --batch 16 is refused, not overridden
    assert cli_main(["train", str(synthetic["data"]), "--out", str(run), "--resume", "--device", "cpu", "--workers", "0",
                     "--batch 16".split()[0], "16", "--max-steps", "4"]) == 2
    assert "batch_size 8 -> 16" in capsys.readouterr().err


def test_metrics_png_redraws_during_training_and_a_plot_failure_is_only_a_warning(synthetic, tmp_path, monkeypatch, hyperface_log):
    from hyperface.training import plots
    from hyperface.training.trainer import MetricsLog

    calls = []
    monkeypatch.setattr(MetricsLog, "DRAW_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(plots, "plot_metrics", lambda run, path=None: calls.append(run) or (_ for _ in ()).throw(RuntimeError("no fonts")))
    result = train(TrainConfig(data=str(synthetic["data"]), out=str(tmp_path / "run"), epochs=1, batch_size=32,
                               max_steps=4, device="cpu", **{**TINY, "log_every": 1}))
    assert result.steps == 4 and len(calls) >= 5  # after each logged step and once more at the end
    assert any("could not draw metrics.png: no fonts" in r.getMessage() for r in hyperface_log)


def test_grad_accum_steps_see_batch_times_k_and_resume_exactly(synthetic, tmp_path, monkeypatch):
    from hyperface.training import trainer

    seen = []
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: seen.append((a[4].shape[0], k["accumulate"])) or real_step(*a, **k))
    common = dict(data=str(synthetic["data"]), epochs=1, batch_size=12, grad_accum=2, device="cpu", seed=2,
                  **{**TINY, "checkpoint_every": 1})
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **common))
    assert set(seen) == {(24, 2)} and whole.steps == 8  # each step takes batch x K images in K passes
    train(TrainConfig(out=str(tmp_path / "cut"), max_steps=3, **common))
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **common))
    assert resumed.steps == 8
    a = torch.load(tmp_path / "whole" / "backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # mid-epoch resume continues on the same images
    with pytest.raises(HyperfaceError, match="does not split into 3 equal passes"):
        real_step(None, None, None, None, torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.zeros(8), device=torch.device("cpu"),
                  amp_dtype=None, channels_last=False, accumulate=3)


def test_arch_spellings_train_and_export_under_one_name(synthetic, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, max_steps=2, device="cpu",
                      **{**TINY, "arch": "R_TINY"}))
    assert json.loads((run / "config.json").read_text())["arch"] == "r_tiny"
    export_backbone(run, tmp_path / "x.onnx")  # the checkpoint's arch matches its weights
    assert (tmp_path / "x.onnx").stat().st_size > 0


def test_explicit_options_as_argparse_reads_them():
    from hyperface.cli import _stage_parser, build_parser, explicit_dests

    parser = _stage_parser(build_parser(), "train")
    assert explicit_dests(parser, ["d", "--batch-size=16", "--lr", "-0.1", "--grad", "2"]) == {"batch_size", "lr", "grad_accum"}
    assert explicit_dests(parser, ["d", "--", "--epochs", "3"]) == set()  # after --, names are not options
    assert explicit_dests(parser, ["d", "--m", "0.4"]) == set()  # ambiguous prefix: argparse refuses it too


def test_stray_names_are_refused_by_stages_without_late_positionals(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["pack", "-n", "5", "--dim", "3", "--out", str(tmp_path / "r"), "extra"])
    assert exit_.value.code == 2 and "unrecognized arguments: extra" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_several_datasets_train_as_one_through_the_cli(synthetic, tmp_path, capsys):
    """`train A B`: B's identities after A's, no copy; the manifest names both and where B's labels
    start; one set alone, or the two in another order, is other data."""
    from hyperface.cli import main
    from hyperface.datasets import RecordIODataset

    second = tmp_path / "second"
    for label in range(3):
        (second / f"{label:03d}").mkdir(parents=True)
        for j in range(4):
            cv2.imwrite(str(second / f"{label:03d}" / f"{j}.png"), np.full((112, 112, 3), 30 * label + j, dtype=np.uint8))
    run = tmp_path / "mix"
    first = str(synthetic["data"])
    tiny = ["--arch", "r_tiny", "--embedding-size", "64", "--workers", "0", "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--checkpoint-every", "0"]
    assert main(["train", first, "--out", str(run), *tiny, "--max-steps", "2", str(second)]) == 0  # DATA after options too
    manifest = json.loads((run / "manifest.json").read_text())
    classes = RecordIODataset(first).num_classes
    assert manifest["num_classes"] == classes + 3 and manifest["data_parts"][1]["first_label"] == classes
    assert set(manifest["inputs"]) == {"data_0", "data_1"}
    assert json.loads((run / "config.json").read_text())["data"] == [first, str(second)]
    capsys.readouterr()
    assert main(["train", first, "--out", str(run), "--resume", "--max-steps", "3"]) == 2
    assert f"different settings (classes {classes + 3} -> {classes})" in capsys.readouterr().err  # one set is other data
    assert main(["train", str(second), first, "--out", str(run), "--resume", "--max-steps", "3"]) == 2
    assert "in this order" in capsys.readouterr().err
    assert main(["train", first, str(second), "--out", str(run), "--resume", "--max-steps", "3"]) == 0


def test_a_run_folder_inside_its_dataset_is_refused(tmp_path):
    folder = tmp_path / "faces"
    for label in range(3):
        (folder / f"{label:03d}").mkdir(parents=True)
        cv2.imwrite(str(folder / f"{label:03d}" / "0.png"), np.full((16, 16, 3), 40 * label, dtype=np.uint8))
    with pytest.raises(HyperfaceError, match="overlap"):
        train(TrainConfig(data=str(folder), out=str(folder / "run"), epochs=1, batch_size=2, device="cpu", **TINY))
    assert sorted(p.name for p in folder.iterdir()) == ["000", "001", "002"]  # no new class folder


def test_val_bins_with_the_same_name_are_both_reported(synthetic, tmp_path):
    import shutil

    (tmp_path / "other").mkdir()
    twin = shutil.copy(synthetic["bin"], tmp_path / "other" / synthetic["bin"].name)
    run = tmp_path / "run"
    train(TrainConfig(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, max_steps=2, device="cpu",
                      val_every=2, val_bins=(str(synthetic["bin"]), str(twin)), **TINY))
    verification = json.loads((run / "manifest.json").read_text())["verification"]
    assert set(verification) == {"heldout", "heldout (2)"}


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(synthetic, tmp_path):
    run = tmp_path / "run"
    base = dict(data=str(synthetic["data"]), out=str(run), epochs=1, batch_size=32, max_steps=1, device="cpu", **TINY)
    train(TrainConfig(**base))
    kept = sorted(p.name for p in run.iterdir())
    for bad in ({"data": str(tmp_path / "typo")}, {"identities": 99}, {"val_bins": (str(tmp_path / "none.bin"),)}):
        with pytest.raises(HyperfaceError):
            train(TrainConfig(**{**base, **bad}, overwrite=True))
        assert sorted(p.name for p in run.iterdir()) == kept  # refused before anything was cleared


def test_an_empty_latest_pointer_names_the_newest_checkpoint_to_write_into_it(tmp_path):
    from hyperface.training.checkpoint import latest_checkpoint

    folder = tmp_path / "checkpoints"
    for step in ("step-000000010", "step-000000020"):
        (folder / step).mkdir(parents=True)
        (folder / step / "meta.json").write_text("{}")
    (folder / "latest").write_text("")
    with pytest.raises(HyperfaceError, match=r"latest is empty or damaged .*: write step-000000020 into it"):
        latest_checkpoint(tmp_path)
    (folder / "latest").write_text("step-000000010\n")
    assert latest_checkpoint(tmp_path) == folder / "step-000000010"


def _adaface_split_parameters(module: torch.nn.Module):
    """AdaFace's Trainer.split_parameters (mk-minchul/AdaFace, train_val.py), re-typed."""
    params_decay, params_no_decay = [], []
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            params_no_decay.extend([*m.parameters()])
        elif len(list(m.children())) == 0:
            params_decay.extend([*m.parameters()])
    assert len(list(module.parameters())) == len(params_decay) + len(params_no_decay)
    return params_decay, params_no_decay


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_bn_weight_decay_groups_parameters_as_adafaces_configure_optimizers(optimizer):
    from hyperface.recognition.backbones import create_backbone
    from hyperface.training.trainer import build_head, build_optimizer

    cfg = TrainConfig(data="d", out="o", arch="r_tiny", embedding_size=64, optimizer=optimizer, bn_weight_decay=False).resolved()
    backbone = create_backbone("r_tiny", embedding_size=64)
    head = build_head(cfg, 10, 0, 1)
    groups = build_optimizer(cfg, backbone, head).param_groups
    # AdaFace: SGD([{params: paras_wo_bn + [head.kernel], weight_decay: 5e-4}, {params: paras_only_bn}]),
    # the second at the optimiser's default weight decay, 0 (frozen parameters are never stepped: left out here)
    decay, no_decay = _adaface_split_parameters(backbone)
    trainable = lambda params: [id(p) for p in params if p.requires_grad]  # noqa: E731
    assert [trainable(g["params"]) for g in groups] == [trainable([*decay, head.weight]), trainable(no_decay)]
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0] and cfg.weight_decay > 0
    owner = {id(p): type(m).__name__ for m in backbone.modules() for p in m.parameters(recurse=False)}
    assert {owner[id(p)] for p in groups[1]["params"]} == {"BatchNorm2d", "BatchNorm1d"}
    assert {owner.get(id(p), "head") for p in groups[0]["params"]} == {"Conv2d", "Linear", "PReLU", "head"}
    # the default: one group, every trainable parameter decayed (arcface_torch)
    default = build_optimizer(TrainConfig(**{**vars(cfg), "bn_weight_decay": True}), backbone, head).param_groups
    assert len(default) == 1 and default[0]["weight_decay"] == cfg.weight_decay
    assert trainable(default[0]["params"]) == trainable([*backbone.parameters(), head.weight])
    # and a step with zero gradients leaves BatchNorm alone and shrinks the rest
    opt = build_optimizer(cfg, backbone, head)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, before[id(p)]) for p in opt.param_groups[1]["params"])
    assert all(not torch.equal(p, before[id(p)]) for p in opt.param_groups[0]["params"] if p.abs().sum() > 0)
    with pytest.raises(HyperfaceError, match="unknown --head-init 'xavier': use normal or unit"):
        TrainConfig(data="d", out="o", head_init="xavier").resolved()
    with pytest.raises(HyperfaceError, match=r"bn_weight_decay \(--bn-weight-decay, --no-bn-weight-decay\) must be True or False, got .false."):
        TrainConfig(data="d", out="o", bn_weight_decay="false").resolved()


def test_no_bn_weight_decay_follows_the_batchnorm_class_only_on_a_vit():
    from hyperface.recognition.backbones import create_backbone
    from hyperface.training.trainer import batchnorm_parameters

    vit = create_backbone("vit_tiny", embedding_size=64)
    names = {id(p): n for n, p in vit.named_parameters()}
    # the feature head's two BatchNorm1d; LayerNorm (norm1, norm2, norm), pos_embed and mask_token still decay
    exempt = sorted(names[id(p)] for p in batchnorm_parameters(vit))
    assert exempt == ["feature.1.bias", "feature.1.weight", "feature.3.bias", "feature.3.weight"]
    assert "blocks.0.norm1.weight" in names.values() and "pos_embed" in names.values()


def test_head_init_unit_and_no_bn_weight_decay_train_resume_exactly_and_are_kept(synthetic, tmp_path, capsys):
    base = ["train", str(synthetic["data"]), "--arch", "r_tiny", "--embedding-size", "64", "--workers", "0", "--device", "cpu",
            "--epochs", "1", "--batch-size", "16", "--loss", "adaface", "--checkpoint-every", "2", "--log-every", "1",
            "--head-init", "unit", "--no-bn-weight-decay"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert cli_main([*base, "--out", str(whole), "--max-steps", "4"]) == 0
    config = json.loads((whole / "config.json").read_text())
    assert (config["head_init"], config["bn_weight_decay"]) == ("unit", False)
    params = json.loads((whole / "manifest.json").read_text())["params"]
    assert (params["head_init"], params["bn_weight_decay"]) == ("unit", False)
    state = torch.load(latest_checkpoint(whole) / "state-rank0.pt", weights_only=True)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [5e-4, 0.0]
    # stopped at step 2, resumed with neither flag (config.json's are taken): the same weights as in one go
    assert cli_main([*base, "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert cli_main(["train", str(synthetic["data"]), "--out", str(run), "--resume", "--device", "cpu", "--workers", "0",
                     "--max-steps", "4"]) == 0
    # (given the defaults, normal and on, the resume would have been refused: see below)
    whole_state, run_state = (torch.load(r / "backbone.pth", weights_only=True) for r in (whole, run))
    assert all(torch.equal(whole_state[k], run_state[k]) for k in whole_state)
    # given again with another value: refused like every setting that shapes the run
    for flag, change in (("--head-init=normal", "head_init 'unit' -> 'normal'"),
                         ("--bn-weight-decay", "bn_weight_decay False -> True")):
        assert cli_main(["train", str(synthetic["data"]), "--out", str(run), "--resume", "--device", "cpu", "--workers", "0",
                         "--max-steps", "5", flag]) == 2
        assert change in capsys.readouterr().err
