"""The dataset runner and `hyperface generate`: quality filter, sharding + merge, resume after a kill,
a full disk, both writers read back, bad inputs."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from generation_fixtures import random_identities, session_tiny_generator, session_tiny_models

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError
from hyperface.datasets import ImageFolderDataset, RecordIODataset, decode_image
from hyperface.generation import dataset as dataset_module
from hyperface.generation.dataset import GenerationConfig, Shard, ShardPart, generate_dataset, merge_parts
from hyperface.generation.variation import Perturbation, image_seed
from hyperface.recognition.alignment import crop_ffhq


class PaintedGenerator:
    """An IdentityGenerator stand-in for the runner's logic: each image is painted with (a hash of) its
    seed, so ``embed`` can return what the image was conditioned on, or its opposite for "bad" seeds."""

    embedding_dim = 512
    resolution = 112

    def __init__(self):
        self.conditioning: dict[int, np.ndarray] = {}
        self.rendered = 0

    @staticmethod
    def key(seed: int) -> int:
        return seed % (1 << 24)

    @staticmethod
    def good(seed: int) -> bool:
        return PaintedGenerator.key(seed) % 2 == 1

    def generate(self, embeddings, seeds):
        images = []
        for embedding, seed in zip(embeddings, seeds):
            key = self.key(seed)
            self.conditioning[key] = embedding
            images.append(np.full((112, 112, 3), [key & 255, (key >> 8) & 255, key >> 16], np.uint8))
        self.rendered += len(images)
        return images

    def embed(self, crops):
        keys = crops[:, 0, 0, 0].astype(int) | crops[:, 0, 0, 1].astype(int) << 8 | crops[:, 0, 0, 2].astype(int) << 16
        return np.stack([self.conditioning[k] * (1 if k % 2 else -1) for k in keys])


def keep_as_is(image):
    return image, image, False


def _read_all(path):
    dataset = ImageFolderDataset(path) if path.name == "images" else RecordIODataset(path)
    return dataset, [dataset.read_raw(i) for i in range(len(dataset))]


def test_quality_filter_retries_then_fills_and_records_statistics(tmp_path):
    generator = PaintedGenerator()
    identities = random_identities(6, seed=1)
    config = GenerationConfig(images_per_identity=4, seed=5, batch_size=5, min_similarity=0.5, max_attempts=6)
    generate_dataset(
        generator, identities, tmp_path / "out", config, formats="folder", aligner=keep_as_is, embed_fn=generator.embed,
        show_progress=False,
    )
    stats = json.loads((tmp_path / "out" / "acceptance.json").read_text())
    per = stats["per_identity"]
    assert stats["summary"]["images"] == 24 and stats["summary"]["renders"] == generator.rendered
    journal = [json.loads(line) for line in (tmp_path / "out/parts/shard-00000-of-00001/journal.jsonl").read_text().splitlines()]
    for entry in journal:
        i = entry["identity"]
        good = [j for j in range(entry["attempts"]) if PaintedGenerator.good(image_seed(5, i, j))]
        assert entry["attempts"] <= 6 and len(entry["indices"]) == 4
        assert entry["accepted"] == min(4, len(good)) == per["accepted"][i]
        assert entry["filled"] == 4 - entry["accepted"]
        kept_good = [j for j in entry["indices"] if j in good]
        assert kept_good == good[:4]  # the first K accepted renders are kept, in order
        if entry["filled"]:
            assert entry["attempts"] == 6  # filled only once out of attempts
        sims = dict(zip(entry["indices"], entry["similarities"]))
        assert all(sims[j] >= 0.5 for j in kept_good) and all(sims[j] < 0.5 for j in set(entry["indices"]) - set(good))
    assert stats["summary"]["images_filled_below_threshold"] == sum(per["filled"])
    # The seed above exercises both outcomes: identities filled with rejects, and full ones.
    assert 0 < sum(f > 0 for f in per["filled"]) < 6
    dataset = ImageFolderDataset(tmp_path / "out" / "images")
    assert len(dataset) == 24 and np.bincount(dataset.labels).tolist() == [4] * 6


def _journal(folder):
    lines = (folder / "parts/shard-00000-of-00001/journal.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda entry: entry["identity"])


def test_overlapped_postprocessing_renders_and_keeps_exactly_what_the_sequential_loop_does(tmp_path):
    """Planning while a batch is still being filtered counts its renders as accepted; an identity
    never asks for more than its shortfall, so both loops render the same indices and keep the same
    images (batches are composed differently, which per-image seeds make irrelevant)."""
    from hyperface.generation.dataset import render_shard

    identities = random_identities(7, seed=3)
    config = GenerationConfig(images_per_identity=4, seed=5, batch_size=5, min_similarity=0.5, max_attempts=7)
    runs = {}
    for overlap in (False, True):
        generator = PaintedGenerator()
        out = tmp_path / f"overlap-{overlap}"
        summary = render_shard(generator, identities, out, config, aligner=keep_as_is, embed_fn=generator.embed,
                               show_progress=False, overlap=overlap)
        assert summary["identities_done"] == 7
        runs[overlap] = (_journal(out), generator.rendered, sorted(generator.conditioning))
    assert runs[True] == runs[False]
    assert any(entry["filled"] for entry in runs[True][0]) and runs[True][1] > 7 * 4  # retries happened


def test_the_next_batch_renders_while_the_last_one_is_filtered(tmp_path):
    """The aligner of batch 1 waits until the generator has started batch 2: with the sequential loop
    this would deadlock (the wait times out and the test fails)."""
    import threading

    from hyperface.generation.dataset import render_shard

    second_batch_started = threading.Event()
    waited = []

    class Recording(PaintedGenerator):
        def generate(self, embeddings, seeds):
            if self.rendered:  # every batch after the first
                second_batch_started.set()
            return super().generate(embeddings, seeds)

    def slow_aligner(image):
        if not waited:
            waited.append(second_batch_started.wait(timeout=30))
        return keep_as_is(image)

    generator = Recording()
    render_shard(generator, random_identities(4, seed=4), tmp_path / "out", GenerationConfig(images_per_identity=2, batch_size=2),
                 aligner=slow_aligner, show_progress=False)
    assert waited == [True]
    assert len(_journal(tmp_path / "out")) == 4


def test_a_failing_render_still_commits_the_batch_processed_meanwhile(tmp_path):
    """Out of memory on batch 3 while batch 2 is being processed: batch 2's identities are committed
    (as the sequential loop would have), the error reaches the caller, and a short batch is refused."""
    from hyperface.generation.dataset import render_shard

    class FailsThird(PaintedGenerator):
        def generate(self, embeddings, seeds):
            if self.rendered == 12:
                raise RuntimeError("CUDA out of memory")
            return super().generate(embeddings, seeds)

    config = GenerationConfig(images_per_identity=3, batch_size=6)
    with pytest.raises(RuntimeError, match="out of memory"):
        render_shard(FailsThird(), random_identities(6, seed=6), tmp_path / "oom", config, aligner=keep_as_is, show_progress=False)
    assert [entry["identity"] for entry in _journal(tmp_path / "oom")] == [0, 1, 2, 3]

    class Short(PaintedGenerator):
        def generate(self, embeddings, seeds):
            return super().generate(embeddings, seeds)[:-1]

    with pytest.raises(HyperfaceError, match="returned 5 images for a batch of 6"):
        render_shard(Short(), random_identities(6, seed=6), tmp_path / "short", config, aligner=keep_as_is, show_progress=False)


def test_a_generator_capturing_cuda_graphs_is_not_overlapped(tmp_path):
    """A CUDA-graph capture must not see another thread's CUDA work: each batch is processed before
    the next one renders."""
    from hyperface.generation.dataset import render_shard

    aligned_before_render = []

    class Capturing(PaintedGenerator):
        captures_cuda_graphs = True

        def __init__(self):
            super().__init__()
            self.aligned = 0

        def generate(self, embeddings, seeds):
            aligned_before_render.append(self.aligned == self.rendered)
            return super().generate(embeddings, seeds)

    generator = Capturing()

    def counting_aligner(image):
        import time

        time.sleep(0.02)  # slow enough that an overlapped render would start before this batch is done
        generator.aligned += 1
        return keep_as_is(image)

    render_shard(generator, random_identities(4, seed=4), tmp_path / "out", GenerationConfig(images_per_identity=2, batch_size=2),
                 aligner=counting_aligner, show_progress=False)
    assert aligned_before_render == [True] * 4 and len(_journal(tmp_path / "out")) == 4


def test_filter_without_fr_model_is_refused(tmp_path):
    config = GenerationConfig(images_per_identity=2, min_similarity=0.3)
    with pytest.raises(HyperfaceError, match="fr-model"):
        generate_dataset(PaintedGenerator(), random_identities(2), tmp_path / "o", config, aligner=keep_as_is, show_progress=False)


def test_a_recordio_too_large_for_float32_keys_is_refused_before_rendering(tmp_path):
    config = GenerationConfig(images_per_identity=1 << 23)  # 2 x 2^23 images: keys past 2^24
    with pytest.raises(HyperfaceError, match="2\\^24"):
        generate_dataset(PaintedGenerator(), random_identities(2), tmp_path / "o", config, formats="rec", aligner=keep_as_is, show_progress=False)
    assert not (tmp_path / "o").exists()


def test_shards_merge_into_exactly_the_single_run(tmp_path):
    identities = random_identities(7, seed=2)
    config = GenerationConfig(images_per_identity=3, seed=1, batch_size=4, perturbation=Perturbation("noise", 0.2))
    for index in range(3):
        generate_dataset(
            PaintedGenerator(), identities, tmp_path / "sharded", config, shard=Shard(index, 3), aligner=keep_as_is,
            show_progress=False,
        )
        if index < 2:
            with pytest.raises(HyperfaceError, match="not generated yet"):
                merge_parts(tmp_path / "sharded")
    merge_parts(tmp_path / "sharded")
    generate_dataset(PaintedGenerator(), identities, tmp_path / "single", config, aligner=keep_as_is, show_progress=False)
    for kind in ("images", "rec"):
        sharded, sharded_items = _read_all(tmp_path / "sharded" / kind)
        single, single_items = _read_all(tmp_path / "single" / kind)
        assert len(sharded) == 21 and np.bincount(sharded.labels).tolist() == [3] * 7
        assert sharded_items == single_items  # same bytes, same labels, same order


def test_restart_with_another_sharding_reuses_finished_identities(tmp_path):
    identities = random_identities(6, seed=8)
    config = GenerationConfig(images_per_identity=2, seed=3, batch_size=4)
    first = PaintedGenerator()
    generate_dataset(first, identities, tmp_path / "o", config, shard=Shard(0, 2), aligner=keep_as_is, show_progress=False)
    assert first.rendered == 6  # identities 0, 2, 4
    rest = PaintedGenerator()
    generate_dataset(rest, identities, tmp_path / "o", config, aligner=keep_as_is, resume=True, show_progress=False)
    assert rest.rendered == 6  # only 1, 3, 5 were left
    dataset = RecordIODataset(tmp_path / "o" / "rec")
    assert len(dataset) == 12 and np.bincount(dataset.labels).tolist() == [2] * 6


class MarkerGenerator(PaintedGenerator):
    """Grey renders; odd seeds carry the marker the stand-in SCRFD detects as a face."""

    def generate(self, embeddings, seeds):
        from recognition_fixtures import grey_image, plant_face

        images = []
        for seed in seeds:
            image = grey_image(160, 160)
            if seed % 2:
                plant_face(image, 16, 5, 5)
            images.append(image)
        self.rendered += len(images)
        return images


def test_detect_alignment_falls_back_to_the_fixed_crop(tmp_path):
    from recognition_fixtures import make_scrfd_onnx

    from hyperface.generation.postprocess import make_aligner

    detector = make_scrfd_onnx(tmp_path / "det_10g.onnx", input_size=160)
    aligner = make_aligner("detect", detector=detector)
    config = GenerationConfig(images_per_identity=3, seed=0, batch_size=4)
    generate_dataset(MarkerGenerator(), random_identities(2), tmp_path / "o", config, formats="rec", aligner=aligner, align_mode="detect", show_progress=False)
    stats = json.loads((tmp_path / "o" / "acceptance.json").read_text())["summary"]
    faceless = sum(image_seed(0, i, j) % 2 == 0 for i in range(2) for j in range(3))
    assert 0 < faceless < 6 and stats["no_face_renders"] == faceless  # those keep the fixed crop
    assert RecordIODataset(tmp_path / "o" / "rec")[0][0].shape == (112, 112, 3)
    with pytest.raises(HyperfaceError, match="--detector"):
        make_aligner("detect")


def test_merge_killed_midway_is_finished_by_a_rerun(tmp_path, monkeypatch):
    from hyperface.datasets import ImageFolderWriter, RecordIOWriter

    identities = random_identities(4, seed=5)
    config = GenerationConfig(images_per_identity=3, seed=2, batch_size=6)
    generate_dataset(PaintedGenerator(), identities, tmp_path / "o", config, aligner=keep_as_is, merge=False, show_progress=False)
    for writer_class in (ImageFolderWriter, RecordIOWriter):
        real_add, added = writer_class.add, []

        def add_then_die(self, *args, _real=real_add, **kwargs):
            added.append(1)
            if len(added) == 7:
                raise Killed
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(writer_class, "add", add_then_die)
        with pytest.raises(Killed):
            merge_parts(tmp_path / "o")
        monkeypatch.setattr(writer_class, "add", real_add)
    # a kill inside the RecordIO writer's close: train.rec renamed into place, train.idx not yet
    # (the rerun must finish it, not take train.rec for a finished dataset)
    import os

    real_replace = os.replace

    def die_before_the_index(src, dst):
        if Path(dst).name == "train.idx":
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_before_the_index)
    with pytest.raises(Killed):
        merge_parts(tmp_path / "o")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "o" / "rec" / "train.rec").exists() and not (tmp_path / "o" / "rec" / "train.idx").exists()
    (tmp_path / "o" / ".run.json.k1ll.tmp").write_text("{")  # a run killed while writing run.json
    merge_parts(tmp_path / "o")
    assert (tmp_path / "o" / "rec" / "property").exists()
    for kind in ("images", "rec"):
        dataset, _ = _read_all(tmp_path / "o" / kind)
        assert len(dataset) == 12 and np.bincount(dataset.labels).tolist() == [3] * 4
    assert not (tmp_path / "o" / "images.tmp").exists()
    assert not [p for p in (tmp_path / "o").rglob("*") if p.name.endswith(".tmp")]


def test_torchrun_environment_picks_the_shard(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    shard = Shard.parse(None)
    assert (shard.index, shard.count) == (2, 4) and list(shard.identities(11)) == [2, 6, 10]
    assert Shard.parse("1/3") == Shard(1, 3)
    with pytest.raises(HyperfaceError):
        Shard.parse("3/3")


class Killed(Exception):
    pass


class CountingGenerator:
    def __init__(self, inner):
        self.inner, self.rendered = inner, 0
        self.embedding_dim, self.resolution = inner.embedding_dim, inner.resolution

    def generate(self, embeddings, seeds):
        self.rendered += len(seeds)
        return self.inner.generate(embeddings, seeds)


def test_resume_after_a_kill_gives_exactly_n_by_k_with_tiny_arc2face(tmp_path):
    generator = CountingGenerator(session_tiny_generator())
    identities = random_identities(5, seed=3)
    config = GenerationConfig(images_per_identity=2, seed=9, batch_size=3)
    out = tmp_path / "out"
    finished = []

    def kill_after_two(identity):
        finished.append(identity)
        if len(finished) >= 2:
            raise Killed

    with pytest.raises(Killed):
        generate_dataset(generator, identities, out, config, on_identity_done=kill_after_two, show_progress=False)
    part = out / "parts" / "shard-00000-of-00001"
    done = len((part / "journal.jsonl").read_text().splitlines())
    assert 2 <= done < 5 and not (out / "rec").exists() and not (out / "images").exists()
    # A kill in the middle of the next commit: half an image and half a journal line on disk.
    with open(part / "images.bin", "ab") as handle:
        handle.write(b"\xff\xd8\xff\xe0 half a jpeg")
    with open(part / "journal.jsonl", "ab") as handle:
        handle.write(b'{"identity": 4, "offset": 1')
    with pytest.raises(HyperfaceError, match="--resume"):
        generate_dataset(generator, identities, out, config, show_progress=False)  # no silent mixing

    generator.rendered = 0
    generate_dataset(generator, identities, out, config, resume=True, show_progress=False)
    assert generator.rendered == (5 - done) * 2  # finished identities were not rendered again
    folder, folder_items = _read_all(out / "images")
    rec, rec_items = _read_all(out / "rec")
    assert len(folder) == len(rec) == 10
    assert np.bincount(folder.labels).tolist() == np.bincount(rec.labels).tolist() == [2] * 5
    assert folder_items == rec_items
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    # Any image can be regenerated alone: identity 4, image 1 (rendered after the resume).
    seed = image_seed(9, 4, 1)
    alone = generator.inner.generate_array(config.perturbation.apply(identities[4], seed)[None], [seed])[0]
    stored = decode_image(rec_items[9][0])
    assert rec_items[9][1] == 4 and stored.shape == (112, 112, 3)
    assert np.abs(stored.astype(float) - crop_ffhq(alone).astype(float)).mean() < 4  # JPEG loss only


def test_rerun_with_other_settings_is_refused(tmp_path):
    identities = random_identities(3)
    config = GenerationConfig(images_per_identity=1, seed=1)
    generate_dataset(PaintedGenerator(), identities, tmp_path / "o", config, aligner=keep_as_is, show_progress=False)
    other = GenerationConfig(images_per_identity=1, seed=2)
    with pytest.raises(HyperfaceError, match=r"other settings \(--seed 1 -> 2\)"):
        generate_dataset(PaintedGenerator(), identities, tmp_path / "o", other, aligner=keep_as_is, resume=True, show_progress=False)
    with pytest.raises(HyperfaceError, match="embeddings_sha256"):
        generate_dataset(PaintedGenerator(), identities[::-1].copy(), tmp_path / "o", config, aligner=keep_as_is, resume=True, show_progress=False)
    bigger_batches = GenerationConfig(images_per_identity=1, seed=1, batch_size=64)  # changes no image: allowed
    generate_dataset(PaintedGenerator(), identities, tmp_path / "o", bigger_batches, aligner=keep_as_is, resume=True, show_progress=False)


def test_full_disk_keeps_finished_identities(tmp_path, monkeypatch):
    identities = random_identities(6, seed=4)
    config = GenerationConfig(images_per_identity=2, seed=0, batch_size=2)
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("images.bin"):
            calls.append(fd)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(dataset_module.os, "fsync", fsync_until_full)
    with pytest.raises(HyperfaceError, match="disk full"):
        generate_dataset(PaintedGenerator(), identities, tmp_path / "o", config, aligner=keep_as_is, show_progress=False)
    monkeypatch.setattr(dataset_module.os, "fsync", real_fsync)
    part = ShardPart(tmp_path / "o" / "parts" / "shard-00000-of-00001")
    assert len(part.entries) == 2  # the two batches committed before the disk filled
    part.close()
    generator = PaintedGenerator()
    generate_dataset(generator, identities, tmp_path / "o", config, aligner=keep_as_is, resume=True, show_progress=False)
    assert generator.rendered == 8
    assert len(RecordIODataset(tmp_path / "o" / "rec")) == 12


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_cli")
    models = session_tiny_models()
    np.save(root / "ids.npy", random_identities(4, seed=6))
    from recognition_fixtures import make_tiny_iresnet, save_backbone

    fr_model = save_backbone(make_tiny_iresnet(seed=1), root / "backbone.pth")
    common = ["--arc2face", str(models.arc2face_dir), "--sd15", str(models.sd15_dir), "--steps", "2", "--resolution", "32", "--device", "cpu"]
    return root, common, fr_model


def test_cli_generates_filters_and_reads_back(cli_inputs, tmp_path):
    root, common, fr_model = cli_inputs
    out = tmp_path / "out"
    argv = ["generate", str(root / "ids.npy"), *common, "-k", "2", "--out", str(out), "--batch-size", "4",
            "--fr-model", str(fr_model), "--min-similarity", "-1", "--format", "rec", "--image-format", "png"]
    assert main(argv) == 0
    rec = RecordIODataset(out / "rec")
    assert len(rec) == 8 and np.bincount(rec.labels).tolist() == [2] * 4 and rec[0][0].shape == (112, 112, 3)
    assert not (out / "images").exists()
    acceptance = json.loads((out / "acceptance.json").read_text())
    stats = acceptance["summary"]
    assert stats["renders"] == 8 and stats["acceptance_rate"] == 1.0
    # The filter's similarities are the FR model's on the stored (lossless PNG) crops, recomputed here.
    from hyperface.recognition import load_recognizer

    faces = np.stack([rec[i][0] for i in range(len(rec))])
    features = load_recognizer(fr_model).embed(faces)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    ids = np.load(root / "ids.npy")
    cosines = np.einsum("nd,nd->n", features, ids[rec.labels] / np.linalg.norm(ids[rec.labels], axis=1, keepdims=True))
    per_identity = [cosines[rec.labels == i].mean() for i in range(4)]
    np.testing.assert_allclose(acceptance["per_identity"]["mean_similarity"], per_identity, atol=2e-5)
    assert stats["mean_similarity"] == pytest.approx(np.mean(per_identity), abs=2e-5)
    # samples.jpg: one row per identity (all 4 here), its 2 images (as many columns as images, up to 8)
    from hyperface.datasets.codec import decode_image
    from hyperface.datasets.preview import BACKGROUND, LABEL_WIDTH

    sheet = decode_image((out / "samples.jpg").read_bytes()).astype(np.int16)
    assert sheet.shape == (4 * 112, LABEL_WIDTH + 2 * 112, 3)
    for i in range(len(rec)):
        identity, index = int(rec.labels[i]), i % 2
        tile = sheet[identity * 112 : identity * 112 + 111, LABEL_WIDTH + index * 112 : LABEL_WIDTH + (index + 1) * 112]
        assert np.abs(tile - rec[i][0][:111].astype(np.int16)).mean() < 6  # JPEG q90
    assert (np.abs(sheet[:, :LABEL_WIDTH] - np.array(BACKGROUND)) > 60).any()  # the labels are drawn
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["generator"]["steps"] == 2 and manifest["params"]["fr_model"] == "backbone.pth"
    from hyperface.common.io import file_sha256

    assert manifest["inputs"]["identities"]["sha256"] == file_sha256(root / "ids.npy")  # traceable to pack's output


def test_cli_shards_then_merge(cli_inputs, tmp_path):
    root, common, _ = cli_inputs
    out = tmp_path / "out"
    for index in range(2):
        argv = ["generate", str(root / "ids.npy"), *common, "-k", "1", "--out", str(out), "--shard", f"{index}/2"]
        assert main(argv) == 0
    assert not (out / "images").exists()  # shards never merge on their own
    assert main(["generate", "--merge", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("*/manifest.json"))]
    assert manifest["started"] == min(p["started"] for p in parts)  # the run's start, not the merge's
    assert manifest["wall_seconds"] >= sum(p["summary"]["seconds_this_run"] for p in parts[:1])
    folder = ImageFolderDataset(out / "images")
    assert len(folder) == 4 and sorted(folder.labels.tolist()) == [0, 1, 2, 3]
    assert len(RecordIODataset(out / "rec")) == 4
    # a rec-only run merged again as both, then as a folder only: every format on disk stays listed
    rec_only = tmp_path / "rec-only"
    for index in range(2):
        assert main(["generate", str(root / "ids.npy"), *common, "-k", "1", "--format", "rec", "--out", str(rec_only),
                     "--shard", f"{index}/2"]) == 0
    assert main(["generate", "--merge", "--out", str(rec_only)]) == 0 and not (rec_only / "images").exists()
    assert main(["generate", "--merge", "--format", "both", "--out", str(rec_only)]) == 0 and (rec_only / "images").is_dir()
    assert main(["generate", "--merge", "--format", "folder", "--out", str(rec_only)]) == 0
    assert set(json.loads((rec_only / "manifest.json").read_text())["outputs"]) >= {"folder", "rec"}


def test_cli_shards_must_share_the_weights_and_mistakes_fail_before_loading(cli_inputs, tmp_path, monkeypatch, capsys):
    import shutil

    from hyperface.generation.arc2face import Arc2FaceGenerator

    root, common, _ = cli_inputs
    arc2face = Path(common[common.index("--arc2face") + 1])
    moved, tuned = tmp_path / "copy" / "Arc2Face", tmp_path / "tuned" / "Arc2Face"
    shutil.copytree(arc2face, moved)
    shutil.copytree(arc2face, tuned)
    weights = tuned / "arc2face" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last float becomes 1.0: another fine-tune, same layout
    weights.write_bytes(bytes(data))

    def argv(folder: Path, index: int) -> list[str]:
        flags = list(common)
        flags[flags.index("--arc2face") + 1] = str(folder)
        return ["generate", str(root / "ids.npy"), *flags, "-k", "1", "--out", str(tmp_path / "out"), "--shard", f"{index}/2"]

    assert main(argv(arc2face, 0)) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model_paths"]["arc2face"] == str(arc2face.resolve()) and len(run["weights"]["arc2face"]) == 64

    loads = []
    real_load = Arc2FaceGenerator.from_pretrained.__func__
    monkeypatch.setattr(Arc2FaceGenerator, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or real_load(cls, *a, **k)))
    assert main(argv(tuned, 1)) == 2  # other UNet weights: refused, before loading any model
    err = capsys.readouterr().err
    assert "weights" in err and "arc2face" in err and "Traceback" not in err and loads == []
    assert f"its models came from arc2face {arc2face.resolve()}" in err  # where the run's own models were
    # A mistake in --out fails before loading, too: a finished single run without --resume.
    single = ["generate", str(root / "ids.npy"), *common, "-k", "1", "--out", str(tmp_path / "single")]
    assert main(single) == 0 and len(loads) == 1
    assert main(single) == 2 and "not empty" in capsys.readouterr().err and len(loads) == 1
    assert main([*single, "--resume"]) == 0 and len(loads) == 1  # finished: nothing to resume, nothing loaded
    (moved / "README.md").write_text("a model card")  # files the loader does not read do not count
    assert main(argv(moved, 1)) == 0  # the same weights copied elsewhere: content, not path, counts
    assert main(["generate", "--merge", "--out", str(tmp_path / "out")]) == 0
    assert len(RecordIODataset(tmp_path / "out" / "rec")) == 4


def test_cli_a_failed_model_load_does_not_pin_run_json(cli_inputs, tmp_path, capsys):
    import shutil

    root, common, fr_model = cli_inputs
    arc2face = Path(common[common.index("--arc2face") + 1])
    broken = tmp_path / "Arc2Face"
    shutil.copytree(arc2face, broken)
    weights = broken / "arc2face" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # an interrupted download
    flags = list(common)
    flags[flags.index("--arc2face") + 1] = str(broken)
    argv = ["generate", str(root / "ids.npy"), *flags, "-k", "1", "--out", str(tmp_path / "out"), "--shard", "0/2",
            "--fr-model", str(fr_model.parent)]  # a folder holding backbone.pth, as train writes it
    assert main(argv) == 2 and "cannot load the UNet" in capsys.readouterr().err
    weights.write_bytes(good)  # downloaded again: the same command now runs, though run.json was written
    assert main(argv) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    from hyperface.common.io import file_sha256

    assert run["weights"]["fr_model"] == file_sha256(fr_model) and run["fr_model"] == fr_model.name


def test_cli_warns_when_the_filter_rejects_most_renders(cli_inputs, tmp_path, hyperface_log):
    import logging

    root, common, fr_model = cli_inputs
    ids = np.load(root / "ids.npy")
    ids[3] = ids[1]  # one person twice: rendered as asked, with a warning
    np.save(tmp_path / "ids.npy", ids)
    argv = ["generate", str(tmp_path / "ids.npy"), *common, "-k", "1", "--out", str(tmp_path / "out"),
            "--fr-model", str(fr_model), "--min-similarity", "0.99", "--max-attempts", "2", "--format", "rec"]
    assert main(argv) == 0
    stats = json.loads((tmp_path / "out" / "acceptance.json").read_text())["summary"]
    assert stats["acceptance_rate"] == 0.0 and stats["images_filled_below_threshold"] == 4
    messages = [(r.levelno, r.getMessage()) for r in hyperface_log]
    assert any(level == logging.INFO and "0.0% cleared --min-similarity 0.99" in text and "8 renders" in text for level, text in messages)
    assert any(level == logging.WARNING and "is --fr-model the FR model" in text for level, text in messages)
    assert any(level == logging.WARNING and "1 identity row(s) repeat an earlier row exactly, e.g. rows [3]" in text
               for level, text in messages)


@pytest.mark.parametrize(
    "array, flags, message",
    [
        (np.ones((3, 128), np.float32) / np.sqrt(128), [], "dimension 128, expected 512"),
        (np.ones((3, 512), np.float32), [], "unit-norm"),
        (None, ["--sd15-missing"], "stable-diffusion-v1-5"),
        (None, ["--min-similarity", "0.4"], "fr-model"),
        (None, ["--resolution", "0"], "--resolution must be between 8 and 4096"),
        (None, ["--resolution", "2000000"], "--resolution must be between 8 and 4096"),
        (None, ["--seed", "-1"], "--seed must be an integer from 0 to"),
        (None, ["--seed", str(2**64)], "--seed must be an integer from 0 to 9223372036854775807"),
        (None, ["--shard", "0/2", "--overwrite"], "--overwrite with several shards"),
        (None, ["--align", "detect", "--detector", "nowhere.onnx"], "--detector file not found"),
        (None, ["--lcm-lora", "NOT_A_LORA"], "holds no LoRA tensors"),
        (None, ["--guidance", "nan"], "--guidance must be a finite number"),
        (None, ["--guidance", "0.5"], "--guidance must be >= 1"),
        (None, ["--perturbation-scale", "nan"], "--perturbation-scale must be a finite number"),
        (None, ["EMBED_GALLERY"], "is a `hyperface embed` gallery (embeddings of real faces), not packed identities: make "
                                  "identities from it with `hyperface pack --identities N --gallery"),
    ],
)
def test_cli_bad_inputs_fail_with_one_clear_line(cli_inputs, tmp_path, capsys, array, flags, message):
    root, common, _ = cli_inputs
    ids = root / "ids.npy"
    if array is not None:
        ids = tmp_path / "bad.npy"
        np.save(ids, array)
    common = list(common)
    if "--sd15-missing" in flags:
        common[common.index("--sd15") + 1] = str(tmp_path / "nowhere")
        flags = []
    if "NOT_A_LORA" in flags:  # a full UNet file given as the LoRA: refused from its header, before any hashing
        from safetensors.numpy import save_file

        save_file({"conv_in.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "unet.safetensors"))
        flags = [str(tmp_path / "unet.safetensors") if f == "NOT_A_LORA" else f for f in flags]
    if "EMBED_GALLERY" in flags:  # `hyperface embed --out runs/gallery` given where packed identities go
        ids = tmp_path / "gallery"
        ids.mkdir()
        np.save(ids / "gallery.npy", np.load(root / "ids.npy"))
        (ids / "manifest.json").write_text('{"stage": "embed", "status": "complete"}')
        flags = []
    assert main(["generate", str(ids), *common, "-k", "1", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not (tmp_path / "o" / "parts").exists()  # refused before any rendering


def test_an_fr_model_without_a_threshold_scores_every_image_and_keeps_it(cli_inputs, tmp_path):
    root, common, fr_model = cli_inputs
    out = tmp_path / "out"
    assert main(["generate", str(root / "ids.npy"), *common, "-k", "2", "--out", str(out), "--fr-model", str(fr_model),
                 "--format", "rec"]) == 0
    stats = json.loads((out / "acceptance.json").read_text())
    assert stats["summary"]["renders"] == 8 and stats["summary"]["images"] == 8  # nothing rejected
    assert stats["summary"]["mean_similarity"] is not None  # but every image scored, for choosing a threshold
    assert all(v is not None for v in stats["per_identity"]["mean_similarity"])


def test_an_fr_model_of_another_dimension_is_refused_before_the_generator_loads(cli_inputs, tmp_path, monkeypatch, capsys):
    from hyperface.generation.arc2face import Arc2FaceGenerator
    from hyperface.recognition.iresnet import iresnet
    from recognition_fixtures import save_backbone

    root, common, _ = cli_inputs
    small = save_backbone(iresnet("r_tiny", embedding_size=64).eval(), tmp_path / "r64.pth")

    def no_loading(*args, **kwargs):
        raise AssertionError("the generator loaded before the FR model was checked")

    monkeypatch.setattr(Arc2FaceGenerator, "from_pretrained", no_loading)
    argv = ["generate", str(root / "ids.npy"), *common, "-k", "1", "--out", str(tmp_path / "o"), "--fr-model", str(small)]
    assert main(argv) == 2
    assert "gives 64-d embeddings but the identities are 512-d" in capsys.readouterr().err


def test_the_filter_scores_a_render_the_model_cannot_embed_as_cosine_0(cli_inputs, monkeypatch):
    from hyperface.generation.postprocess import cosine_to_references, load_embed_fn
    from hyperface.recognition.recognizers import Recognizer
    from recognition_fixtures import random_faces

    _, _, fr_model = cli_inputs
    embed_fn, _ = load_embed_fn(fr_model)
    crops = random_faces(3, seed=4)
    references = random_identities(3, seed=5)
    expected = cosine_to_references(embed_fn, crops, references)
    original = Recognizer.features

    def nan_for_the_second(self, images):
        feats = original(self, images)
        feats[1] = np.nan
        return feats

    monkeypatch.setattr(Recognizer, "features", nan_for_the_second)
    got = cosine_to_references(embed_fn, crops, references)
    assert got[1] == 0.0 and np.allclose(got[[0, 2]], expected[[0, 2]], atol=1e-6)


def _hold_lock_in_another_process(lock_file: Path):
    """A second process holding a shard's lock, as a running shard does (flock is per process)."""
    import subprocess
    import sys

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; h = open(sys.argv[1], 'a+b'); fcntl.flock(h, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(lock_file)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_running_shard_blocks_its_twin_other_settings_and_the_merge(tmp_path):
    identities = random_identities(4, seed=3)
    config = GenerationConfig(images_per_identity=1, seed=1)
    out = tmp_path / "o"
    generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(0, 2), aligner=keep_as_is, show_progress=False)
    (out / "parts" / "shard-00000-of-00002" / "journal.jsonl").write_bytes(b"")  # as if shard 0 had only just started
    holder = _hold_lock_in_another_process(out / "parts" / "shard-00000-of-00002" / "lock")
    try:
        with pytest.raises(HyperfaceError, match=r"another process is rendering shard 0/2"):
            generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(0, 2), aligner=keep_as_is, show_progress=False)
        generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(1, 2), aligner=keep_as_is, show_progress=False)
        with pytest.raises(HyperfaceError, match=r"still rendering into .* \(shard-00000-of-00002\)"):
            merge_parts(out)
    finally:
        holder.kill()
        holder.wait()
    generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(0, 2), aligner=keep_as_is, show_progress=False)
    assert merge_parts(out)["num_images"] == 4
    single = tmp_path / "single"  # a one-shard job that has rendered nothing yet is not cleared under it
    (single / "parts" / "shard-00000-of-00001").mkdir(parents=True)
    (single / ".hyperface-run").write_text("generate\n")
    holder = _hold_lock_in_another_process(single / "parts" / "shard-00000-of-00001" / "lock")
    try:
        with pytest.raises(HyperfaceError, match=r"another process is generating into .*single"):
            generate_dataset(PaintedGenerator(), identities, single, config, aligner=keep_as_is, overwrite=True, show_progress=False)
        assert (single / "parts" / "shard-00000-of-00001" / "lock").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_part_rendered_with_other_settings_is_refused_by_the_merge_and_its_resume(tmp_path):
    identities = random_identities(4, seed=4)
    config = GenerationConfig(images_per_identity=1, seed=1)
    out = tmp_path / "o"
    for index in range(2):
        generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(index, 2), aligner=keep_as_is, show_progress=False)
    settings = out / "parts" / "shard-00001-of-00002" / "settings.json"
    recorded = json.loads(settings.read_text())
    assert recorded["config"]["seed"] == 1 and "batch_size" not in recorded["config"]
    recorded["config"]["seed"] = 2  # what a shard that raced the others with --seed 2 would have left
    settings.write_text(json.dumps(recorded))
    with pytest.raises(HyperfaceError, match=r"shard-00001-of-00002 was rendered with other settings \(--seed 1 -> 2\)"):
        merge_parts(out)
    with pytest.raises(HyperfaceError, match=r"holds images rendered with other settings \(--seed 2 -> 1\)"):
        generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(1, 2), aligner=keep_as_is, show_progress=False)


def test_run_json_is_written_by_exactly_one_of_two_writers(tmp_path):
    from hyperface.common.io import save_json_if_absent

    assert save_json_if_absent(tmp_path / "sub" / "run.json", {"seed": 1}) is True
    assert save_json_if_absent(tmp_path / "sub" / "run.json", {"seed": 2}) is False
    assert json.loads((tmp_path / "sub" / "run.json").read_text()) == {"seed": 1}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["run.json"]  # no temporary left


def test_a_merged_run_without_its_parts_refuses_other_settings(tmp_path):
    identities = random_identities(3, seed=5)
    out = tmp_path / "o"
    config = GenerationConfig(images_per_identity=1, seed=1)
    generate_dataset(PaintedGenerator(), identities, out, config, aligner=keep_as_is, keep_parts=False, show_progress=False)
    assert not (out / "parts").exists()
    other = GenerationConfig(images_per_identity=2, seed=7)
    with pytest.raises(HyperfaceError, match=r"other settings \(--seed 1 -> 7, -k/--images-per-identity 1 -> 2\)"):
        generate_dataset(PaintedGenerator(), identities, out, other, aligner=keep_as_is, resume=True, show_progress=False)
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 1


def test_nan_pixels_stop_the_render_with_the_cause_named(monkeypatch):
    import torch

    generator = session_tiny_generator()
    monkeypatch.setattr(generator, "_vae_decode", lambda chunk, return_dict=False: (torch.full((chunk.shape[0], 3, 8, 8), float("nan")),))
    with pytest.raises(HyperfaceError, match=r"NaN/inf pixels for 2 of 2 images: fp16 overflow"):
        generator.decode(torch.zeros(2, 4, 4, 4))


def test_shard_locks_survive_probes_file_systems_without_locks_and_refusals(tmp_path, monkeypatch):
    import fcntl

    from hyperface.common import io as common_io
    from hyperface.common.io import holds_lock
    from hyperface.generation.dataset import claim_shard, open_run, release_shard, running_shards

    identities = random_identities(2, seed=9)
    config = GenerationConfig(images_per_identity=1, seed=1)
    real_flock, failures = fcntl.flock, []

    def busy_three_times(handle, operation):  # another process's running_shards() probe, three times over
        if operation & fcntl.LOCK_EX and len(failures) < 3:
            failures.append(operation)
            raise BlockingIOError(errno.EWOULDBLOCK, "busy")
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", busy_three_times)
    claim_shard(tmp_path / "a", Shard(0, 1))
    assert len(failures) == 3 and holds_lock(tmp_path / "a" / "parts" / "shard-00000-of-00001" / "lock")
    release_shard(tmp_path / "a", Shard(0, 1))

    def no_locks_here(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks_here)  # NFS without lockd: run, unlocked, not refused
    claim_shard(tmp_path / "b", Shard(0, 1))
    assert running_shards(tmp_path / "b") == []
    monkeypatch.setattr(fcntl, "flock", real_flock)

    # a refused start leaves no lock behind in a process that lives on (a notebook)
    out = tmp_path / "c"
    generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(0, 2), aligner=keep_as_is, show_progress=False)
    with pytest.raises(HyperfaceError, match="other settings"):
        open_run(out, identities, GenerationConfig(images_per_identity=1, seed=2), embedding_dim=512, shard=Shard(1, 2))
    assert not any(key.startswith(str(out.resolve())) for key in common_io._HELD_LOCKS)


def test_a_run_from_before_a_fingerprinted_file_resumes(tmp_path):
    identities = random_identities(2, seed=10)
    config = GenerationConfig(images_per_identity=1, seed=1)
    out = tmp_path / "o"
    generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(0, 2), aligner=keep_as_is,
                     run_info={"weights": {"arc2face": "a"}}, show_progress=False)
    # the version that also fingerprints the detector, on a run made before it did
    generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(1, 2), aligner=keep_as_is,
                     run_info={"weights": {"arc2face": "a", "detector": "d"}}, show_progress=False)
    with pytest.raises(HyperfaceError, match=r"weights\.arc2face"):
        generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(1, 2), aligner=keep_as_is,
                         run_info={"weights": {"arc2face": "b"}}, show_progress=False)
    assert merge_parts(out)["num_images"] == 2


def test_one_merge_at_a_time(tmp_path):
    identities = random_identities(2, seed=11)
    out = tmp_path / "o"
    for index in range(2):
        generate_dataset(PaintedGenerator(), identities, out, GenerationConfig(images_per_identity=1, seed=1),
                         shard=Shard(index, 2), aligner=keep_as_is, show_progress=False)
    holder = _hold_lock_in_another_process(out / ".merge.lock")
    try:
        with pytest.raises(HyperfaceError, match="another process is merging"):
            merge_parts(out)
        assert not (out / "images").exists() and not (out / "images.tmp").exists()
    finally:
        holder.kill()
        holder.wait()
    assert merge_parts(out)["num_images"] == 2


def test_shards_restarted_together_wait_for_the_one_replacing_a_failed_attempts_run_json(tmp_path):
    import shutil
    import subprocess
    import sys

    identities = random_identities(2, seed=12)
    config = GenerationConfig(images_per_identity=1, seed=1)
    generate_dataset(PaintedGenerator(), identities, tmp_path / "model", config, shard=Shard(0, 2), aligner=keep_as_is,
                     show_progress=False)
    out = tmp_path / "o"  # a failed attempt with --seed 7: run.json, nothing rendered
    generate_dataset(PaintedGenerator(), identities, out, GenerationConfig(images_per_identity=1, seed=7),
                     shard=Shard(0, 2), aligner=keep_as_is, show_progress=False)
    shutil.rmtree(out / "parts")
    (out / "parts" / "shard-00000-of-00002").mkdir(parents=True)
    # shard 0, corrected, holds its lock and replaces run.json half a second later
    replacer = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, shutil, sys, time; h = open(sys.argv[1], 'a+b'); fcntl.flock(h, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(0.5); shutil.copy(sys.argv[2], sys.argv[3]); time.sleep(30)",
         str(out / "parts" / "shard-00000-of-00002" / "lock"), str(tmp_path / "model" / "run.json"), str(out / "run.json")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert replacer.stdout.readline().strip() == "held"
        generate_dataset(PaintedGenerator(), identities, out, config, shard=Shard(1, 2), aligner=keep_as_is, show_progress=False)
    finally:
        replacer.kill()
        replacer.wait()
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 1


def test_cli_a_rank_requeued_after_the_merge_renders_nothing(cli_inputs, tmp_path):
    root, common, _ = cli_inputs
    out = tmp_path / "out"
    for index in range(2):
        assert main(["generate", str(root / "ids.npy"), *common, "-k", "1", "--out", str(out), "--shard", f"{index}/2"]) == 0
    assert main(["generate", "--merge", "--no-keep-parts", "--out", str(out)]) == 0
    assert main(["generate", str(root / "ids.npy"), *common, "-k", "1", "--out", str(out), "--shard", "0/2", "--resume"]) == 0
    assert not list((out / "parts").glob("*/images.bin"))  # nothing rendered again
    before = (out / "manifest.json").read_bytes()
    assert main(["generate", "--merge", "--out", str(out)]) == 0  # merged already: nothing to do, nothing rewritten
    assert (out / "manifest.json").read_bytes() == before and len(RecordIODataset(out / "rec")) == 4
    (out / "images").rename(tmp_path / "images-elsewhere")
    assert main(["generate", "--merge", "--format", "folder", "--out", str(out)]) == 2  # nothing left to build it from


def test_a_shard_whose_run_json_another_shard_replaced_stops_before_writing(tmp_path):
    """Nothing rendered yet, so a shard started with other settings takes run.json; one already
    rendering with the old settings stops at its first commit, its renders not kept."""
    identities = random_identities(4, seed=13)
    out = tmp_path / "o"
    old, new = GenerationConfig(images_per_identity=1, seed=1), GenerationConfig(images_per_identity=1, seed=2)
    generate_dataset(PaintedGenerator(), identities, tmp_path / "model", new, aligner=keep_as_is, show_progress=False)
    replacement = (tmp_path / "model" / "run.json").read_text()

    class RacedGenerator(PaintedGenerator):
        def generate(self, embeddings, seeds):
            (out / "run.json").write_text(replacement)  # shard 1 started with --seed 2 meanwhile
            return super().generate(embeddings, seeds)

    with pytest.raises(HyperfaceError, match=r"another shard replaced .*run.json with other settings \(--seed 1 -> 2\)"):
        generate_dataset(RacedGenerator(), identities, out, old, shard=Shard(0, 2), aligner=keep_as_is, show_progress=False)
    assert (out / "parts" / "shard-00000-of-00002" / "journal.jsonl").read_bytes() == b""


def test_cli_a_merged_set_records_its_rendering_command_and_formats(cli_inputs, tmp_path, monkeypatch, capsys):
    """`dataset info` on a sharded set names the command that rendered it (its parts are gone after
    --no-keep-parts), the merge as "merged by", and params.format the formats on disk."""
    import sys

    root, common, _ = cli_inputs
    out = tmp_path / "out"

    def run(*argv: str) -> int:
        monkeypatch.setattr(sys, "argv", ["hyperface", *argv])
        return main(list(argv))

    renders = [["generate", str(root / "ids.npy"), *common, "-k", "1", "--format", "rec", "--out", str(out), "--shard", f"{i}/2"]
               for i in range(2)]
    assert all(run(*argv) == 0 for argv in renders)
    merge = ["generate", "--merge", "--format", "both", "--no-keep-parts", "--out", str(out)]
    assert run(*merge) == 0 and not (out / "parts").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == " ".join(["hyperface", *renders[0]])
    assert manifest["render_commands"] == [" ".join(["hyperface", *argv]) for argv in renders]
    assert manifest["merged_by"] == " ".join(["hyperface", *merge])
    assert manifest["params"]["format"] == "both" and json.loads((out / "run.json").read_text())["format"] == "rec"
    capsys.readouterr()
    assert main(["dataset", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--shard 0/2\n" in text and "made by       hyperface generate (" in text
    made_by = next(line for line in text.splitlines() if "made by" in line)
    assert "--merge" not in made_by and "merged by     hyperface generate --merge --format both" in text
    # a one-shard run merges in its own process: its command is what made it, and nothing says "merged by"
    single = tmp_path / "single"
    assert run("generate", str(root / "ids.npy"), *common, "-k", "1", "--out", str(single)) == 0
    manifest = json.loads((single / "manifest.json").read_text())
    assert "merged_by" not in manifest and "render_commands" not in manifest and "--merge" not in manifest["command"]


def test_cli_resume_with_another_k_names_the_flag_not_its_derived_max_attempts(cli_inputs, tmp_path, capsys):
    root, common, _ = cli_inputs
    argv = ["generate", str(root / "ids.npy"), *common, "--out", str(tmp_path / "o")]
    assert main([*argv, "-k", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "-k", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "other settings (-k/--images-per-identity 2 -> 3)" in err and "max_attempts" not in err and "Traceback" not in err


def test_run_changes_name_max_attempts_only_where_it_was_set():
    from hyperface.generation.dataset import comparable_settings, describe_run_changes

    def settings(**config) -> dict:
        run = {"config": GenerationConfig(**config).describe(), "format": "rec", "align": "ffhq"}
        return comparable_settings(run, run)

    filtered = {"min_similarity": 0.5}
    assert describe_run_changes(settings(images_per_identity=2, **filtered), settings(images_per_identity=3, **filtered)) == \
        "-k/--images-per-identity 2 -> 3"  # max_attempts 4 -> 6 followed -k
    assert describe_run_changes(settings(images_per_identity=2, max_attempts=5, **filtered),
                                settings(images_per_identity=3, **filtered)) == "--max-attempts 5 -> 6, -k/--images-per-identity 2 -> 3"
    assert describe_run_changes(settings(images_per_identity=2, perturbation=Perturbation("noise", 0.1)),
                                {**settings(images_per_identity=2), "format": "both"}) == \
        "--format 'rec' -> 'both', --perturbation 'noise' -> 'angle', --perturbation-scale 0.1 -> 10.0"


class RecordingBar:
    """A stand-in for common.runtime.progress's bar: what the runner told it, when."""

    def __init__(self, total=None, desc="", unit="it", **kwargs):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, 0, {}

    def update(self, n=1):
        self.n += n

    def set_postfix(self, refresh=True, **values):
        self.postfix = values

    def close(self):
        pass


@pytest.mark.parametrize("filtered", [False, True])
def test_the_progress_bar_counts_images_as_they_render(monkeypatch, tmp_path, filtered):
    """Not only when an identity finishes: a first batch shows at once (img/s, time left), each identity
    counts its first K renders, so the bar ends at N x K with a filter too; the postfix counts identities."""
    bars: list[RecordingBar] = []
    monkeypatch.setattr(dataset_module, "progress", lambda **kwargs: bars.append(RecordingBar(**kwargs)) or bars[-1])
    seen = []  # (bar count, postfix) at the start of each render call: what the previous batches showed

    class Watched(PaintedGenerator):
        def generate(self, embeddings, seeds):
            seen.append((bars[0].n, dict(bars[0].postfix)))
            return super().generate(embeddings, seeds)

    generator = Watched()
    filters = dict(min_similarity=0.5, max_attempts=8) if filtered else {}
    config = GenerationConfig(images_per_identity=4, seed=5, batch_size=3, **filters)
    generate_dataset(generator, random_identities(3, seed=3), tmp_path / "o", config, aligner=keep_as_is,
                     embed_fn=generator.embed if filtered else None, formats="rec", merge=False)
    bar = bars[0]
    assert (bar.total, bar.unit, bar.desc) == (12, "img", "generate 0/1")
    assert seen[1] == (3, {"identities": "0/3", "renders": 3})  # 3 images of identity 0 rendered, none finished
    assert all(b <= a for (b, _), (a, _) in zip(seen, seen[1:])) and all(n <= 12 for n, _ in seen)
    assert bar.n == 12 and bar.postfix == {"identities": "3/3", "renders": generator.rendered}
    assert generator.rendered > 12 if filtered else generator.rendered == 12


def test_a_resolution_is_checked_before_the_weights_load_and_warned_once(cli_inputs, tmp_path, monkeypatch, capsys, hyperface_log):
    """--resolution off the UNet's grid is refused, and one off its native size warned about, from the
    config files: before minutes of loading SD1.5-sized weights, and only once for the whole run."""
    import hyperface.generation.arc2face as arc2face

    root, common, _ = cli_inputs
    ids = str(root / "ids.npy")
    assert main(["generate", ids, *common, "-k", "1", "--out", str(tmp_path / "odd"), "--resolution", "34"]) == 2
    assert "--resolution must be a multiple of 4, got 34" in capsys.readouterr().err

    def no_loading(*args, **kwargs):
        raise HyperfaceError("weights loaded")

    with monkeypatch.context() as patch:
        patch.setattr(arc2face, "load_arc2face_components", no_loading)
        assert main(["generate", ids, *common, "-k", "1", "--out", str(tmp_path / "big"), "--resolution", "64"]) == 2
    assert "weights loaded" in capsys.readouterr().err
    assert [r.getMessage()[:46] for r in hyperface_log if "--resolution" in r.getMessage()] == ["--resolution 64 is not the 32 px the UNet was "]
    hyperface_log.clear()
    assert main(["generate", ids, *common, "-k", "1", "--out", str(tmp_path / "run"), "--resolution", "64", "--format", "rec"]) == 0
    assert len([r for r in hyperface_log if "--resolution" in r.getMessage()]) == 1
