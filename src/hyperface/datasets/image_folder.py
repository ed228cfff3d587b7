"""Image-folder datasets: one sub-folder per identity (``000123/0007.jpg``), sorted names -> labels."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.runtime import get_logger
from hyperface.datasets.codec import IMAGE_EXTENSIONS, check_rgb_uint8, decode_image, encode_image, image_encoding


def _extension_of(data: bytes) -> str:
    extension = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp"}.get(image_encoding(data) or "")
    if extension is None:
        raise HyperfaceError("encoded image bytes are neither JPEG, PNG nor BMP")
    return extension


class ImageFolderWriter:
    """Write ``out_dir/<label:06d>/<index:04d>.jpg`` files, each atomically (temp file + rename).

    A kill leaves only complete images (hidden ``.*.tmp`` leftovers are ignored by the reader).
    Pass ``index`` to make names deterministic (then rerunning after a kill rewrites the same
    files instead of duplicating them); without it, each label continues after its highest existing
    index. Files are not fsynced one by one: a rename is atomic against a killed process, which is
    the failure this guards against, and per-file fsync would dominate at millions of images.
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, image_format: str = "jpg", quality: int = 95, digits: int = 6, index_digits: int = 4
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.image_format = image_format.lower().lstrip(".").replace("jpeg", "jpg")
        if self.image_format not in ("jpg", "png"):
            raise HyperfaceError(f"unsupported image format {image_format!r}: use jpg or png")
        self.quality = quality
        self.digits = digits
        self.index_digits = index_digits  # file names sort in index order only while they have equal widths
        self._next_index: dict[int, int] = {}

    def folder(self, label: int) -> Path:
        return self.out_dir / f"{int(label):0{self.digits}d}"

    def existing(self, label: int) -> list[Path]:
        """Complete image files already written for ``label`` (for resuming)."""
        folder = self.folder(label)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))

    def add(self, image: np.ndarray | bytes, label: int, index: int | None = None) -> Path:
        """Write one image (RGB uint8 HWC array or encoded bytes) for ``label``; returns its path."""
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or int(label) < 0:
            raise HyperfaceError(f"labels must be non-negative integers, got {label!r}")
        label = int(label)
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            extension = _extension_of(data)
        else:
            data = encode_image(check_rgb_uint8(image), image_format=self.image_format, quality=self.quality)
            extension = self.image_format
        if index is None:
            if label not in self._next_index:
                stems = [int(p.stem) for p in self.existing(label) if p.stem.isdigit()]
                self._next_index[label] = max(stems, default=-1) + 1
            index = self._next_index[label]
        self._next_index[label] = max(self._next_index.get(label, 0), int(index) + 1)
        folder = self.folder(label)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{int(index):0{self.index_digits}d}.{extension}"
        # One name per image (one writer per folder): a rerun after a kill reuses it, so no
        # temporaries pile up, and none is carried along when a staging folder is renamed.
        tmp = folder / f".{path.name}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def close(self) -> None:
        """Nothing to finalise (every image is already complete); kept for symmetry with RecordIOWriter."""

    def __enter__(self) -> "ImageFolderWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageFolderDataset:
    """``root/<class>/<image>`` -> ``dataset[i] = (RGB uint8 HWC image, label)``.

    Class folders sorted by name get labels 0..C-1 (zero-padded names keep numeric order; empty class
    folders keep their label so labels stay aligned with identity numbers). Hidden files and
    non-image files are ignored. Picklable: it holds only paths.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise HyperfaceError(f"image folder dataset not found: {self.root}")
        with os.scandir(self.root) as entries:
            self.classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise HyperfaceError(f"{self.root} has no class sub-folders: expected one folder per identity (e.g. 000000/0000.jpg)")
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            with os.scandir(self.root / name) as entries:
                files = sorted(
                    e.name
                    for e in entries
                    if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                )
            paths.extend(f"{name}/{f}" for f in files)
            labels.extend([label] * len(files))
        if not paths:
            raise HyperfaceError(f"{self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        empty = len(self.classes) - len(set(labels))
        if empty:  # kept (labels stay identity numbers) but worth knowing: they are classes without data
            get_logger("hyperface.datasets").warning(
                "%s: %d of %d class folders hold no images; they keep their labels", self.root, empty, len(self.classes)
            )
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the labels and the image file names (not their bytes: reading or stat-ing
        millions of files at every start would cost minutes)."""
        digest = hashlib.sha256(b"image-folder\0")
        digest.update(self.labels.astype("<i8").tobytes())
        digest.update("\n".join(self.paths).encode("utf-8", "surrogateescape"))  # names that are not UTF-8, too
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.paths)

    def image_name(self, index: int) -> str:
        """Image ``index``'s path in the folder (``class/file``)."""
        return self.paths[index]

    def class_names(self) -> list[str]:
        """The folder name of each label."""
        return list(self.classes)

    def read_raw(self, index: int) -> tuple[bytes, int]:
        path = self.root / self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise HyperfaceError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return data, int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        data, label = self.read_raw(index)
        return decode_image(data, what=str(self.root / self.paths[index])), label

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, images={len(self)}, classes={self.num_classes})"


__all__ = ["ImageFolderDataset", "ImageFolderWriter"]
