"""Exact quality metrics of a packing, over all pairs (tiled), with the limits beside them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hyperface.packing.bounds import levenshtein_bound_deg, random_min_angle_deg
from hyperface.packing.geometry import pair_stats, tiled_topk

PERCENTILES = (1, 5, 50, 95, 99)


def _degrees(cos: torch.Tensor) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cos.double().cpu().numpy(), -1.0, 1.0)))


def gallery_similarity(points: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine of each point to its nearest gallery embedding (exact, tiled)."""
    sims, _ = tiled_topk(points.float(), gallery.float(), 1)
    return sims[:, 0]


def packing_metrics(
    points: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Metrics for N unit vectors: min angle, max cosine, nearest-neighbour angles, dense pairs.

    ``points`` and ``gallery`` must already be unit rows. The Levenshtein bound and the expected
    value for random points are reported for the same (N, d). The all-pairs pass runs on
    ``device`` (default: where ``points`` are), in float32.
    """
    return packing_report(points, gallery, device=device)[0]


def packing_report(
    points: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    *,
    device: torch.device | str | None = None,
    representatives: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """(metrics, per-identity NN angles in degrees, per-identity nearest-gallery cosine or None):
    the arrays behind the metrics, from the same all-pairs pass, for plots. With the orbit
    ``representatives`` of a cyclic code (``points`` = their shifts) the pass runs on them alone,
    exact and about d times cheaper (:func:`~hyperface.packing.cyclic.orbit_pair_stats`)."""
    x = torch.as_tensor(points).float()
    if device is not None:
        x = x.to(device)
    num, dim = x.shape
    if representatives is not None:
        from hyperface.packing.cyclic import orbit_pair_stats

        stats = orbit_pair_stats(representatives, num)
    else:
        stats = pair_stats(x)
    nn_angles = _degrees(stats.nn_cos)
    max_cos = float(stats.nn_cos.max())
    metrics: dict[str, Any] = {
        "num_identities": int(num),
        "dim": int(dim),
        "min_angle_deg": float(math.degrees(math.acos(min(1.0, max(-1.0, max_cos))))),
        "max_cosine": max_cos,
        "mean_nn_angle_deg": float(nn_angles.mean()),
        "nn_angle_percentiles_deg": {str(p): float(np.percentile(nn_angles, p)) for p in PERCENTILES},
        "pairs_above_cos_0.3": stats.pairs_above[0.3],
        "pairs_above_cos_0.4": stats.pairs_above[0.4],
        "num_pairs": stats.num_pairs,
        "levenshtein_bound_deg": levenshtein_bound_deg(num, dim),
        "random_expected_min_angle_deg": random_min_angle_deg(num, dim),
    }
    sims = None
    if gallery is not None:
        g = torch.as_tensor(gallery).float().to(x.device)
        sims = gallery_similarity(x, g).double().cpu().numpy()
        metrics["gallery_similarity"] = {
            "mean": float(sims.mean()),
            "min": float(sims.min()),
            **{f"p{p}": float(np.percentile(sims, p)) for p in PERCENTILES},
        }
        metrics["mean_gallery_distance"] = float(np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims)).mean())
    return metrics, nn_angles, sims


def format_metrics(metrics: dict[str, Any]) -> str:
    """A short human summary, the limits beside the result."""
    lines = [
        f"identities {metrics['num_identities']} in {metrics['dim']}-d",
        f"min angle        {metrics['min_angle_deg']:.3f} deg  (max cosine {metrics['max_cosine']:.4f})",
        f"  Levenshtein bound {metrics['levenshtein_bound_deg']:.3f} deg, random points ~{metrics['random_expected_min_angle_deg']:.3f} deg",
        f"mean NN angle    {metrics['mean_nn_angle_deg']:.3f} deg  "
        f"(p1 {metrics['nn_angle_percentiles_deg']['1']:.2f}, p50 {metrics['nn_angle_percentiles_deg']['50']:.2f})",
        f"pairs cos > 0.3  {metrics['pairs_above_cos_0.3']}, > 0.4 {metrics['pairs_above_cos_0.4']}",
    ]
    if "gallery_similarity" in metrics:
        g = metrics["gallery_similarity"]
        lines.append(f"gallery cosine   mean {g['mean']:.4f}, min {g['min']:.4f}, p5 {g['p5']:.4f}")
    return "\n".join(lines)
