"""Verification sets from any face dataset, in insightface's ``.bin`` format (``hyperface dataset pairs``).

For what LFW cannot tell: accuracy on held-out identities of your own (synthetic) set during training
(``train --identities N`` on the first N, pairs from the rest), or how hard a dataset's identities are
for a pretrained FR model (``evaluate w600k_r50.onnx pairs.bin``).

Laid out like LFW's ``pairs.txt``: ten folds, each with as many genuine as impostor pairs (genuine
first), and the folds identity-disjoint: the identities are dealt to the folds at random, and a
fold's pairs use only its own. insightface's 10-fold protocol (contiguous folds) then splits exactly
there. Genuine pairs are two different images of one identity; impostor pairs one image each of two
identities; no pair repeats. Every draw comes from ``seed``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import atomic_write, escape_line
from hyperface.datasets.codec import decode_image
from hyperface.evaluation.verification import FOLDS


def sample_pairs(labels: np.ndarray, pairs: int, *, seed: int = 0, folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) image indices and (P,) issame for ``pairs`` pairs over the images whose labels are
    given, laid out as the module docstring says. ``pairs`` must be a multiple of ``2 * folds``."""
    if pairs < 2 * folds or pairs % (2 * folds):
        raise HyperfaceError(f"--pairs must be a positive multiple of {2 * folds} ({folds} folds of equal genuine and "
                             f"impostor pairs), got {pairs}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    identities = rng.permutation(np.unique(labels))
    if identities.size < 2 * folds:
        raise HyperfaceError(f"{identities.size} identities are too few for {folds} identity-disjoint folds: "
                             f"need at least {2 * folds}")
    order = np.argsort(labels, kind="stable")
    counts = np.searchsorted(labels[order], identities, side="right") - np.searchsorted(labels[order], identities)
    # identities that can give a genuine pair are dealt first, so every fold gets its share of them
    identities = identities[np.argsort(counts < 2, kind="stable")]
    starts = np.searchsorted(labels[order], identities)
    counts = np.searchsorted(labels[order], identities, side="right") - starts
    per_fold = pairs // (2 * folds)
    index_pairs, issame = [], []
    for fold in range(folds):
        members = np.arange(fold, identities.size, folds)  # positions in `identities` dealt to this fold
        index_pairs += _genuine(rng, order, starts[members], counts[members], per_fold, fold)
        index_pairs += _impostor(rng, order, starts[members], counts[members], per_fold, fold)
        issame += [True] * per_fold + [False] * per_fold
    return np.asarray(index_pairs, dtype=np.int64), np.asarray(issame, dtype=bool)


def _genuine(rng, order, starts, counts, wanted: int, fold: int) -> list[tuple[int, int]]:
    eligible = np.flatnonzero(counts >= 2)
    capacity = int((counts[eligible] * (counts[eligible] - 1) // 2).sum())
    if capacity < wanted:
        raise HyperfaceError(f"fold {fold + 1}: its identities allow {capacity} distinct genuine pairs, {wanted} are "
                             "needed: ask for fewer --pairs, or use a dataset with more images per identity")
    seen: dict[tuple[int, int], None] = {}  # in draw order
    for _ in range(1000 * wanted):
        if len(seen) == wanted:
            break
        who = eligible[rng.integers(eligible.size)]
        a, b = sorted(rng.choice(int(counts[who]), size=2, replace=False))
        seen[(int(order[starts[who] + a]), int(order[starts[who] + b]))] = None
    if len(seen) < wanted:
        raise HyperfaceError(f"fold {fold + 1}: found only {len(seen)} distinct genuine pairs of the {wanted} needed; ask for fewer --pairs")
    return list(seen)


def _impostor(rng, order, starts, counts, wanted: int, fold: int) -> list[tuple[int, int]]:
    total = int(counts.sum())
    capacity = (total * total - int((counts.astype(np.int64) ** 2).sum())) // 2  # image pairs across identities
    if capacity < wanted:
        raise HyperfaceError(f"fold {fold + 1}: its identities allow {capacity} distinct impostor pairs, {wanted} are needed")
    seen: dict[tuple[int, int], None] = {}  # in draw order
    for _ in range(1000 * wanted):  # distinct pairs of distinct identities: plenty unless the fold is tiny
        if len(seen) == wanted:
            break
        first, second = rng.choice(starts.size, size=2, replace=False)
        a = int(order[starts[first] + rng.integers(counts[first])])
        b = int(order[starts[second] + rng.integers(counts[second])])
        seen[(min(a, b), max(a, b))] = None
    if len(seen) < wanted:
        raise HyperfaceError(f"fold {fold + 1}: found only {len(seen)} distinct impostor pairs of the {wanted} needed; ask for fewer --pairs")
    return list(seen)


def pairs_files(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The files a pairs run writes: ``F.bin``, ``F.pairs.tsv`` (one line per pair), ``F.manifest.json``."""
    out = Path(out)
    return out, out.with_name(out.stem + ".pairs.tsv"), out.with_name(out.stem + ".manifest.json")


def write_bin(path: str | os.PathLike, bins: list[bytes], issame: np.ndarray) -> Path:
    """Write ``(bins, issame_list)`` as insightface's verification ``.bin`` pickle (atomically):
    encoded images 2i and 2i+1 form pair i. Plain bytes and bools only, so :func:`read_bin`'s
    allow-list (and insightface's loader) read it."""
    if len(bins) != 2 * len(issame):
        raise HyperfaceError(f"a .bin holds two images per pair: got {len(bins)} images for {len(issame)} pairs")
    with atomic_write(path) as handle:
        pickle.dump(([bytes(b) for b in bins], [bool(v) for v in issame]), handle, protocol=4)
    return Path(path)


def make_verification_bin(
    reader: Any, out: str | os.PathLike, *, pairs: int = 6000, seed: int = 0, first_identity: int = 0,
    identities: int | None = None,
) -> dict[str, Any]:
    """Sample pairs among identities ``first_identity .. first_identity + identities - 1`` of
    ``reader`` (a dataset reader), write them to ``out`` (.bin) and ``<out stem>.pairs.tsv`` (image
    names and same/different, one line per pair); return the facts for a manifest. Every image in
    the pairs decodes: one that does not is left out and the pairs are drawn again without it."""
    labels = np.asarray(reader.labels, dtype=np.int64)
    classes = int(reader.num_classes)
    last = classes if identities is None else first_identity + identities
    if not 0 <= first_identity < classes or last > classes:
        asked = f"identities {first_identity}..{last - 1}" if identities is not None else f"identity {first_identity} onwards"
        raise HyperfaceError(f"{asked} asked for, but the dataset has identities 0..{classes - 1}")
    chosen = np.flatnonzero((labels >= first_identity) & (labels < last))
    unreadable: list[str] = []
    while True:  # a drawn image that does not decode is left out and the pairs drawn again (same seed)
        try:
            index_pairs, issame = sample_pairs(labels[chosen], pairs, seed=seed)
        except HyperfaceError as exc:
            if not unreadable:
                raise
            raise HyperfaceError(f"{exc} ({len(unreadable)} unreadable image(s) were left out, e.g. {unreadable[0]})") from None
        index_pairs = chosen[index_pairs]
        encoded: dict[int, bytes] = {}
        bad = []
        for i in np.unique(index_pairs):
            try:
                data = reader.read_raw(int(i))[0]
                decode_image(data)
                encoded[int(i)] = data
            except HyperfaceError:
                bad.append(int(i))
        if not bad:
            break
        unreadable += [reader.image_name(i) for i in bad]
        chosen = np.setdiff1d(chosen, bad)
    bins = [encoded[int(i)] for i in index_pairs.reshape(-1)]
    out = Path(out)
    write_bin(out, bins, issame)
    listing = pairs_files(out)[1]
    with atomic_write(listing, "w", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write("image_a\timage_b\tsame\n")
        handle.writelines(f"{escape_line(reader.image_name(int(a)))}\t{escape_line(reader.image_name(int(b)))}\t{int(same)}\n"
                          for (a, b), same in zip(index_pairs, issame))
    used = np.unique(labels[index_pairs.reshape(-1)])
    return {"pairs": int(issame.size), "genuine": int(issame.sum()), "identities_used": int(used.size),
            "identity_range": [first_identity, last - 1], "folds": FOLDS, "listing": listing.name,
            "unreadable_left_out": unreadable}


__all__ = ["make_verification_bin", "pairs_files", "sample_pairs", "write_bin"]
