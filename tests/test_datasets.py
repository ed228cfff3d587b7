"""Dataset writers and readers: round trips, an independent hand-made .rec, corruption, resume."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from hyperface.common.errors import HyperfaceError
from hyperface.datasets import (
    ImageFolderDataset,
    ImageFolderWriter,
    RecordIODataset,
    RecordIOWriter,
    encode_image,
    open_dataset,
)
from hyperface.datasets.recordio import frame_record, pack_payload, unpack_payload

MAGIC = 0xCED7230A


def _images(count: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8) for _ in range(count)]


# --- an independent writer of the format, from the spec (struct.pack by hand) --------------------
def _hand_record(payload: bytes) -> bytes:
    """dmlc framing: split at 4-byte-aligned magic words (dropped), cflag 1/2/3, pad to 4 bytes."""
    out = b""
    start = 0
    cuts = [i for i in range(0, len(payload) - len(payload) % 4, 4) if payload[i : i + 4] == struct.pack("<I", MAGIC)]
    for cut in cuts:
        cflag = 1 if start == 0 else 2
        out += struct.pack("<II", MAGIC, (cflag << 29) | (cut - start)) + payload[start:cut]
        start = cut + 4
    cflag = 3 if cuts else 0
    out += struct.pack("<II", MAGIC, (cflag << 29) | (len(payload) - start)) + payload[start:]
    return out + b"\0" * ((4 - len(payload) % 4) % 4)


def _hand_payload(label, data: bytes, id_: int = 0) -> bytes:
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, id_, 0) + struct.pack(f"<{len(label)}f", *label) + data
    return struct.pack("<IfQQ", 0, float(label), id_, 0) + data


def _write_hand_rec(folder, records: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    blob, lines = b"", ""
    for key, payload in enumerate(records):
        lines += f"{key}\t{len(blob)}\n"
        blob += _hand_record(payload)
    (folder / "train.rec").write_bytes(blob)
    (folder / "train.idx").write_text(lines)


def test_frame_record_matches_independent_framing_including_multipart():
    # id = MAGIC puts the magic word at aligned offset 8 of the payload: the record must be split.
    payloads = [
        _hand_payload(3, b"abcdefg"),
        _hand_payload(5, b"xy" + struct.pack("<I", MAGIC) * 2 + b"z", id_=MAGIC),
        _hand_payload([1.0, 2.0], b""),
    ]
    for payload in payloads:
        assert frame_record(payload) == _hand_record(payload)
    assert (_hand_record(payloads[1])[4:8] != struct.pack("<I", len(payloads[1])))  # really multi-part


def test_reads_hand_written_insightface_layout_with_multipart_record(tmp_path):
    images = _images(5)
    blobs = [encode_image(im, image_format="png") for im in images]
    labels = [0, 0, 1, 1, 1]
    # records: 0 header (6, 8); images 1..5; identity records 6, 7
    records = [_hand_payload([6.0, 8.0], b"")]
    for key, (blob, label) in enumerate(zip(blobs, labels), 1):
        records.append(_hand_payload(label, blob, id_=MAGIC if key == 3 else key))
    records += [_hand_payload([1.0, 3.0], b""), _hand_payload([3.0, 6.0], b"")]
    _write_hand_rec(tmp_path / "rec", records)
    dataset = RecordIODataset(tmp_path / "rec")
    assert dataset.layout == "insightface"
    assert len(dataset) == 5 and dataset.num_classes == 2
    assert dataset.labels.tolist() == labels
    for i in range(5):
        image, label = dataset[i]
        np.testing.assert_array_equal(image, images[i])
        assert label == labels[i]


def test_reads_plain_layout_written_by_other_tools(tmp_path):
    images = _images(3, seed=1)
    labels = [2, 0, 1]
    records = [_hand_payload(label, encode_image(im, image_format="png"), id_=k) for k, (im, label) in enumerate(zip(images, labels))]
    # an array label (flag 2) on an image record: insightface takes label[0]
    records[1] = _hand_payload([0.0, 7.0], encode_image(images[1], image_format="png"))
    _write_hand_rec(tmp_path / "plain", records)
    dataset = open_dataset(tmp_path / "plain" / "train.rec")
    assert isinstance(dataset, RecordIODataset) and dataset.layout == "plain"
    assert dataset.labels.tolist() == labels and dataset.num_classes == 3
    np.testing.assert_array_equal(dataset[1][0], images[1])


@pytest.mark.parametrize("reader", ["recordio", "folder"])
def test_writers_round_trip_through_readers(tmp_path, reader):
    images = _images(7, seed=2)
    labels = [1, 1, 0, 0, 0, 3, 3]  # grouped, not sorted, label 2 has no images
    if reader == "recordio":
        with RecordIOWriter(tmp_path / "ds", image_format="png") as writer:
            for image, label in zip(images, labels):
                writer.add(image, label)
        assert not list((tmp_path / "ds").glob("*.tmp"))
        assert (tmp_path / "ds" / "property").read_text().strip() == "4,16,18"
    else:
        writer = ImageFolderWriter(tmp_path / "ds", image_format="png")
        for image, label in zip(images, labels):
            writer.add(image, label)
        (tmp_path / "ds" / "000002").mkdir()  # an identity whose images were all filtered out
    dataset = open_dataset(tmp_path / "ds")
    assert type(dataset) is (RecordIODataset if reader == "recordio" else ImageFolderDataset)
    assert dataset.num_classes == 4
    pairs = sorted((int(dataset.labels[i]), dataset[i][0].tobytes()) for i in range(len(dataset)))
    assert pairs == sorted((label, image.tobytes()) for image, label in zip(images, labels))
    assert all(dataset[i][1] == dataset.labels[i] for i in range(len(dataset)))
    clone = pickle.loads(pickle.dumps(dataset))  # DataLoader workers
    np.testing.assert_array_equal(clone[3][0], dataset[3][0])


def test_recordio_layout_matches_insightface(tmp_path):
    """Header record 0 = (K, M); identity records K..M-1 hold (first, end) image keys."""
    images = _images(4, seed=3)
    jpeg = encode_image(images[0])
    with RecordIOWriter(tmp_path) as writer:
        writer.add(jpeg, 0)  # encoded bytes are stored as given
        writer.add(images[1], 0)
        writer.add(images[2], 1)
        writer.add(images[3], 1)
    lines = [line.split("\t") for line in (tmp_path / "train.idx").read_text().splitlines()]
    offsets = {int(k): int(v) for k, v in lines}
    assert sorted(offsets) == list(range(7))
    blob = (tmp_path / "train.rec").read_bytes()

    def payload(key):
        magic, lrec = struct.unpack_from("<II", blob, offsets[key])
        assert magic == MAGIC and lrec >> 29 == 0
        return blob[offsets[key] + 8 : offsets[key] + 8 + (lrec & ((1 << 29) - 1))]

    flag, _, _, _ = struct.unpack_from("<IfQQ", payload(0))
    assert flag == 2 and struct.unpack_from("<2f", payload(0), 24) == (5.0, 7.0)
    assert struct.unpack_from("<2f", payload(5), 24) == (1.0, 3.0)
    assert struct.unpack_from("<2f", payload(6), 24) == (3.0, 5.0)
    assert struct.unpack_from("<IfQQ", payload(3))[:2] == (0, 1.0)
    assert payload(1)[24:] == jpeg
    assert RecordIODataset(tmp_path).read_raw(0) == (jpeg, 0)


def test_truncated_and_corrupt_recordio_rejected(tmp_path):
    with RecordIOWriter(tmp_path / "ok") as writer:
        for i, image in enumerate(_images(4, seed=4)):
            writer.add(image, i // 2)
    rec = (tmp_path / "ok" / "train.rec").read_bytes()
    idx = (tmp_path / "ok" / "train.idx").read_text()
    bad = tmp_path / "cut"
    bad.mkdir()
    (bad / "train.rec").write_bytes(rec[: len(rec) - 30])
    (bad / "train.idx").write_text(idx)
    with pytest.raises(HyperfaceError, match="truncated"):
        RecordIODataset(bad)
    # an image record whose JPEG bytes are damaged: clean error on access
    dataset = RecordIODataset(tmp_path / "ok")
    offset = int(idx.splitlines()[2].split("\t")[1])
    damaged = bytearray(rec)
    damaged[offset + 8 + 24 : offset + 8 + 24 + 64] = b"\0" * 64
    (bad / "train.rec").write_bytes(bytes(damaged))
    with pytest.raises(HyperfaceError, match="not a decodable"):
        RecordIODataset(bad)[1]
    damaged[offset : offset + 4] = b"XXXX"
    (bad / "train.rec").write_bytes(bytes(damaged))
    with pytest.raises(HyperfaceError, match="magic"):
        RecordIODataset(bad)[1]
    (bad / "train.idx").unlink()
    with pytest.raises(HyperfaceError, match="index"):
        RecordIODataset(bad)
    assert len(dataset) == 4


def test_recordio_writer_resumes_after_kill(tmp_path):
    images = _images(6, seed=5)
    writer = RecordIOWriter(tmp_path)
    for i in range(4):
        writer.add(images[i], i // 2)
    writer.flush()  # the process dies here, mid-way through a record:
    with open(tmp_path / "train.rec.tmp", "ab") as handle:
        handle.write(frame_record(pack_payload(2.0, encode_image(images[4])))[:50])
    with open(tmp_path / "train.idx.tmp", "a") as handle:
        handle.write("5\t12")
    assert not (tmp_path / "train.rec").exists()
    with pytest.raises(HyperfaceError, match="unfinished"):
        open_dataset(tmp_path)
    resumed = RecordIOWriter(tmp_path, resume=True)
    assert resumed.label_counts == {0: 2, 1: 2} and resumed.num_images == 4
    resumed.add(images[4], 2)
    resumed.add(images[5], 2)
    resumed.close()
    dataset = RecordIODataset(tmp_path)
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert dataset.num_classes == 3
    with pytest.raises(HyperfaceError, match="already exists"):
        RecordIOWriter(tmp_path)


def test_recordio_writer_labels_in_any_order_with_gaps_past_its_table(tmp_path):
    """The label -> key-range table grows past its first 1024 labels; gaps stay empty identities."""
    images = _images(5, seed=9)
    writer = RecordIOWriter(tmp_path)
    for image, label in zip(images, [3000, 3000, 7, 0, 0]):
        writer.add(image, label)
    assert writer.label_counts == {0: 2, 7: 1, 3000: 2}
    assert writer.images_of(3000) == 2 and writer.images_of(5) == 0 and writer.images_of(10**6) == 0
    with pytest.raises(HyperfaceError, match="already written"):
        writer.add(images[0], 7)
    writer.close(num_classes=3002)
    dataset = RecordIODataset(tmp_path)
    assert dataset.num_classes == 3002
    assert sorted(dataset.labels.tolist()) == [0, 0, 7, 3000, 3000]
    assert np.bincount(dataset.labels, minlength=3002)[[0, 7, 3000, 3001]].tolist() == [2, 1, 2, 0]


def test_recordio_writer_loses_nothing_added_before_a_sigkill(tmp_path):
    """No flush() by the caller: a process killed outright keeps every record add() returned."""
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, numpy as np\n"
        "from hyperface.datasets import RecordIOWriter\n"
        f"writer = RecordIOWriter({str(tmp_path)!r}, image_format='png')\n"
        "rng = np.random.default_rng(0)\n"
        "for i in range(120):\n"
        "    writer.add(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), i // 10)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    resumed = RecordIOWriter(tmp_path, resume=True)
    assert resumed.num_images == 120 and resumed.label_counts == {label: 10 for label in range(12)}
    resumed.close()
    assert RecordIODataset(tmp_path).labels.tolist() == [i // 10 for i in range(120)]


def test_writer_input_errors(tmp_path):
    writer = RecordIOWriter(tmp_path / "a")
    image = _images(1)[0]
    writer.add(image, 0)
    writer.add(image, 1)
    with pytest.raises(HyperfaceError, match="grouped by identity"):
        writer.add(image, 0)
    with pytest.raises(HyperfaceError, match="non-negative"):
        writer.add(image, -1)
    with pytest.raises(HyperfaceError, match="uint8"):
        writer.add(image.astype(np.float32), 1)
    writer.abort()
    assert not list((tmp_path / "a").iterdir())
    with pytest.raises(HyperfaceError, match="no images"):
        RecordIOWriter(tmp_path / "b").close()


def test_image_folder_writer_resume_and_reader_errors(tmp_path):
    writer = ImageFolderWriter(tmp_path / "f")
    images = _images(3, seed=6)
    first = writer.add(images[0], 5)
    assert first.relative_to(tmp_path / "f").as_posix() == "000005/0000.jpg"
    (first.parent / ".0001.jpg.123.tmp").write_bytes(b"half")  # a kill mid-write leaves only this
    again = ImageFolderWriter(tmp_path / "f")  # a new process continues after existing files
    assert again.add(images[1], 5).name == "0001.jpg"
    assert again.add(encode_image(images[2], image_format="png"), 5, index=7).name == "0007.png"
    dataset = ImageFolderDataset(tmp_path / "f")
    assert len(dataset) == 3 and dataset.classes == ["000005"] and dataset.labels.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(dataset[2][0], images[2])
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(HyperfaceError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(HyperfaceError, match="not found"):
        open_dataset(tmp_path / "missing")
    (first.parent / "0003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(HyperfaceError, match="not a decodable"):
        ImageFolderDataset(tmp_path / "f")[2]


def test_unpack_payload_rejects_short_payload():
    with pytest.raises(HyperfaceError, match="header"):
        unpack_payload(b"\0" * 10)
    header, rest = unpack_payload(pack_payload([1.0, 2.0, 3.0], b"img"))
    assert header.flag == 3 and header.label.tolist() == [1.0, 2.0, 3.0] and bytes(rest) == b"img"


def test_writer_splits_payloads_holding_the_magic_word(tmp_path):
    png = encode_image(_images(1, seed=7)[0], image_format="png")
    data = png + b"\0" * (-len(png) % 4) + struct.pack("<I", MAGIC) * 3  # aligned magic words in the payload
    with RecordIOWriter(tmp_path) as writer:
        writer.add(data, 0)
        writer.add(png, 0)
    blob = (tmp_path / "train.rec").read_bytes()
    offset = int((tmp_path / "train.idx").read_text().splitlines()[1].split("\t")[1])
    assert struct.unpack_from("<I", blob, offset + 4)[0] >> 29 == 1  # written as a multi-part record
    dataset = RecordIODataset(tmp_path)
    assert dataset.read_raw(0) == (data, 0) and dataset.read_raw(1) == (png, 0)
    np.testing.assert_array_equal(dataset[0][0], dataset[1][0])


def test_empty_shard_is_rejected(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "train.idx").write_text("")
    with pytest.raises(HyperfaceError, match="no records"):
        open_dataset(tmp_path)
    (tmp_path / "train.idx").write_text("0\t0\n")
    with pytest.raises(HyperfaceError, match="truncated"):
        open_dataset(tmp_path)


def test_dataloader_workers_read_lazily(tmp_path):
    import torch
    images = _images(6, seed=8)
    with RecordIOWriter(tmp_path, image_format="png") as writer:
        for i, image in enumerate(images):
            writer.add(image, i // 3)
    dataset = RecordIODataset(tmp_path)
    dataset[0]  # the parent opened its handle; workers must open their own
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batches = list(loader)
    got = torch.cat([b[0] for b in batches]).numpy()
    np.testing.assert_array_equal(got, np.stack(images))
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 0, 1, 1, 1]


def test_reads_insightface_rec_builder_property_with_image_count_line(tmp_path):
    # insightface's own writer (python-package insightface/data/rec_builder.py, RecBuilder.close)
    # writes "num_classes,height,width" and then the image count on a second line; keys from 0,
    # no header record (arcface_torch's MXFaceDataset reads every key).
    images = [encode_image(image) for image in _images(3, seed=11)]
    _write_hand_rec(tmp_path, [_hand_payload(label, data, id_=k) for k, (label, data) in enumerate(zip([0, 1, 1], images))])
    (tmp_path / "property").write_text("2,16,18\n3\n")
    dataset = RecordIODataset(tmp_path)
    assert dataset.layout == "plain" and dataset.num_classes == 2 and dataset.image_size == (16, 18)
    assert [dataset.read_raw(i) for i in range(3)] == list(zip(images, [0, 1, 1]))
    for damaged in ("2,16,18\nthree\n", "2,16,18\n3\n4\n", "2,16\n3\n"):
        (tmp_path / "property").write_text(damaged)
        with pytest.raises(HyperfaceError, match="num_classes,height,width"):
            RecordIODataset(tmp_path)


@pytest.mark.parametrize("header", ["k_and_classes", "one_value", "identity_records_missing"])
def test_header_record_without_identity_records_reads_each_images_label(tmp_path, header):
    # MXFaceDataset reads only record 0's first value K (images 1..K-1). Third-party converters write
    # record 0 as (K, num_classes) with no identity records; others leave the identity records out.
    images = [encode_image(image) for image in _images(4, seed=12)]
    labels = [0, 0, 2, 1]
    head = {"k_and_classes": [5.0, 3.0], "one_value": [5.0], "identity_records_missing": [5.0, 8.0]}[header]
    records = [_hand_payload(head, b"")] + [_hand_payload(label, data, id_=k) for k, (label, data) in enumerate(zip(labels, images), start=1)]
    _write_hand_rec(tmp_path, records)
    dataset = RecordIODataset(tmp_path)
    assert dataset.layout == "insightface" and dataset.labels.tolist() == labels and dataset.num_classes == 3
    assert [dataset.read_raw(i) for i in range(4)] == list(zip(images, labels))
    # an image record the header promises is still required
    lines = (tmp_path / "train.idx").read_text().splitlines()
    (tmp_path / "train.idx").write_text("\n".join(line for line in lines if not line.startswith("3\t")) + "\n")
    with pytest.raises(HyperfaceError, match=r"lacks image records \[3\]"):
        RecordIODataset(tmp_path)


def test_keys_past_float32_exactness_take_each_images_own_label(tmp_path):
    # A Glint360K-sized file keeps keys > 2^24 in float32 labels, where odd keys round to even: the
    # identity ranges can no longer be trusted (they would shift labels between neighbours).
    big = float(1 << 24)
    images = [encode_image(image) for image in _images(4, seed=7)]
    records = [_hand_payload([big + 6, big + 8], b"")]  # header: identity records at "2^24 + 6 .."
    records += [_hand_payload(label, data, id_=key) for key, (label, data) in enumerate(zip([0, 0, 1, 1], images), start=1)]
    records += [_hand_payload([1.0, 2.0], b""), _hand_payload([2.0, 5.0], b"")]  # rounded: would mislabel image 2
    _write_hand_rec(tmp_path, records)
    dataset = RecordIODataset(tmp_path)
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert [dataset.read_raw(i) for i in range(4)] == list(zip(images, [0, 0, 1, 1]))


def test_image_whose_header_disagrees_with_its_identity_record_keeps_its_own_label(tmp_path, hyperface_log):
    # Identity ranges (1, 3), (3, 5) but image 2's own header says class 0 and image 3's says 7:
    # `labels` counts classes from the identity records (one header each); reading an image returns
    # its own header's label, as insightface's MXFaceDataset does, and the mismatch is logged once;
    # a header label outside the classes (7 of 2) would fail training hours in: the identity
    # record's class is used, with a warning.
    images = [encode_image(image) for image in _images(4, seed=8)]
    records = [_hand_payload([5.0, 7.0], b"")]
    records += [_hand_payload(label, data, id_=key) for key, (label, data) in enumerate(zip([1, 0, 1, 7], images), start=1)]
    records += [_hand_payload([1.0, 3.0], b""), _hand_payload([3.0, 5.0], b"")]
    _write_hand_rec(tmp_path, records)
    dataset = RecordIODataset(tmp_path)
    assert dataset.labels.tolist() == [1, 1, 1, 1]
    import logging

    hyperface_log.clear()  # what reading logs, not opening
    assert [dataset.read_raw(i) for i in range(4)] == list(zip(images, [1, 0, 1, 1]))
    assert dataset.read_raw(3) == (images[3], 1)  # again: no second warning (a trainer reads it every epoch)
    warnings = [r.getMessage() for r in hyperface_log if r.levelno >= logging.WARNING and "own header" in r.getMessage()]
    assert len(warnings) == 2 and "image 1 is labelled 0 in its own header" in warnings[0]
    assert "image 3 is labelled 7 in its own header, outside the dataset's classes 0..1: using its identity record's class 1" in warnings[1]


def test_recordio_capacity_is_checked_before_writing(tmp_path):
    from hyperface.datasets.recordio import check_recordio_capacity

    check_recordio_capacity((1 << 24) - 1002, 1000)  # fits: images + identities + header < 2^24
    with pytest.raises(HyperfaceError, match="--format folder"):
        check_recordio_capacity((1 << 24) - 1001, 1000)


def test_overwrite_killed_between_renames_leaves_no_finished_looking_pair(tmp_path, monkeypatch):
    import os

    with RecordIOWriter(tmp_path) as writer:
        writer.add(_images(1, seed=1)[0], 0)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt  # killed before the new index lands
        real_replace(src, dst)

    writer = RecordIOWriter(tmp_path, overwrite=True)
    for image in _images(3, seed=2):
        writer.add(image, 1)
    monkeypatch.setattr("hyperface.datasets.recordio.os.replace", replace)
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    monkeypatch.undo()
    assert not (tmp_path / "train.idx").exists()  # the old index is gone: visibly incomplete
    with pytest.raises(HyperfaceError):
        RecordIODataset(tmp_path)


def test_contact_sheet_rows_and_tiles():
    from hyperface.datasets.preview import BACKGROUND, LABEL_WIDTH, contact_sheet, spread_rows

    assert spread_rows(100, 8)[0] == 0 and spread_rows(100, 8)[-1] == 99 and len(spread_rows(100, 8)) == 8
    assert spread_rows(3, 8) == [0, 1, 2] and spread_rows(0, 8) == []
    big = np.zeros((512, 512, 3), np.uint8)
    big[:, 256:] = 200  # left half dark, right half bright: survives the resize to 112
    small = np.full((112, 112, 3), 90, np.uint8)
    sheet = contact_sheet([("id 0", [big, small]), ("id 7\ncos 0.61", [small])], columns=3)
    assert sheet.shape == (2 * 112, LABEL_WIDTH + 3 * 112, 3)
    first = sheet[:111, LABEL_WIDTH : LABEL_WIDTH + 112]
    assert first[:, :50].max() == 0 and first[:, 62:].min() == 200
    assert (sheet[112:223, LABEL_WIDTH : LABEL_WIDTH + 112] == 90).all()
    assert (sheet[112:223, LABEL_WIDTH + 112 :] == np.array(BACKGROUND, np.uint8)).all()  # padded row
    with pytest.raises(HyperfaceError, match="RGB"):
        contact_sheet([("bad", [np.zeros((112, 112), np.uint8)])])
    # a wide photo keeps its aspect ratio (centred, letterboxed); None (unreadable) leaves its tile empty
    wide = np.full((50, 100, 3), 200, np.uint8)
    sheet = contact_sheet([("x", [None, wide])], columns=2)
    assert (sheet[:111, LABEL_WIDTH : LABEL_WIDTH + 112] == np.array(BACKGROUND, np.uint8)).all()
    tile = sheet[:, LABEL_WIDTH + 112 :]
    assert (tile[28:84] == 200).all() and (tile[:28] == np.array(BACKGROUND, np.uint8)).all()


def test_a_generate_output_folder_stands_for_its_dataset(tmp_path):
    from hyperface.common.io import prepare_output_dir
    from hyperface.datasets import resolve_generated
    from hyperface.recognition.images import open_image_source

    run = prepare_output_dir(tmp_path / "gen", stage="generate")
    with pytest.raises(HyperfaceError, match="without a finished dataset.*--resume"):
        open_dataset(run)
    images = np.zeros((2, 112, 112, 3), np.uint8)
    with ImageFolderWriter(run / "images") as writer:
        writer.add(images[0], 0)
        writer.add(images[1], 1)
    (run / "samples.jpg").write_bytes(encode_image(images[0]))  # the contact sheet is not a face
    assert resolve_generated(run) == run / "images"
    assert len(open_dataset(run)) == 2 and len(open_image_source(run)) == 2
    with RecordIOWriter(run / "rec") as writer:
        writer.add(images[0], 0)
    assert resolve_generated(run) == run / "rec" and len(open_dataset(run)) == 1  # RecordIO first
    plain = tmp_path / "plain"
    plain.mkdir()
    assert resolve_generated(plain) == plain  # other folders are what they are


def test_non_finite_labels_are_named_errors_not_crashes(tmp_path):
    from hyperface.datasets.recordio import read_idx

    with RecordIOWriter(tmp_path / "rec") as writer:
        for label in (0, 0, 1):
            writer.add(np.full((8, 8, 3), 40 * label, np.uint8), label)
    rec_path = tmp_path / "rec" / "train.rec"
    keys, offsets = read_idx(tmp_path / "rec" / "train.idx")
    offset_of = dict(zip(keys.tolist(), offsets.tolist()))
    original = rec_path.read_bytes()

    def with_label(key: int, value: float, at: int = 12) -> None:
        # after the 8-byte frame, header "IfQQ": its label at +12, a flag>0 label array after it at +32
        data = bytearray(original)
        data[offset_of[key] + at : offset_of[key] + at + 4] = struct.pack("<f", value)
        rec_path.write_bytes(bytes(data))

    with_label(2, float("nan"))  # an image record: reading it fails cleanly (training substitutes it)
    dataset = RecordIODataset(tmp_path / "rec")
    with pytest.raises(HyperfaceError, match="image 1 holds a non-finite label"):
        dataset[1]
    assert dataset[0][1] == 0 and dataset[2][1] == 1
    with_label(0, float("nan"), at=32)  # header record 0's (first identity, end): cannot be indexed
    with pytest.raises(HyperfaceError, match="header record 0 holds a non-finite label"):
        RecordIODataset(tmp_path / "rec")


def test_a_recordio_folder_without_its_index_is_named_as_such_by_embed(tmp_path):
    from hyperface.recognition.images import open_image_source

    with RecordIOWriter(tmp_path / "rec") as writer:
        writer.add(np.zeros((8, 8, 3), np.uint8), 0)
    (tmp_path / "rec" / "train.idx").unlink()
    with pytest.raises(HyperfaceError, match="RecordIO index .*train.idx is missing"):
        open_image_source(tmp_path / "rec")  # not "no images in folder"


def test_image_folder_fingerprint_follows_names_and_labels(tmp_path):
    import os

    image = np.zeros((8, 8, 3), np.uint8)
    for name in ("000000/a.png", "000001/b.png", "000001/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(encode_image(image, image_format="png"))
    before = ImageFolderDataset(tmp_path).fingerprint()
    assert ImageFolderDataset(tmp_path).fingerprint() == before
    (tmp_path / "000001" / "c.png").rename(tmp_path / "000001" / "d.png")
    assert ImageFolderDataset(tmp_path).fingerprint() != before  # another file name
    (tmp_path / "000001" / "d.png").rename(tmp_path / "000001" / os.fsdecode(b"\xe9.png"))  # not UTF-8
    assert len(ImageFolderDataset(tmp_path).fingerprint()) == 64


def test_a_resume_cuts_a_record_with_a_negative_label(tmp_path):
    images = _images(3, seed=11)
    writer = RecordIOWriter(tmp_path)
    writer.add(images[0], 0)
    writer.add(images[1], 1)
    writer.flush()
    with open(tmp_path / "train.rec.tmp", "ab") as rec, open(tmp_path / "train.idx.tmp", "a") as idx:
        offset = rec.tell()
        rec.write(frame_record(pack_payload(-1.0, encode_image(images[2]), id=3)))  # not a record this writer makes
        idx.write(f"3\t{offset}\n")
    resumed = RecordIOWriter(tmp_path, resume=True)
    assert resumed.label_counts == {0: 1, 1: 1} and resumed.num_images == 2
    resumed.close()
    assert RecordIODataset(tmp_path).labels.tolist() == [0, 1]


def _encoded_in_every_format(size: int = 64, seed: int = 9) -> dict[str, tuple[np.ndarray, bytes]]:
    """One image per extension of IMAGE_EXTENSIONS, as cv2.imencode writes it (PGM is grey), with
    the pixels it encodes. 64 px: OpenJPEG refuses to encode much smaller images."""
    import cv2

    from hyperface.datasets.codec import IMAGE_EXTENSIONS

    rng = np.random.default_rng(seed)
    out = {}
    for ext in IMAGE_EXTENSIONS:
        rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if ext == ".pgm":
            rgb[:] = rgb[..., :1]
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(ext, bgr[..., 0] if ext == ".pgm" else bgr)
        assert ok, ext
        out[ext] = (rgb, data.tobytes())
    return out


def test_every_image_extension_is_one_opencv_decodes_and_every_stage_lists_the_same():
    from hyperface.datasets import codec, image_folder
    from hyperface.datasets.codec import decode_image, image_encoding
    from hyperface.recognition import images

    assert images.IMAGE_EXTENSIONS is codec.IMAGE_EXTENSIONS and image_folder.IMAGE_EXTENSIONS is codec.IMAGE_EXTENSIONS
    lossless = {".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"}
    for ext, (rgb, data) in _encoded_in_every_format().items():
        decoded = decode_image(data, what=ext)  # OpenCV alone: the datasets' decoder
        assert decoded.shape == rgb.shape, ext
        if ext in lossless:
            np.testing.assert_array_equal(decoded, rgb, err_msg=ext)
        assert image_encoding(data) is not None, ext  # dataset info names its encoding


def test_an_image_folder_holds_the_files_embed_reads(tmp_path):
    """`embed` and the image-folder reader (report, train, dataset info) take the same files."""
    from hyperface.recognition.images import open_image_source

    files = _encoded_in_every_format()
    for k, (ext, (_rgb, data)) in enumerate(files.items()):
        folder = tmp_path / "data" / f"{k % 3:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:04d}{ext.upper() if k % 2 else ext}").write_bytes(data)
    (tmp_path / "data" / "000000" / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path / "data")
    source = open_image_source(tmp_path / "data")
    assert len(dataset) == len(files) and [source.name(i) for i in range(len(source))] == dataset.paths
    for i in range(len(dataset)):
        assert dataset[i][0].shape == (64, 64, 3), dataset.paths[i]


@pytest.mark.parametrize("stage, hint", [("train", "give the dataset it trained on"), ("pack", "hyperface generate"),
                                         ("embed", "hyperface report"), ("report", "the dataset the report describes")])
def test_another_stage_s_output_given_as_a_dataset_says_what_it_is(tmp_path, stage, hint):
    from hyperface.common.io import RUN_MARKER
    from hyperface.datasets import open_dataset

    marked, manifested = tmp_path / "marked", tmp_path / "manifested"
    for folder in (marked, manifested):
        (folder / "000000").mkdir(parents=True)  # would otherwise pass for an (empty) image folder
    (marked / RUN_MARKER).write_text(f"{stage}\n")
    (manifested / "manifest.json").write_text(json.dumps({"stage": stage}))
    for folder in (marked, manifested):
        with pytest.raises(HyperfaceError, match=f"is a `hyperface {stage}` output, not an image dataset: .*{hint}"):
            open_dataset(folder)
