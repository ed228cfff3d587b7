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


def test_a_bin_given_twice_is_evaluated_once(tiny_backbone, tmp_path, capsys, hyperface_log):
    _, model_path = tiny_backbone
    write_noisy_pairs_bin(tmp_path / "lfw.bin", 20, seed=1, noise=30)
    out = tmp_path / "report.json"
    assert main(["evaluate", str(model_path), str(tmp_path / "lfw.bin"), str(tmp_path / "." / "lfw.bin"),
                 "--json", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert list(report["accuracy"]) == ["lfw"] and len(report["inputs"]["bins"]) == 1
    assert any("more than once" in r.getMessage() for r in hyperface_log)


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
    assert "checkpoint.pt" not in text and text.count(".ckpt") == 1 and "AdaFace IR .ckpt" in text  # train writes no .ckpt
    assert "backbone.safetensors" in text and "checkpoints/latest" in text and "--export" in text


def test_the_table_marks_a_val_whose_far_missed_the_target():
    from hyperface.evaluation.runner import format_table

    row = {"accuracy": 0.9, "std": 0.01, "best_threshold": 1.2, "far_target": 1e-3}
    table = format_table({"results": {"tiny": {**row, "num_pairs": 40, "val": 1.0, "far": 0.1},
                                      "cfp_fp": {**row, "num_pairs": 7000, "val": 0.5, "far": 0.0011}}})
    lines = table.splitlines()
    assert lines[1].endswith("100.00*") and lines[2].endswith("50.00")  # 1.1e-3 is the target, reached
    assert lines[-1] == "* FAR reached instead of 1e-3 (too few impostor pairs per fold): tiny 0.1"


def test_plot_and_compare_overlay_earlier_reports(tiny_backbone, tmp_path, capsys, monkeypatch, hyperface_log):
    """--plot draws each model's histograms per set; --compare prints earlier --json reports beside this one."""
    import cv2

    from hyperface.evaluation import plots

    _, model_path = tiny_backbone
    write_noisy_pairs_bin(tmp_path / "lfw.bin", 20, seed=1, noise=30)
    write_noisy_pairs_bin(tmp_path / "agedb_30.bin", 10, seed=2, noise=30)
    assert main(["evaluate", str(model_path), str(tmp_path / "lfw.bin"), "--device", "cpu", "--json", str(tmp_path / "a.json")]) == 0
    torch.manual_seed(1)
    (tmp_path / "other").mkdir()
    torch.save(iresnet("r_tiny", embedding_size=64).eval().state_dict(), tmp_path / "other" / "backbone.pth")
    figures = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "other"), str(tmp_path / "lfw.bin"), str(tmp_path / "agedb_30.bin"), "--device", "cpu",
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "eval.png"), "--compare", str(tmp_path / "a.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    table = capsys.readouterr().out.split("\n\n")[-1].splitlines()
    assert table[0].split() == ["other", "a"]  # this model labelled by its run folder, the report by its file
    assert table[1].split() == ["lfw", "acc", "(%)", f"{100 * b['accuracy']['lfw']:.2f}", f"{100 * a['accuracy']['lfw']:.2f}"]
    assert table[2].split() == ["agedb_30", "acc", "(%)", f"{100 * b['accuracy']['agedb_30']:.2f}", "-"]
    assert len(table) == 3  # no mean: the models share one set only
    image = cv2.imread(str(tmp_path / "eval.png"))
    assert image is not None and image.shape[1] > 800
    lfw_axes, agedb_axes = (ax for ax in figures[0].axes if ax.axison)
    assert len(lfw_axes.patches) == 4 and len(agedb_axes.patches) == 2  # genuine + impostor per model
    genuine = np.asarray(b["results"]["lfw"]["similarity_histogram"]["genuine"])
    assert genuine.sum() == 10 and lfw_axes.patches[0].get_data().values.sum() * 0.02 == pytest.approx(1.0)  # a density
    assert any(f"a: {100 * a['accuracy']['lfw']:.2f}%" in t.get_text() for t in lfw_axes.get_legend().get_texts())
    assert lfw_axes.get_title().startswith("lfw (solid genuine") and agedb_axes.get_title().startswith("agedb_30 (")
    thresholds = sorted(line.get_xdata()[0] for line in lfw_axes.lines)  # one dotted line per model, at cosine 1 - d / 2
    assert thresholds == pytest.approx(sorted(1 - r["results"]["lfw"]["best_threshold"] / 2 for r in (a, b)))
    assert lfw_axes.patches[0].get_edgecolor() != lfw_axes.patches[2].get_edgecolor()  # one colour per model

    # a report from before histograms were kept: left out of its panels, with a warning, not an error
    del a["results"]["lfw"]["similarity_histogram"]
    (tmp_path / "old.json").write_text(json.dumps(a))
    hyperface_log.clear()
    assert main(["evaluate", str(tmp_path / "other"), str(tmp_path / "lfw.bin"), "--device", "cpu",
                 "--plot", str(tmp_path / "eval.pdf"), "--compare", str(tmp_path / "old.json")]) == 0
    assert (tmp_path / "eval.pdf").read_bytes().startswith(b"%PDF")
    assert len(figures[1].axes[0].patches) == 2
    assert any("old has no score histogram for lfw" in r.getMessage() for r in hyperface_log)

    # a report of the same model (same label): told apart in the table, its own colour in the plot
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "other.json").write_text(json.dumps(b))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "other"), str(tmp_path / "lfw.bin"), "--device", "cpu",
                 "--plot", str(tmp_path / "same.png"), "--compare", str(tmp_path / "again" / "other.json")]) == 0
    assert capsys.readouterr().out.split("\n\n")[-1].splitlines()[0].split() == ["other", str(tmp_path / "again" / "other.json")]
    single = figures[2].axes[0]
    assert single.get_title() == "lfw (solid genuine, dashed impostor, dotted threshold)"
    assert single.patches[0].get_edgecolor() != single.patches[2].get_edgecolor()


def test_plot_and_compare_mistakes_fail_before_the_evaluation(tiny_backbone, tmp_path, capsys):
    _, model_path = tiny_backbone
    missing = str(tmp_path / "missing.bin")  # would fail later: these must fail first
    (tmp_path / "notes.json").write_text("not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "nothr.json").write_text(json.dumps({"results": {"lfw": {"accuracy": 0.9, "similarity_histogram": {"genuine": [1], "impostor": [1]}}}}))
    (tmp_path / "text_tar.json").write_text(json.dumps({"ijb": {"target": "IJBC", "tar_at_far": {"1e-05": "a"}}}))
    (tmp_path / "no_rank.json").write_text(json.dumps({"results": {"lfw": {"accuracy": 0.9}}, "ijb": {
        "target": "IJBC", "tar_at_far": {}, "identification": {"rank": {}}}}))
    for extra, message in ((["--plot", str(tmp_path / "eval.txt")], "ending in .png"),
                           (["--plot", str(tmp_path)], "is a folder"),
                           (["--compare", str(tmp_path / "gone.json")], "no such file"),
                           (["--compare", str(tmp_path / "notes.json")], "not a readable JSON report"),
                           (["--compare", str(tmp_path / "list.json")], "not a `hyperface evaluate --json` report"),
                           (["--compare", str(tmp_path / "nothr.json")], "similarity histogram without a threshold"),
                           (["--compare", str(tmp_path / "list.json"), str(tmp_path / "lfw.bin")], "put the BIN files before --compare"),
                           (["--compare", str(tmp_path / "text_tar.json")], "not a number (ValueError"),
                           (["--compare", str(tmp_path / "no_rank.json")], "not a number (KeyError: '1')"),
                           (["--json", str(model_path)], "is the model"),
                           (["--json", str(tmp_path / "nothr.json"), "--compare", str(tmp_path / "nothr.json")], "is a --compare report"),
                           (["--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.png")], "is --json")):
        assert main(["evaluate", str(model_path), missing, *extra]) == 2
        assert message in capsys.readouterr().err, extra


def test_comparison_table_with_ijb_and_shared_sets():
    from hyperface.evaluation.runner import format_comparison

    def report(accuracies, tar=None):
        out = {"results": {name: {"accuracy": acc} for name, acc in accuracies.items()}}
        if tar is not None:
            out["ijb"] = {"target": "IJBC", "tar_at_far": {"1e-05": tar / 2, "1e-04": tar}}
        return out

    text = format_comparison([("hf", report({"lfw": 0.99, "cfp_fp": 0.9, "agedb_30": 0.8}, tar=0.9)),
                              ("dcface", report({"lfw": 0.98, "cfp_fp": 0.8}))])
    rows = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in text.splitlines()[1:]}
    assert rows["lfw acc (%)"] == ["99.00", "98.00"] and rows["agedb_30 acc (%)"] == ["80.00", "-"]
    assert rows["mean of 2 shared"] == ["94.50", "89.00"]
    assert rows["IJBC TAR@1e-04 (%)"] == ["90.00", "-"] and rows["IJBC TAR@1e-05 (%)"] == ["45.00", "-"]


def test_ctrl_c_tells_each_stage_what_to_rerun(tiny_backbone, tmp_path, capsys, monkeypatch):
    """evaluate and report have no --resume: the hint must not send the user to a flag that fails."""
    from hyperface.evaluation import runner
    from hyperface.report import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    _, model_path = tiny_backbone
    write_noisy_pairs_bin(tmp_path / "lfw.bin", 4, seed=1)
    monkeypatch.setattr(runner, "evaluate_model", interrupted)
    assert main(["evaluate", str(model_path), str(tmp_path / "lfw.bin")]) == 130
    err = capsys.readouterr().err
    assert "rerun the same command" in err and "--cache DIR" in err and "--resume" not in err
    assert main(["evaluate", str(model_path), "--ijb", str(tmp_path), "--cache", str(tmp_path / "c")]) == 130
    assert "the IJB features in --cache are kept" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "run_report", interrupted)
    assert main(["report", str(tmp_path / "e.npy"), "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "rerun the same command (with --overwrite if" in err and "--resume" not in err


def test_compare_paper_puts_the_published_numbers_beside(tmp_path, monkeypatch):
    from hyperface.evaluation import plots
    from hyperface.evaluation.runner import PAPER_RESULTS, format_comparison, read_reports

    monkeypatch.chdir(tmp_path)  # no file named "paper" here
    (label, paper), = read_reports(["paper"])
    assert label == "paper" and paper["results"]["cfp_fp"]["accuracy"] == 0.8883
    mine = {"results": {"lfw": {"accuracy": 0.99}, "cfp_fp": {"accuracy": 0.9}}}
    text = format_comparison([("hf-r50", mine), (label, paper)]).splitlines()
    rows = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in text[1:-1]}
    assert rows["lfw acc (%)"] == ["99.00", "98.50"] and rows["cplfw acc (%)"] == ["-", "84.23"]
    assert rows["mean of 2 shared"] == ["94.50", f"{100 * (PAPER_RESULTS['lfw'] + PAPER_RESULTS['cfp_fp']) / 2:.2f}"]
    assert text[-1].startswith("paper: HyperFace (ICLR 2025)") and "Vec2Face HSFace10K 92.00" in text[-1]
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    plots.plot_evaluation(tmp_path / "x.png", [("hf-r50", mine), (label, paper)])
    assert [ax.get_title() for ax in figures[0].axes if ax.axison] == ["lfw", "cfp_fp"]  # no panels for the paper's sets
    assert [label for label, _ in read_reports(["paper", "paper"])] == ["paper"]  # once, however often named
    (tmp_path / "paper").write_text("{}")  # a real file of that name is read as a report
    with pytest.raises(Exception, match="not a `hyperface evaluate --json` report"):
        read_reports(["paper"])


def test_a_plot_failure_keeps_the_json_and_says_so(tiny_backbone, tmp_path, capsys, monkeypatch):
    from hyperface.evaluation import plots

    _, model_path = tiny_backbone
    write_noisy_pairs_bin(tmp_path / "lfw.bin", 10, seed=1)

    def broken(path, reports):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "plot_evaluation", broken)
    assert main(["evaluate", str(model_path), str(tmp_path / "lfw.bin"), "--device", "cpu", "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "could not draw it (no display); the table and --json are complete" in err and "Traceback" not in err
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"]["lfw"] >= 0


def test_the_ijb_roc_panel_draws_the_reports_points(monkeypatch, tmp_path):
    from hyperface.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    roc = {"far": [1e-6, 1e-4, 1e-2, 1.0], "tar": [0.2, 0.5, 0.9, 1.0]}
    report = {"ijb": {"target": "IJBC", "tar_at_far": {"1e-04": 0.5}, "roc": roc}}
    plots.plot_evaluation(tmp_path / "x.png", [("m", report)])
    ax = figures[0].axes[0]
    assert ax.get_title() == "IJBC 1:1 ROC" and ax.get_xscale() == "log"
    assert list(ax.lines[0].get_xdata()) == roc["far"] and list(ax.lines[0].get_ydata()) == roc["tar"]
    assert ax.get_legend().get_texts()[0].get_text() == "m: TAR 50.00% at FAR 1e-4"


def test_model_labels_name_the_run_and_step(tmp_path):
    from hyperface.common.text import unique_labels
    from hyperface.evaluation.runner import model_label

    step = tmp_path / "hf-r50" / "checkpoints" / "step-000000042"
    step.mkdir(parents=True)
    (step / "backbone.safetensors").write_bytes(b"x")
    (tmp_path / "hf-r50" / "checkpoints" / "latest").write_text("step-000000042\n")
    assert model_label(step) == "hf-r50/step-000000042" == model_label(tmp_path / "hf-r50")
    (tmp_path / "w600k_r50.onnx").write_bytes(b"x")
    assert model_label(tmp_path / "w600k_r50.onnx") == "w600k_r50.onnx"
    assert unique_labels(["a", "b", "a", "a"]) == ["a", "b", "a (2)", "a (3)"]
    assert unique_labels(["a", "a", "a (2)"]) == ["a", "a (3)", "a (2)"]  # never two the same


def test_bins_may_follow_options_and_compare_lists_end_with_a_double_dash(tiny_backbone, tmp_path, capsys):
    _, model_path = tiny_backbone
    write_noisy_pairs_bin(tmp_path / "lfw.bin", 10, seed=1)
    write_noisy_pairs_bin(tmp_path / "cfp_fp.bin", 10, seed=2)
    assert main(["evaluate", str(model_path), "--device", "cpu", str(tmp_path / "lfw.bin"), "--json", str(tmp_path / "a.json"),
                 str(tmp_path / "cfp_fp.bin")]) == 0
    assert set(json.loads((tmp_path / "a.json").read_text())["accuracy"]) == {"lfw", "cfp_fp"}
    capsys.readouterr()
    assert main(["evaluate", str(model_path), "--device", "cpu", "--compare", str(tmp_path / "a.json"), "--", str(tmp_path / "lfw.bin")]) == 0
    assert "lfw acc (%)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(model_path), "--device", "cpu", str(tmp_path / "lfw.bin"), "--no-such-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-flag" in err and "hyperface evaluate" in err  # the stage's own usage
    # --json onto a --compare report would destroy it
    assert main(["evaluate", str(model_path), str(tmp_path / "lfw.bin"), "--json", str(tmp_path / "a.json"),
                 "--compare", str(tmp_path / "a.json")]) == 2
    assert "it would be overwritten" in capsys.readouterr().err
    assert main(["evaluate", str(model_path), str(tmp_path / "lfw.bin"), "--cache", str(tmp_path / "c")]) == 2
    assert "--cache keeps IJB features: it needs --ijb DIR" in capsys.readouterr().err


def test_comparison_notes_other_protocols_other_files_and_shows_1n():
    from hyperface.evaluation.runner import format_comparison

    def report(flip, folds, pairs, sha, ident=None):
        out = {"protocol": {"flip": flip, "folds": folds}, "results": {"lfw": {"accuracy": 0.9, "num_pairs": pairs}},
               "inputs": {"bins": [{"path": "/data/lfw.bin", "sha256": sha}]}}
        if ident is not None:
            out["ijb"] = {"target": "IJBC", "tar_at_far": {"1e-04": 0.5}, "identification": ident}
        return out

    ident = {"rank": {"1": 0.8, "5": 0.9, "10": 0.95}, "tpir_at_fpir": {"1e-02": 0.6, "1e-01": 0.7}}
    text = format_comparison([("a", report(True, 10, 6000, "aa" * 32, ident)), ("b", report(False, 5, 6000, "bb" * 32))])
    assert "note: the reports use different protocols: a (flip, 10 folds), b (no flip, 5 folds)" in text
    assert "note: lfw is another file in some reports (SHA-256 differs)" in text
    rows = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in text.splitlines() if "(%)" in line}
    assert rows["IJBC 1:N rank-1 (%)"] == ["80.00", "-"] and rows["IJBC TPIR@1e-01 (%)"] == ["70.00", "-"]
    other = format_comparison([("a", report(True, 10, 6000, "aa" * 32)), ("b", report(True, 10, 20, "aa" * 32))])
    assert "note: lfw is not the same set in every report: a 6000 pairs, b 20 pairs" in other
    same = format_comparison([("a", report(True, 10, 6000, "aa" * 32)), ("b", report(True, 10, 6000, "aa" * 32))])
    assert "note:" not in same


def test_ijb_tar_at_a_far_no_impostor_pair_reaches_is_starred():
    from hyperface.evaluation.runner import format_table

    ijb = {"target": "IJBC", "tar_at_far": {"1e-06": 1.0, "1e-02": 0.9}, "num_templates": 12, "num_pairs": 66,
           "num_images": 36, "auc": 0.99, "num_impostor_pairs": 600}
    text = format_table({"ijb": ijb})
    assert " 100.00*" in text and "90.00*" not in text  # 1e-2 x 600 = 6 impostor pairs: measured
    assert "* FAR below 1 / 600 impostor pairs: not measured" in text


def test_outputs_never_replace_inputs_and_a_bad_later_set_fails_before_any_embedding(tiny_backbone, tmp_path, capsys):
    from hyperface.evaluation.runner import evaluate_model

    _, model_path = tiny_backbone
    write_noisy_pairs_bin(tmp_path / "good.bin", 20, seed=1)
    write_noisy_pairs_bin(tmp_path / "small.bin", 4, seed=2)
    before = (tmp_path / "good.bin").read_bytes()
    assert main(["evaluate", str(model_path), str(tmp_path / "good.bin"), "--json", str(tmp_path / "good.bin")]) == 2
    assert "is a benchmark file" in capsys.readouterr().err and (tmp_path / "good.bin").read_bytes() == before
    embedded = []

    def counting(images):
        embedded.append(len(images))
        return images.reshape(len(images), -1)[:, :16].astype(np.float32)

    with pytest.raises(Exception, match=r"small.bin: 4 pairs, fewer than the 10 folds"):
        evaluate_model(counting, [tmp_path / "good.bin", tmp_path / "small.bin"])
    assert embedded == []
    with pytest.raises(Exception, match="issame_list must be a flat list"):
        (tmp_path / "flat.bin").write_bytes(pickle.dumps(([b"x"] * 4, [[True], [False]])))
        evaluate_model(counting, [tmp_path / "flat.bin"])
