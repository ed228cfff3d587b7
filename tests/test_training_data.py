"""Training data: deterministic augmentation, sharded resumable sampling, label checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperface.common.errors import HyperfaceError
from hyperface.training.data import (
    AugmentConfig,
    ResumableSampler,
    TrainDataset,
    augment,
    check_labels,
    low_resolution,
    photometric,
    random_crop_in_place,
)


class ListReader:
    """A minimal reader with the hyperface.datasets interface."""

    def __init__(self, images: list[np.ndarray], labels: list[int], num_classes: int):
        self.images, self.labels, self.num_classes = images, np.asarray(labels, dtype=np.int64), num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def _image(seed: int = 0, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_crop_keeps_a_box_in_place_and_zeroes_the_rest():
    image = _image() | 1  # no zero pixels, so the kept box is exactly the non-zero region
    out = random_crop_in_place(image, np.random.default_rng(3))
    rows, cols = np.nonzero(out.any(axis=2))
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert np.array_equal(out[top:bottom, left:right], image[top:bottom, left:right])
    kept = (bottom - top) * (right - left)
    assert 0.15 * 112 * 112 <= kept <= 112 * 112 and (out == 0).any()


def test_low_resolution_keeps_size_and_removes_detail():
    image = _image(1)
    out = low_resolution(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8
    # Random noise has no low-frequency content: any downscale-upscale changes it a lot.
    assert np.abs(out.astype(int) - image).mean() > 5


def test_photometric_changes_colour_statistics_only():
    image = np.full((8, 8, 3), (200, 100, 50), np.uint8)
    out = photometric(image, np.random.default_rng(1))
    assert out.shape == image.shape and not np.array_equal(out, image)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) == 1  # a flat image stays flat


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    reader = ListReader([_image(i) for i in range(6)], [0, 1, 2, 0, 1, 2], 3)
    dataset = TrainDataset(reader, augment=AugmentConfig.adaface(0.5), seed=7)
    first = [dataset[d][0] for d in range(12)]
    again = [dataset[d][0] for d in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # Epoch 1 (draw ids 6..11) sees the same images augmented differently.
    assert not all(torch.equal(first[i], first[i + 6]) for i in range(6))
    assert first[0].shape == (3, 112, 112) and first[0].dtype == torch.uint8
    # With no augmentation the tensor is the image, channels first.
    plain = TrainDataset(reader, augment=AugmentConfig(flip=False))
    assert np.array_equal(plain[2][0].permute(1, 2, 0).numpy(), reader.images[2])


def test_flip_mirrors_about_half_the_samples():
    image = _image(2)
    flips = sum(
        np.array_equal(augment(image, AugmentConfig(), np.random.default_rng(k)), image[:, ::-1]) for k in range(200)
    )
    assert 70 < flips < 130


def test_sampler_shards_cover_every_sample_and_resume_continues_exactly():
    per_rank = [list(ResumableSampler(10, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(p) == 4 for p in per_rank)  # padded to 12
    assert set(np.concatenate(per_rank).tolist()) == set(range(10))
    sampler = ResumableSampler(10, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(d % 10 for d in full) == list(range(10)) and all(d // 10 == 2 for d in full)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert [d % 10 for d in sampler] != [d % 10 for d in full]  # reshuffled every epoch


def test_label_problems_are_refused():
    with pytest.raises(HyperfaceError, match="declares 3 classes"):
        check_labels(np.array([0, 1, 3]), 3)
    assert check_labels(np.array([0, 1, 1, 2]), 3) == 0
    assert check_labels(np.array([0, 7, 7]), 10) == 8  # sparse labels: 8 centres without an image
    with pytest.raises(HyperfaceError, match="empty"):
        check_labels(np.array([], dtype=np.int64), 3)
    reader = ListReader([_image(0)], [5], 3)
    with pytest.raises(HyperfaceError, match="outside 0..2"):
        TrainDataset(reader)[0]
    with pytest.raises(HyperfaceError, match="empty"):
        TrainDataset(ListReader([], [], 3))


def test_images_of_other_sizes_are_resized_with_a_warning(hyperface_log):
    reader = ListReader([_image(0, size=128)], [0], 1)
    assert TrainDataset(reader, augment=AugmentConfig(flip=False))[0][0].shape == (3, 112, 112)
    warned = [r.getMessage() for r in hyperface_log if "resized" in r.getMessage()]
    assert len(warned) == 1 and "are 128x128 (the first one read), not 112x112" in warned[0]
    hyperface_log.clear()
    TrainDataset(ListReader([_image(0)], [0], 1))
    assert not [r for r in hyperface_log if "resized" in r.getMessage()]


def test_an_unreadable_image_is_replaced_by_the_next_sample(tmp_path, hyperface_log):
    from hyperface.datasets import ImageFolderWriter, open_dataset

    writer = ImageFolderWriter(tmp_path / "data", image_format="png")
    for label, seed in [(0, 1), (0, 2), (1, 3)]:
        writer.add(_image(seed), label=label, index=seed)
    writer.close()
    reader = open_dataset(tmp_path / "data")
    (tmp_path / "data" / "000000" / "0002.png").write_bytes(b"not an image")  # sample 1
    dataset = TrainDataset(reader, augment=AugmentConfig(flip=False))
    hyperface_log.clear()
    image, label = dataset[1]
    warnings = [r.getMessage() for r in hyperface_log if r.name == "hyperface.train"]
    assert label == 1 and np.array_equal(image.numpy().transpose(1, 2, 0), _image(3))  # sample 2, its label
    assert any("sample 1 is unreadable" in w for w in warnings)
    for path in (tmp_path / "data").rglob("*.png"):
        path.write_bytes(b"junk")
    with pytest.raises(HyperfaceError, match="all unreadable"):
        dataset[0]


def test_low_resolution_draws_each_resize_its_own_interpolation(monkeypatch):
    import cv2

    used = []
    real_resize = cv2.resize
    monkeypatch.setattr(cv2, "resize", lambda img, size, interpolation: used.append(interpolation) or real_resize(img, size, interpolation=interpolation))
    for seed in range(20):
        low_resolution(_image(seed), np.random.default_rng(seed))
    pairs = list(zip(used[::2], used[1::2]))
    assert any(down != up for down, up in pairs)  # independent draws, as AdaFace's augmenter
