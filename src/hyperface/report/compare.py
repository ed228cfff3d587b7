"""``hyperface report --compare``: datasets side by side (HyperFace against DCFace, Vec2Face, ...),
from the ``report.json`` files earlier ``hyperface report`` runs wrote.

The table puts each dataset's headline numbers in a column; the figure overlays the distributions
every report keeps as binned histograms. Statistics compare only when one FR model saw every
dataset: the notes under the table say where the reports differ in model, thresholds or reference set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import atomic_write, read_json, releases_output_locks
from hyperface.report.pipeline import REPORT_FILE

COMPARISON_TABLE = "comparison.txt"
COMPARISON_PLOT = "comparison.png"


@dataclass
class DatasetReport:
    """One column of a comparison: its label, its ``report.json`` and the manifest beside it ({} if none)."""

    label: str
    report: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _report_file(path: Path) -> Path:
    """``path`` itself, or the report.json in a report folder; a clear error for anything else."""
    if path.is_dir():
        if (path / REPORT_FILE).is_file():
            return path / REPORT_FILE
        if (path / "gallery.npy").exists() or (path / "gallery.index.txt").exists():
            raise HyperfaceError(
                f"--compare {path}: embeddings, not a report. Give folders `hyperface report` wrote; an EMBEDDINGS "
                "argument goes before --compare (its list takes every name after it)"
            )
        raise HyperfaceError(f"--compare {path}: no {REPORT_FILE} in this folder (give `hyperface report` output folders)")
    if not path.exists():
        raise HyperfaceError(f"--compare {path}: no such file or folder (give `hyperface report` output folders)")
    if path.suffix == ".npy":
        raise HyperfaceError(f"--compare {path}: embeddings, not a report; an EMBEDDINGS argument goes before --compare")
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _report_problem(report: Any) -> str | None:
    """What the table would trip over in a report read from disk (None: nothing)."""
    if not isinstance(report, dict):
        return "not a JSON object"
    for key in ("num_images", "num_identities"):
        if not isinstance(report.get(key), int):
            return f"no {key}"
    for key in ("intra_class", "inter_class"):
        if not isinstance(report.get(key), dict):
            return f"no {key} section"
    histograms = report.get("histograms")
    if histograms is not None:
        bins = histograms.get("bins") if isinstance(histograms, dict) else None
        if not isinstance(bins, int) or bins < 1 or any(
            not isinstance(counts, list) or len(counts) != bins or not all(_is_number(c) for c in counts)
            for name, counts in histograms.items() if name not in ("bins", "range")
        ):
            return "its histograms do not all have the stated number of bins"
        span = histograms.get("range", [-1.0, 1.0])
        if not (isinstance(span, list) and len(span) == 2 and all(_is_number(v) for v in span) and span[0] < span[1]):
            return "its histograms' range is not two increasing numbers"
    return None


def read_dataset_reports(paths: Sequence[str | os.PathLike]) -> list[DatasetReport]:
    """Earlier ``hyperface report`` outputs (folders or their report.json), each labelled by its folder name
    (repeated names get " (2)", ...)."""
    entries = []
    for given in paths:
        file = _report_file(Path(given))
        try:
            report = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise HyperfaceError(f"--compare {given}: not a readable JSON report ({exc})") from None
        problem = _report_problem(report)
        if problem:
            raise HyperfaceError(f"--compare {given}: {problem}; give a report written by `hyperface report`")
        manifest_path = file.parent / "manifest.json"
        try:
            manifest = read_json(manifest_path) if manifest_path.is_file() else {}
        except (OSError, HyperfaceError):  # damaged: only the reference-set note needs it
            manifest = {}
        label = file.parent.name if file.name == REPORT_FILE else file.stem
        entry = DatasetReport(label or str(file), report, manifest, file)
        try:  # the table, tried now on this report alone: a field it trips over is named before any work
            format_report_comparison([entry])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise HyperfaceError(f"--compare {given}: a field the comparison table reads is missing or not a number "
                                 f"({type(exc).__name__}: {exc}); give a report written by `hyperface report`") from None
        entries.append(entry)
    return labelled_uniquely(entries)


def labelled_uniquely(entries: Sequence[DatasetReport]) -> list[DatasetReport]:
    """The entries, a repeated label told apart: the second ``hf10k`` becomes ``hf10k (2)``."""
    from dataclasses import replace

    from hyperface.common.text import unique_labels

    return [replace(e, label=label) for e, label in zip(entries, unique_labels([e.label for e in entries]))]


def _get(report: dict[str, Any], *keys: str) -> Any:
    value: Any = report
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text  # -0.0002 shows as 0.000, not -0.000


def comparison_rows(entries: Sequence[DatasetReport]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per dataset): the numbers papers compare synthetic datasets by."""
    reports = [e.report for e in entries]

    def row(name: str, cell) -> tuple[str, list[str]]:
        return name, [cell(r) for r in reports]

    rows = [
        row("identities", lambda r: f"{r['num_identities']:,}"),
        row("images", lambda r: f"{r['num_images']:,}"),
        row("images per identity", lambda r: _number(_get(r, "images_per_identity", "mean"), 1)),
        row("intra: mean pair cosine", lambda r: _number(_get(r, "intra_class", "mean_pair_cosine_per_identity", "mean"))),
        row("intra: image to centroid", lambda r: _number(_get(r, "intra_class", "image_to_centroid_cosine", "mean"))),
        row("inter: nearest identity", lambda r: _number(_get(r, "inter_class", "nearest_identity_cosine", "mean"))),
        row("inter: nearest, p99", lambda r: _number(_get(r, "inter_class", "nearest_identity_cosine", "p99"))),
    ]
    if any(_get(r, "inter_class", "unique_identities") for r in reports):
        rows.append(row("unique identities (%)", lambda r: _percent(_get(r, "inter_class", "unique_identities", "fraction"))))
    if any(r.get("verification") for r in reports):
        rows += [
            row("genuine cosine", lambda r: _number(_get(r, "verification", "genuine_cosine", "mean"))),
            row("impostor cosine", lambda r: _number(_get(r, "verification", "impostor_cosine", "mean"))),
            row("d'", lambda r: _number(_get(r, "verification", "d_prime"), 2)),
            row("EER (%)", lambda r: _percent(_get(r, "verification", "eer"))),
        ]
        fars = list(dict.fromkeys(far for r in reports for far in (_get(r, "verification", "tar_at_far") or {})))
        for far in fars:
            rows.append(row(f"TAR@FAR={far} (%)", lambda r, far=far: _percent(_get(r, "verification", "tar_at_far", far, "tar"))))
    if any(r.get("target") for r in reports):
        rows.append(row("target cosine", lambda r: _number(_get(r, "target", "image_to_target_cosine", "mean"))))
    if any(r.get("leakage") for r in reports):
        rows.append(row("leaked identities (%)", lambda r: _percent(_get(r, "leakage", "fraction_at_or_above"))))
        rows.append(row("nearest real, max", lambda r: _number(_get(r, "leakage", "nearest_reference_cosine", "max"))))
    if any(_get(r, "pose", "faces_with_pose") for r in reports):
        rows.append(row("|yaw| > 30 deg (%)", lambda r: _percent(_get(r, "pose", "abs_yaw_above", "30"))))
        rows.append(row("yaw spread per id (deg)", lambda r: _number(_get(r, "pose", "identity_yaw_std_deg", "mean"), 1)))
    return rows


def _model_name(entry: DatasetReport) -> str | None:
    model = entry.report.get("embedding_model") or {}
    path = model.get("path")
    return Path(path).name if path else None


def comparability_notes(entries: Sequence[DatasetReport]) -> list[str]:
    """Where the reports were not measured alike: the FR model, the thresholds, the reference set."""
    notes = []
    models = {e.label: (e.report.get("embedding_model") or {}).get("sha256") for e in entries}
    known = {sha for sha in models.values() if sha}
    if len(known) > 1:
        notes.append("note: different FR models saw these datasets, so their cosines are not on one scale: "
                     + ", ".join(f"{e.label} {_model_name(e) or '?'} ({(models[e.label] or '?')[:12]})" for e in entries))
    elif known and len(known) < len(entries) and None in models.values():
        unknown = [label for label, sha in models.items() if not sha]
        notes.append(f"note: the FR model behind {', '.join(unknown)} is not recorded (embeddings made outside "
                     "`hyperface embed`): compare only reports made with one model")
    for name, keys in (("--leak-threshold", ("leakage", "threshold")), ("--unique-threshold", ("inter_class", "unique_identities", "threshold"))):
        values = {e.label: _get(e.report, *keys) for e in entries if _get(e.report, *keys) is not None}
        if len(set(values.values())) > 1:
            notes.append(f"note: the reports use different {name}: " + ", ".join(f"{label} {v}" for label, v in values.items()))
    references = {e.label: _get(e.manifest, "inputs", "reference", "sha256") for e in entries if e.report.get("leakage")}
    if len({sha for sha in references.values() if sha}) > 1:
        notes.append("note: leakage was measured against different reference sets: "
                     + ", ".join(f"{label} {(sha or '?')[:12]}" for label, sha in references.items()))
    dims = {e.report.get("dim") for e in entries}
    if len(dims) > 1:
        notes.append("note: the embeddings have different dimensions (" + ", ".join(f"{e.label} {e.report.get('dim')}" for e in entries)
                     + "): different FR models")
    return notes


def format_report_comparison(entries: Sequence[DatasetReport]) -> str:
    """The datasets as columns, one statistic a row, then the notes on what differs between them."""
    from hyperface.common.text import side_by_side

    rows = comparison_rows(entries)
    models = [_model_name(e) for e in entries]
    if any(models):
        rows.append(("FR model", [m or "?" for m in models]))
    return "\n".join(side_by_side([e.label for e in entries], rows, min_width=9) + comparability_notes(entries))


def plot_report_comparison(path: str | os.PathLike, entries: Sequence[DatasetReport]) -> Path | None:
    """Overlaid distributions (genuine/impostor pairs, identity tightness and separation, leakage or
    target consistency), one colour per dataset. None when no report kept histograms (written before
    they were added)."""
    drawable = [e for e in entries if isinstance(e.report.get("histograms"), dict)]
    if not drawable:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hyperface.common.io import save_figure

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    panels = [
        (axes[0, 0], ("genuine", "impostor"), "cosine of an image pair", "pairs: genuine (solid) vs impostor (dashed)"),
        (axes[0, 1], ("intra_identity",), "mean pair cosine within an identity", "identity tightness"),
        (axes[1, 0], ("nearest_identity",), "centroid cosine to the nearest other identity", "identity separation"),
    ]
    last = "leakage" if any("leakage" in e.report["histograms"] for e in drawable) else "target"
    panels.append((axes[1, 1], (last,), "identity centroid to its nearest reference row (dotted: --leak-threshold)" if last == "leakage"
                   else "image to its target identity embedding", "identity leakage" if last == "leakage" else "identity consistency"))
    for ax, names, xlabel, title in panels:
        drawn, span = False, [np.inf, -np.inf]
        for colour, entry in enumerate(drawable):
            hist = entry.report["histograms"]
            low, high = hist.get("range", (-1.0, 1.0))
            edges = np.linspace(low, high, hist["bins"] + 1)
            for name, style in zip(names, ("-", "--")):
                counts = np.asarray(hist.get(name) or [], dtype=np.float64)
                if counts.sum() <= 0:
                    continue
                density = counts / (counts.sum() * np.diff(edges))
                label = entry.label if name == names[0] or len(names) == 1 else None
                ax.stairs(density, edges, color=f"C{colour}", linestyle=style, label=label)
                used = np.flatnonzero(counts)
                span = [min(span[0], edges[used[0]]), max(span[1], edges[used[-1] + 1])]
                drawn = True
            threshold = _get(entry.report, "leakage", "threshold")
            if names == ("leakage",) and threshold is not None:
                ax.axvline(threshold, color=f"C{colour}", ls=":", lw=1)
                span = [min(span[0], threshold), max(span[1], threshold)]
        if drawn:
            ax.set_xlim(max(-1.0, span[0] - 0.05), min(1.0, span[1] + 0.05))  # where the data are
            ax.set_xlabel(xlabel)
            ax.set_ylabel("density")
            ax.set_title(title)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no report has {title}", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    skipped = [e.label for e in entries if e not in drawable]
    fig.suptitle("datasets compared" + (f" ({', '.join(skipped)}: no histograms, rerun its report)" if skipped else ""))
    return save_figure(fig, path)


def write_comparison(out_dir: str | os.PathLike, entries: Sequence[DatasetReport], *, plot: bool = True) -> list[str]:
    """``comparison.txt`` (the table and notes) and ``comparison.png`` in ``out_dir``; the names written."""
    out_dir = Path(out_dir)
    with atomic_write(out_dir / COMPARISON_TABLE, "w", encoding="utf-8") as handle:
        handle.write(format_report_comparison(entries) + "\n")
    written = [COMPARISON_TABLE]
    if plot and plot_report_comparison(out_dir / COMPARISON_PLOT, entries) is not None:
        written.append(COMPARISON_PLOT)
    return written


@releases_output_locks
def compare_reports(entries: Sequence[DatasetReport], out_dir: str | os.PathLike, *, overwrite: bool = False, plot: bool = True) -> Path:
    """Only the comparison of earlier reports: ``out_dir`` gets comparison.txt, comparison.png and a manifest."""
    from hyperface.common.io import prepare_output_dir
    from hyperface.common.manifest import Manifest

    if len(entries) < 2:
        raise HyperfaceError("a comparison needs two reports or more")
    out = prepare_output_dir(out_dir, overwrite=overwrite, stage="report", resumable=False)
    outputs = write_comparison(out, entries, plot=plot)
    manifest = Manifest(stage="report", params={"compare": [e.label for e in entries]},
                        inputs={e.label: e.path for e in entries if e.path is not None})
    manifest.extra["outputs"] = outputs
    manifest.write(out)
    return out
