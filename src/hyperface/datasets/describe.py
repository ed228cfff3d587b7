"""What a face dataset holds, at a glance (``hyperface dataset info``): size, identities, images per
identity, image sizes and encodings, and optionally a full check of every image.

The summary reads only the index and a sample of images (seconds on millions); ``check=True`` reads
and decodes every image, in worker threads, and finds images stored twice: the same bytes under two
identities is label noise a trainer cannot see, under one identity a wasted sample.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import check_output_file, escape_line, read_json
from hyperface.common.runtime import get_logger, ordered_parallel_map, progress
from hyperface.datasets import check_outside_datasets, open_dataset, resolve_generated
from hyperface.datasets.codec import decode_image, image_encoding
from hyperface.datasets.image_folder import ImageFolderDataset
from hyperface.datasets.preview import contact_sheet, save_contact_sheet, spread_rows

log = get_logger("hyperface.datasets")

#: Images decoded for the summary's sizes and encodings, spread over the dataset.
SAMPLE_IMAGES = 64
#: Unreadable images and duplicate groups listed by name in a check (all are counted).
EXAMPLES = 10


def _counts_summary(counts: np.ndarray) -> dict[str, float]:
    with_images = counts[counts > 0]
    return {
        "min": int(with_images.min()),
        "median": float(np.median(with_images)),
        "mean": round(float(with_images.mean()), 3),
        "max": int(with_images.max()),
    }


def describe_dataset(
    path: str | os.PathLike,
    *,
    check: bool = False,
    workers: int = 4,
    show_progress: bool | None = None,
    preview: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Facts about the dataset at ``path`` (anything :func:`~hyperface.datasets.open_dataset` reads),
    as plain data; ``check`` reads and decodes every image (see the module docstring); ``preview``
    also saves a contact sheet there (:func:`save_dataset_preview`), from the same reader."""
    if preview is not None:  # before a --check that may read millions of images
        check_preview_path(preview, path)
    resolved = resolve_generated(Path(path))
    reader = open_dataset(resolved)
    labels = np.asarray(reader.labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=int(reader.num_classes))
    facts: dict[str, Any] = {
        "path": str(Path(path)),
        "format": "folder" if isinstance(reader, ImageFolderDataset) else "recordio",
        "images": int(labels.size),
        "identities": int(reader.num_classes),
        "identities_with_images": int(np.count_nonzero(counts)),
        "images_per_identity": _counts_summary(counts),
        "fingerprint": reader.fingerprint(),
    }
    if resolved != Path(path):  # a generate or convert output folder: what made it, from its manifest
        facts["dataset"] = str(resolved)
        try:
            made = read_json(Path(path) / "manifest.json")
            facts["made_by"] = {key: made.get(key) for key in ("stage", "command", "finished")}
            if made.get("merged_by"):  # a sharded generate's `--merge` (command: what rendered it)
                facts["made_by"]["merged_by"] = made["merged_by"]
        except (OSError, HyperfaceError):  # still running, or damaged: the dataset itself is what counts
            pass
    if isinstance(reader, ImageFolderDataset):
        facts["classes"] = {"first": reader.classes[0], "last": reader.classes[-1]}
    else:
        facts["layout"] = reader.layout
        facts["bytes"] = reader.rec_path.stat().st_size
        if reader.image_size is not None:
            facts["property_image_size"] = list(reader.image_size)
    sizes, encodings = Counter(), Counter()
    for index in np.unique(np.linspace(0, labels.size - 1, min(SAMPLE_IMAGES, labels.size)).round().astype(np.int64)):
        try:
            data, _ = reader.read_raw(int(index))
        except HyperfaceError:  # a damaged record: --check names it
            sizes["unreadable"] += 1
            encodings["unreadable"] += 1
            continue
        encodings[(image_encoding(data) or "unknown").lower()] += 1
        try:
            height, width = decode_image(data).shape[:2]
            sizes[f"{width}x{height}"] += 1
        except HyperfaceError:
            sizes["unreadable"] += 1
    facts["sample"] = {"images": sum(encodings.values()), "sizes": dict(sizes.most_common()), "encodings": dict(encodings.most_common())}
    if check:
        facts["check"] = _check_every_image(reader, workers=workers, show_progress=show_progress)
    if preview is not None:
        facts["preview"] = str(save_dataset_preview(preview, reader))
    return facts


def _check_every_image(reader: Any, *, workers: int, show_progress: bool | None) -> dict[str, Any]:
    lock = threading.Lock()  # readers share one file handle: read one at a time, decode in parallel

    def check_one(index: int) -> tuple[int, bytes | None, str | None]:
        try:
            with lock:
                data, _ = reader.read_raw(index)
            decode_image(data, strict=True)
        except HyperfaceError as exc:
            return index, None, str(exc)
        return index, hashlib.blake2b(data, digest_size=16).digest(), None

    count = len(reader)
    labels = np.asarray(reader.labels, dtype=np.int64)
    digests = np.zeros((count, 2), dtype=np.uint64)  # 16 bytes an image: 670 MB for 42M images, no dict
    readable = np.ones(count, dtype=bool)
    unreadable: list[dict[str, Any]] = []
    bar = progress(total=count, desc="check", unit="img", disable=None if show_progress is None else not show_progress)
    try:
        for index, digest, problem in ordered_parallel_map(check_one, range(count), workers, window=8 * workers):
            bar.update(1)
            if digest is None:
                readable[index] = False
                if len(unreadable) < EXAMPLES:
                    unreadable.append({"image": reader.image_name(index), "label": int(labels[index]), "reason": problem})
            else:
                digests[index] = np.frombuffer(digest, dtype=np.uint64)
    finally:
        bar.close()
    # equal digests sit next to each other once sorted; a run of them is one group of the same bytes
    rows = np.flatnonzero(readable)
    rows = rows[np.lexsort((rows, digests[rows, 1], digests[rows, 0]))]  # ties in index order
    same = (digests[rows[1:]] == digests[rows[:-1]]).all(axis=1) if rows.size > 1 else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, ~same])
    sizes = np.diff(np.r_[starts, rows.size])
    groups = starts[sizes > 1]
    group_sizes = sizes[sizes > 1]
    if groups.size:
        ordered_labels = labels[rows]
        lowest = np.minimum.reduceat(ordered_labels, starts)[sizes > 1]
        highest = np.maximum.reduceat(ordered_labels, starts)[sizes > 1]
        across = lowest != highest
    else:
        across = np.zeros(0, dtype=bool)
    shown = np.r_[np.flatnonzero(across), np.flatnonzero(~across)][:EXAMPLES]  # label noise first
    return {
        "unreadable": int(count - readable.sum()),
        "unreadable_examples": unreadable,
        "duplicate_images": int((group_sizes - 1).sum()),
        "duplicate_groups_across_identities": int(across.sum()),
        "duplicate_examples": [
            [{"image": reader.image_name(int(i)), "label": int(labels[i])} for i in rows[groups[g] : groups[g] + group_sizes[g]]]
            for g in shown
        ],
    }


def format_description(facts: dict[str, Any]) -> str:
    """The facts as the lines ``hyperface dataset info`` prints."""
    per = facts["images_per_identity"]
    lines = [
        f"{facts['path']}: {facts['format']}" + (f" ({facts['layout']} layout)" if facts.get("layout") else "")
        + (f", reading {facts['dataset']}" if facts.get("dataset") else ""),
        f"  images      {facts['images']:,}",
        f"  identities  {facts['identities']:,}" + (
            f" ({facts['identities'] - facts['identities_with_images']:,} without images)"
            if facts["identities_with_images"] != facts["identities"] else ""),
        f"  per identity  min {per['min']}, median {per['median']:g}, mean {per['mean']:g}, max {per['max']}",
    ]
    sample = facts["sample"]
    lines.append(f"  image sizes   {', '.join(f'{k} ({v})' for k, v in sample['sizes'].items())}   [a sample of {sample['images']}]")
    lines.append(f"  encodings     {', '.join(f'{k} ({v})' for k, v in sample['encodings'].items())}")
    if "bytes" in facts:
        size = facts["bytes"]
        lines.append(f"  size on disk  {size / 1e9:.2f} GB" if size >= 1e9 else f"  size on disk  {size / 1e6:.1f} MB")
    made = facts.get("made_by")
    if made:
        when = str(made.get("finished") or "")[:16].replace("T", " ")
        lines.append(f"  made by       hyperface {made.get('stage')}{f' ({when} UTC)' if when else ''}: {made.get('command')}")
        if made.get("merged_by"):  # a sharded generate: the shards rendered it, this command merged them
            lines.append(f"  merged by     {made['merged_by']}")
    if "classes" in facts:
        lines.append(f"  class folders {escape_line(facts['classes']['first'])} .. {escape_line(facts['classes']['last'])}")
    check = facts.get("check")
    if check is not None:
        lines.append(f"  check         {check['unreadable']:,} unreadable, {check['duplicate_images']:,} duplicate image(s), "
                     f"{check['duplicate_groups_across_identities']:,} group(s) shared across identities")
        # names as rejected.tsv writes them: a tab or newline in a file name does not break the lines
        lines += [f"    unreadable: {escape_line(e['image'])} (label {e['label']}): {e['reason']}" for e in check["unreadable_examples"]]
        lines += ["    same bytes: " + ", ".join(f"{escape_line(m['image'])} (label {m['label']})" for m in group)
                  for group in check["duplicate_examples"]]
    return "\n".join(lines)


def check_preview_path(path: str | os.PathLike, dataset: str | os.PathLike) -> None:
    """A contact sheet's path: a writable .jpg outside the dataset."""
    path = Path(path)
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        raise HyperfaceError(f"--preview {path}: the contact sheet is a JPEG; give a .jpg path")
    check_output_file(path, "--preview")
    check_outside_datasets(path, [dataset], "--preview")


def save_dataset_preview(path: str | os.PathLike, dataset: Any, *, rows: int = 8, columns: int = 8) -> Path:
    """A contact sheet (JPEG) of ``rows`` identities spread over the dataset, ``columns`` images each.
    ``dataset``: a path, or a reader already open (:func:`~hyperface.datasets.open_dataset`)."""
    if isinstance(dataset, (str, os.PathLike)):
        check_preview_path(path, dataset)
        reader = open_dataset(dataset)
    else:
        reader = dataset
    labels = np.asarray(reader.labels)
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(int(reader.num_classes) + 1))
    sheet_rows = []
    for label in spread_rows(int(reader.num_classes), rows):
        images = []
        for index in order[starts[label] : starts[label + 1]][:columns]:
            try:
                images.append(reader[int(index)][0])
            except HyperfaceError:
                images.append(None)  # a dark tile: the check names it
        sheet_rows.append((f"id {label}\n{starts[label + 1] - starts[label]} img", images))
    save_contact_sheet(path, contact_sheet(sheet_rows, columns=columns))
    return Path(path)


__all__ = ["check_preview_path", "describe_dataset", "format_description", "save_dataset_preview"]
