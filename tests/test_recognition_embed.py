"""`hyperface embed` end to end through hyperface.cli.main: sources, modes, bad inputs, resume."""

from __future__ import annotations

import json

import cv2
import os

import numpy as np
import pytest
from PIL import Image
from recognition_fixtures import (
    expected_face,
    export_onnx,
    grey_image,
    make_scrfd_onnx,
    make_tiny_iresnet,
    plant_face,
    random_faces,
    save_backbone,
)

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError
from hyperface.recognition import load_recognizer
from hyperface.recognition.alignment import align_face, crop_ffhq
from hyperface.recognition.embed import GalleryPaths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_models")
    model = make_tiny_iresnet(seed=5)
    return {
        "pth": save_backbone(model, root / "backbone.pth"),
        "onnx": export_onnx(model, root / "w600k_tiny.onnx"),
        "det": make_scrfd_onnx(root / "det_10g.onnx", input_size=160),
    }


def _write(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def _read_lines(path):
    return path.read_text().splitlines()


def _embed(*args):
    return main(["embed", *map(str, args), "--no-progress", "--device", "cpu"])


def test_embed_aligned_folder_with_bad_files(tmp_path, models, capsys):
    faces = random_faces(6, seed=21)
    src = tmp_path / "faces"
    _write(src / "b" / "002.png", faces[2])
    _write(src / "a" / "000.jpg", faces[0])
    _write(src / "a" / "001.png", faces[1])
    Image.fromarray(faces[3]).convert("L").save(src / "c_grey.png")
    Image.fromarray(faces[4]).convert("RGBA").save(src / "d_rgba.png")
    Image.fromarray(cv2.resize(faces[5], (224, 224))).save(src / "e_224.webp", lossless=True)
    cv2.imwrite(str(src / "d_16bit.png"), faces[1][..., ::-1].astype(np.uint16) * 257)
    Image.fromarray(faces[2]).convert("P").save(src / "d_palette.png")
    (src / "f_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (src / "g_empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    Image.fromarray(faces[0][:, :60]).save(src / "h_not_square.png")
    out = tmp_path / "run" / "gallery.npy"

    assert _embed(src, "--model", models["pth"], "--aligned", "--out", out, "--batch-size", "2", "--workers", "3") == 0
    gallery = np.load(out)
    index = _read_lines(tmp_path / "run" / "gallery.index.txt")
    rejected = _read_lines(tmp_path / "run" / "gallery.rejected.tsv")
    assert index == ["a/000.jpg", "a/001.png", "b/002.png", "c_grey.png", "d_16bit.png", "d_palette.png", "d_rgba.png", "e_224.webp"]
    assert gallery.shape == (8, 512) and gallery.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    assert rejected[0] == "path\treason"
    reasons = dict(line.split("\t") for line in rejected[1:])
    assert set(reasons) == {"f_corrupt.jpg", "g_empty.png", "h_not_square.png"}
    assert reasons["g_empty.png"] == "unreadable: empty file"
    assert reasons["f_corrupt.jpg"].startswith("unreadable: not a readable image (JPEG header but corrupt")
    assert reasons["h_not_square.png"].startswith("not an aligned square crop")

    # Rows are the embeddings of exactly those files (lossless ones compared directly).
    rec = load_recognizer(models["pth"])
    np.testing.assert_allclose(gallery[1:3], rec.embed(faces[1:3]), atol=1e-5)
    grey = np.repeat(np.asarray(Image.fromarray(faces[3]).convert("L"))[..., None], 3, axis=2)
    np.testing.assert_allclose(gallery[3], rec.embed(grey)[0], atol=1e-5)
    np.testing.assert_allclose(gallery[4], gallery[1], atol=1e-5)  # 16-bit PNG: same pixels >> 8
    np.testing.assert_allclose(gallery[6], rec.embed(faces[4:5])[0], atol=1e-5)

    assert not (tmp_path / "run" / "manifest.json").exists()  # --out g.npy: the manifest is g's own
    manifest = json.loads((tmp_path / "run" / "gallery.manifest.json").read_text())
    assert manifest["stage"] == "embed" and manifest["status"] == "complete"
    assert manifest["counts"] == {
        "inputs": 11, "embedded": 8, "rejected": 3, "embedding_size": 512,
        "rejected_reasons": manifest["counts"]["rejected_reasons"],
    }
    assert manifest["recognizer"]["normalisation"] == "(x - 127.5) / 127.5"
    assert manifest["recognizer"]["channel_order"] == "RGB"
    assert manifest["source"]["ignored_non_images"] == 1
    assert "sha256" in manifest["inputs"]["model"]
    assert not (tmp_path / "run" / "gallery.parts").exists()

    # A second run into the same place is refused without --resume/--overwrite.
    assert _embed(src, "--model", models["pth"], "--aligned", "--out", out) == 2
    assert "--resume" in capsys.readouterr().err
    assert _embed(src, "--model", models["onnx"], "--aligned", "--out", out, "--overwrite") == 0
    np.testing.assert_allclose(np.load(out), gallery, atol=2e-4)  # ONNX and PyTorch agree end to end


def test_embed_with_detector_and_list_file(tmp_path, models):
    src = tmp_path / "photos"
    with_face = grey_image(240, 320)
    plant_face(with_face, 16, row=3, col=4, scale=0.5)
    _write(src / "face.png", with_face)
    other_face = grey_image(240, 320)
    plant_face(other_face, 16, row=5, col=2, scale=0.5)
    _write(src / "other.png", other_face)
    _write(src / "empty_scene.png", grey_image(240, 320))
    listing = tmp_path / "list.txt"
    listing.write_text("# photos\nphotos/face.png\n\nphotos/missing.jpg\nphotos/other.png\nphotos/empty_scene.png\n")
    out = tmp_path / "det"
    assert _embed(listing, "--model", models["onnx"], "--detector", models["det"], "--out", out, "--flip") == 0
    assert _read_lines(out / "gallery.index.txt") == ["photos/face.png", "photos/other.png"]
    rejected = _read_lines(out / "gallery.rejected.tsv")[1:]
    assert rejected == ["photos/missing.jpg\tunreadable: file not found", "photos/empty_scene.png\tno face detected"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocess"]["mode"] == "detect" and manifest["recognizer"]["flip"] is True
    assert "norm_crop" in manifest["preprocess"]["alignment"]  # a resume of a run aligned otherwise is refused
    # the embedding is the flip-fused one of the face aligned from the planted landmarks
    _, landmarks = expected_face(16, 3, 4, scale=0.5)
    expected = load_recognizer(models["onnx"], flip=True).embed(align_face(with_face, landmarks)[None])
    np.testing.assert_allclose(np.load(out / "gallery.npy")[:1], expected, atol=2e-4)
    # the detected landmarks, row for row (two faces in one batch), in each photo's pixels
    _, other_landmarks = expected_face(16, 5, 2, scale=0.5)
    np.testing.assert_allclose(np.load(out / "gallery.landmarks.npy"), np.stack([landmarks, other_landmarks]), atol=1e-3)
    assert manifest["outputs"]["landmarks"] == "gallery.landmarks.npy"


def test_embed_ffhq_crop(tmp_path, models):
    images = random_faces(3, seed=4, size=256)
    for i, image in enumerate(images):
        _write(tmp_path / "gen" / f"{i:05d}.png", image)
    out = tmp_path / "g.npy"
    assert _embed(tmp_path / "gen", "--model", models["onnx"], "--crop", "ffhq", "--out", out) == 0
    rec = load_recognizer(models["onnx"])
    expected = rec.embed(np.stack([crop_ffhq(image) for image in images]))
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_embed_clear_errors(tmp_path, models, capsys):
    (tmp_path / "empty").mkdir()
    assert _embed(tmp_path / "empty", "--model", models["pth"], "--aligned", "--out", tmp_path / "o.npy") == 2
    assert "no images in folder" in capsys.readouterr().err
    _write(tmp_path / "one" / "x.png", random_faces(1)[0])
    assert _embed(tmp_path / "one", "--model", tmp_path / "glintr100.onnx", "--aligned", "--out", tmp_path / "o.npy") == 2
    err = capsys.readouterr().err
    assert "glintr100.onnx" in err and "antelopev2" in err and "Traceback" not in err
    assert _embed(tmp_path / "one", "--model", models["pth"], "--out", tmp_path / "o.npy") == 2
    assert "--detector" in capsys.readouterr().err
    # numeric options are refused by name, before any model is loaded (the model path here does not exist)
    for flag, value, rule in (("--chunk-size", "0", "at least 1"), ("--batch-size", "0", "at least 1"),
                              ("--det-threshold", "2", "a score in [0, 1]"), ("--det-size", "-1", "a positive multiple of 32")):
        assert _embed(tmp_path / "one", "--model", tmp_path / "none.onnx", "--aligned", flag, value, "--out", tmp_path / "o.npy") == 2
        err = capsys.readouterr().err
        assert f"{flag} must be {rule}" in err and "none.onnx" not in err
    (tmp_path / "afile").write_text("x")  # an --out that cannot be written: refused before the model loads
    assert _embed(tmp_path / "one", "--model", tmp_path / "none.onnx", "--aligned", "--out", tmp_path / "afile" / "g.npy") == 2
    err = capsys.readouterr().err
    assert "afile is a file, not a folder" in err and "none.onnx" not in err
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "manifest.json").write_text('{"stage": "pack"}')
    assert _embed(tmp_path / "one", "--model", models["pth"], "--aligned", "--out", tmp_path / "packed", "--overwrite") == 2
    assert "belongs to another run (pack)" in capsys.readouterr().err
    assert json.loads((tmp_path / "packed" / "manifest.json").read_text()) == {"stage": "pack"}
    # a damaged manifest: whose it is cannot be told, so nothing beside it is touched, and the error says what to do
    (tmp_path / "packed" / "manifest.json").write_text('{"stage": "emb')
    assert _embed(tmp_path / "one", "--model", models["pth"], "--aligned", "--out", tmp_path / "packed", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "manifest.json is damaged: not valid JSON" in err and "delete it and run again with --overwrite" in err
    assert (tmp_path / "packed" / "manifest.json").read_text() == '{"stage": "emb'
    # every input rejected: the list is still written, and the run fails loudly
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"junk")
    assert _embed(tmp_path / "bad", "--model", models["pth"], "--aligned", "--out", tmp_path / "b" / "g.npy") == 2
    assert "no image could be embedded" in capsys.readouterr().err
    assert len(_read_lines(tmp_path / "b" / "g.rejected.tsv")) == 2


def test_embed_resumes_after_kill(tmp_path, models, monkeypatch, capsys):
    faces = random_faces(7, seed=8)
    for i, face in enumerate(faces):
        _write(tmp_path / "src" / f"{i}.png", face)
    _write(tmp_path / "src" / "zz_corrupt.png", grey_image(4, 4))  # too small: rejected
    model = tmp_path / "model.pth"
    model.write_bytes(models["pth"].read_bytes())
    args = [tmp_path / "src", "--model", model, "--aligned", "--chunk-size", "3", "--batch-size", "2"]

    assert _embed(*args, "--out", tmp_path / "clean" / "g.npy") == 0

    from hyperface.recognition.recognizers import Recognizer

    original = Recognizer.embed_valid
    calls = {"n": 0}

    def dying_embed(self, images):
        calls["n"] += 1
        if calls["n"] == 3:  # chunk 0 = 2 batches, chunk 1 dies in its first batch
            raise KeyboardInterrupt
        return original(self, images)

    monkeypatch.setattr(Recognizer, "embed_valid", dying_embed)
    out = tmp_path / "killed" / "g.npy"
    assert _embed(*args, "--out", out) == 130
    assert "rerun with --resume to continue" in capsys.readouterr().err
    parts = tmp_path / "killed" / "g.parts"
    assert sorted(p.name for p in parts.glob("chunk_*.npz")) == ["chunk_000000.npz"]
    assert not out.exists() and not (tmp_path / "killed" / "g.manifest.json").exists()
    assert _embed(*args, "--out", out) == 2  # refuses to mix runs without --resume
    capsys.readouterr()
    assert _embed(*args, "--flip", "--out", out, "--resume") == 2  # other settings: refuses to resume
    err = capsys.readouterr().err
    assert "other settings (recognizer.flip False -> True)" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "src" / "6.png").rename(tmp_path / "src" / "6b.png")  # the same count, other names: refused
    assert _embed(*args, "--out", out, "--resume") == 2
    assert "other images" in capsys.readouterr().err
    (tmp_path / "src" / "6b.png").rename(tmp_path / "src" / "6.png")
    save_backbone(make_tiny_iresnet(seed=6), model)  # another model at the same path: not resumed into the run
    assert _embed(*args, "--out", out, "--resume") == 2
    assert "recognizer.sha256" in capsys.readouterr().err
    model.write_bytes(models["pth"].read_bytes())

    def counting_embed(self, images):
        calls["rows"] = calls.get("rows", 0) + len(images)
        return original(self, images)

    monkeypatch.setattr(Recognizer, "embed_valid", counting_embed)
    assert _embed(*args, "--out", out, "--resume") == 0
    assert calls["rows"] == 4  # only chunks 1 and 2 (inputs 3..7, one of them rejected) were recomputed
    clean = tmp_path / "clean"
    np.testing.assert_array_equal(np.load(out), np.load(clean / "g.npy"))
    for suffix in ("index.txt", "rejected.tsv"):
        assert (tmp_path / "killed" / f"g.{suffix}").read_text() == (clean / f"g.{suffix}").read_text()
    assert json.loads((tmp_path / "killed" / "g.manifest.json").read_text())["resumed_chunks"] == 1
    # the preview shows the same faces whether or not the run was resumed
    assert (tmp_path / "killed" / "g.aligned.jpg").read_bytes() == (clean / "g.aligned.jpg").read_bytes()


def test_embed_preview_shows_aligned_faces_spread_over_the_gallery(tmp_path, models):
    from hyperface.datasets.preview import LABEL_WIDTH, spread_rows
    from hyperface.recognition.embed import PREVIEW_FACES

    faces = random_faces(40, seed=4)
    for i, face in enumerate(faces):
        _write(tmp_path / "src" / f"{i:03d}.png", face)
    _write(tmp_path / "src" / "005x.png", grey_image(4, 4))  # rejected: never shown
    assert _embed(tmp_path / "src", "--model", models["pth"], "--aligned", "--chunk-size", "7", "--out", tmp_path / "out") == 0
    sheet = cv2.imread(str(tmp_path / "out" / "gallery.aligned.jpg"))[..., ::-1]  # picks from 6 chunks
    assert sheet.shape == (4 * 112, LABEL_WIDTH + 8 * 112, 3)
    shown = spread_rows(40, PREVIEW_FACES)
    assert len(shown) == 32 and shown[0] == 0 and shown[-1] == 39
    for k, row in enumerate(shown):
        tile = sheet[112 * (k // 8) : 112 * (k // 8) + 111, LABEL_WIDTH + 112 * (k % 8) :][:, :112].astype(float)
        own = np.abs(tile - faces[row][:111]).mean()
        assert own < 12 and own < np.abs(tile - faces[(row + 1) % 40][:111]).mean() / 3, (k, row, own)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outputs"]["preview"] == "gallery.aligned.jpg" and manifest["preview_rows"] == shown


def test_embed_recordio(tmp_path, models):
    from hyperface.datasets import RecordIOWriter

    faces = random_faces(5, seed=13)
    writer = RecordIOWriter(tmp_path / "rec", image_format="png")
    for i, face in enumerate(faces):
        writer.add(face, label=i // 2)
    writer.close()
    out = tmp_path / "rec_gallery.npy"
    assert _embed(tmp_path / "rec", "--model", models["onnx"], "--aligned", "--out", out, "--workers", "2") == 0
    assert _read_lines(tmp_path / "rec_gallery.index.txt") == [f"train.rec#{i}" for i in range(5)]
    np.testing.assert_allclose(np.load(out), load_recognizer(models["onnx"]).embed(faces), atol=1e-5)


def test_embed_resume_of_a_complete_run_refuses_changed_settings(tmp_path, models, capsys):
    faces = random_faces(3, seed=31)
    for i, face in enumerate(faces):
        _write(tmp_path / "src" / f"{i}.png", face)
    args = [tmp_path / "src", "--model", models["pth"], "--aligned"]
    for out in (tmp_path / "folder", tmp_path / "file" / "g.npy"):  # both output forms
        assert _embed(*args, "--out", out) == 0
        paths = GalleryPaths.from_out(out)
        before = paths.embeddings.read_bytes(), paths.manifest.read_bytes()
        capsys.readouterr()
        assert _embed(*args, "--flip", "--out", out, "--resume") == 2
        err = capsys.readouterr().err
        assert "the run is complete" in err and "recognizer.flip False -> True" in err and "--overwrite" in err
        assert len(err.strip().splitlines()) == 1
        assert (paths.embeddings.read_bytes(), paths.manifest.read_bytes()) == before
        # the same settings (batch size may change): nothing to do, nothing rewritten
        assert _embed(*args, "--batch-size", "1", "--out", out, "--resume") == 0
        assert (paths.embeddings.read_bytes(), paths.manifest.read_bytes()) == before
        assert _embed(*args, "--flip", "--out", out, "--overwrite") == 0
        assert json.loads(paths.manifest.read_text())["recognizer"]["flip"] is True


def test_embed_npy_outputs_are_self_contained_and_found_by_readers(tmp_path, models):
    from hyperface.report.pipeline import labels_for_embeddings

    faces = random_faces(4, seed=17)
    for i, face in enumerate(faces):
        _write(tmp_path / "faces" / f"id{i % 2}" / f"{i}.png", face)
    runs = tmp_path / "runs"
    for name in ("g1", "g2"):  # two galleries in one folder
        assert _embed(tmp_path / "faces", "--model", models["pth"], "--aligned", "--out", runs / f"{name}.npy") == 0
    assert sorted(p.name for p in runs.iterdir()) == [
        "g1.aligned.jpg", "g1.index.txt", "g1.manifest.json", "g1.npy", "g1.rejected.tsv",
        "g2.aligned.jpg", "g2.index.txt", "g2.manifest.json", "g2.npy", "g2.rejected.tsv",
    ]
    assert json.loads((runs / "g2.manifest.json").read_text())["outputs"]["embeddings"] == "g2.npy"
    # readers (report) find the manifest and index from the .npy path alone
    labels, dataset = labels_for_embeddings(runs / "g1.npy")
    assert labels.tolist() == [0, 0, 1, 1] and dataset == (tmp_path / "faces").resolve()
    assert GalleryPaths(runs / "g2.npy").manifest == runs / "g2.manifest.json"
    # the folder form keeps its layout: FOLDER/gallery.npy + FOLDER/manifest.json
    assert _embed(tmp_path / "faces", "--model", models["pth"], "--aligned", "--out", tmp_path / "folder") == 0
    assert (tmp_path / "folder" / "manifest.json").is_file() and not (tmp_path / "folder" / "gallery.manifest.json").exists()
    assert GalleryPaths(tmp_path / "folder" / "gallery.npy").manifest == tmp_path / "folder" / "manifest.json"
    assert labels_for_embeddings(tmp_path / "folder" / "gallery.npy")[0].tolist() == [0, 0, 1, 1]
    # a gallery written with the older file-form layout (manifest.json in the folder) is still found and resumed
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for path in runs.glob("g1.*"):
        (legacy / path.name).write_bytes(path.read_bytes())
    (legacy / "g1.manifest.json").rename(legacy / "manifest.json")
    assert GalleryPaths(legacy / "g1.npy").manifest == legacy / "manifest.json"
    assert GalleryPaths.from_out(legacy / "g1.npy").manifest == legacy / "manifest.json"
    assert labels_for_embeddings(legacy / "g1.npy")[0].tolist() == [0, 0, 1, 1]
    assert _embed(tmp_path / "faces", "--model", models["pth"], "--aligned", "--out", legacy / "g1.npy", "--resume") == 0
    assert _embed(tmp_path / "faces", "--model", models["pth"], "--aligned", "--flip", "--out", legacy / "g1.npy", "--resume") == 2


def test_rejected_reasons_say_what_is_wrong_without_object_reprs(tmp_path, models):
    _write(tmp_path / "src" / "ok.png", random_faces(1, seed=3)[0])
    (tmp_path / "src" / "junk.png").write_bytes(b"junk")
    (tmp_path / "src" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert _embed(tmp_path / "src", "--model", models["pth"], "--aligned", "--out", tmp_path / "g.npy") == 0
    reasons = dict(line.split("\t") for line in _read_lines(tmp_path / "g.rejected.tsv")[1:])
    assert reasons["junk.png"] == "unreadable: not a readable image (no known image format, 4 bytes starting b'junk')"
    assert reasons["cut.png"].startswith("unreadable: not a readable image (PNG header but corrupt or truncated data, 28 bytes")
    assert not any("object at 0x" in reason or "BytesIO" in reason for reason in reasons.values())


def test_load_embeddings_refuses_non_numeric_npy_without_suggesting_pickles(tmp_path):
    from hyperface.common.errors import HyperfaceError
    from hyperface.common.io import load_embeddings

    (tmp_path / "garbage.npy").write_bytes(b"this is not numpy at all")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "archive.npz", a=np.ones((2, 4), np.float32))
    (tmp_path / "archive.npy").write_bytes((tmp_path / "archive.npz").read_bytes())
    np.save(tmp_path / "cut.npy", np.ones((50, 8), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:200])
    for name in ("garbage.npy", "objects.npy", "archive.npy", "cut.npy"):
        with pytest.raises(HyperfaceError) as info:
            load_embeddings(tmp_path / name, what="gallery")
        message = str(info.value)
        assert f"gallery file {tmp_path / name}" in message and "not a numeric .npy array" in message, message
        assert "pickle" not in message.lower(), message
    ok = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.save(tmp_path / "ok.npy", ok)
    np.testing.assert_allclose(np.linalg.norm(load_embeddings(tmp_path / "ok.npy"), axis=1), 1.0, atol=1e-6)


def test_file_names_that_are_not_utf8_survive_embed_and_report(tmp_path, models):
    faces = random_faces(4, seed=3)
    src = tmp_path / "faces"
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8 (a surrogate in the str)
    for face, (label, name) in zip(faces, ((0, "a.png"), (0, odd), (1, "b.png"), (1, "c.png"))):
        (src / f"{label:06d}").mkdir(parents=True, exist_ok=True)
        (src / f"{label:06d}" / name).write_bytes(cv2.imencode(".png", face[..., ::-1])[1].tobytes())
    out = tmp_path / "emb"
    assert _embed(src, "--model", models["pth"], "--aligned", "--out", out) == 0
    raw_index = (out / "gallery.index.txt").read_bytes().splitlines()
    assert b"000000/caf\xe9.png" in raw_index and len(raw_index) == 4  # the file's own bytes
    assert np.load(out / "gallery.npy").shape == (4, 512)
    assert main(["report", str(out), "--out", str(tmp_path / "report"), "--no-plot", "--device", "cpu"]) == 0
    import json

    assert json.loads((tmp_path / "report" / "report.json").read_text())["images_per_identity"]["min"] == 2


def test_file_names_with_line_breaking_characters_round_trip_from_embed_to_report(tmp_path, models):
    """embed escapes backslash, tab, newline and CR in gallery.index.txt; report undoes the escapes
    (and splits on newlines only, so a form feed inside a name stays in it)."""
    from hyperface.common.io import escape_line, read_lines, unescape_line
    from hyperface.report.pipeline import embedded_items

    names = ("back\\slash.png", "tab\tname.png", "new\nline.png", "form\x0cfeed.png", "x#1.png", "lit\\n.png")
    for name in names:
        assert unescape_line(escape_line(name)) == name and "\n" not in escape_line(name)
    src = tmp_path / "faces"
    for i, (face, name) in enumerate(zip(random_faces(len(names), seed=4), names)):
        (src / f"{i % 2:06d}#{i % 2}").mkdir(parents=True, exist_ok=True)  # "#<digits>" in a class folder too
        (src / f"{i % 2:06d}#{i % 2}" / name).write_bytes(cv2.imencode(".png", face[..., ::-1])[1].tobytes())
    out = tmp_path / "emb"
    assert _embed(src, "--model", models["pth"], "--aligned", "--out", out) == 0
    written = read_lines(out / "gallery.index.txt")
    assert sorted(written) == sorted(f"{i % 2:06d}#{i % 2}/{name}" for i, name in enumerate(names))
    labels, _, items, folder = embedded_items(out / "gallery.npy")
    assert [folder.paths[i] for i in items] == written
    assert labels.tolist() == [int(name.split("#")[1][0]) for name in written]


def test_a_decompression_bomb_is_rejected_not_decoded(tmp_path, models):
    import struct
    import subprocess
    import sys
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    src = tmp_path / "faces"
    _write(src / "good.png", random_faces(1, seed=4)[0])
    # 20000 x 20000 RGB in a few bytes: it would unpack to 1.2 GB
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    (src / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    # a fresh process: OpenCV reads its limit once, at import (hyperface sets it before importing it)
    done = subprocess.run([sys.executable, "-m", "hyperface", "embed", str(src), "--model", str(models["pth"]), "--aligned",
                           "--out", str(tmp_path / "emb"), "--device", "cpu", "--no-progress"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rejected = (tmp_path / "emb" / "gallery.rejected.tsv").read_text().splitlines()
    assert len(rejected) == 2 and rejected[1].startswith("bomb.png\t") and "178956970 pixels" in rejected[1]
    assert np.load(tmp_path / "emb" / "gallery.npy").shape == (1, 512)


def test_an_image_the_model_cannot_embed_is_rejected_not_fatal(tmp_path, models, monkeypatch):
    from hyperface.recognition.recognizers import Recognizer

    faces = random_faces(5, seed=9)
    for i, face in enumerate(faces):
        _write(tmp_path / "src" / f"{i}.png", face)
    original = Recognizer.features

    odd = [3, 4]  # 4 is alone in the last batch of 2: one odd image, not a broken model

    def nan_for_odd(self, images):  # e.g. an fp16 model overflowing on odd images
        feats = original(self, images)
        for i in odd:
            feats[np.all(images == faces[i], axis=(1, 2, 3))] = np.nan
        return feats

    monkeypatch.setattr(Recognizer, "features", nan_for_odd)
    assert _embed(tmp_path / "src", "--model", models["pth"], "--aligned", "--batch-size", "2", "--out", tmp_path / "o") == 0
    assert _read_lines(tmp_path / "o" / "gallery.index.txt") == ["0.png", "1.png", "2.png"]
    rejected = _read_lines(tmp_path / "o" / "gallery.rejected.tsv")
    assert rejected[1:] == [f"{i}.png\tthe model returned NaN/inf or all-zero features for it" for i in odd]
    assert np.isfinite(np.load(tmp_path / "o" / "gallery.npy")).all()
    monkeypatch.setattr(Recognizer, "features", lambda self, images: np.full((len(images), 512), np.nan, np.float32))
    with pytest.raises(HyperfaceError, match="for all 8 image"):  # a batch of 8 without one: the model's fault
        load_recognizer(models["pth"]).embed_valid(np.stack([faces[0]] * 8))
    assert _embed(tmp_path / "src", "--model", models["pth"], "--aligned", "--out", tmp_path / "broken") == 2


def test_ffhq_crop_of_an_aligned_crop_warns_once(hyperface_log):
    from hyperface.recognition.preprocess import FacePreprocessor

    preprocess = FacePreprocessor("ffhq")
    preprocess.process(np.zeros((512, 512, 3), np.uint8))  # what the crop is for: no warning
    assert hyperface_log == []
    for _ in range(3):
        preprocess.process(np.zeros((112, 112, 3), np.uint8))
    assert len(hyperface_log) == 1 and "use --aligned" in hyperface_log[0].getMessage()


def test_a_model_given_as_a_run_folder_is_recorded_as_its_weights_file(tmp_path, models):
    import json
    import shutil

    from hyperface.common.io import file_sha256

    run = tmp_path / "train-run"
    run.mkdir()
    shutil.copy(models["pth"], run / "backbone.pth")
    _write(tmp_path / "src" / "0.png", random_faces(1, seed=1)[0])
    assert _embed(tmp_path / "src", "--model", run, "--aligned", "--out", tmp_path / "o") == 0
    recorded = json.loads((tmp_path / "o" / "manifest.json").read_text())["inputs"]["model"]
    assert recorded == {"path": str((run / "backbone.pth").resolve()), "sha256": file_sha256(models["pth"])}


def test_a_resumed_run_with_chunks_from_before_landmarks_gets_nan_rows(tmp_path):
    from hyperface.recognition.embed import _merge

    class Source:
        def name(self, i):
            return f"img{i}.png"

    paths = GalleryPaths(tmp_path / "g.npy", in_folder=False)
    paths.parts.mkdir()
    old = dict(embeddings=np.ones((2, 4), np.float32), rows=np.array([0, 1]), rejected_rows=np.zeros(0, np.int64),
               rejected_reasons=np.zeros(0, dtype="<U1"))
    np.savez(paths.chunk(0), **old)  # written by a version that kept no landmarks
    points = np.arange(10, dtype=np.float32).reshape(1, 5, 2)
    np.savez(paths.chunk(1), **{**old, "embeddings": np.ones((1, 4), np.float32), "rows": np.array([2]), "landmarks": points})
    result = _merge(paths, Source(), 2, 4, landmarks=True)
    saved = np.load(paths.landmarks)
    assert result.embedded == 3 and saved.shape == (3, 5, 2)
    assert np.isnan(saved[:2]).all() and np.array_equal(saved[2], points[0])


def test_embed_never_replaces_what_it_did_not_write(tmp_path, models, capsys):
    faces = random_faces(3, seed=12)
    for i, face in enumerate(faces):
        _write(tmp_path / "src" / f"{i}.png", face)
    args = [tmp_path / "src", "--model", models["pth"], "--aligned"]
    folder = tmp_path / "mine.npy"  # a user's folder that happens to be named like the output
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep.txt").write_text("precious")
    foreign = tmp_path / "identities.npy"  # e.g. another stage's output
    np.save(foreign, np.eye(4, dtype=np.float32))
    before = foreign.read_bytes()
    for out, flag in ((folder, "--overwrite"), (foreign, "--resume"), (foreign, "--overwrite")):
        assert _embed(*args, "--out", out, flag) == 2
        err = capsys.readouterr().err
        assert "was not written by `hyperface embed`" in err and len(err.strip().splitlines()) == 1
    assert (folder / "sub" / "keep.txt").read_text() == "precious" and foreign.read_bytes() == before
    # its own outputs it does replace and resume
    assert _embed(*args, "--out", tmp_path / "g.npy") == 0
    assert _embed(*args, "--out", tmp_path / "g.npy", "--overwrite") == 0
    assert _embed(*args, "--out", tmp_path / "g.npy", "--resume") == 0


def test_embed_resume_embeds_a_damaged_chunk_again(tmp_path, models, monkeypatch, capsys):
    from hyperface.recognition.recognizers import Recognizer

    faces = random_faces(6, seed=13)
    for i, face in enumerate(faces):
        _write(tmp_path / "src" / f"{i}.png", face)
    args = [tmp_path / "src", "--model", models["pth"], "--aligned", "--chunk-size", "2", "--batch-size", "2"]
    assert _embed(*args, "--out", tmp_path / "clean" / "g.npy") == 0
    original = Recognizer.embed_valid
    calls = {"n": 0}

    def dying_embed(self, images):
        calls["n"] += 1
        if calls["n"] == 3:  # chunks 0 and 1 done, killed in chunk 2
            raise KeyboardInterrupt
        return original(self, images)

    monkeypatch.setattr(Recognizer, "embed_valid", dying_embed)
    out = tmp_path / "killed" / "g.npy"
    assert _embed(*args, "--out", out) == 130
    parts = tmp_path / "killed" / "g.parts"
    chunk = parts / "chunk_000001.npz"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # damaged after it was written
    monkeypatch.setattr(Recognizer, "embed_valid", original)
    capsys.readouterr()
    assert _embed(*args, "--out", out, "--resume") == 0
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "clean" / "g.npy"))
    assert json.loads((tmp_path / "killed" / "g.manifest.json").read_text())["resumed_chunks"] == 1  # chunk 0 only
    # a damaged plan: one line naming it
    assert _embed(*args, "--out", tmp_path / "again" / "g.npy") == 0
    (tmp_path / "again" / "g.parts").mkdir()
    (tmp_path / "again" / "g.parts" / "plan.json").write_text("{bad")
    (tmp_path / "again" / "g.manifest.json").unlink()
    capsys.readouterr()
    assert _embed(*args, "--out", tmp_path / "again" / "g.npy", "--resume") == 2
    err = capsys.readouterr().err
    assert "plan.json is damaged: not valid JSON" in err and "Traceback" not in err


def test_runs_made_before_model_checksums_still_resume(tmp_path, models, monkeypatch):
    """Plans and manifests of the version before model SHA-256s were recorded: partial and finished
    runs resume with the same model (its checksum unknown then, its path compared as before)."""
    from hyperface.recognition import embed as embed_module
    from hyperface.recognition.recognizers import Recognizer

    for i, face in enumerate(random_faces(5, seed=41)):
        _write(tmp_path / "src" / f"{i}.png", face)
    args = [tmp_path / "src", "--model", models["pth"], "--aligned", "--chunk-size", "2", "--batch-size", "2"]
    real_settings, real_embed = embed_module._resume_settings, Recognizer.embed_valid

    def settings_without_checksums(*a, **k):
        settings = real_settings(*a, **k)
        settings["recognizer"].pop("sha256")
        return settings

    calls = []

    def dies_in_chunk_2(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_embed(self, images)

    monkeypatch.setattr(embed_module, "_resume_settings", settings_without_checksums)
    monkeypatch.setattr(Recognizer, "embed_valid", dies_in_chunk_2)
    assert _embed(*args, "--out", tmp_path / "partial" / "g.npy") == 130
    monkeypatch.setattr(Recognizer, "embed_valid", real_embed)
    assert _embed(*args, "--out", tmp_path / "finished" / "g.npy") == 0
    monkeypatch.setattr(embed_module, "_resume_settings", real_settings)
    assert _embed(*args, "--out", tmp_path / "partial" / "g.npy", "--resume") == 0
    assert _embed(*args, "--out", tmp_path / "finished" / "g.npy", "--resume") == 0
    assert np.array_equal(np.load(tmp_path / "partial" / "g.npy"), np.load(tmp_path / "finished" / "g.npy"))


def test_a_corrected_rerun_reuses_what_an_attempt_that_embedded_nothing_left(tmp_path, models, capsys, hyperface_log):
    (tmp_path / "wrong" / "a.jpg").parent.mkdir(parents=True)
    (tmp_path / "wrong" / "a.jpg").write_bytes(b"junk")  # e.g. the wrong folder: every input rejected
    for i, face in enumerate(random_faces(3, seed=14)):
        _write(tmp_path / "right" / f"{i}.png", face)
    model = ["--model", models["pth"], "--aligned"]
    assert _embed(tmp_path / "right", *model, "--out", tmp_path / "clean") == 0
    for out, flags in ((tmp_path / "zz", ()), (tmp_path / "g.npy", ()), (tmp_path / "resumed", ("--resume",))):
        assert _embed(tmp_path / "wrong", *model, "--out", out) == 2
        assert "all 1 inputs were rejected" in capsys.readouterr().err
        paths = GalleryPaths.from_out(out)
        assert len(_read_lines(paths.rejected)) == 2 and not list(paths.parts.glob("chunk_*"))  # the list stays, to read
        hyperface_log.clear()
        assert _embed(tmp_path / "right", *model, "--out", out, *flags) == 0, capsys.readouterr().err
        assert any("an earlier attempt there embedded no image" in r.getMessage() for r in hyperface_log)
        np.testing.assert_array_equal(np.load(paths.embeddings), np.load(tmp_path / "clean" / "gallery.npy"))
        assert _read_lines(paths.rejected) == ["path\treason"] and not paths.parts.exists()
        # a finished embed is protected as before
        assert _embed(tmp_path / "wrong", *model, "--out", out) == 2
        assert "already holds" in capsys.readouterr().err
        np.testing.assert_array_equal(np.load(paths.embeddings), np.load(tmp_path / "clean" / "gallery.npy"))


def test_fp16_is_refused_where_it_would_do_nothing(tmp_path, models, capsys):
    """fp16 is CUDA autocast of a PyTorch trunk: on the CPU, or for an ONNX model, it would change
    nothing while the manifest said fp16, so it is refused before anything is written."""
    _write(tmp_path / "src" / "0.png", random_faces(1, seed=15)[0])
    import torch

    cases = [(models["pth"], "cpu", "--fp16 needs a CUDA device"), (models["onnx"], "cpu", "--fp16 is for PyTorch models")]
    if not torch.cuda.is_available():
        cases.append((models["pth"], "auto", "--fp16 needs a CUDA device"))  # auto is the CPU here
    for model, device, message in cases:
        out = tmp_path / f"{model.suffix[1:]}-{device}"
        assert main(["embed", str(tmp_path / "src"), "--model", str(model), "--aligned", "--fp16", "--device", device,
                     "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(HyperfaceError, match="needs a CUDA device"):
        load_recognizer(models["pth"], device="cpu", fp16=True)
    assert load_recognizer(models["pth"], device="cpu").describe()["fp16"] is False  # what the manifest records


_EMBED_AND_WAIT = """
import sys, time
from pathlib import Path
from hyperface.cli import main
from hyperface.recognition.recognizers import Recognizer

go, args = Path(sys.argv[1]), sys.argv[2:]
real, calls = Recognizer.embed_valid, []

def embed_valid(self, images):
    calls.append(len(images))
    if len(calls) == 2:  # chunk 0 is saved: hold the run here until the test says go
        print("holding", flush=True)
        while not go.exists():
            time.sleep(0.05)
    return real(self, images)

Recognizer.embed_valid = embed_valid
sys.exit(main(["embed", *args]))
"""


@pytest.mark.parametrize("form", ["file", "folder"])
def test_the_same_embed_started_twice_is_refused_and_deletes_nothing(tmp_path, models, capsys, form):
    """Two processes embedding into one gallery used to interleave their chunk files. The second is
    refused (--resume and --overwrite too) while the first runs, nothing of the first's is touched,
    and once the first ends the gallery is free; no lock file is left beside the gallery."""
    import subprocess
    import sys

    for i, face in enumerate(random_faces(6, seed=31)):
        _write(tmp_path / "src" / f"{i}.png", face)
    out = tmp_path / "gallery" / ("g.npy" if form == "file" else "run")
    paths = GalleryPaths.from_out(out)
    args = [str(tmp_path / "src"), "--model", str(models["pth"]), "--aligned", "--chunk-size", "2", "--batch-size", "2",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", _EMBED_AND_WAIT, str(go), *args], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "gallery").rglob("*") if p.is_file()}
        assert paths.chunk(0).relative_to(tmp_path) in before
        for flags in ((), ("--resume",), ("--overwrite",)):
            capsys.readouterr()
            assert main(["embed", *args[:-3], *flags, "--no-progress", "--device", "cpu"]) == 2
            err = capsys.readouterr().err
            assert f"another process is writing into {paths.embeddings} now" in err and len(err.strip().splitlines()) == 1
        after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "gallery").rglob("*") if p.is_file()}
        assert after == before
    finally:
        go.touch()
        first.wait(timeout=120)
    assert first.returncode == 0
    assert paths.embeddings.is_file() and not paths.parts.exists()
    names = sorted(p.name for p in paths.embeddings.parent.iterdir())
    assert ".hyperface-run" not in names and not [n for n in names if n.startswith(".")]  # nothing stray beside it
    assert main(["embed", *args[:-3], "--resume", "--no-progress", "--device", "cpu"]) == 0  # complete: nothing to do
    assert main(["embed", *args[:-3], "--overwrite", "--no-progress", "--device", "cpu"]) == 0  # free again


def test_embed_lets_go_of_its_gallery_when_it_returns(tmp_path, models, monkeypatch):
    """A run stopped by Ctrl-C (or failing) in this process leaves the gallery to the next process."""
    import subprocess
    import sys

    from hyperface.common import io as common_io
    from hyperface.recognition.recognizers import Recognizer

    for i, face in enumerate(random_faces(4, seed=32)):
        _write(tmp_path / "src" / f"{i}.png", face)
    real, calls = Recognizer.embed_valid, []

    def dies_in_chunk_1(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(Recognizer, "embed_valid", dies_in_chunk_1)
    out = tmp_path / "g.npy"
    assert _embed(tmp_path / "src", "--model", models["pth"], "--aligned", "--chunk-size", "2", "--batch-size", "2",
                  "--out", out) == 130
    parts = GalleryPaths.from_out(out).parts
    assert (parts / ".hyperface-run").read_text() == "embed\n" and not common_io.holds_lock(parts / ".hyperface-run")
    take = [sys.executable, "-c", "import sys; from hyperface.common.io import lock_output; lock_output(sys.argv[1])", str(parts)]
    assert subprocess.run(take, capture_output=True, text=True).returncode == 0
    monkeypatch.setattr(Recognizer, "embed_valid", real)
    assert _embed(tmp_path / "src", "--model", models["pth"], "--aligned", "--chunk-size", "2", "--batch-size", "2",
                  "--out", out, "--resume") == 0
    assert not parts.exists() and not common_io.holds_lock(parts / ".hyperface-run")
