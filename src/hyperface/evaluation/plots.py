"""One figure for ``hyperface evaluate`` reports: genuine vs impostor scores per .bin set, the IJB ROC.

Works from the JSON-ready reports :func:`~hyperface.evaluation.evaluate_model` returns (and
``--json`` writes), so the curves of several models, evaluated on different days, can be overlaid.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hyperface.common.io import save_figure
from hyperface.common.runtime import get_logger

log = get_logger("evaluate")

#: The formats ``--plot`` may name (what matplotlib's Agg backend writes).
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def plot_evaluation(path: str | os.PathLike, reports: Sequence[tuple[str, dict[str, Any]]]) -> Path:
    """Write one panel per verification set (cosine histograms of genuine and impostor pairs, each
    model's mean threshold) and one ROC panel per IJB target, every model overlaid in its colour.

    ``reports``: (label, report) pairs; a report is ``evaluate_model``'s dict or a ``--json`` file's
    content. Reports written before hyperface kept histograms and ROC points are left out of those
    panels, with a warning.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [(label, report) for label, report in reports if not report.get("published")]  # numbers only: no curves
    benchmarks = list(dict.fromkeys(name for _, report in reports for name in report.get("results", {})))
    targets = list(dict.fromkeys(report["ijb"]["target"] for _, report in reports if report.get("ijb")))
    panels = [("bin", name) for name in benchmarks] + [("ijb", target) for target in targets]
    if not panels:
        raise ValueError("nothing to plot: the reports hold neither .bin results nor IJB results")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    colours = [f"C{i % 10}" for i in range(len(reports))]  # by position: two reports may share a label
    for ax, (kind, name) in zip(axes.flat, panels):
        drawn = 0
        spans = []  # the occupied cosine range of each model's histograms
        for (label, report), colour in zip(reports, colours):
            if kind == "bin":
                span = _draw_scores(ax, label, name, report.get("results", {}).get(name), colour, single=len(reports) == 1)
                drawn += span is not None
                spans += [span] if span else []
            else:
                ijb = report.get("ijb")
                drawn += _draw_roc(ax, label, ijb if ijb and ijb["target"] == name else None, colour)
        if kind == "bin":
            if not drawn:
                ax.set_title(name, fontsize=10)
            if spans:  # zoom on the occupied bins: a set's pairs rarely spread over all of [-1, 1]
                ax.set_xlim(min(lo for lo, _ in spans), max(hi for _, hi in spans))
            flipped = all((report.get("protocol") or {}).get("flip", True) for _, report in reports)
            ax.set_xlabel("cosine similarity of a pair" + (" (flip-fused features)" if flipped else ""))
            ax.set_ylabel("pairs (density)")
        else:
            ax.set_xscale("log")
            ax.set_xlim(1e-6, 1)
            ax.set_ylim(0, 1.02)  # a TAR of 100 % stays visible above the frame
            ax.set_xlabel("false accept rate")
            ax.set_ylabel("true accept rate")
            ax.set_title(f"{name} 1:1 ROC")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="lower right" if kind == "ijb" else "upper left")
        else:
            ax.text(0.5, 0.5, "no curves in these reports\n(written by an older hyperface)", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


def _draw_scores(ax: Any, label: str, name: str, result: dict[str, Any] | None, colour: str, *, single: bool) -> tuple[float, float] | None:
    """Draw one model's histograms and threshold; returns the cosine range they occupy (None: nothing drawn)."""
    histogram = (result or {}).get("similarity_histogram")
    if not histogram:
        if result:
            log.warning("%s has no score histogram for %s (an older report): left out of the plot", label, name)
        return None
    genuine = np.asarray(histogram["genuine"], dtype=np.float64)
    impostor = np.asarray(histogram["impostor"], dtype=np.float64)
    edges = np.linspace(-1, 1, genuine.size + 1)
    width = edges[1] - edges[0]
    # the protocol thresholds squared L2 distance d; for unit vectors cosine = 1 - d / 2
    threshold = 1 - result["best_threshold"] / 2
    accuracy = f"{100 * result['accuracy']:.2f}%"
    for counts, style, kind in ((genuine, "-", "genuine"), (impostor, "--", "impostor")):
        if counts.sum() > 0:
            # one model: each curve named; several: one legend line per model, the line styles in the title
            legend = f"{kind} ({int(counts.sum()):,})" if single else (f"{label}: {accuracy}" if kind == "genuine" else None)
            tint = ("C0" if kind == "genuine" else "C3") if single else colour
            ax.stairs(counts / (counts.sum() * width), edges, color=tint, linestyle=style, label=legend)
    ax.axvline(threshold, color="k" if single else colour, lw=1, ls=":", label=f"threshold {threshold:.3f}" if single else None)
    ax.set_title(f"{name} {accuracy}" if single else f"{name} (solid genuine, dashed impostor, dotted threshold)", fontsize=10)
    used = np.nonzero(genuine + impostor)[0]
    return (float(edges[used[0]]), float(edges[used[-1] + 1])) if used.size else None


def _draw_roc(ax: Any, label: str, ijb: dict[str, Any] | None, colour: str) -> int:
    roc = (ijb or {}).get("roc")
    if not roc:
        if ijb:
            log.warning("%s has no ROC points for %s (an older report): left out of the plot", label, ijb["target"])
        return 0
    tar_1e4 = ijb["tar_at_far"].get("1e-04")
    legend = f"{label}: TAR {100 * tar_1e4:.2f}% at FAR 1e-4" if tar_1e4 is not None else label
    ax.plot(roc["far"], roc["tar"], color=colour, label=legend)
    return 1


__all__ = ["PLOT_FORMATS", "plot_evaluation"]
