"""A smaller dataset inside a larger one, for the ablations HyperFace-style papers run (fewer
identities, fewer images per identity) without rendering or copying anything again.

Image j of identity i in a ``hyperface generate`` set depends only on ``(seed, i, j)`` (the quality
filter accepts renders in index order too), so the first K images of each identity are what
``generate -k K`` renders for it. The identities themselves were packed among all N of the full
set: the first N' of them are not what ``pack --identities N'`` would choose (that spreads wider).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.runtime import get_logger

log = get_logger("hyperface.datasets")


class DatasetSubset:
    """Identities ``0 .. identities-1`` of ``reader`` (all when None), each with its first
    ``per_identity`` images in the reader's order (all when None). Same interface as the readers:
    ``labels``, ``num_classes``, ``fingerprint()``, ``len()`` and ``[i]``."""

    def __init__(self, reader: Any, *, identities: int | None = None, per_identity: int | None = None, warn: bool = True):
        labels = np.asarray(reader.labels, dtype=np.int64)
        classes = int(reader.num_classes)
        for name, value in (("identities", identities), ("images per identity", per_identity)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise HyperfaceError(f"{name} must be a positive integer, got {value!r}")
        if identities is not None and identities > classes:
            raise HyperfaceError(f"the dataset has {classes} identities, fewer than the {identities} asked for")
        keep = labels < identities if identities is not None else np.ones(labels.size, dtype=bool)
        if per_identity is not None:
            order = np.argsort(labels, kind="stable")  # index order within each identity
            sorted_labels = labels[order]
            starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
            rank = np.arange(labels.size) - np.repeat(starts, np.diff(np.r_[starts, labels.size]))
            within = np.empty(labels.size, dtype=bool)
            within[order] = rank < per_identity
            keep &= within
        self.reader = reader
        self.indices = np.flatnonzero(keep)
        self.labels = labels[self.indices]
        self.num_classes = identities if identities is not None else classes
        self.identities, self.per_identity = identities, per_identity
        if per_identity is not None:
            counts = np.bincount(self.labels, minlength=self.num_classes)
            short, empty = int(np.count_nonzero(counts < per_identity)), int(np.count_nonzero(counts == 0))
            if short and warn:
                log.warning("%d of %d identities have fewer than %d images%s; they keep what they have",
                            short, self.num_classes, per_identity, f" ({empty} have none)" if empty else "")

    def fingerprint(self) -> str:
        """The whole dataset's fingerprint and the subset's bounds: another subset is other data."""
        text = f"{self.reader.fingerprint()}\0subset {self.identities} {self.per_identity}"
        return hashlib.sha256(text.encode()).hexdigest()

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.reader[int(self.indices[index])]

    def image_name(self, index: int) -> str:
        return self.reader.image_name(int(self.indices[index]))

    def class_names(self) -> list[str]:
        return self.reader.class_names()[: self.num_classes]

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """The encoded image and its label, as the reader stores them."""
        return self.reader.read_raw(int(self.indices[index]))

    def describe(self) -> dict[str, Any]:
        return {"identities": self.num_classes, "images": len(self), "per_identity": self.per_identity,
                "of": {"identities": int(self.reader.num_classes), "images": len(self.reader)}}


__all__ = ["DatasetSubset"]
