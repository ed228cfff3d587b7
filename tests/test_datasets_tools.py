"""`hyperface dataset info` and `hyperface dataset convert`: facts, checks, conversions, resume."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError
from hyperface.datasets import ImageFolderDataset, RecordIODataset, RecordIOWriter, open_dataset
from hyperface.datasets.convert import ConvertConfig, convert_dataset
from hyperface.datasets.describe import describe_dataset
from hyperface.datasets.image_folder import ImageFolderWriter


def _image(seed: int, size: tuple[int, int] = (24, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three named identities (3, 2, 4 files): JPEG and PNG, one unreadable file, one image stored
    under two identities."""
    root = tmp_path / "src"
    layout = {"alice": ["a.jpg", "b.png", "c.jpg"], "bob": ["a.png", "b.jpg"], "carol": ["a.jpg", "b.jpg", "c.png", "d.jpg"]}
    seed = 0
    for name, files in layout.items():
        (root / name).mkdir(parents=True)
        for file in files:
            seed += 1
            ok, data = cv2.imencode(Path(file).suffix, _image(seed))
            (root / name / file).write_bytes(data.tobytes())
    (root / "carol" / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg")  # unreadable
    (root / "bob" / "c.jpg").write_bytes((root / "alice" / "a.jpg").read_bytes())  # alice's image, as bob
    return root


def _raw(reader) -> list[tuple[bytes, int]]:
    return [reader.read_raw(i) for i in range(len(reader))]


def test_folder_to_rec_and_folder_copies_bytes_and_leaves_out_unreadable_images(folder, tmp_path):
    out = tmp_path / "out"
    result = convert_dataset(folder, out, ConvertConfig(formats="both"), show_progress=False)
    source = ImageFolderDataset(folder)
    readable = [(source.read_raw(i)[0], int(source.labels[i])) for i in range(len(source)) if source.paths[i] != "carol/b.jpg"]
    assert (result.images, result.identities, result.rejected, result.copied) == (9, 3, 1, 9)
    assert _raw(RecordIODataset(out / "rec")) == readable  # byte for byte, in the source's order
    assert _raw(ImageFolderDataset(out / "images")) == readable
    assert sorted(p.name for p in (out / "images" / "000000").iterdir()) == ["0000.jpg", "0001.png", "0002.jpg"]
    assert (out / "classes.tsv").read_text().splitlines() == ["label\tsource\timages", "0\talice\t3", "1\tbob\t3", "2\tcarol\t3"]
    rejected = (out / "rejected.tsv").read_text().splitlines()
    assert rejected[0] == "source_index\timage\treason" and rejected[1].startswith("7\tcarol/b.jpg\t") and len(rejected) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "convert" and manifest["counts"]["images"] == 9 and manifest["counts"]["rejected"] == 1
    assert len(open_dataset(out)) == 9  # the output folder stands for its rec/, as train, embed and report read it


def test_a_sparse_rec_relabelled_to_a_folder_keeps_the_mapping(tmp_path):
    with RecordIOWriter(tmp_path / "sparse") as writer:
        for label, seed in ((0, 1), (0, 2), (5, 3), (9, 4), (9, 5)):
            writer.add(_image(seed), label)
    assert RecordIODataset(tmp_path / "sparse").num_classes == 10
    out = tmp_path / "dense"
    result = convert_dataset(tmp_path / "sparse" / "train.rec", out, ConvertConfig(formats="folder", relabel=True), show_progress=False)
    dense = ImageFolderDataset(out / "images")
    assert result.identities == 3 and dense.labels.tolist() == [0, 0, 1, 2, 2]
    assert [raw for raw, _ in _raw(dense)] == [raw for raw, _ in _raw(RecordIODataset(tmp_path / "sparse"))]
    assert (out / "classes.tsv").read_text().splitlines()[1:] == ["0\t0\t2", "1\t5\t1", "2\t9\t2"]
    assert not (out / "rejected.tsv").exists()  # written with the first reject only


def test_a_subset_re_encoded_as_png_keeps_the_pixels(folder, tmp_path):
    out = tmp_path / "sub"
    config = ConvertConfig(formats="rec", image_format="png", identities=2, images_per_identity=2)
    result = convert_dataset(folder, out, config, show_progress=False)
    converted, source = RecordIODataset(out / "rec"), ImageFolderDataset(folder)
    assert result.images == 4 and converted.num_classes == 2 and result.copied == 0
    expected = [source[i] for i in (0, 1, 3, 4)]  # alice a, b; bob a, b
    for (image, label), (want, want_label) in zip((converted[i] for i in range(4)), expected):
        assert label == want_label and np.array_equal(image, want)
    assert all(raw[:8] == b"\x89PNG\r\n\x1a\n" for raw, _ in _raw(converted))


@pytest.mark.parametrize("kill_after", [2, 5, 8])
@pytest.mark.parametrize("formats", ["rec", "both"])
def test_a_killed_conversion_resumes_to_the_same_files(folder, tmp_path, monkeypatch, kill_after, formats):
    """Killed after n images (before and after the unreadable one): --resume ends byte for byte where
    an uninterrupted run does, no image lost or written twice."""
    config = ConvertConfig(formats=formats, workers=2)
    convert_dataset(folder, tmp_path / "whole", config, show_progress=False)

    calls = {"n": 0}
    real_add = RecordIOWriter.add if formats == "rec" else ImageFolderWriter.add

    def dying_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > kill_after:
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    target = RecordIOWriter if formats == "rec" else ImageFolderWriter
    monkeypatch.setattr(target, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(folder, tmp_path / "cut", config, show_progress=False)
    monkeypatch.setattr(target, "add", real_add)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(HyperfaceError, match="--resume"):
        convert_dataset(folder, tmp_path / "cut", config, show_progress=False)
    with pytest.raises(HyperfaceError, match="other settings"):
        convert_dataset(folder, tmp_path / "cut", ConvertConfig(formats=formats, relabel=True), resume=True, show_progress=False)
    result = convert_dataset(folder, tmp_path / "cut", config, resume=True, show_progress=False)
    assert result.images == 9 and result.written == 9 - kill_after  # only what the kill left
    for name in ("rec/train.rec", "rec/train.idx", "rec/property", "classes.tsv", "rejected.tsv"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    if formats == "both":
        files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole" / "images").rglob("*.*"))
        assert files == sorted(p.relative_to(tmp_path / "cut") for p in (tmp_path / "cut" / "images").rglob("*.*"))
        assert all((tmp_path / "cut" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes() for f in files)
    again = convert_dataset(folder, tmp_path / "cut", config, resume=True, show_progress=False)
    assert again.written == 0 and again.images == 9  # finished: nothing to do


def test_info_counts_identities_sizes_unreadable_and_shared_images(folder):
    facts = describe_dataset(folder, check=True, workers=2)
    assert (facts["format"], facts["images"], facts["identities"]) == ("folder", 10, 3)
    assert facts["images_per_identity"] == {"min": 3, "median": 3.0, "mean": 3.333, "max": 4}
    assert facts["sample"]["encodings"] == {"jpeg": 7, "png": 3}
    assert facts["sample"]["sizes"] == {"20x24": 9, "unreadable": 1}
    check = facts["check"]
    assert check["unreadable"] == 1 and check["unreadable_examples"][0]["image"] == "carol/b.jpg"
    assert check["duplicate_images"] == 1 and check["duplicate_groups_across_identities"] == 1
    assert [m["image"] for m in check["duplicate_examples"][0]] == ["alice/a.jpg", "bob/c.jpg"]


def test_cli_info_json_preview_and_convert(folder, tmp_path, capsys):
    preview = tmp_path / "preview.jpg"
    assert main(["dataset", "info", str(folder), "--json", "--preview", str(preview)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["identities"] == 3 and "check" not in facts
    sheet = cv2.imread(str(preview))
    assert sheet is not None and sheet.shape[0] == 3 * 112  # one row per identity (3 < 8)
    out = tmp_path / "rec"
    assert main(["dataset", "convert", str(folder), "--out", str(out), "--no-progress"]) == 0
    assert len(RecordIODataset(out / "rec")) == 9
    assert main(["dataset", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recordio (insightface layout)" in text and "images      9" in text
    assert "made by       hyperface convert (" in text  # from the output folder's manifest


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quality", "0"], "--quality must be in 1..100"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--identities", "0"], "--identities must be at least 1"),
        (["--identities", "7"], "has 3 identities"),
    ],
)
def test_cli_convert_refuses_bad_options_in_one_line(folder, tmp_path, capsys, args, message):
    assert main(["dataset", "convert", str(folder), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_missing_source_is_one_line(tmp_path, capsys):
    assert main(["dataset", "info", str(tmp_path / "nowhere")]) == 2
    assert "dataset not found" in capsys.readouterr().err


def test_a_torn_rejected_line_is_cut_before_more_are_appended(tmp_path):
    from hyperface.datasets.convert import _read_rejected

    path = tmp_path / "rejected.tsv"
    path.write_bytes(b"source_index\timage\treason\n3\ta.jpg\tbad\n1")  # killed while writing "12\t..."
    assert _read_rejected(path) == {3}
    assert path.read_bytes() == b"source_index\timage\treason\n3\ta.jpg\tbad\n"


def test_an_output_overlapping_the_source_is_refused(folder, tmp_path):
    convert_dataset(folder, tmp_path / "c", show_progress=False)
    for source, out in ((tmp_path / "c", tmp_path / "c"), (folder, folder / "rec"), (tmp_path / "c" / "rec", tmp_path / "c")):
        with pytest.raises(HyperfaceError, match="overlap"):
            convert_dataset(source, out, overwrite=True, show_progress=False)
    assert len(open_dataset(tmp_path / "c")) == 9  # untouched


def test_check_groups_every_copy_and_lists_label_noise_first(tmp_path):
    a, b, c = (cv2.imencode(".png", _image(seed))[1].tobytes() for seed in (1, 2, 3))
    with RecordIOWriter(tmp_path / "rec") as writer:
        for data, label in ((c, 0), (a, 0), (a, 0), (c, 0), (b, 1), (a, 2)):
            writer.add(data, label)
    check = describe_dataset(tmp_path / "rec", check=True, workers=1)["check"]
    assert check["duplicate_images"] == 3 and check["duplicate_groups_across_identities"] == 1
    groups = [[(m["image"], m["label"]) for m in group] for group in check["duplicate_examples"]]
    assert groups == [[("train.rec#1", 0), ("train.rec#2", 0), ("train.rec#5", 2)], [("train.rec#0", 0), ("train.rec#3", 0)]]


# --- from a bad-input audit -------------------------------------------------------------------------


def test_a_kill_between_the_final_renames_is_completed_by_resume(folder, tmp_path):
    out = tmp_path / "out"
    convert_dataset(folder, out, show_progress=False)
    whole = {name: (out / "rec" / name).read_bytes() for name in ("train.rec", "train.idx", "property")}
    # the state a kill inside RecordIOWriter.close leaves: train.rec renamed, its index not yet
    (out / "rec" / "train.idx").rename(out / "rec" / "train.idx.tmp")
    (out / "manifest.json").unlink()
    convert_dataset(folder, out, resume=True, show_progress=False)
    assert {name: (out / "rec" / name).read_bytes() for name in whole} == whole
    assert len(open_dataset(out)) == 9


def test_labels_without_images_stay_aligned_in_every_format(folder, tmp_path):
    (folder / "dave").mkdir()  # a trailing identity without images
    (folder / "dave" / "notes.txt").write_text("no faces yet")
    convert_dataset(folder, tmp_path / "o", ConvertConfig(formats="both"), show_progress=False)
    rec, images = RecordIODataset(tmp_path / "o" / "rec"), ImageFolderDataset(tmp_path / "o" / "images")
    assert rec.num_classes == images.num_classes == 4 and rec.labels.tolist() == images.labels.tolist()
    assert (tmp_path / "o" / "rec" / "property").read_text().split(",")[0] == "4"
    with RecordIOWriter(tmp_path / "sparse") as writer:
        for label, seed in ((0, 1), (5, 2), (9, 3)):
            writer.add(_image(seed), label)
    convert_dataset(tmp_path / "sparse", tmp_path / "s", ConvertConfig(formats="folder"), show_progress=False)
    assert ImageFolderDataset(tmp_path / "s" / "images").labels.tolist() == [0, 5, 9]  # empty folders keep the numbers


def test_class_names_are_escaped_and_subset_rejects_name_the_source_index(folder, tmp_path):
    (folder / "carol").rename(folder / "carol\tsmith")
    convert_dataset(folder, tmp_path / "o", ConvertConfig(identities=3, images_per_identity=2), show_progress=False)
    classes = (tmp_path / "o" / "classes.tsv").read_text().splitlines()
    assert classes[3] == "2\tcarol\\tsmith\t1" and len(classes) == 4
    rejected = (tmp_path / "o" / "rejected.tsv").read_text().splitlines()[1]
    assert rejected.startswith("7\tcarol\\tsmith/b.jpg\t")  # the source's index, not the subset's position (4)


def test_no_verify_copies_bytes_even_when_the_first_image_is_unreadable(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "0.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage")
    (tmp_path / "src" / "a" / "1.png").write_bytes(cv2.imencode(".png", _image(1, (30, 40)))[1].tobytes())
    result = convert_dataset(tmp_path / "src", tmp_path / "o", ConvertConfig(verify=False), show_progress=False)
    assert result.images == 2 and result.rejected == 0  # not decoded: copied as given
    assert (tmp_path / "o" / "rec" / "property").read_text().strip() == "1,30,40"  # size from the readable one's header


def test_damaged_files_are_one_clear_error(folder, tmp_path):
    out = tmp_path / "o"
    convert_dataset(folder, out, show_progress=False)
    (out / "manifest.json").write_text('{"stage": "convert", "counts": 5}')
    with pytest.raises(HyperfaceError, match="manifest.json is damaged"):
        convert_dataset(folder, out, resume=True, show_progress=False)
    (out / "rec" / "property").write_text("1000000000000,16,16\n")
    with pytest.raises(HyperfaceError, match="more than RecordIO's float32 labels can number"):
        RecordIODataset(out / "rec")
    (out / "rec" / "property").write_text("3,0,16\n")
    with pytest.raises(HyperfaceError, match="positive numbers"):
        RecordIODataset(out / "rec")


def test_info_counts_a_damaged_record_as_unreadable(tmp_path):
    with RecordIOWriter(tmp_path / "rec") as writer:
        for seed in range(4):
            writer.add(_image(seed), 0)
    dataset = RecordIODataset(tmp_path / "rec")
    offset = int(dataset._offsets[2])
    data = bytearray((tmp_path / "rec" / "train.rec").read_bytes())
    data[offset : offset + 4] = b"XXXX"  # record 2's magic word
    (tmp_path / "rec" / "train.rec").write_bytes(bytes(data))
    facts = describe_dataset(tmp_path / "rec", check=True, workers=1)
    assert facts["check"]["unreadable"] == 1 and facts["check"]["unreadable_examples"][0]["image"] == "train.rec#2"


def test_preview_must_be_a_jpeg_outside_the_dataset(folder, tmp_path, capsys):
    before = (folder / "alice" / "a.jpg").read_bytes()
    assert main(["dataset", "info", str(folder), "--preview", str(folder / "alice" / "a.jpg")]) == 2
    assert "inside the dataset" in capsys.readouterr().err and (folder / "alice" / "a.jpg").read_bytes() == before
    assert main(["dataset", "info", str(folder), "--preview", str(tmp_path / "p.png")]) == 2
    assert "give a .jpg path" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_a_stray_rec_file_does_not_turn_an_image_folder_into_recordio(folder):
    (folder / "notes.rec").write_text("not a dataset")
    assert isinstance(open_dataset(folder), ImageFolderDataset)


def test_several_sources_are_concatenated_with_shifted_labels(folder, tmp_path):
    with RecordIOWriter(tmp_path / "second") as writer:
        for label, seed in ((0, 11), (0, 12), (1, 13)):
            writer.add(_image(seed), label)
    out = tmp_path / "mixed"
    result = convert_dataset([folder, tmp_path / "second" / "train.rec", tmp_path / "second"], out,
                             ConvertConfig(formats="both"), show_progress=False)
    assert (result.images, result.identities, result.rejected) == (9 + 3 + 3, 3 + 2 + 2, 1)
    mixed = RecordIODataset(out / "rec")
    second = _raw(RecordIODataset(tmp_path / "second"))
    assert _raw(mixed)[9:12] == [(raw, label + 3) for raw, label in second]  # after the first set's 3 identities
    assert _raw(mixed)[12:] == [(raw, label + 5) for raw, label in second]
    classes = (out / "classes.tsv").read_text().splitlines()[1:]
    assert classes == ["0\tsrc/alice\t3", "1\tsrc/bob\t3", "2\tsrc/carol\t3", "3\ttrain.rec/0\t2", "4\ttrain.rec/1\t1",
                       "5\tsecond/0\t2", "6\tsecond/1\t1"]
    assert (out / "rejected.tsv").read_text().splitlines()[1].startswith("7\tsrc/carol/b.jpg\t")
    assert json.loads((out / "manifest.json").read_text())["source"]["parts"][1]["first_label"] == 3
    with pytest.raises(HyperfaceError, match="other settings|has changed"):
        convert_dataset([tmp_path / "second", folder], out, ConvertConfig(formats="both"), resume=True, show_progress=False)


# --- from a code review -----------------------------------------------------------------------------


def test_both_outputs_store_the_same_bytes_encoded_once(folder, tmp_path, monkeypatch):
    import hyperface.datasets.convert as convert_module

    calls = []
    real_encode = convert_module.encode_image
    monkeypatch.setattr(convert_module, "encode_image", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    convert_dataset(folder, tmp_path / "o", ConvertConfig(formats="both", image_format="png", workers=2), show_progress=False)
    assert len(calls) == 9  # one encode an image, not one a format
    assert _raw(RecordIODataset(tmp_path / "o" / "rec")) == _raw(ImageFolderDataset(tmp_path / "o" / "images"))


def test_image_size_of_reads_the_header_as_decoding_turns_it():
    import io

    from PIL import Image

    from hyperface.datasets.codec import decode_image, image_size_of

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(buffer, "JPEG", exif=exif)
    assert image_size_of(buffer.getvalue()) == decode_image(buffer.getvalue()).shape[:2] == (40, 20)
    assert image_size_of(b"\xff\xd8\xffjunk") is None


def test_index_digits_keep_long_identities_in_order(tmp_path):
    writer = ImageFolderWriter(tmp_path / "f", index_digits=5)
    writer.add(_image(1), 0, index=9999)
    writer.add(_image(2), 0, index=10000)
    assert [p.name for p in writer.existing(0)] == ["09999.jpg", "10000.jpg"]


def test_info_prints_names_that_are_not_utf8_as_their_bytes(tmp_path):
    import os
    import subprocess
    import sys

    odd = tmp_path / "src" / os.fsdecode(b"\xffodd")
    odd.mkdir(parents=True)
    (odd / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "src" / "b").mkdir()
    (tmp_path / "src" / "b" / "a.png").write_bytes(cv2.imencode(".png", _image(1))[1].tobytes())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "hyperface", "dataset", "info", str(tmp_path / "src"), "--check"],
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"\xffodd/a.png" in done.stdout and b"class folders b .. \xffodd" in done.stdout


@pytest.mark.parametrize("formats", ["rec", "both"])
def test_a_hard_kill_resumes_to_the_same_files(folder, tmp_path, formats):
    """os._exit mid-run (no exception handler, no suspend): what a SIGKILL leaves behind."""
    import os
    import subprocess
    import sys

    config = ConvertConfig(formats=formats)
    convert_dataset(folder, tmp_path / "whole", config, show_progress=False)
    script = f"""
import os
from hyperface.datasets import ImageFolderWriter, RecordIOWriter
from hyperface.datasets.convert import ConvertConfig, convert_dataset
target = {"RecordIOWriter" if formats == "rec" else "ImageFolderWriter"}
real, calls = target.add, []
def add(self, *args, **kwargs):
    calls.append(1)
    result = real(self, *args, **kwargs)
    if len(calls) == 5:
        os._exit(9)
    return result
target.add = add
convert_dataset({str(folder)!r}, {str(tmp_path / "cut")!r}, ConvertConfig(formats={formats!r}), show_progress=False)
"""
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=120)
    assert done.returncode == 9, done.stderr.decode()[-2000:]
    result = convert_dataset(folder, tmp_path / "cut", config, resume=True, show_progress=False)
    assert result.images == 9 and result.written == 4
    for name in ("rec/train.rec", "rec/train.idx", "rec/property", "classes.tsv", "rejected.tsv"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_outputs_beside_a_rec_file_are_fine_and_its_own_files_are_not(tmp_path):
    from hyperface.datasets import check_outside_datasets

    with RecordIOWriter(tmp_path / "data") as writer:
        writer.add(_image(1), 0)
    rec = tmp_path / "data" / "train.rec"
    check_outside_datasets(tmp_path / "data" / "dense", [rec], folder=True)  # beside the file: fine
    check_outside_datasets(tmp_path / "data" / "pairs.bin", [rec])
    for out, folder in ((tmp_path / "data" / "train.idx", False), (tmp_path / "data" / "property", False), (tmp_path, True)):
        with pytest.raises(HyperfaceError, match="inside the dataset|overlap"):
            check_outside_datasets(out, [rec], folder=folder)
    with pytest.raises(HyperfaceError, match="overlap"):  # the folder given: anything in it
        check_outside_datasets(tmp_path / "data" / "dense", [tmp_path / "data"], folder=True)
    result = convert_dataset(rec, tmp_path / "data" / "dense", ConvertConfig(relabel=True), show_progress=False)
    assert result.images == 1


def test_mixed_image_sizes_are_warned_about(folder, tmp_path, hyperface_log):
    import logging

    with RecordIOWriter(tmp_path / "big") as writer:
        writer.add(_image(5, (48, 40)), 0)
    hyperface_log.clear()
    convert_dataset([folder, tmp_path / "big"], tmp_path / "o", show_progress=False)
    messages = [r.getMessage() for r in hyperface_log if r.levelno >= logging.WARNING]
    assert any("the images come in 2 sizes (20x24, 40x48)" in m for m in messages)


def _damaged_jpeg(seed: int = 7) -> bytes:
    """A JPEG whose entropy-coded data is scrambled mid-way: OpenCV still decodes it (libjpeg warns)."""
    ok, encoded = cv2.imencode(".jpg", np.kron(_image(seed, (12, 10)), np.ones((8, 8, 1), dtype=np.uint8)))
    data = bytearray(encoded.tobytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0x5A
    return bytes(data)


def test_a_damaged_jpeg_that_still_decodes_is_found_by_check_and_left_out_by_convert(folder, tmp_path):
    from PIL import Image

    from hyperface.datasets.codec import decode_image, jpeg_damage

    damaged = _damaged_jpeg()
    assert decode_image(damaged).shape == (96, 80, 3)  # what training's reader sees: an image
    assert "Corrupt JPEG data" in jpeg_damage(damaged)
    with pytest.raises(HyperfaceError, match="damaged JPEG"):
        decode_image(damaged, what="x.jpg", strict=True)
    clean = _image(3, (40, 32))
    for mode, options in (("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})):
        buffer = __import__("io").BytesIO()
        Image.fromarray(clean).convert(mode).save(buffer, "JPEG", **options)
        assert jpeg_damage(buffer.getvalue()) is None, (mode, options)
        assert decode_image(buffer.getvalue(), strict=True).shape == (40, 32, 3)

    (folder / "alice" / "c.jpg").write_bytes(damaged)
    check = describe_dataset(folder, check=True, workers=2)["check"]
    assert check["unreadable"] == 2
    assert {e["image"]: "damaged JPEG" in e["reason"] for e in check["unreadable_examples"]} == {"alice/c.jpg": True, "carol/b.jpg": False}
    result = convert_dataset(folder, tmp_path / "out", ConvertConfig(), show_progress=False)
    rejected = (tmp_path / "out" / "rejected.tsv").read_text().splitlines()[1:]
    assert result.rejected == 2 and [line.split("\t")[1] for line in rejected] == ["alice/c.jpg", "carol/b.jpg"]
    unchecked = convert_dataset(folder, tmp_path / "raw", ConvertConfig(verify=False), show_progress=False)
    assert unchecked.rejected == 0 and damaged in [data for data, _ in _raw(open_dataset(tmp_path / "raw"))]


def test_the_strict_check_never_unpacks_an_image_over_the_pixel_limit(monkeypatch):
    import simplejpeg

    from hyperface.datasets.codec import jpeg_damage

    damaged = _damaged_jpeg()
    assert jpeg_damage(damaged) is not None
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", str(96 * 80 - 1))  # this 96 x 80 image is now "too large"

    def unpacked(*args, **kwargs):
        raise AssertionError("decoded past the pixel limit")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", unpacked)
    assert jpeg_damage(damaged) is None  # left to OpenCV's decode, which refuses it by its header


def test_tiff_and_gif_sources_are_re_encoded_for_recordio_and_come_back(tmp_path):
    """RecordIO readers (insightface's) decode JPEG/PNG: other formats are encoded again, never copied."""
    from hyperface.datasets.codec import decode_image, image_encoding

    root = tmp_path / "src"
    smooth = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8)  # JPEG keeps it within a few levels
    blocks = np.kron(np.array([[[255, 0, 0], [0, 0, 255]], [[0, 255, 0], [255, 255, 255]]], np.uint8), np.ones((16, 16, 1), np.uint8))
    sources = {"000000/a.tif": smooth, "000000/b.png": _image(1, (32, 32)), "000001/a.gif": blocks}  # a GIF has 256 colours
    for name, rgb in sources.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(Path(name).suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        (root / name).write_bytes(data.tobytes())
    result = convert_dataset(root, tmp_path / "rec", show_progress=False)
    assert (result.images, result.rejected, result.copied) == (3, 0, 1)  # only the PNG's bytes copied
    rec = RecordIODataset(tmp_path / "rec" / "rec")
    assert [image_encoding(rec.read_raw(i)[0]) for i in range(3)] == ["JPEG", "PNG", "JPEG"]
    assert rec.read_raw(1)[0] == (root / "000000" / "b.png").read_bytes()
    back = convert_dataset(tmp_path / "rec", tmp_path / "back", ConvertConfig(formats="folder"), show_progress=False)
    folder = ImageFolderDataset(tmp_path / "back" / "images")
    assert back.images == 3 and folder.paths == ["000000/0000.jpg", "000000/0001.png", "000001/0000.jpg"]
    assert folder.labels.tolist() == [0, 0, 1]
    for i, name in enumerate(sources):  # the pixels the source file holds (a GIF's palette quantises)
        assert np.abs(folder[i][0].astype(np.int16) - decode_image((root / name).read_bytes())).mean() < 6, name
        assert folder.read_raw(i)[0] == rec.read_raw(i)[0]  # the rec's JPEG/PNG bytes copied back
