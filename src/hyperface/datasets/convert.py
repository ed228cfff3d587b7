"""Convert a face dataset between insightface RecordIO and image folders (``hyperface dataset convert``).

What it is for: an image-folder set (DCFace, Vec2Face and most research releases) turned into the
``train.rec`` insightface's trainers read, a ``.rec`` unpacked into folders to look at or to edit, a
subset (first N identities, first K images each) cut out as its own dataset, labels that skip
numbers made consecutive (``relabel``), or several sets mixed into one (their identities one after
another), without loading any of them into memory.

Output folder, laid out like ``hyperface generate``'s (so ``train``, ``embed`` and ``report`` take
the folder itself)::

    OUT/rec/train.rec, train.idx, property     --format rec (or both)
    OUT/images/<label:06d>/<index:04d>.jpg      --format folder (or both); built as images.tmp
    OUT/classes.tsv                             label, source class (folder name or source label), images
    OUT/manifest.json                           parameters, source checksum, counts (written last)
    OUT/run.json                                what is being converted (checked on resume)

Encoded JPEG/PNG bytes are copied as they are (``image_format="keep"``: lossless; decoded only to
check them, which ``verify=False`` skips); other formats, or an explicit ``jpg``/``png``, are decoded
and encoded again in worker threads, once for both outputs. Unreadable images are left out and
listed in ``OUT/rejected.tsv``.
Images are written identity by identity in label order. A kill loses at most the image being
written: ``resume=True`` keeps every finished image (the RecordIO writer's own recovery, and the
image files present) and continues after it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import (
    atomic_write, escape_line, prepare_output_dir, read_json, read_lines, releases_output_locks, remove_stale_temporaries, save_json,
)
from hyperface.common.manifest import Manifest, describe_changes
from hyperface.common.runtime import get_logger, ordered_parallel_map, progress
from hyperface.datasets import check_outside_datasets
from hyperface.datasets.codec import decode_image, encode_image, image_encoding
from hyperface.datasets.concat import concat_parts, open_datasets
from hyperface.datasets.image_folder import ImageFolderWriter
from hyperface.datasets.recordio import RecordIOWriter, check_recordio_capacity, finish_interrupted_close
from hyperface.datasets.subset import DatasetSubset

log = get_logger("hyperface.datasets")

FORMATS = ("rec", "folder", "both")
IMAGE_FORMATS = ("keep", "jpg", "png")
RUN_FILE = "run.json"
CLASSES_FILE = "classes.tsv"
REJECTED_FILE = "rejected.tsv"


@dataclass(frozen=True)
class ConvertConfig:
    """What to write: ``formats`` rec / folder / both; ``image_format`` keep (copy JPEG/PNG bytes) or
    jpg / png (encode again, JPEG at ``quality``); ``relabel`` maps the labels that have images to
    0..K-1 in order; ``identities`` / ``images_per_identity`` cut a subset first (see
    :class:`~hyperface.datasets.subset.DatasetSubset`)."""

    formats: str = "rec"
    image_format: str = "keep"
    quality: int = 95
    relabel: bool = False
    identities: int | None = None
    images_per_identity: int | None = None
    workers: int = 4
    verify: bool = True  # decode every image, also those copied as bytes, and leave out what fails

    def checked(self) -> "ConvertConfig":
        if self.formats not in FORMATS:
            raise HyperfaceError(f"unknown format {self.formats!r}: use {', '.join(FORMATS)}")
        if self.image_format not in IMAGE_FORMATS:
            raise HyperfaceError(f"unknown image format {self.image_format!r}: use {', '.join(IMAGE_FORMATS)}")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise HyperfaceError(f"JPEG quality must be an integer in 1..100, got {self.quality!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise HyperfaceError(f"workers must be at least 1, got {self.workers!r}")
        return self


@dataclass
class ConvertResult:
    out: Path
    images: int  # in the new dataset
    identities: int  # its num_classes
    written: int  # by this call (the rest were there from an interrupted run)
    copied: int  # of those, encoded bytes copied as they were
    rejected: int  # unreadable source images left out (rejected.tsv)
    seconds: float
    complete_before: bool = False  # the folder held the finished conversion already


def _read_rejected(path: Path) -> set[int]:
    """Source images an interrupted run left out (the first field of each rejected.tsv line). A line
    torn by a kill is cut off first, so the lines appended after it stay whole."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
    return {int(line.split("\t", 1)[0]) for line in read_lines(path) if line.split("\t", 1)[0].isdigit()}


def _check_run(out: Path, run: dict[str, Any], *, resume: bool) -> None:
    path = out / RUN_FILE
    if resume and path.exists():
        saved = read_json(path)
        if saved.get("source_fingerprint") != run["source_fingerprint"]:
            raise HyperfaceError(f"cannot --resume {out}: its source has changed since (other images or labels); "
                                 "convert the original, or start again with --overwrite")
        changes = describe_changes(saved, run)
        if changes:
            raise HyperfaceError(f"cannot --resume {out}: it converts with other settings ({changes}); use the same ones or --overwrite")
    save_json(path, run)


def _finished_counts(out: Path) -> dict[str, int]:
    """The counts a finished conversion's manifest holds."""
    facts = read_json(out / "manifest.json").get("counts")
    try:
        return {key: int(facts[key]) for key in ("images", "identities", "rejected")}
    except (TypeError, KeyError, ValueError):
        raise HyperfaceError(f"{out / 'manifest.json'} is damaged (no image counts); delete it and run again with --resume") from None


@releases_output_locks
def convert_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: ConvertConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool | None = None,
) -> ConvertResult:
    """Write ``source`` (any dataset :func:`~hyperface.datasets.open_dataset` reads, or several, one
    after another: :class:`~hyperface.datasets.concat.ConcatDataset`) to ``out`` in the formats of
    ``config``; see the module docstring for the layout. Returns what was written."""
    config = (config or ConvertConfig()).checked()
    started = time.perf_counter()
    sources = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
    check_outside_datasets(out, sources, folder=True)
    reader: Any = open_datasets(sources)
    if config.identities is not None or config.images_per_identity is not None:
        reader = DatasetSubset(reader, identities=config.identities, per_identity=config.images_per_identity)
    labels = np.asarray(reader.labels, dtype=np.int64)
    names = reader.class_names()
    present = np.unique(labels)
    if config.relabel:
        new_label = np.searchsorted(present, labels)
        num_classes = int(present.size)
        source_of = [names[int(label)] for label in present]
    else:
        new_label, num_classes, source_of = labels, int(reader.num_classes), names
    if config.formats in ("rec", "both"):
        check_recordio_capacity(labels.size, num_classes)  # before anything is written
    if num_classes > present.size:  # kept as empty classes (empty folders, empty identity records)
        log.warning("%d of %d labels have no image: pass --relabel to number the %d that do 0..%d",
                    num_classes - present.size, num_classes, present.size, present.size - 1)

    out = prepare_output_dir(out, overwrite=overwrite, resume=resume, stage="convert", setup_files=(RUN_FILE,))
    remove_stale_temporaries(out)
    fingerprint = reader.fingerprint()
    params = {k: v for k, v in dataclasses.asdict(config).items() if k != "workers"}
    _check_run(out, {"source_fingerprint": fingerprint, **params}, resume=resume)
    if (out / "manifest.json").exists():
        counts = _finished_counts(out)
        log.info("%s is already complete; nothing to resume", out)
        return ConvertResult(out, counts["images"], counts["identities"], 0, 0, counts["rejected"], 0.0, complete_before=True)

    # identity by identity, in label order; within one, the source's order (stable sort)
    order = np.argsort(new_label, kind="stable")
    ordered_labels = new_label[order]
    # rejected.tsv names images by their index in the source (a subset's positions are not that)
    source_indices = reader.indices[order] if isinstance(reader, DatasetSubset) else order

    # A format finished in an earlier attempt (train.rec and .idx in place, images/ renamed) is kept.
    encode_as = config.image_format if config.image_format != "keep" else "jpg"  # for images not JPEG/PNG
    rec = folder = None
    finish_interrupted_close(out / "rec" / "train.rec")
    if config.formats in ("rec", "both") and not ((out / "rec" / "train.rec").exists() and (out / "rec" / "train.idx").exists()):
        rec = RecordIOWriter(out / "rec", resume=True, image_format=encode_as, quality=config.quality)
    if config.formats in ("folder", "both") and not (out / "images").is_dir():
        most = int(np.bincount(new_label).max())  # file names of one width sort in index order
        folder = ImageFolderWriter(out / "images.tmp", image_format=encode_as, quality=config.quality,
                                   digits=max(6, len(str(num_classes - 1))), index_digits=max(4, len(str(most - 1))))
    def held(label: int) -> tuple[int, int]:
        """Images of ``label`` the rec and the folder hold from an interrupted run (each writes in
        order: a prefix). Asked before this run writes any image of the label."""
        return (rec.images_of(label) if rec is not None else 1 << 62,
                len(folder.existing(label)) if folder is not None else 1 << 62)

    # Unreadable images are left out and listed in rejected.tsv as they are found (before anything
    # after them is written), so a resumed run knows which source images its written ones were.
    rejected_path = out / REJECTED_FILE
    rejected = _read_rejected(rejected_path)  # source indices
    bar = progress(total=int(order.size), desc="convert", unit="img", disable=None if show_progress is None else not show_progress)

    def todo() -> Iterator[int]:
        """Write positions k of the images not yet written; the rest only move the bar."""
        label, slot, done = -1, 0, 0  # one label at a time: no per-identity tables at millions of them
        for k in range(order.size):
            if int(source_indices[k]) in rejected:
                bar.update(1)
                continue
            if ordered_labels[k] != label:
                label, slot = int(ordered_labels[k]), 0
                done = min(held(label))
            if slot < done:
                bar.update(1)
            else:
                yield k
            slot += 1

    lock = threading.Lock()  # read_raw shares one file handle: reads one at a time, the rest in parallel

    def load(k: int) -> tuple[int, bytes | None, bool, str, tuple[int, ...] | None]:
        """(k, the bytes both writers store, whether they are the source's own, why not readable,
        the decoded size when the image was decoded)."""
        with lock:
            try:
                data, _ = reader.read_raw(int(order[k]))
            except HyperfaceError as exc:
                return k, None, False, str(exc), None
        copy = config.image_format == "keep" and image_encoding(data) in ("JPEG", "PNG")
        try:
            image = decode_image(data, what="image", strict=config.verify) if config.verify or not copy else None
        except HyperfaceError as exc:
            return k, None, False, str(exc), None
        size = image.shape[:2] if image is not None else None
        if copy:
            return k, data, True, "", size
        return k, encode_image(image, image_format=encode_as, quality=config.quality), False, "", size  # once, here

    written = copied = 0
    sizes: set[tuple[int, ...]] = set()  # a few decoded image sizes: trainers batch one size only
    label, slot, rec_had, folder_had = -1, 0, 0, 0
    rejected_log = None  # rejected.tsv is created with the first reject
    try:
        for k, data, raw, problem, size in ordered_parallel_map(load, todo(), config.workers, window=8 * config.workers):
            bar.update(1)
            if size is not None and len(sizes) < 8:
                sizes.add(size)
            if data is None:
                if rejected_log is None:
                    rejected_log = open(rejected_path, "a", encoding="utf-8", errors="surrogateescape")
                    if rejected_log.tell() == 0:
                        rejected_log.write("source_index\timage\treason\n")
                index = int(source_indices[k])
                rejected_log.write(f"{index}\t{escape_line(reader.image_name(int(order[k])))}\t{escape_line(problem)}\n")
                rejected_log.flush()
                rejected.add(index)
                continue
            if ordered_labels[k] != label:
                label = int(ordered_labels[k])
                rec_had, folder_had = held(label)
                slot = min(rec_had, folder_had)
            if rec is not None and slot >= rec_had:
                rec.add(data, label)
            if folder is not None and slot >= folder_had:
                folder.add(data, label, index=slot)
            slot += 1
            written += 1
            copied += raw
    except BaseException:
        if rec is not None:
            rec.suspend()  # its .tmp files stay for --resume
        raise
    finally:
        bar.close()
        if rejected_log is not None:
            rejected_log.close()
    kept = ~np.isin(source_indices, np.fromiter(rejected, dtype=np.int64, count=len(rejected)))
    kept_labels = ordered_labels[kept]
    if not kept_labels.size:
        raise HyperfaceError(f"no image of {', '.join(map(str, sources))} could be read ({len(rejected)} tried; {rejected_path} says why)")
    if rejected:
        log.warning("%d unreadable image(s) left out; %s lists them", len(rejected), rejected_path)
    if len(sizes) > 1:  # RecordIO's property names one size, and trainers batch images of one size
        log.warning("the images come in %s sizes (%s): resize them to one (e.g. 112x112) before training",
                    "8 or more" if len(sizes) >= 8 else len(sizes), ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:4]))
    emptied = np.setdiff1d(np.unique(ordered_labels), kept_labels)
    if emptied.size:
        log.warning("%d identit%s lost every image (unreadable), kept as empty classes: %s", emptied.size,
                    "y" if emptied.size == 1 else "ies", ", ".join(escape_line(source_of[int(label)]) for label in emptied[:5])
                    + (f" and {emptied.size - 5} more" if emptied.size > 5 else ""))
    if rec is not None:
        rec.close(num_classes=num_classes)  # identity records and property for every class, empty ones too
    if folder is not None:
        for label in np.setdiff1d(np.arange(num_classes), kept_labels):  # empty folders keep the labels aligned
            folder.folder(int(label)).mkdir(parents=True, exist_ok=True)
        os.replace(out / "images.tmp", out / "images")

    with atomic_write(out / CLASSES_FILE, "w", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write("label\tsource\timages\n")
        counts = np.bincount(kept_labels, minlength=num_classes)
        handle.writelines(f"{label}\t{escape_line(source_of[label])}\t{int(counts[label])}\n" for label in range(num_classes))
    seconds = time.perf_counter() - started
    manifest = Manifest(stage="convert", params=params, inputs={})
    manifest.extra.update({
        "source": {"paths": [str(s.resolve()) for s in sources], "fingerprint": fingerprint,
                   **({"subset": reader.describe()} if isinstance(reader, DatasetSubset) else {}),
                   **({"parts": parts} if (parts := concat_parts(reader)) else {})},
        "counts": {"images": int(kept_labels.size), "identities": num_classes, "rejected": len(rejected),
                   "written": written, "copied": copied},
        "outputs": [name for name, wanted in (("rec", "rec"), ("images", "folder")) if config.formats in (wanted, "both")]
                   + [CLASSES_FILE] + ([REJECTED_FILE] if rejected else []),
    })
    manifest.time("convert", seconds)
    manifest.write(out)
    return ConvertResult(out, int(kept_labels.size), num_classes, written, copied, len(rejected), seconds)


__all__ = ["ConvertConfig", "ConvertResult", "convert_dataset"]
