"""One figure for a dataset report: genuine vs impostor, tightness vs separation, target, leakage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hyperface.common.io import save_figure
from hyperface.report.stats import DatasetStats


def histogram_bins(stats: DatasetStats) -> np.ndarray:
    """Bins 0.01 wide from -0.3 (or lower, down to the smallest value plotted, so none drops out of
    the picture) to 1."""
    shown = [stats.impostor, stats.genuine, stats.intra_mean, stats.nearest_identity, stats.target_similarity, stats.leakage]
    lows = [float(np.min(a[np.isfinite(a)])) for a in shown if a is not None and np.isfinite(a).any()]
    low = min([-0.3, *lows])
    return np.linspace(-30, 100, 131) / 100 if low >= -0.3 else np.arange(np.floor(low * 100), 101) / 100


def plot_report(path: str | Path, stats: DatasetStats) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = stats.report
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    bins = histogram_bins(stats)

    ax = axes[0, 0]
    if len(stats.impostor):
        ax.hist(stats.impostor, bins=bins, density=True, alpha=0.6, color="C3", label=f"impostor ({len(stats.impostor):,} pairs)")
    if len(stats.genuine):
        ax.hist(stats.genuine, bins=bins, density=True, alpha=0.6, color="C0", label=f"genuine ({len(stats.genuine):,} pairs)")
    ver = report.get("verification")
    if ver:
        ax.axvline(ver["eer_threshold"], color="k", ls="--", lw=1, label=f"EER {100 * ver['eer']:.2f}% at {ver['eer_threshold']:.3f}")
    ax.set_xlabel("cosine similarity of an image pair")
    ax.set_ylabel("density")
    ax.set_title("genuine vs impostor pairs")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    intra = stats.intra_mean[np.isfinite(stats.intra_mean)]
    if intra.size:
        ax.hist(intra, bins=bins, alpha=0.6, color="C0", label="mean pair cosine within the identity")
    ax.hist(stats.nearest_identity, bins=bins, alpha=0.6, color="C1", label="centroid cosine to the nearest other identity")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("identities")
    ax.set_title("per identity: tightness vs separation")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    if stats.target_similarity is not None:
        ax.hist(stats.target_similarity, bins=bins, color="C2")
        ax.set_xlabel("cosine of each image to its target identity embedding")
        ax.set_ylabel("images")
        ax.set_title("identity consistency (target embeddings)")
    else:
        ax.text(0.5, 0.5, "no target identities given\n(--identities identities.npy)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    ax = axes[1, 1]
    if stats.leakage is not None:
        leak = report["leakage"]
        ax.hist(stats.leakage, bins=bins, color="C4")
        ax.axvline(leak["threshold"], color="k", ls="--", lw=1,
                   label=f"threshold {leak['threshold']}: {leak['identities_at_or_above']} identities at or above")
        ax.set_xlabel("cosine of each identity centroid to its nearest reference embedding")
        ax.set_ylabel("identities")
        ax.set_title("identity leakage")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no reference set given\n(--reference REAL.npy)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    fig.suptitle(f"{report['num_identities']:,} identities, {report['num_images']:,} images")
    return save_figure(fig, path)
