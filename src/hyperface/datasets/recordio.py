"""MXNet RecordIO (``train.rec`` + ``train.idx``) in insightface's layout, without mxnet.

On-disk format (dmlc-core recordio, as ``mx.recordio.MXIndexedRecordIO`` reads it):

- A record is ``uint32 magic 0xced7230a``, ``uint32 lrec`` (low 29 bits: length, top 3 bits:
  continuation flag ``cflag``), the payload, zero padding to a multiple of 4 bytes. A payload that
  contains the magic word at a 4-byte-aligned position is split there into parts (cflag 1 = first,
  2 = middle, 3 = last; the magic itself is dropped and re-inserted by the reader).
- ``.idx`` is text, one ``key<TAB>byte offset`` line per record.
- A payload starts with the ``IfQQ`` image-record header ``(flag, label, id, id2)``; when
  ``flag > 0`` the label is an array of ``flag`` float32 values right after the header. The encoded
  image (JPEG/PNG) follows.
- insightface layout: record 0 is a header with ``flag=2`` and label ``(K, M)``; records 1..K-1 are
  images with their class label; records K..M-1 are one identity record per class with label
  ``(first image key, end image key)`` (end exclusive). A ``property`` file holds
  ``num_classes,height,width``.

:class:`RecordIODataset` also reads the plain layout other tools write (``im2rec``, insightface's
``RecBuilder``, DCFace: no header or identity records, every record an image, in ``.idx`` order), and
a header record 0 without identity records (images ``1..K-1``, each image's own label: all that
arcface_torch's ``MXFaceDataset`` reads of it).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.runtime import get_logger
from hyperface.datasets.codec import check_rgb_uint8, decode_image, encode_image, image_size_of

log = get_logger("hyperface.datasets")

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_FRAME = struct.Struct("<II")
IR_FORMAT = "<IfQQ"  # flag, label, id, id2 (native alignment adds no padding: same 24 bytes)
IR_SIZE = struct.calcsize(IR_FORMAT)
#: Size of the reserved header record 0 (frame + IfQQ + two float32 labels), rewritten at close.
_HEADER_RECORD_SIZE = _FRAME.size + IR_SIZE + 8
#: insightface's layout stores record keys as float32 header labels: exact only below 2^24.
FLOAT32_EXACT_LIMIT = 1 << 24


def check_recordio_capacity(num_images: int, num_identities: int) -> None:
    """Refuse a dataset whose record keys would not be exact float32 labels (insightface's layout)."""
    records = int(num_images) + int(num_identities) + 1  # images, identity records, header
    if records >= FLOAT32_EXACT_LIMIT or num_identities > FLOAT32_EXACT_LIMIT:
        raise HyperfaceError(
            f"{num_images:,} images of {num_identities:,} identities need {records:,} RecordIO records, but insightface's "
            f"layout keeps record keys as float32 labels, exact only below 2^24 = {FLOAT32_EXACT_LIMIT:,}; "
            "use --format folder, or split the identities into several datasets"
        )


@dataclass(frozen=True)
class IRHeader:
    """The image-record header: ``label`` is a float when ``flag == 0``, else ``flag`` float32 values."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack_payload(label: float | Sequence[float] | np.ndarray, data: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """Build a record payload like ``mx.recordio.pack``: scalar label -> flag 0, array -> flag = size."""
    if np.ndim(label) == 0:
        return struct.pack(IR_FORMAT, 0, float(label), id, id2) + bytes(data)
    values = np.asarray(label, dtype="<f4").reshape(-1)
    return struct.pack(IR_FORMAT, values.size, 0.0, id, id2) + values.tobytes() + bytes(data)


def unpack_payload(payload: bytes | memoryview, *, what: str = "record") -> tuple[IRHeader, memoryview]:
    """Split a payload into its :class:`IRHeader` and the encoded image bytes (like ``mx.recordio.unpack``)."""
    view = memoryview(payload)
    if len(view) < IR_SIZE:
        raise HyperfaceError(f"{what} is {len(view)} bytes, shorter than its {IR_SIZE}-byte header: the .rec file is corrupt")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, view, 0)
    rest = view[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise HyperfaceError(f"{what} declares {flag} label values but holds {len(rest)} bytes: the .rec file is corrupt")
        label = np.frombuffer(rest[: 4 * flag], dtype="<f4").astype(np.float32)
        rest = rest[4 * flag :]
    return IRHeader(int(flag), label, int(id_), int(id2)), rest


def frame_record(payload: bytes) -> bytes:
    """Frame a payload as dmlc-core's RecordIOWriter does, splitting it at aligned magic words."""
    size = len(payload)
    if size >= 1 << 29:
        raise HyperfaceError(f"a RecordIO record holds at most 2^29 bytes; got {size} (is the image huge?)")
    aligned = size - size % 4
    words = np.frombuffer(payload, dtype="<u4", count=aligned // 4)
    cuts = (np.flatnonzero(words == RECORDIO_MAGIC) * 4).tolist()
    parts: list[bytes] = []
    start = 0
    for cut in cuts:
        parts.append(_FRAME.pack(RECORDIO_MAGIC, ((1 if start == 0 else 2) << 29) | (cut - start)))
        parts.append(payload[start:cut])
        start = cut + 4
    parts.append(_FRAME.pack(RECORDIO_MAGIC, ((3 if start else 0) << 29) | (size - start)))
    parts.append(payload[start:])
    parts.append(b"\0" * (-size % 4))
    return b"".join(parts)


def _read_frame(handle: BinaryIO, *, offset: int, first: bool, what: str) -> tuple[int, int]:
    """(continuation flag, payload length) of the frame at the handle's position, validated.

    ``offset`` is where the record starts (for messages); ``first`` says whether this is its first
    part, which decides the legal continuation flags (0/1 first, 2/3 after).
    """
    frame = handle.read(_FRAME.size)
    if len(frame) < _FRAME.size:
        raise HyperfaceError(f"{what} at byte {offset} is cut off: the .rec file is truncated (re-copy or regenerate it)")
    magic, lrec = _FRAME.unpack(frame)
    if magic != RECORDIO_MAGIC:
        raise HyperfaceError(
            f"{what} at byte {offset} does not start with the RecordIO magic number: the .rec file is corrupt "
            "or the .idx does not belong to it"
        )
    cflag, length = lrec >> 29, lrec & _LENGTH_MASK
    if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
        raise HyperfaceError(f"{what} at byte {offset} has an invalid continuation flag {cflag}: the .rec file is corrupt")
    return cflag, length


def read_record(handle: BinaryIO, offset: int, *, what: str = "record") -> bytes:
    """Read the (possibly multi-part) record at ``offset`` and return its payload."""
    handle.seek(offset)
    chunks: list[bytes] = []
    first = True
    while True:
        cflag, length = _read_frame(handle, offset=offset, first=first, what=what)
        data = handle.read(length)
        if len(data) < length:
            raise HyperfaceError(f"{what} at byte {offset} is cut off: the .rec file is truncated (re-copy or regenerate it)")
        chunks.append(data)
        if length % 4:
            handle.seek(4 - length % 4, os.SEEK_CUR)
        if cflag in (0, 3):
            return b"".join(chunks)
        chunks.append(_MAGIC_BYTES)
        first = False


def _record_end(handle: BinaryIO, offset: int, file_size: int, *, what: str) -> int:
    """Byte offset just after the record at ``offset``, walking its parts without reading the data."""
    position = offset
    first = True
    while True:
        handle.seek(position)
        cflag, length = _read_frame(handle, offset=offset, first=first, what=what)
        position += _FRAME.size + length + (-length % 4)
        if position > file_size + (-length % 4):  # the last record's padding may be missing at EOF
            raise HyperfaceError(f"{what} at byte {offset} is cut off: the .rec file is truncated (re-copy or regenerate it)")
        if cflag in (0, 3):
            return position
        first = False


def _read_header(handle: BinaryIO, offset: int, *, what: str) -> tuple[IRHeader, bool]:
    """Header of the record at ``offset`` and whether it carries image bytes, reading a few bytes only."""
    handle.seek(offset)
    cflag, length = _read_frame(handle, offset=offset, first=True, what=what)
    if cflag == 1:  # rare multi-part record: read it whole
        header, rest = unpack_payload(read_record(handle, offset, what=what), what=what)
        return header, len(rest) > 0
    prefix = handle.read(min(length, IR_SIZE + 4 * 64))
    if len(prefix) >= 4:
        need = IR_SIZE + 4 * struct.unpack_from("<I", prefix, 0)[0]
        if len(prefix) < min(need, length):
            prefix += handle.read(min(need, length) - len(prefix))
    header, _ = unpack_payload(prefix, what=what)
    return header, length > IR_SIZE + 4 * header.flag


def _whole(value: float, what: str) -> int:
    """A float32 label or record number as insightface reads it (``int()``), refusing NaN and inf."""
    value = float(value)
    if not np.isfinite(value):
        raise HyperfaceError(f"{what} holds a non-finite label ({value}): the record is corrupt")
    return int(value)


def _scalar_label(header: IRHeader, what: str = "a record") -> int:
    label = header.label
    return _whole(label if np.ndim(label) == 0 else label[0], what)  # insightface takes label[0] of arrays


def _rec_and_idx(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        recs = sorted(path.glob("*.rec"))
        if (path / "train.rec").is_file():
            rec = path / "train.rec"
        elif len(recs) == 1:
            rec = recs[0]
        else:
            found = ", ".join(r.name for r in recs) or "none"
            raise HyperfaceError(f"{path} holds no single RecordIO dataset (train.rec expected; .rec files found: {found})")
    else:
        rec = path if path.suffix == ".rec" else path.with_suffix(".rec")
    idx = rec.with_suffix(".idx")
    if not rec.is_file():
        raise HyperfaceError(f"RecordIO file not found: {rec}")
    if not idx.is_file():
        raise HyperfaceError(
            f"RecordIO index {idx} is missing: a .rec needs its .idx beside it (if the writer was killed, rerun it with resume)"
        )
    return rec, idx


def read_idx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` file into (keys, offsets) int64 arrays, in file order."""
    keys: list[int] = []
    offsets: list[int] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.split(b"\t")
            try:
                if len(fields) != 2:
                    raise ValueError
                keys.append(int(fields[0]))
                offsets.append(int(fields[1]))
            except ValueError:
                raise HyperfaceError(
                    f"{path} line {number} is not 'key<TAB>offset': the index is corrupt (rebuild it from the .rec)"
                ) from None
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def _read_property(path: Path) -> tuple[int, int, int] | None:
    """``num_classes,height,width`` from a ``property`` file. insightface's ``RecBuilder``
    (python-package ``insightface/data/rec_builder.py``) writes the image count on a second line:
    a second line holding one number is accepted (and not used)."""
    if not path.exists():
        return None
    try:
        lines = path.read_text().strip().splitlines()
        fields = [int(v) for v in lines[0].split(",")]
        if len(fields) != 3 or min(fields) < 1 or len(lines) > 2 or (len(lines) == 2 and int(lines[1]) < 0):
            raise ValueError
    except (ValueError, IndexError, OSError, UnicodeDecodeError):
        raise HyperfaceError(
            f"{path} must read 'num_classes,height,width' with positive numbers (e.g. 10000,112,112), "
            "optionally followed by a line with the image count (insightface's RecBuilder)"
        ) from None
    if fields[0] > FLOAT32_EXACT_LIMIT:  # labels are float32 in the records: no real dataset has more classes
        raise HyperfaceError(f"{path} says {fields[0]} classes, more than RecordIO's float32 labels can number (2^24): it is damaged")
    return fields[0], fields[1], fields[2]


class RecordIODataset:
    """Random access to a ``.rec``/``.idx`` pair: ``dataset[i] -> (RGB uint8 HWC image, int label)``.

    ``path`` is the ``.rec`` file or a folder holding ``train.rec``. Picklable for DataLoader workers:
    the file is opened lazily in each process. ``labels`` (int64, one per image) and ``num_classes``
    come from the identity records (insightface layout) or a scan of the record headers (plain layout);
    ``num_classes`` prefers the ``property`` file when present.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.rec_path, self.idx_path = _rec_and_idx(path)
        self._handle: BinaryIO | None = None
        self._handle_pid: int | None = None
        self._warned_label_mismatch = False
        self._warned_label_outside = False
        keys, offsets = read_idx(self.idx_path)
        if keys.size == 0:
            raise HyperfaceError(f"{self.idx_path} is empty: the dataset has no records")
        file_size = self.rec_path.stat().st_size
        if int(offsets.min()) < 0:
            raise HyperfaceError(f"{self.idx_path} holds a negative offset: the index is damaged (rebuild it, or write the dataset again)")
        if int(offsets.max()) + _FRAME.size > file_size:
            raise HyperfaceError(
                f"{self.idx_path} points past the end of {self.rec_path} ({file_size} bytes): the .rec file is truncated"
            )
        offset_of = dict(zip(keys.tolist(), offsets.tolist()))
        with open(self.rec_path, "rb") as handle:
            last = int(offsets.max())
            _record_end(handle, last, file_size, what=f"{self.rec_path.name} last record")
            self.layout, image_offsets, labels = self._index(handle, keys, offset_of)
        self._offsets = np.asarray(image_offsets, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        if self._offsets.size == 0:
            raise HyperfaceError(f"{self.rec_path} holds no image records")
        prop = _read_property(self.rec_path.parent / "property")
        if self.labels.min() < 0:
            raise HyperfaceError(f"{self.rec_path} has negative class labels")
        self.num_classes = int(self.labels.max()) + 1
        self.image_size: tuple[int, int] | None = None
        if prop is not None:
            if prop[0] < self.num_classes:
                raise HyperfaceError(
                    f"{self.rec_path.parent / 'property'} says {prop[0]} classes but the records use labels up to "
                    f"{self.num_classes - 1}: the property file does not belong to this dataset"
                )
            self.num_classes = prop[0]
            self.image_size = (prop[1], prop[2])

    def _index(self, handle: BinaryIO, keys: np.ndarray, offset_of: dict[int, int]):
        name = self.rec_path.name
        if 0 in offset_of:
            header, has_image = _read_header(handle, offset_of[0], what=f"{name} record 0")
            if header.flag > 0 and not has_image:
                if max(header.label[:2]) >= FLOAT32_EXACT_LIMIT:
                    # Past 2^24 the float32 ranges round (odd keys to even) and would shift labels
                    # between neighbouring identities: take every image record's own label instead.
                    images = []
                    for k in np.unique(keys[keys > 0]):  # key order, as insightface reads them
                        record, holds_image = _read_header(handle, offset_of[int(k)], what=f"{name} record {k}")
                        if holds_image:
                            images.append((offset_of[int(k)], _scalar_label(record, f"{name} record {k}")))
                    return "insightface", [o for o, _ in images], [label for _, label in images]
                return ("insightface", *self._index_insightface(handle, header, offset_of))
        # plain layout: every record is an image, in .idx order
        labels = [_scalar_label(_read_header(handle, offset_of[int(k)], what=f"{name} record {k}")[0], f"{name} record {k}") for k in keys]
        return "plain", [offset_of[int(k)] for k in keys], labels

    def _index_insightface(self, handle: BinaryIO, header0: IRHeader, offset_of: dict[int, int]):
        """Images ``1..K-1`` (K = record 0's first label value, all arcface_torch's ``MXFaceDataset``
        reads) and their labels: from one image header per identity record when records
        ``K..M-1`` are identity ranges tiling the images, else from every image's own header (a
        header written as ``(K, num_classes)`` with no identity records, as some third-party
        converters do, or identity records missing or damaged: MXFaceDataset trains on those too)."""
        name = self.rec_path.name
        first_identity = _whole(header0.label[0], f"{name} header record 0")
        if first_identity < 1:
            raise HyperfaceError(f"{name} header record 0 has an invalid first identity record {first_identity} (must be >= 1)")
        missing = [k for k in range(1, first_identity) if k not in offset_of]
        if missing:
            raise HyperfaceError(
                f"{self.idx_path} lacks image records {missing[:5]} that header record 0 promises: the dataset is incomplete"
            )
        image_offsets = [offset_of[k] for k in range(1, first_identity)]
        end_identity = _whole(header0.label[1], f"{name} header record 0") if header0.flag >= 2 else None
        labels = self._identity_labels(handle, first_identity, end_identity, offset_of)
        if labels is None:
            log.info("%s: header record 0 is %s, without identity records that tile images 1..%d: reading every "
                     "image's own label", name, header0.label.tolist(), first_identity - 1)
            labels = np.asarray(
                [_scalar_label(_read_header(handle, offset_of[k], what=f"{name} record {k}")[0], f"{name} record {k}") for k in range(1, first_identity)],
                dtype=np.int64,
            )
        return image_offsets, labels

    def _identity_labels(self, handle: BinaryIO, first_identity: int, end_identity: int | None,
                         offset_of: dict[int, int]) -> np.ndarray | None:
        """Labels of images ``1..first_identity-1`` from identity records ``first..end-1`` (one image
        header each), or None when those are not identity ranges tiling the images in order."""
        name = self.rec_path.name
        if end_identity is None or end_identity < first_identity or any(k not in offset_of for k in range(first_identity, end_identity)):
            return None
        labels = np.full(first_identity - 1, -1, dtype=np.int64)
        expected_start = 1
        for key in range(first_identity, end_identity):
            identity, has_image = _read_header(handle, offset_of[key], what=f"{name} identity record {key}")
            if identity.flag < 2 or has_image:
                return None
            start, end = (_whole(v, f"{name} identity record {key}") for v in identity.label[:2])
            if start != expected_start or end < start or end > first_identity:
                return None
            if end > start:
                first_image, _ = _read_header(handle, offset_of[start], what=f"{name} record {start}")
                labels[start - 1 : end - 1] = _scalar_label(first_image, f"{name} record {start}")
            expected_start = end
        return labels if expected_start == first_identity else None

    # -- access --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 of the labels and the record layout (every image record's offset, so every
        record's size): another dataset, or the same identities rendered again, gives another value.
        Cheap: both are already in memory."""
        digest = hashlib.sha256(b"recordio\0")
        digest.update(self.labels.astype("<i8").tobytes())
        digest.update(self._offsets.astype("<i8").tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return int(self._offsets.size)

    def image_name(self, index: int) -> str:
        """``train.rec#<index>``: how the embed index and the reports name a record."""
        return f"{self.rec_path.name}#{index}"

    def class_names(self) -> list[str]:
        """Records have numbers, not names: each label's own number."""
        return [str(label) for label in range(self.num_classes)]

    def _file(self) -> BinaryIO:
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = open(self.rec_path, "rb")
            self._handle_pid = os.getpid()
        return self._handle

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """The encoded image bytes and the label of image ``index`` (no decoding)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        offset = int(self._offsets[index])
        what = f"{self.rec_path.name} image {index}"
        header, data = unpack_payload(read_record(self._file(), offset, what=what), what=what)
        label = _scalar_label(header, what)
        if not 0 <= label < self.num_classes:
            # outside the classes the identity records (or the property file) size: a trainer would fail
            # on it hours in; the identity record's class is the one that fits
            if not self._warned_label_outside:
                self._warned_label_outside = True
                log.warning("%s is labelled %d in its own header, outside the dataset's classes 0..%d: using its identity "
                            "record's class %d (further such images are not logged)", what, label, self.num_classes - 1,
                            int(self.labels[index]))
            return bytes(data), int(self.labels[index])
        if label != self.labels[index] and not self._warned_label_mismatch:
            # `labels` (one header per identity, fast on millions of images) sized the classes; the
            # image's own header is what insightface trains on, so that is what is returned.
            self._warned_label_mismatch = True
            log.warning(
                "%s is labelled %d in its own header, but its identity record puts it in class %d: %s is "
                "inconsistent (training uses each image's own label, as insightface does; the report and "
                "num_classes use the identity records). Further mismatches are not logged.",
                what, label, int(self.labels[index]), self.rec_path,
            )
        return bytes(data), label

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        data, label = self.read_raw(index)
        return decode_image(data, what=f"{self.rec_path.name} image {index}"), label

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RecordIODataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Only close a handle this process opened (a forked worker's copy belongs to its parent).
        if getattr(self, "_handle", None) is not None and self._handle_pid == os.getpid():
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"RecordIODataset({str(self.rec_path)!r}, images={len(self)}, classes={self.num_classes}, layout={self.layout})"


def finish_interrupted_close(rec_path: str | os.PathLike) -> bool:
    """Complete a :meth:`RecordIOWriter.close` killed between its two renames (the finished ``.rec``
    in place, its fsynced ``.idx`` still named ``.idx.tmp``). Returns whether there was one."""
    rec_path = Path(rec_path)
    idx_path, tmp_idx = rec_path.with_suffix(".idx"), rec_path.with_suffix(".idx.tmp")
    if rec_path.is_file() and not idx_path.exists() and tmp_idx.is_file() and not rec_path.with_suffix(".rec.tmp").exists():
        os.replace(tmp_idx, idx_path)
        return True
    return False


class _LabelRanges:
    """label -> [first key, end key) of its records, as two int64 arrays indexed by label that grow
    by doubling: 16 bytes a label (a dict of lists took ~250, half a gigabyte at 2M identities)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._first = np.full(0, -1, dtype=np.int64)  # -1: no image of this label yet
        self._end = np.zeros(0, dtype=np.int64)

    def __bool__(self) -> bool:
        return bool((self._first >= 0).any())

    def __contains__(self, label: int) -> bool:
        return 0 <= label < len(self._first) and self._first[label] >= 0

    def start(self, label: int, key: int) -> None:
        if label < 0:  # NumPy would take it from the end of the table
            raise HyperfaceError(f"labels must be non-negative integers, got {label}")
        if label >= len(self._first):
            size = max(label + 1, 2 * len(self._first), 1024)
            first = np.full(size, -1, dtype=np.int64)
            end = np.zeros(size, dtype=np.int64)
            first[: len(self._first)] = self._first
            end[: len(self._end)] = self._end
            self._first, self._end = first, end
        self._first[label] = key
        self._end[label] = key

    def extend(self, label: int, end_key: int) -> None:
        self._end[label] = end_key

    def get(self, label: int, default: tuple[int, int]) -> tuple[int, int]:
        if label in self:
            return int(self._first[label]), int(self._end[label])
        return default

    def counts(self) -> dict[int, int]:
        labels = np.flatnonzero(self._first >= 0)
        return dict(zip(labels.tolist(), (self._end[labels] - self._first[labels]).tolist()))


class RecordIOWriter:
    """Stream images into ``out_dir/train.rec`` + ``train.idx`` (+ ``property``) in insightface's layout.

    Add images grouped by identity (all images of one label together, labels in any order); only the
    small label -> key-range table is kept in memory. Until :meth:`close` the files are
    ``train.rec.tmp``/``train.idx.tmp``; ``close`` appends the identity records, rewrites the
    reserved header record 0, and renames them to their final names, so a finished-looking dataset
    is always complete. After a kill, ``RecordIOWriter(out_dir, resume=True)`` reopens the ``.tmp``
    files, drops any half-written record, and continues: see :attr:`label_counts` for what is there.
    Labels without images (gaps) get empty identity ranges, so ``num_classes = max label + 1``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        prefix: str = "train",
        image_format: str = "jpg",
        quality: int = 95,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rec_path = self.out_dir / f"{prefix}.rec"
        self.idx_path = self.out_dir / f"{prefix}.idx"
        self.property_path = self.out_dir / "property"
        self._tmp_rec = self.rec_path.with_name(self.rec_path.name + ".tmp")
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self.image_format = image_format
        self.quality = quality
        self.image_size: tuple[int, int] | None = None
        self._ranges = _LabelRanges()
        self._current: int | None = None
        self._max_label = -1
        self._next_key = 1
        self._closed = False
        if resume:
            finish_interrupted_close(self.rec_path)
        if self.rec_path.exists() and not overwrite:
            raise HyperfaceError(
                f"{self.rec_path} already exists (a finished dataset): choose another folder or pass overwrite=True"
            )
        if resume and self._tmp_rec.exists() and self._tmp_idx.exists():
            self._recover()
        else:
            self._rec = open(self._tmp_rec, "wb")
            self._idx = open(self._tmp_idx, "w", encoding="ascii", newline="\n")
            self._rec.write(frame_record(pack_payload([0.0, 0.0])))  # header record 0, rewritten at close
            self._idx.write("0\t0\n")

    # -- resume ----------------------------------------------------------------------------------
    def _recover(self) -> None:
        size = self._tmp_rec.stat().st_size
        raw = self._tmp_idx.read_bytes()
        lines = raw.split(b"\n")[:-1]  # a last line without newline is half-written: drop it
        valid_end_rec = 0
        valid_lines: list[bytes] = []
        with open(self._tmp_rec, "rb") as handle:
            for line in lines:
                try:
                    key_text, offset_text = line.split(b"\t")
                    key, offset = int(key_text), int(offset_text)
                except ValueError:
                    break
                if key != len(valid_lines) or offset != valid_end_rec:
                    break
                try:
                    end = _record_end(handle, offset, size, what="record")
                    if end > size:
                        break
                    header, has_image = _read_header(handle, offset, what="record")
                except HyperfaceError:
                    break
                if key > 0:
                    if not has_image:  # an identity record from an interrupted close: rebuilt at close
                        break
                    try:
                        label = _scalar_label(header)
                    except HyperfaceError:
                        break
                    if label < 0:  # not a record this writer made: damage, cut here
                        break
                    self._track(label, key)
                    if self.image_size is None:
                        self.image_size = image_size_of(unpack_payload(read_record(handle, offset))[1])
                valid_lines.append(line + b"\n")
                valid_end_rec = end
        if not valid_lines:
            self._rec = open(self._tmp_rec, "wb")
            self._idx = open(self._tmp_idx, "w", encoding="ascii", newline="\n")
            self._rec.write(frame_record(pack_payload([0.0, 0.0])))
            self._idx.write("0\t0\n")
            self._ranges.clear()
            self._current = None
            self._max_label = -1
            return
        self._next_key = len(valid_lines)
        self._rec = open(self._tmp_rec, "r+b")
        self._rec.truncate(valid_end_rec)
        self._rec.seek(valid_end_rec)
        with open(self._tmp_idx, "wb") as handle:
            handle.write(b"".join(valid_lines))
        self._idx = open(self._tmp_idx, "a", encoding="ascii", newline="\n")

    def _track(self, label: int, key: int) -> None:
        if label != self._current:
            if label in self._ranges:
                raise HyperfaceError(
                    f"label {label} was already written before label {self._current}: add images grouped by identity "
                    "(all images of one label together)"
                )
            self._ranges.start(label, key)
            self._current = label
            self._max_label = max(self._max_label, label)
        self._ranges.extend(label, key + 1)

    # -- writing -----------------------------------------------------------------------------------
    def images_of(self, label: int) -> int:
        """Images written so far for ``label``."""
        start, end = self._ranges.get(int(label), (0, 0))
        return end - start

    @property
    def label_counts(self) -> dict[int, int]:
        """Images written so far per label (after a resume: what survived the kill)."""
        return self._ranges.counts()

    @property
    def num_images(self) -> int:
        return self._next_key - 1

    def add(self, image: np.ndarray | bytes, label: int) -> int:
        """Append one image (RGB uint8 HWC array, or already-encoded JPEG/PNG bytes); returns its record key."""
        if self._closed:
            raise HyperfaceError("this RecordIOWriter is closed")
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or int(label) < 0:
            raise HyperfaceError(f"labels must be non-negative integers, got {label!r}")
        label = int(label)
        if label >= FLOAT32_EXACT_LIMIT:
            raise HyperfaceError(f"label {label} does not fit a float32 RecordIO label exactly (max 2^24 classes)")
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            if self.image_size is None:  # from the header: the bytes are stored as given, not decoded
                self.image_size = image_size_of(data)
        else:
            image = check_rgb_uint8(image)
            if self.image_size is None:
                self.image_size = image.shape[:2]
            data = encode_image(image, image_format=self.image_format, quality=self.quality)
        key = self._next_key
        check_recordio_capacity(key, max(self._max_label, label) + 1)
        self._track(label, key)
        offset = self._rec.tell()
        self._rec.write(frame_record(pack_payload(float(label), data, id=key)))
        self._idx.write(f"{key}\t{offset}\n")
        # Each record reaches the OS before add returns (the record, then its index line), so a
        # killed process loses at most the record it was writing. One small write per image, next
        # to a JPEG encode: nothing against the hundreds of records Python's buffers would hold.
        self.flush()
        self._next_key += 1
        return key

    def flush(self) -> None:
        """Push buffered records to the OS (``add`` does it after every record; a kill of the process
        then loses nothing already added; for a power cut, fsync is the caller's choice)."""
        self._rec.flush()
        self._idx.flush()

    def close(self, num_classes: int | None = None) -> None:
        """Write identity records and the header, then move the files to their final names.
        ``num_classes``: when the last labels have no image, how many classes there are (identity
        records and ``property`` cover them all); at least the highest label added + 1."""
        if self._closed:
            return
        if not self._ranges:
            self.abort()
            raise HyperfaceError("no images were added to the RecordIO dataset; nothing was written")
        num_classes = max(self._max_label + 1, int(num_classes or 0))
        first_identity = self._next_key
        key = first_identity
        for label in range(num_classes):
            start, end = self._ranges.get(label, (first_identity, first_identity))
            offset = self._rec.tell()
            self._rec.write(frame_record(pack_payload([float(start), float(end)])))
            self._idx.write(f"{key}\t{offset}\n")
            key += 1
        self._rec.seek(0)
        header = frame_record(pack_payload([float(first_identity), float(key)]))
        assert len(header) == _HEADER_RECORD_SIZE
        self._rec.write(header)
        for handle in (self._rec, self._idx):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        # The .idx goes last: until it is in place (an old one is removed first) the dataset is
        # visibly incomplete, so a kill here never leaves a new .rec beside an old index, and a kill
        # between the two renames is completed by finish_interrupted_close (resume=True).
        from hyperface.common.io import save_bytes

        self.idx_path.unlink(missing_ok=True)
        height, width = self.image_size or (112, 112)
        save_bytes(self.property_path, f"{num_classes},{height},{width}\n".encode())
        os.replace(self._tmp_rec, self.rec_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._closed = True

    def abort(self) -> None:
        """Close the files and delete the unfinished ``.tmp`` outputs."""
        if self._closed:
            return
        for handle in (self._rec, self._idx):
            handle.close()
        for path in (self._tmp_rec, self._tmp_idx):
            path.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> "RecordIOWriter":
        return self

    def suspend(self) -> None:
        """Release the files but keep the ``.tmp`` outputs, for ``RecordIOWriter(..., resume=True)``."""
        if self._closed:
            return
        self.flush()
        for handle in (self._rec, self._idx):
            handle.close()
        self._closed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the .tmp files for resume=True, but release the handles
            self.suspend()


__all__ = [
    "IRHeader",
    "RECORDIO_MAGIC",
    "RecordIODataset",
    "RecordIOWriter",
    "FLOAT32_EXACT_LIMIT",
    "check_recordio_capacity",
    "finish_interrupted_close",
    "frame_record",
    "pack_payload",
    "read_idx",
    "read_record",
    "unpack_payload",
]
