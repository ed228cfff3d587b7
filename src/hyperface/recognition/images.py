"""Where the images to embed come from: a folder, a list file, or a RecordIO dataset.

Every source is an indexable list of named images with a fixed, sorted order, so a killed run can
resume by index. Decoding is tolerant: any format, size, bit depth, palette or alpha channel that
OpenCV or Pillow can read becomes RGB uint8; a file neither can read raises
:class:`UnreadableImage` with the reason, which the caller records.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from hyperface.common.errors import HyperfaceError, without_object_reprs
from hyperface.datasets.codec import IMAGE_EXTENSIONS  # the datasets' list: what embed reads, report finds
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list", ".csv", ".tsv"})


class UnreadableImage(Exception):
    """An input that is not a decodable image; ``str(exc)`` is the reason for the rejected list."""


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 (H, W, 3), honouring EXIF orientation: the datasets'
    OpenCV decoder first (grey, alpha and 16-bit converted, EXIF applied), Pillow for the rest."""
    from hyperface.datasets.codec import ImageTooLarge
    from hyperface.datasets.codec import decode_image as decode_with_opencv

    if not data:
        raise UnreadableImage("empty file")
    try:
        return decode_with_opencv(data)
    except ImageTooLarge as exc:  # not for Pillow either: the limit is the point
        raise UnreadableImage(str(exc).replace("image is larger", "larger")) from None
    except HyperfaceError:
        return _decode_with_pillow(data)


def _decode_with_pillow(data: bytes) -> np.ndarray:
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                image = Image.fromarray(np.clip(array / max(array.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError as exc:  # its message is "cannot identify image file <_io.BytesIO ...>"
        raise UnreadableImage(f"not a readable image ({_what_the_bytes_are(data)})") from exc
    except Image.DecompressionBombError as exc:  # formats OpenCV leaves to Pillow: the same limit
        raise UnreadableImage(f"larger than Pillow's {Image.MAX_IMAGE_PIXELS * 2} pixel limit; refused to protect memory") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        detail = without_object_reprs(str(exc))[:120] or type(exc).__name__
        raise UnreadableImage(f"not a readable image ({_what_the_bytes_are(data)}: {detail})") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise UnreadableImage(f"decoded to an empty image {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _what_the_bytes_are(data: bytes) -> str:
    """What is wrong with undecodable image bytes, in words: corrupt data of a known format, or none."""
    from hyperface.datasets.codec import image_encoding

    kind = image_encoding(data)
    if kind is not None:
        return f"{kind} header but corrupt or truncated data, {len(data)} bytes"
    return f"no known image format, {len(data)} bytes starting {data[:8]!r}"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8, or raise :class:`UnreadableImage`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as exc:
        raise UnreadableImage("file not found") from exc
    except OSError as exc:
        raise UnreadableImage(f"cannot read file ({exc.strerror or exc})") from exc
    return decode_image(data)


class ImageSource:
    """An ordered, indexable collection of named images."""

    kind = "images"
    root: Path
    ignored: int = 0  # files skipped because they are not images (by extension)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def name(self, index: int) -> str:  # pragma: no cover - abstract
        """The string written to the index file for this image."""
        raise NotImplementedError

    def load(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        """RGB uint8 image, or raise :class:`UnreadableImage`."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(Path(self.root).resolve()), "count": len(self), "ignored_non_images": self.ignored}


class FileListSource(ImageSource):
    """Image files given by path; names are the paths as written (relative to ``root`` for folders)."""

    def __init__(self, paths: list[Path], names: list[str], root: Path, kind: str, ignored: int = 0):
        self.paths, self.names, self.root, self.kind, self.ignored = paths, names, root, kind, ignored

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.names[index]

    def load(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


class RecordSource(ImageSource):
    """Images of a RecordIO dataset read through :mod:`hyperface.datasets`; named ``train.rec#<i>``."""

    kind = "recordio"

    def __init__(self, path: Path):
        try:
            from hyperface.datasets import RecordIODataset
        except ImportError as exc:
            raise HyperfaceError(
                f"{path} is a RecordIO dataset, but hyperface.datasets cannot read it here ({exc}); "
                "extract it to image files or give a folder"
            ) from exc
        self.root = path
        self.dataset = RecordIODataset(str(path))
        self._label = Path(getattr(self.dataset, "rec_path", path)).name
        self._lock = threading.Lock()  # one shared file handle: serialise the reads, decode in parallel

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        return f"{self._label}#{index}"

    def load(self, index: int) -> np.ndarray:
        try:
            with self._lock:
                data, _label = self.dataset.read_raw(index)
        except HyperfaceError as exc:
            raise UnreadableImage(f"corrupt record ({exc})") from exc
        return decode_image(data)


def _is_recordio(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".rec"
    return (path / "train.rec").is_file()  # without its train.idx the reader says so, not "no images"


def _scan_folder(root: Path) -> FileListSource:
    paths: list[Path] = []
    ignored = 0
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith("."):
                continue
            if Path(filename).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(Path(folder) / filename)
            else:
                ignored += 1
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    names = [p.relative_to(root).as_posix() for p in paths]
    return FileListSource(paths, names, root, "folder", ignored)


def _read_list_file(list_path: Path) -> FileListSource:
    base = list_path.parent
    paths, names = [], []
    with open(list_path, encoding="utf-8", errors="surrogateescape") as handle:  # names that are not UTF-8 stay bytes
        for line in handle:
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split("\t") if "\t" in line else [line]
            # insightface .lst lines are "flag\tpath\tlabel": take the field that names an image
            entry = next((f for f in fields if Path(f.strip()).suffix.lower() in IMAGE_EXTENSIONS), fields[0]).strip()
            path = Path(entry).expanduser()
            paths.append(path if path.is_absolute() else base / path)
            names.append(entry)
    return FileListSource(paths, names, base, "list")


def open_image_source(path: str | os.PathLike) -> ImageSource:
    """A folder (searched recursively), a list file (one path per line), or a RecordIO dataset."""
    path = Path(path).expanduser()
    if not path.exists():
        raise HyperfaceError(f"images not found: {path}; give a folder of images, a list file or a RecordIO train.rec")
    from hyperface.datasets import resolve_generated

    path = resolve_generated(path)  # a generate output folder: its dataset, not its samples.jpg
    if _is_recordio(path):
        source: ImageSource = RecordSource(path)
    elif path.is_dir():
        source = _scan_folder(path)
        if len(source) == 0:
            extra = f" ({source.ignored} other files ignored)" if source.ignored else ""
            raise HyperfaceError(
                f"no images in folder {path}{extra}; expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )
    elif path.suffix.lower() in LIST_SUFFIXES:
        source = _read_list_file(path)
        if len(source) == 0:
            raise HyperfaceError(f"list file {path} names no images (one path per line, relative to its folder)")
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        source = FileListSource([path], [path.name], path.parent, "file")
    else:
        raise HyperfaceError(
            f"cannot tell what {path} is: give a folder of images, a list file ({', '.join(sorted(LIST_SUFFIXES))}) "
            "or a RecordIO train.rec"
        )
    if len(source) == 0:
        raise HyperfaceError(f"{path} holds no images")
    return source


__all__ = [
    "FileListSource",
    "ImageSource",
    "RecordSource",
    "UnreadableImage",
    "decode_image",
    "open_image_source",
    "read_image",
]
