"""A training run's curves at a glance: ``metrics.png`` beside ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hyperface.common.io import save_figure
from hyperface.common.text import display_name

PLOT_FILE = "metrics.png"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line a kill cut short is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def plot_metrics(run: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Draw loss, learning rate, throughput and verification accuracy against the step from
    ``run/metrics.jsonl`` into ``path`` (default ``run/metrics.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if isinstance(r.get("val"), dict)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True, sharex=True)  # one step axis for all four
    steps = np.array([r["step"] for r in train])
    epoch_starts = [r["step"] for prev, r in zip(train, train[1:]) if r.get("epoch") != prev.get("epoch")]
    panels = (
        (axes[0, 0], "loss", "training loss (mean over each logging interval)"),
        (axes[0, 1], "lr", "learning rate"),
        (axes[1, 0], "images_per_s", "throughput (images/s, all ranks)"),
    )
    for ax, key, title in panels:
        values = np.array([r.get(key, np.nan) for r in train], dtype=np.float64)
        if np.isfinite(values).any():
            ax.plot(steps, values, color="C0", lw=1)
        for start in epoch_starts:  # epoch boundaries
            ax.axvline(start, color="0.6", lw=0.8, ls="--", zorder=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if train and train[-1].get("loss") is not None:
        axes[0, 0].set_yscale("log" if min(r["loss"] for r in train if r.get("loss")) > 0 else "linear")
    ax = axes[1, 1]
    if val:
        names = list(dict.fromkeys(name for r in val for name in r["val"]))
        for i, name in enumerate(names):
            points = [(r["step"], r["val"][name]) for r in val if name in r["val"]]
            xs, ys = zip(*points)
            ax.plot(xs, 100 * np.asarray(ys), marker="o", ms=3, color=f"C{i % 10}", label=f"{name} {100 * ys[-1]:.2f}%")
        ax.legend(fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.set_title("verification (10-fold accuracy, flip fusion)", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no verification sets\n(--val-bin lfw.bin ...)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    last = train[-1] if train else {}
    fig.suptitle(f"{display_name(run.name)}: step {last.get('step', 0):,}, epoch {last.get('epoch', 0)}"
                 + (f", loss {last['loss']:.3f}" if last.get("loss") is not None else ""))
    return save_figure(fig, Path(path) if path is not None else run / PLOT_FILE)


__all__ = ["PLOT_FILE", "plot_metrics", "read_metrics"]
