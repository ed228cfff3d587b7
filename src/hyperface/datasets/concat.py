"""Several datasets read as one, their identities side by side: the first dataset's labels, then the
second's shifted past them, and so on. For mixing sets (HyperFace with DCFace, synthetic with real)
into one training set with ``hyperface dataset convert A B --out AB``; nothing is copied until then.

Identities are never merged across datasets: the same person in two of them becomes two classes, as
it would in any concatenation of label spaces (``hyperface report`` can find such pairs).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError


class ConcatDataset:
    """``readers`` one after another; ``tags`` name them in image and class names (``tag/name``;
    :func:`~hyperface.common.text.unique_labels` tells equal folder names apart).
    Same interface as the readers: ``labels``, ``num_classes``, ``fingerprint()``, ``len()``,
    ``[i]``, ``read_raw(i)``, ``image_name(i)``, ``class_names()``."""

    def __init__(self, readers: list[Any], tags: list[str]) -> None:
        if not readers or len(readers) != len(tags):
            raise HyperfaceError("concatenation needs one tag per dataset, and at least one dataset")
        self.readers, self.tags = list(readers), list(tags)
        self.class_offsets = np.cumsum([0] + [int(r.num_classes) for r in readers])
        self.image_offsets = np.cumsum([0] + [len(r) for r in readers])
        self.labels = np.concatenate(
            [np.asarray(r.labels, dtype=np.int64) + offset for r, offset in zip(readers, self.class_offsets)]
        )
        self.num_classes = int(self.class_offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        part = int(np.searchsorted(self.image_offsets, index, side="right")) - 1
        return part, int(index - self.image_offsets[part])

    def fingerprint(self) -> str:
        """Each dataset's fingerprint, in order: another order is another dataset."""
        text = "\0".join(["concat", *(r.fingerprint() for r in self.readers)])
        return hashlib.sha256(text.encode()).hexdigest()

    def __len__(self) -> int:
        return int(self.image_offsets[-1])

    def read_raw(self, index: int) -> tuple[bytes, int]:
        part, local = self._locate(index)
        data, label = self.readers[part].read_raw(local)
        return data, int(label + self.class_offsets[part])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        part, local = self._locate(index)
        image, label = self.readers[part][local]
        return image, int(label + self.class_offsets[part])

    def image_name(self, index: int) -> str:
        part, local = self._locate(index)
        return f"{self.tags[part]}/{self.readers[part].image_name(local)}"

    def class_names(self) -> list[str]:
        return [f"{tag}/{name}" for reader, tag in zip(self.readers, self.tags) for name in reader.class_names()]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"tag": tag, "images": len(reader), "identities": int(reader.num_classes), "first_label": int(offset)}
            for reader, tag, offset in zip(self.readers, self.tags, self.class_offsets)
        ]


def open_datasets(paths: str | os.PathLike | Sequence[str | os.PathLike], *, warn: bool = True) -> Any:
    """One dataset (:func:`~hyperface.datasets.open_dataset`), or several read as one
    :class:`ConcatDataset`, tagged by their folder or file names. ``warn=False`` on all but one
    process of a distributed run, so a warning is printed once."""
    from hyperface.common.text import unique_labels
    from hyperface.datasets import open_dataset

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise HyperfaceError("no dataset given")
    if len(paths) == 1:
        return open_dataset(paths[0])
    readers = [open_dataset(p) for p in paths]
    # the files actually read: a generate folder and its rec/train.rec are one dataset
    files = [str(Path(getattr(r, "rec_path", None) or r.root).resolve()) for r in readers]
    twice = sorted({path for path, given in zip(paths, files) if files.count(given) > 1}, key=str)
    if twice and warn:  # allowed (an oversampling experiment?) but rarely meant
        from hyperface.common.runtime import get_logger

        get_logger("hyperface.datasets").warning(
            "%s: the same dataset more than once: its identities appear again under new labels", ", ".join(map(str, twice)))
    return ConcatDataset(readers, unique_labels([Path(p).resolve().name for p in paths]))


def concat_parts(reader: Any) -> list[dict[str, Any]] | None:
    """Where each dataset's labels start in ``reader`` (a ConcatDataset, perhaps inside a subset)."""
    base = getattr(reader, "reader", reader)  # DatasetSubset keeps the reader it cuts
    return base.describe() if isinstance(base, ConcatDataset) else None


__all__ = ["ConcatDataset", "concat_parts", "open_datasets"]
