"""``evaluate_model``: one model on several verification sets (and IJB), as a table and a JSON report."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.text import side_by_side
from hyperface.evaluation.verification import FOLDS, VerificationResult, evaluate_bin


def _benchmark_names(paths: Sequence[Path]) -> list[str]:
    names = [p.stem for p in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def evaluate_model(
    model: str | os.PathLike | Callable[[np.ndarray], np.ndarray],
    bins: Sequence[str | os.PathLike] = (),
    *,
    arch: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    flip: bool = True,
    nfolds: int = FOLDS,
    ijb_root: str | os.PathLike | None = None,
    ijb_target: str = "IJBC",
    ijb_detector_score: bool = True,
    cache_dir: str | os.PathLike | None = None,
    ijb_identification: bool = False,
) -> dict[str, Any]:
    """Evaluate a model (anything ``load_recognizer`` opens: ONNX, backbone.pth, a training run folder,
    checkpoint folder or ``checkpoints/latest``) or an embed function.

    Returns a JSON-ready dict: ``accuracy`` (benchmark -> mean accuracy, a fraction), ``results``
    (benchmark -> full :class:`VerificationResult`), ``ijb`` (when ``ijb_root``), ``model`` info.
    ``cache_dir``: IJB face features are kept there block by block, in a sub-folder named by the
    model file's and the release's checksums and the settings, so a killed run resumes (an embed
    function instead of a model file: the folder is used as given; key it yourself).
    """
    paths = [Path(p) for p in bins]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise HyperfaceError(
            f"verification set(s) not found: {', '.join(missing)} (insightface's lfw.bin, cfp_fp.bin, agedb_30.bin, "
            "calfw.bin, cplfw.bin ship inside its training-set archives, e.g. faces_webface_112x112)"
        )
    if not paths and ijb_root is None:
        raise HyperfaceError("nothing to evaluate: give at least one .bin verification set or --ijb DIR")
    # every input read and checked before the model loads: a mistake in the last input must not throw
    # away the evaluation of the ones before it
    from hyperface.evaluation.verification import read_bin

    for path in paths:
        issame = read_bin(path)[1]
        if issame.size < nfolds:
            raise HyperfaceError(f"{path}: {issame.size} pairs, fewer than the {nfolds} folds of the protocol (--folds)")
        del issame
    ijb_inputs = None
    if ijb_root is not None:
        from hyperface.evaluation.ijb import prepare_ijb

        ijb_inputs = prepare_ijb(ijb_root, ijb_target, identification=ijb_identification)
    model_info: dict[str, Any]
    if callable(model):
        embed_fn = model
        model_info = {"callable": getattr(model, "__name__", type(model).__name__)}
    else:
        from hyperface.common.runtime import resolve_device
        from hyperface.recognition import load_recognizer

        resolved = str(resolve_device(device))
        # flip=False: the protocol adds the mirror's raw features itself, before normalising;
        # onnx_input="divide": ONNX models are fed as arcface_torch's onnx_ijbc.py feeds them
        recognizer = load_recognizer(model, arch=arch, device=resolved, flip=False, batch_size=batch_size, onnx_input="divide")
        embed_fn = recognizer.features
        model_info = {"path": str(Path(model).resolve()), **recognizer.describe()}
    results: dict[str, VerificationResult] = {}
    timings: dict[str, float] = {}
    for name, path in zip(_benchmark_names(paths), paths):
        start = time.perf_counter()
        result = evaluate_bin(embed_fn, path, batch_size=batch_size, flip=flip, nfolds=nfolds)
        result.name = name
        results[name] = result
        timings[name] = round(time.perf_counter() - start, 3)
    report: dict[str, Any] = {
        "accuracy": {name: r.accuracy for name, r in results.items()},
        "results": {name: r.to_dict() for name, r in results.items()},
        "model": model_info,
        "protocol": {"flip": flip, "folds": nfolds, "distance": "squared L2", "thresholds": "np.arange(0, 4, 0.01)"},
        "timings": timings,
    }
    if ijb_root is not None:
        from hyperface.evaluation.ijb import evaluate_ijb

        start = time.perf_counter()
        cache = None
        if cache_dir is not None:
            cache = Path(cache_dir) if callable(model) else Path(cache_dir) / _ijb_cache_key(model, ijb_root, ijb_target, flip)
        ijb = evaluate_ijb(
            embed_fn, ijb_root, ijb_target, batch_size=batch_size, flip=flip, use_detector_score=ijb_detector_score,
            cache_dir=cache, identification=ijb_identification, inputs=ijb_inputs,
        )
        report["ijb"] = ijb.to_dict()
        timings[ijb.target] = round(time.perf_counter() - start, 3)
    return report


def _ijb_cache_key(model: str | os.PathLike, root: str | os.PathLike, target: str, flip: bool) -> str:
    """A folder name that changes with the weights, the release's meta files or the settings."""
    import hashlib

    from hyperface.common.io import file_sha256
    from hyperface.evaluation.ijb import _ijb_folder
    from hyperface.recognition.recognizers import resolve_model_path

    meta = _ijb_folder(Path(root), target.upper()) / "meta"
    # align=: features cached before the crops became insightface's float32 fit are not reused
    parts = [file_sha256(resolve_model_path(model)), target.upper(), f"flip={flip}", "align=insightface-ijb-float32"]
    parts += [file_sha256(p) for p in sorted(meta.glob(f"{target.lower()}_*.txt"))]
    return f"{target.upper()}-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def model_label(model: str | os.PathLike) -> str:
    """A short name for a model in tables and plot legends: the run folder (and checkpoint step) for
    ``hyperface train`` outputs, otherwise the file name."""
    from hyperface.recognition.recognizers import resolve_model_path

    path = resolve_model_path(model).resolve()
    if path.stem != "backbone":
        return path.name
    if path.parent.name.startswith("step-"):  # RUN/checkpoints/step-N/backbone.safetensors
        return f"{path.parent.parent.parent.name}/{path.parent.name}"
    return path.parent.name


#: The HyperFace paper's published accuracies (iResNet-50 trained on HyperFace 10K x 50, 0.5M images),
#: what ``--compare paper`` puts beside a reproduction.
PAPER_RESULTS = {"lfw": 0.9850, "cfp_fp": 0.8883, "cplfw": 0.8423, "agedb_30": 0.8653, "calfw": 0.8940}
#: Other synthetic sets' published means over the same five sets (iResNet-50, about 0.5M images).
PAPER_OTHER_MEANS = {"Vec2Face HSFace10K": 92.00, "Arc2Face": 91.73, "DCFace": 89.56, "IDiff-Face": 88.20,
                     "DigiFace": 83.45, "SynFace": 74.75, "CASIA-WebFace (real)": 94.8}


def paper_report() -> dict[str, Any]:
    """The paper's numbers in the shape of an ``evaluate --json`` report (accuracies only)."""
    return {"published": "HyperFace (ICLR 2025), iResNet-50 on HyperFace 10K x 50",
            "results": {name: {"accuracy": acc} for name, acc in PAPER_RESULTS.items()}}


def read_reports(paths: Sequence[str | os.PathLike], *, own_label: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Earlier ``evaluate --json`` reports, each labelled by its file name (its path where two share
    one, or where it is ``own_label``, the model evaluated beside them); the word ``paper`` (no such
    file here) stands for the paper's published accuracies."""
    import json

    for path in paths:  # the likely slip first: BIN files typed after --compare, which takes every name after it
        if str(path).lower().endswith(".bin"):
            raise HyperfaceError(f"--compare {path}: a verification set, not a report; put the BIN files before --compare "
                                 "(its list takes every name after it), or end the list with --")
    reports = []
    names = [Path(p).stem for p in paths]
    for name, path in zip(names, paths):
        if str(path) == "paper" and not Path(path).exists():
            if not any(label == "paper" for label, _ in reports):  # once, however often it is named
                reports.append(("paper", paper_report()))
            continue
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HyperfaceError(f"--compare {path}: no such file (give reports written by `hyperface evaluate --json`)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise HyperfaceError(f"--compare {path}: not a readable JSON report ({exc})") from None
        if not isinstance(report, dict) or not (isinstance(report.get("results"), dict) or isinstance(report.get("ijb"), dict)):
            raise HyperfaceError(f"--compare {path}: not a `hyperface evaluate --json` report (no results or ijb in it)")
        problem = _report_problem(report)
        if problem is None:  # the table, tried now on this report alone: any field it trips over is named here
            try:
                format_comparison([(name, report)])
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                problem = f"a field the comparison table reads is missing or not a number ({type(exc).__name__}: {exc})"
        if problem:
            raise HyperfaceError(f"--compare {path}: {problem}; give a report written by `hyperface evaluate --json`")
        reports.append((name if names.count(name) == 1 and name != own_label else str(path), report))
    return reports


def _report_problem(report: dict[str, Any]) -> str | None:
    """What the table and the plot would trip over in a report read from disk (None: nothing)."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for name, result in (report.get("results") or {}).items():
        if not isinstance(result, dict) or not number(result.get("accuracy")):
            return f"results[{name!r}] has no accuracy"
        histogram = result.get("similarity_histogram")
        if histogram and not (number(result.get("best_threshold")) and isinstance(histogram, dict)
                              and len(histogram.get("genuine") or []) == len(histogram.get("impostor") or []) > 0):
            return f"results[{name!r}] has a similarity histogram without a threshold or with uneven bins"
    ijb = report.get("ijb")
    if ijb is not None:
        if not isinstance(ijb, dict) or not isinstance(ijb.get("target"), str) or not isinstance(ijb.get("tar_at_far"), dict):
            return "its ijb entry has no target or tar_at_far"
        roc = ijb.get("roc")
        if roc and not (isinstance(roc, dict) and len(roc.get("far") or []) == len(roc.get("tar") or []) > 0):
            return "its ijb roc has uneven far and tar lists"
    return None


def _comparability_notes(reports: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Lines warning where reports side by side were not measured alike: another protocol, or another
    file under a set's name (pair count or SHA-256), which the JSON reports record."""
    notes = []
    measured = [(label, report) for label, report in reports if not report.get("published")]
    protocols = {label: (p.get("flip"), p.get("folds")) for label, report in measured if (p := report.get("protocol"))}
    if len(set(protocols.values())) > 1:
        notes.append("note: the reports use different protocols: " + ", ".join(
            f"{label} ({'flip' if flip else 'no flip'}, {folds} folds)" for label, (flip, folds) in protocols.items()))
    names = dict.fromkeys(name for _, report in measured for name in report.get("results", {}))
    for name in names:
        pairs = {label: report["results"][name].get("num_pairs") for label, report in measured if name in report.get("results", {})}
        shas = {}
        for label, report in measured:
            for entry in (report.get("inputs") or {}).get("bins") or []:
                if isinstance(entry, dict) and Path(str(entry.get("path", ""))).stem == name and entry.get("sha256"):
                    shas[label] = entry["sha256"]
        if len({p for p in pairs.values() if p is not None}) > 1:
            notes.append(f"note: {name} is not the same set in every report: " + ", ".join(f"{label} {p} pairs" for label, p in pairs.items()))
        elif len(set(shas.values())) > 1:
            notes.append(f"note: {name} is another file in some reports (SHA-256 differs): " + ", ".join(
                f"{label} {sha[:12]}" for label, sha in shas.items()))
    return notes


def format_comparison(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Several models side by side: accuracy per .bin set, and IJB TAR at FAR 1e-5 and 1e-4."""
    rows: list[tuple[str, list[str]]] = []
    benchmarks = list(dict.fromkeys(name for _, report in reports for name in report.get("results", {})))
    for name in benchmarks:
        cells = [report.get("results", {}).get(name) for _, report in reports]
        rows.append((f"{name} acc (%)", [f"{100 * c['accuracy']:.2f}" if c else "-" for c in cells]))
    shared = [name for name in benchmarks if all(name in report.get("results", {}) for _, report in reports)]
    if len(shared) > 1:
        means = [np.mean([report["results"][name]["accuracy"] for name in shared]) for _, report in reports]
        label = "mean acc (%)" if len(shared) == len(benchmarks) else f"mean of {len(shared)} shared"
        rows.append((label, [f"{100 * m:.2f}" for m in means]))
    targets = list(dict.fromkeys(report["ijb"]["target"] for _, report in reports if report.get("ijb")))
    for target in targets:
        ijbs = [report["ijb"] if (report.get("ijb") or {}).get("target") == target else None for _, report in reports]
        for far in ("1e-05", "1e-04"):
            cells = [ijb["tar_at_far"].get(far) if ijb else None for ijb in ijbs]
            rows.append((f"{target} TAR@{far} (%)", [f"{100 * c:.2f}" if c is not None else "-" for c in cells]))
        if any(ijb and ijb.get("identification") for ijb in ijbs):
            idents = [(ijb or {}).get("identification") or {} for ijb in ijbs]
            rows.append((f"{target} 1:N rank-1 (%)", [f"{100 * i['rank']['1']:.2f}" if i else "-" for i in idents]))
            for fpir in ("1e-02", "1e-01"):
                cells = [i.get("tpir_at_fpir", {}).get(fpir) if i else None for i in idents]
                rows.append((f"{target} TPIR@{fpir} (%)", [f"{100 * c:.2f}" if c is not None else "-" for c in cells]))
    lines = side_by_side([label for label, _ in reports], rows, min_width=8)
    lines += _comparability_notes(reports)
    published = [report["published"] for _, report in reports if report.get("published")]
    if published:
        lines.append(f"paper: {published[0]}. Published means over the five sets: "
                     + ", ".join(f"{name} {mean:.2f}" for name, mean in PAPER_OTHER_MEANS.items()))
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned text: one row per benchmark, IJB TARs below."""
    lines = []
    results = report.get("results", {})
    if results:
        width = max(9, *(len(n) for n in results))
        lines.append(f"{'benchmark':<{width}}  {'pairs':>6}  {'accuracy (%)':>15}  {'threshold':>9}  {'VAL@FAR=1e-3 (%)':>16}")
        missed = []
        for name, r in results.items():
            acc = f"{100 * r['accuracy']:.2f} +- {100 * r['std']:.2f}"
            val = f"{100 * r['val']:.2f}" if r.get("val") is not None else "-"
            target = r.get("far_target", 1e-3)
            if r.get("val") is not None and r.get("far") is not None and r["far"] > 2 * target:
                val += "*"  # too few impostor pairs per fold: the threshold could not get down to the target
                missed.append(f"{name} {r['far']:.3g}")
            lines.append(f"{name:<{width}}  {r['num_pairs']:>6}  {acc:>15}  {r['best_threshold']:>9.3f}  {val:>16}")
        if len(results) > 1:
            mean = 100 * float(np.mean([r["accuracy"] for r in results.values()]))
            lines.append(f"{'mean':<{width}}  {'':>6}  {mean:>15.2f}")
        if missed:
            lines.append(f"* FAR reached instead of 1e-3 (too few impostor pairs per fold): {', '.join(missed)}")
    ijb = report.get("ijb")
    if ijb:
        if lines:
            lines.append("")
        keys = list(ijb["tar_at_far"])
        impostors = ijb.get("num_impostor_pairs")
        unmeasured = [k for k in keys if impostors and float(k) * impostors < 1]  # not one impostor pair that far out
        lines.append(f"{ijb['target']} 1:1 TAR (%) at FAR  " + "  ".join(f"{k:>7}" for k in keys))
        lines.append(f"{'':<{len(ijb['target']) + 20}}"
                     + "  ".join(f"{100 * ijb['tar_at_far'][k]:>{6 if k in unmeasured else 7}.2f}" + ("*" if k in unmeasured else "")
                                 for k in keys))
        if unmeasured:
            lines.append(f"* FAR below 1 / {impostors} impostor pairs: not measured, read off the end of the ROC")
        lines.append(f"({ijb['num_templates']} templates, {ijb['num_pairs']} pairs, {ijb['num_images']} faces; AUC {100 * ijb['auc']:.2f})")
        ident = ijb.get("identification")
        if ident:
            ranks = "  ".join(f"rank-{k} {100 * v:.2f}" for k, v in ident["rank"].items())
            tpir = "  ".join(f"TPIR@FPIR={k} " + (f"{100 * v:.2f}" if v is not None else "-") for k, v in ident["tpir_at_fpir"].items())
            lines.append(f"{ijb['target']} 1:N (%)  {ranks}  {tpir}")
            lines.append(f"({ident['num_probes']} probe templates against {ident['num_gallery']} gallery templates)")
    return "\n".join(lines)


__all__ = ["evaluate_model", "format_table"]
