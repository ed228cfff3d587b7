"""Statistics of a face dataset seen through an FR model: how tight each identity is, how far apart
identities are, how well images match the identity they were made for, and how close synthetic
identities come to real ones (identity leakage).

Everything is O(N d) or tiled (identity centroids against each other or against a reference set of
up to millions of rows): no N x N matrix. Pair distributions are estimated from sampled pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hyperface.common.errors import HyperfaceError
from hyperface.evaluation.ijb import roc_curve
from hyperface.packing.geometry import tiled_topk

PERCENTILES = (1, 5, 50, 95, 99)
ROW_CHUNK = 65536  # rows per chunk in per-row passes: bounded temporaries at millions of images
BASE_CHUNK = 262_144  # reference rows on the device at once in a nearest-neighbour search (512 MB at d=512)
#: Bins of the cosine histograms report.json keeps (0.01 wide over [-1, 1]): what ``report --compare``
#: overlays, so datasets reported on different machines can be drawn together without their arrays.
HISTOGRAM_RANGE, HISTOGRAM_BINS = (-1.0, 1.0), 200


def cosine_histogram(values: np.ndarray) -> list[int]:
    """Counts of ``values`` in the :data:`HISTOGRAM_BINS` bins over :data:`HISTOGRAM_RANGE` (ends clipped in)."""
    v = np.clip(np.asarray(values, dtype=np.float64), *HISTOGRAM_RANGE)
    counts, _ = np.histogram(v[np.isfinite(v)], bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
    return [int(c) for c in counts]


def summary(values: np.ndarray) -> dict[str, float]:
    """Mean, std, min, max and percentiles of a 1-D array, as plain floats."""
    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
    out.update({f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES})
    return out


@dataclass
class Classes:
    """Rows grouped by label: ``labels[order]`` is sorted, class c's rows are ``order[starts[c]:starts[c]+counts[c]]``."""

    labels: np.ndarray  # (C,) the distinct labels, sorted
    inverse: np.ndarray  # (N,) class position of each row
    counts: np.ndarray  # (C,)
    order: np.ndarray  # (N,) rows sorted by class
    starts: np.ndarray  # (C,)

    @classmethod
    def of(cls, labels: np.ndarray) -> "Classes":
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise HyperfaceError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
        distinct, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return cls(distinct, inverse, counts, order, starts)


def class_centroids(embeddings: np.ndarray, classes: Classes) -> tuple[np.ndarray, np.ndarray]:
    """(unit centroids (C, d), mean pairwise cosine within each class (C,), NaN for 1-image classes).

    For unit rows, the mean cosine over the n(n-1) ordered pairs of a class is exactly
    (||sum||^2 - n) / (n (n - 1)): no pairwise pass needed.
    """
    sums_t = torch.zeros((len(classes.labels), embeddings.shape[1]), dtype=torch.float64)
    inverse = torch.from_numpy(classes.inverse)
    for start in range(0, len(embeddings), ROW_CHUNK):  # np.add.at is ~10x slower; chunks bound the float64 copy
        block = torch.from_numpy(np.asarray(embeddings[start : start + ROW_CHUNK], dtype=np.float64))
        sums_t.index_add_(0, inverse[start : start + ROW_CHUNK], block)
    sums = sums_t.numpy()
    n = classes.counts.astype(np.float64)
    sq = (sums * sums).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        intra = np.where(n > 1, (sq - n) / (n * (n - 1)), np.nan)
    centroids = (sums / np.maximum(np.sqrt(sq), 1e-12)[:, None]).astype(np.float32)
    return centroids, intra


def rowwise_cosines(embeddings: np.ndarray, table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``embeddings[i] . table[index[i]]`` for every row, in chunks (never an (N, d) gathered copy)."""
    out = np.empty(len(embeddings), dtype=np.float32)
    for start in range(0, len(embeddings), ROW_CHUNK):
        stop = start + ROW_CHUNK
        out[start:stop] = np.einsum("nd,nd->n", embeddings[start:stop], table[index[start:stop]])
    return out


def sample_pairs(classes: Classes, num_genuine: int, num_impostor: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (k, 2): genuine pairs (two different images of one identity) and impostor pairs
    (two images of different identities), each drawn uniformly over all pairs of its kind, with
    replacement: the distributions a verification over every pair of the set has, whatever the
    class sizes (an identity with n images holds n(n - 1)/2 genuine pairs).

    A set with no more pairs in all than asked for in all is enumerated instead: every pair once
    (a random subset of one kind if it has more than asked), so a small set is described exactly,
    not by repeats of a few pairs.
    """
    n = classes.inverse.shape[0]
    if n * (n - 1) // 2 <= num_genuine + num_impostor:
        first, second = np.triu_indices(n, 1)
        same = classes.inverse[first] == classes.inverse[second]
        kinds = []
        for mask, wanted in ((same, num_genuine), (~same, num_impostor)):
            pairs = np.stack([first[mask], second[mask]], axis=1)
            if len(pairs) > wanted:
                pairs = pairs[np.sort(rng.choice(len(pairs), wanted, replace=False))]
            kinds.append(pairs)
        return kinds[0], kinds[1]
    eligible = np.flatnonzero(classes.counts[classes.inverse] >= 2)
    genuine = np.zeros((0, 2), dtype=np.int64)
    if num_genuine > 0 and eligible.size:
        # uniform over ordered pairs: the first image weighted by how many others its identity has
        # (n - 1), the second uniform among those, so each pair has probability 1 / sum n(n - 1)
        others = np.cumsum(classes.counts[classes.inverse[eligible]] - 1)
        first = eligible[np.searchsorted(others, rng.integers(0, others[-1], num_genuine), side="right")]
        c = classes.inverse[first]
        position = np.empty(n, dtype=np.int64)
        position[classes.order] = np.arange(n) - np.repeat(classes.starts, classes.counts)
        offset = 1 + rng.integers(0, np.iinfo(np.int64).max, num_genuine) % (classes.counts[c] - 1)
        second = classes.order[classes.starts[c] + (position[first] + offset) % classes.counts[c]]
        genuine = np.stack([first, second], axis=1)
    impostor = np.zeros((0, 2), dtype=np.int64)
    if num_impostor > 0 and len(classes.labels) > 1:
        parts, have = [], 0
        while have < num_impostor:  # rejection: a random pair is rarely of one class when C is large
            pairs = rng.integers(0, n, (2 * (num_impostor - have) + 16, 2))
            pairs = pairs[classes.inverse[pairs[:, 0]] != classes.inverse[pairs[:, 1]]]
            parts.append(pairs[: num_impostor - have])
            have += len(parts[-1])
        impostor = np.concatenate(parts)
    return genuine, impostor


def pair_cosines(embeddings: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(len(pairs), dtype=np.float32)
    for s in range(0, len(pairs), chunk):
        p = pairs[s : s + chunk]
        out[s : s + chunk] = np.einsum("nd,nd->n", embeddings[p[:, 0]], embeddings[p[:, 1]])
    return out


def equal_error_rate(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(EER, its threshold): where FAR (impostors at or above a threshold) meets FRR (genuine pairs
    below it), over every distinct score (not a thinned ROC, which can drop the crossing), the rate
    interpolated linearly between the two thresholds around the crossing."""
    scores = np.r_[genuine, impostor].astype(np.float64)
    is_genuine = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    order = np.argsort(-scores, kind="stable")
    scores, is_genuine = scores[order], is_genuine[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # the last row of each distinct score
    far = np.r_[0.0, np.cumsum(~is_genuine)[last] / max(len(impostor), 1)]
    frr = np.r_[1.0, 1.0 - np.cumsum(is_genuine)[last] / max(len(genuine), 1)]
    thresholds = np.r_[np.inf, scores[last]]
    gap = far - frr  # rises from -1 to +1 as the threshold falls
    i = int(np.argmax(gap >= 0))
    alpha = 0.0 if gap[i] == gap[i - 1] else -gap[i - 1] / (gap[i] - gap[i - 1])
    eer = far[i - 1] + alpha * (far[i] - far[i - 1])
    return float(eer), float(thresholds[i] if alpha >= 0.5 else thresholds[i - 1] if np.isfinite(thresholds[i - 1]) else thresholds[i])


def verification_stats(genuine: np.ndarray, impostor: np.ndarray, far_targets=(1e-4, 1e-3, 1e-2)) -> dict[str, Any]:
    """EER, TAR at FAR and d' from genuine / impostor cosine samples.

    A FAR below 10 / (number of impostor pairs) cannot be read off the sample and is left out, as
    is one that ties among the top impostor scores skip over.
    """
    labels = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    fpr, tpr, thresholds = roc_curve(labels, np.r_[genuine, impostor])
    eer, eer_threshold = equal_error_rate(genuine, impostor)
    tar = {}
    for target in far_targets:
        if target * len(impostor) >= 10:
            i = int(np.searchsorted(fpr, target, side="right")) - 1  # largest FAR not above the target
            if np.isfinite(thresholds[i]):  # else tied top impostor scores jump past the target: no reading
                tar[f"{target:g}"] = {"tar": float(tpr[i]), "threshold": float(thresholds[i])}
    spread = np.sqrt((genuine.var() + impostor.var()) / 2)
    return {
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
        "genuine_cosine": summary(genuine),
        "impostor_cosine": summary(impostor),
        "d_prime": float((genuine.mean() - impostor.mean()) / max(spread, 1e-12)),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "tar_at_far": tar,
    }


#: How many closest identity pairs and loosest identities report.json lists.
REPORTED_EXTREMES = 10


def closest_pairs(top_sims: np.ndarray, top_index: np.ndarray, count: int) -> list[tuple[int, int, float]]:
    """The ``count`` most similar distinct pairs, (a, b, cosine) with a < b, most similar first,
    from each row's ``k`` nearest others (``top_sims``/``top_index``, (C, k), k >= ``count`` or C - 1).
    Exact: a pair among the global top ``count`` has each member among the other's ``count`` nearest."""
    num, k = top_sims.shape
    sims, idx, rows = top_sims.ravel(), top_index.ravel(), np.repeat(np.arange(num), k)
    # each pair appears at most twice (once from each end), so the top 2 x count entries hold the answer
    top = min(2 * count, len(sims))
    if top == 0:
        return []
    candidates = np.argpartition(-sims, top - 1)[:top]
    candidates = candidates[np.argsort(-sims[candidates], kind="stable")]
    pairs: list[tuple[int, int, float]] = []
    seen: set[tuple[int, int]] = set()
    for i in candidates:
        a, b = sorted((int(rows[i]), int(idx[i])))
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b, float(sims[i])))
    return pairs[:count]


def loosest(intra_mean: np.ndarray, count: int) -> list[int]:
    """Class positions of the ``count`` identities with the lowest mean pair cosine (single-image
    identities, NaN, have none and are skipped), loosest first."""
    known = np.isfinite(intra_mean)
    order = np.argsort(np.where(known, intra_mean, np.inf), kind="stable")
    return [int(c) for c in order[: min(count, int(known.sum()))]]


def nearest(
    queries: np.ndarray, base: np.ndarray, *, k: int = 1, exclude_self: bool = False, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Cosines and indices of each query's ``k`` nearest rows of ``base``, nearest first, (N, k)
    (tiled, exact float32; ``exclude_self``: base is queries, each row's own match left out)."""
    q = torch.from_numpy(np.ascontiguousarray(queries)).to(device)
    if exclude_self:
        sims, idx = tiled_topk(q, q, k, exclude_self=True)
        return sims.cpu().numpy(), idx.cpu().numpy()
    # the base (a reference set of millions of rows, possibly a memory map) is read a block at a time
    best_sims = best_idx = None
    for start in range(0, len(base), BASE_CHUNK):
        block = torch.from_numpy(np.array(base[start : start + BASE_CHUNK], dtype=np.float32)).to(device)  # a copy: maps are read-only
        sims, idx = tiled_topk(q, block, min(k, len(block)))
        idx = idx + start
        if best_sims is not None:  # merge; ties keep the earlier block's (lower) index first
            sims, order = torch.cat([best_sims, sims], dim=1).topk(min(k, best_sims.shape[1] + sims.shape[1]), dim=1)
            idx = torch.cat([best_idx, idx], dim=1).gather(1, order)
        best_sims, best_idx = sims, idx
    return best_sims.cpu().numpy(), best_idx.cpu().numpy()


#: |yaw| thresholds (degrees) whose share the report gives: near-frontal, half-profile, profile.
YAW_BANDS = (15, 30, 45)


def pose_stats(pose: np.ndarray, classes: Classes) -> dict[str, Any]:
    """Yaw, pitch and roll distributions, the share of faces beyond each :data:`YAW_BANDS`, and each
    identity's yaw spread (std over its faces with landmarks)."""
    pose = np.asarray(pose, dtype=np.float64)
    known = np.isfinite(pose).all(axis=1)
    if not known.any():
        return {"faces_with_pose": 0}
    yaw = pose[known, 0]
    inverse = classes.inverse[known]
    count = np.bincount(inverse, minlength=len(classes.labels))
    mean = np.bincount(inverse, weights=yaw, minlength=len(classes.labels)) / np.maximum(count, 1)
    square = np.bincount(inverse, weights=yaw**2, minlength=len(classes.labels)) / np.maximum(count, 1)
    spread = np.sqrt(np.maximum(square - mean**2, 0.0))[count >= 2]
    return {
        "faces_with_pose": int(known.sum()),
        "yaw_deg": summary(yaw), "pitch_deg": summary(pose[known, 1]), "roll_deg": summary(pose[known, 2]),
        "abs_yaw_above": {str(band): float(np.mean(np.abs(yaw) > band)) for band in YAW_BANDS},
        "identity_yaw_std_deg": summary(spread) if spread.size else None,
        "method": "5 detected landmarks against a generic 3D face (approximate; compare datasets, not single faces)",
    }


def _unique_identities(earlier: np.ndarray, threshold: float) -> dict[str, Any]:
    unique = earlier <= threshold
    return {"threshold": threshold, "count": int(unique.sum()), "fraction": float(unique.mean()),
            "rule": "no earlier identity (label order) with a centroid cosine above the threshold (Vec2Face)"}


def earlier_max_cosine(
    centroids: np.ndarray, *, device: str | torch.device = "cpu", rows: int = 1024, cols: int = 1 << 16
) -> np.ndarray:
    """Per identity, the highest cosine of its centroid to any identity before it in label order
    (-1 for the first): tiles of ``rows`` x ``cols`` below the diagonal only (half of the N x N
    products; 256 MB of scores at a time, never the N x N matrix)."""
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    out = torch.full((c.shape[0],), -1.0, device=device)
    for start in range(0, c.shape[0], rows):
        stop = min(start + rows, c.shape[0])
        own = torch.arange(start, stop, device=device)[:, None]
        for c0 in range(0, stop, cols):
            c1 = min(c0 + cols, stop)
            sims = c[start:stop] @ c[c0:c1].T
            sims.masked_fill_(torch.arange(c0, c1, device=device)[None, :] >= own, -1.0)  # itself and later ones
            out[start:stop] = torch.maximum(out[start:stop], sims.max(dim=1).values)
    return out.cpu().numpy()


@dataclass
class DatasetStats:
    """What :func:`dataset_stats` computes: ``report`` (JSON-ready) and the arrays behind the plots."""

    report: dict[str, Any]
    genuine: np.ndarray
    impostor: np.ndarray
    intra_mean: np.ndarray  # per identity, NaN for single-image identities
    nearest_identity: np.ndarray  # per identity: cosine of its centroid to the nearest other centroid
    closest: list[tuple[int, int, float]] = field(default_factory=list)  # most similar identity pairs (class positions)
    target_similarity: np.ndarray | None = None  # per image: cosine to its identity's target embedding
    leakage: np.ndarray | None = None  # per identity: cosine of its centroid to the nearest reference row
    leakage_index: np.ndarray | None = None
    classes: Classes | None = None


def check_report_inputs(
    embeddings: np.ndarray, labels: np.ndarray, *, identities: np.ndarray | None = None, reference: np.ndarray | None = None
) -> Classes:
    """Every check :func:`dataset_stats` makes of its inputs, cheap enough to run before any output exists."""
    if len(labels) != len(embeddings):
        raise HyperfaceError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    classes = Classes.of(labels)
    if len(classes.labels) < 2:
        raise HyperfaceError("a report needs at least 2 identities (inter-class statistics compare them)")
    if identities is not None:
        if identities.shape[1] != embeddings.shape[1]:
            raise HyperfaceError(
                f"identities have dimension {identities.shape[1]} but the embeddings {embeddings.shape[1]}: "
                "embed the dataset with the FR model the identities live in (e.g. Arc2Face's arcface.onnx)"
            )
        if not np.isfinite(identities).all():
            raise HyperfaceError(f"identities have NaN/inf values in row(s) {np.flatnonzero(~np.isfinite(identities).all(axis=1))[:5].tolist()}")
        if classes.labels.min() < 0 or classes.labels.max() >= len(identities):
            raise HyperfaceError(
                f"labels run {classes.labels.min()}..{classes.labels.max()} but there are {len(identities)} identities: "
                "label i must be row i of identities.npy (as `hyperface generate` writes them)"
            )
    if reference is not None and reference.shape[1] != embeddings.shape[1]:
        raise HyperfaceError(f"reference has dimension {reference.shape[1]} but the embeddings {embeddings.shape[1]}")
    return classes


def dataset_stats(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    identities: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    leak_threshold: float = 0.4,
    unique_threshold: float = 0.4,
    genuine_pairs: int = 200_000,
    impostor_pairs: int = 1_000_000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    pose: np.ndarray | None = None,
) -> DatasetStats:
    """All report statistics for unit-row ``embeddings`` (N, d) with integer ``labels`` (N,).

    ``identities`` (the packed target embeddings, row = label) adds each image's similarity to its
    target; ``reference`` (real identities or images, unit rows) adds identity leakage: each
    identity centroid's nearest reference row, and how many reach ``leak_threshold``.
    ``pose`` ((N, 3) yaw, pitch, roll in degrees, NaN where unknown; from the detected landmarks)
    adds the pose distribution and each identity's yaw spread.
    ``unique_threshold``: Vec2Face's count of unique identities (``inter-separability-measurement.py``):
    those whose centroid has no earlier identity (in label order) above this cosine.
    """
    classes = check_report_inputs(embeddings, labels, identities=identities, reference=reference)
    rng = np.random.default_rng(seed)
    centroids, intra = class_centroids(embeddings, classes)
    broken = np.flatnonzero(~np.isfinite(centroids).all(axis=1))  # a NaN/inf row spoils its class sum: no extra pass
    if broken.size:
        raise HyperfaceError(f"embeddings have NaN/inf values in rows of {broken.size} identities (labels "
                             f"{', '.join(str(int(classes.labels[c])) for c in broken[:5])}{', ...' if broken.size > 5 else ''})")
    to_centroid = rowwise_cosines(embeddings, centroids, classes.inverse)
    # one pass: each identity's nearest others give both its nearest and the closest pairs overall
    top_sims, top_index = nearest(centroids, centroids, k=min(REPORTED_EXTREMES, len(centroids) - 1), exclude_self=True, device=device)
    nearest_sim, closest = top_sims[:, 0], closest_pairs(top_sims, top_index, REPORTED_EXTREMES)
    gen_pairs, imp_pairs = sample_pairs(classes, genuine_pairs, impostor_pairs, rng)
    genuine, impostor = pair_cosines(embeddings, gen_pairs), pair_cosines(embeddings, imp_pairs)
    multi = np.isfinite(intra)
    report: dict[str, Any] = {
        "num_images": int(len(embeddings)),
        "num_identities": int(len(classes.labels)),
        "dim": int(embeddings.shape[1]),
        "images_per_identity": {"min": int(classes.counts.min()), "mean": float(classes.counts.mean()), "max": int(classes.counts.max())},
        "intra_class": {
            "mean_pair_cosine_per_identity": summary(intra[multi]) if multi.any() else None,
            "image_to_centroid_cosine": summary(to_centroid),
        },
        "inter_class": {
            "nearest_identity_cosine": summary(nearest_sim),
            "unique_identities": _unique_identities(earlier_max_cosine(centroids, device=device), unique_threshold),
            "closest_pairs": [
                {"labels": [int(classes.labels[a]), int(classes.labels[b])], "cosine": cosine} for a, b, cosine in closest
            ],
        },
        "seed": seed,
    }
    if multi.any():
        report["intra_class"]["loosest_identities"] = [
            {"label": int(classes.labels[c]), "mean_pair_cosine": float(intra[c])} for c in loosest(intra, REPORTED_EXTREMES)
        ]
    if len(genuine) and len(impostor):
        report["verification"] = verification_stats(genuine, impostor)
    stats = DatasetStats(report, genuine, impostor, intra, nearest_sim, closest, classes=classes)

    if identities is not None:
        target = rowwise_cosines(embeddings, identities, labels)
        stats.target_similarity = target
        per_identity = np.bincount(classes.inverse, weights=target) / classes.counts
        report["target"] = {"image_to_target_cosine": summary(target), "identity_mean_cosine": summary(per_identity)}

    if pose is not None:
        report["pose"] = pose_stats(pose, classes)

    if reference is not None:
        sims, index = nearest(centroids, reference, device=device)
        sims, index = sims[:, 0], index[:, 0]
        if not np.isfinite(sims).all():  # a NaN row is every identity's top match: "0 leaked" otherwise
            raise HyperfaceError(f"reference has NaN/inf values (row {int(index[~np.isfinite(sims)][0])})")
        stats.leakage, stats.leakage_index = sims, index
        above = sims >= leak_threshold
        report["leakage"] = {
            "threshold": leak_threshold,
            "reference_rows": int(len(reference)),
            "identities_at_or_above": int(above.sum()),
            "fraction_at_or_above": float(above.mean()),
            "nearest_reference_cosine": summary(sims),
        }
    report["histograms"] = report_histograms(stats)
    return stats


def report_histograms(stats: DatasetStats) -> dict[str, Any]:
    """The distributions behind the plots, binned (see :data:`HISTOGRAM_BINS`), for ``report --compare``."""
    out: dict[str, Any] = {"range": list(HISTOGRAM_RANGE), "bins": HISTOGRAM_BINS}
    arrays = {"genuine": stats.genuine, "impostor": stats.impostor, "intra_identity": stats.intra_mean,
              "nearest_identity": stats.nearest_identity, "target": stats.target_similarity, "leakage": stats.leakage}
    for name, values in arrays.items():
        if values is not None and np.isfinite(values).any():
            out[name] = cosine_histogram(values)
    return out
