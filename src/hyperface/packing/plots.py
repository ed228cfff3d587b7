"""Pictures of a packing run: convergence, nearest-neighbour angles, gallery proximity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hyperface.common.io import save_figure


def plot_packing(
    path: str | Path,
    history: list[dict[str, float]],
    nn_angles_deg: np.ndarray,
    metrics: dict[str, Any],
    gallery_similarity: np.ndarray | None = None,
) -> Path:
    """Write a PNG with the min-angle convergence curve and the NN-angle histogram (+ gallery)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if gallery_similarity is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), constrained_layout=True)
    bound = metrics["levenshtein_bound_deg"]
    random_value = metrics["random_expected_min_angle_deg"]

    ax = axes[0]
    if history:
        seconds = [h["seconds"] for h in history]
        angles = [h["min_angle_deg"] for h in history]
        ax.plot(seconds, angles, color="C0", lw=1.5, label="min angle (during run)")
    else:
        ax.set_xticks([])  # no optimisation, no time axis (--steps 0)
    ax.axhline(bound, color="C3", ls="--", lw=1, label=f"Levenshtein bound {bound:.2f}")
    ax.axhline(random_value, color="grey", ls=":", lw=1, label=f"random points {random_value:.2f}")
    ax.axhline(metrics["min_angle_deg"], color="C2", lw=1, label=f"final {metrics['min_angle_deg']:.3f}")
    ax.set_xlabel("optimisation time (s)")
    ax.set_ylabel("minimum pairwise angle (deg)")
    ax.set_title(f"N={metrics['num_identities']}, d={metrics['dim']}" + ("" if history else ": starting points, not optimised"))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)

    ax = axes[1]
    lowest, highest = float(np.min(nn_angles_deg)), float(np.max(nn_angles_deg))
    # Jammed packings (cyclic orbit codes in particular) put every identity's nearest neighbour at the
    # same angle to ~1e-5 deg: show at least 0.02 deg so the axis reads in plain degrees.
    view = (lowest - 0.01, highest + 0.01) if highest - lowest < 0.02 else None
    ax.hist(nn_angles_deg, bins=60, range=view, color="C0", alpha=0.8)
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    spread = float(np.ptp(nn_angles_deg)) or 1e-3
    if bound <= (view[1] if view else highest + spread):  # on the axis as drawn
        ax.axvline(bound, color="C3", ls="--", lw=1, label="Levenshtein bound")
    else:  # a far-away line would squash a tight (jammed) distribution into one bin
        ax.plot([], [], color="C3", ls="--", lw=1, label=f"Levenshtein bound {bound:.2f} (off scale)")
    ax.axvline(metrics["min_angle_deg"], color="C2", lw=1, label="min angle")
    ax.set_xlabel("angle to nearest other identity (deg)")
    ax.set_ylabel("identities")
    ax.set_title(f"nearest-neighbour angles\nmean {metrics['mean_nn_angle_deg']:.3f} deg, spread {highest - lowest:.2g} deg", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    if gallery_similarity is not None:
        ax = axes[2]
        if float(np.min(gallery_similarity)) > 1 - 1e-5:  # --steps 0 from the gallery: rounding noise only
            ax.text(0.5, 0.5, "every identity is a gallery row\n(cosine 1: not optimised)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
        else:
            ax.hist(gallery_similarity, bins=60, color="C1", alpha=0.8)
            ax.set_xlabel("cosine to nearest gallery embedding")
            ax.set_ylabel("identities")
            ax.grid(alpha=0.3)
        ax.set_title("proximity to the face gallery")

    return save_figure(fig, path)
