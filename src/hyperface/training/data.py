"""Training data: augmentation, a torch Dataset over the hyperface readers, a resumable sampler.

Determinism is what makes ``--resume`` exact: the sampler's order is a function of
``(seed, epoch)`` and every sample's augmentation draws from its own generator seeded by
``(seed, epoch, index)``, so the batch at step *k* is the same whether the run was interrupted or
not, whichever worker process loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hyperface.common.errors import HyperfaceError
from hyperface.common.runtime import get_logger

log = get_logger("hyperface.train")

#: Consecutive unreadable samples replaced by the next readable one before giving up.
MAX_SUBSTITUTIONS = 100

try:  # OpenCV is in the recognition extra; only the low-resolution augmentation needs it.
    import cv2
except ImportError:  # pragma: no cover - exercised only without the extra
    cv2 = None


@dataclass
class AugmentConfig:
    """Training augmentation. Defaults: flip only (arcface_torch); ``adaface()`` adds the rest.

    ``crop_p``, ``low_res_p``, ``photometric_p`` are AdaFace's augmentations (each applied with its
    probability, in that order, before the flip):

    - crop: a RandomResizedCrop box (area 20-100 %, aspect 3/4-4/3) is kept *in place* and the rest
      of the image is zeroed (no resizing, so the face keeps its scale);
    - low resolution: downscale to 20-100 % of the side and back up, each with its own random OpenCV
      interpolation (nearest, linear, area, cubic, Lanczos);
    - photometric: brightness, contrast and saturation jitter, each factor in [0.5, 1.5], in random
      order (torchvision's ColorJitter(0.5, 0.5, 0.5, 0) semantics).
    """

    flip: bool = True
    crop_p: float = 0.0
    low_res_p: float = 0.0
    photometric_p: float = 0.0

    @classmethod
    def adaface(cls, p: float = 0.2) -> "AugmentConfig":
        return cls(flip=True, crop_p=p, low_res_p=p, photometric_p=p)


def random_crop_in_place(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep a random RandomResizedCrop-style box where it is; zero everything else."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.2, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            out = np.zeros_like(image)
            out[top : top + h, left : left + w] = image[top : top + h, left : left + w]
            return out
    return image  # torchvision falls back to the whole image


_INTERPOLATIONS = ("INTER_NEAREST", "INTER_LINEAR", "INTER_AREA", "INTER_CUBIC", "INTER_LANCZOS4")


def low_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Downscale to a random 20-100 % of the side and back, each resize with a random interpolation."""
    if cv2 is None:
        raise HyperfaceError(
            "low-resolution augmentation needs OpenCV: pip install 'hyperface[recognition]' "
            "(or opencv-python-headless)"
        )
    height, width = image.shape[:2]
    side = max(1, int(rng.uniform(0.2, 1.0) * height))
    down, up = (getattr(cv2, _INTERPOLATIONS[int(i)]) for i in rng.integers(0, len(_INTERPOLATIONS), 2))
    small = cv2.resize(image, (side, side), interpolation=down)  # AdaFace draws each resize's own
    return cv2.resize(small, (width, height), interpolation=up)


def _gray(image: np.ndarray) -> np.ndarray:
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def photometric(image: np.ndarray, rng: np.random.Generator, strength: float = 0.5) -> np.ndarray:
    """Brightness, contrast and saturation jitter in random order (ColorJitter semantics)."""
    out = image.astype(np.float32)
    for op in rng.permutation(3):
        factor = rng.uniform(1.0 - strength, 1.0 + strength)
        if op == 0:  # brightness: scale towards black
            out = out * factor
        elif op == 1:  # contrast: blend with the mean grey level
            out = out * factor + (1.0 - factor) * float(_gray(out).mean())
        else:  # saturation: blend with the grey image
            out = out * factor + (1.0 - factor) * _gray(out)[..., None]
        out = np.clip(out, 0.0, 255.0)
    return out.round().astype(np.uint8)


def augment(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Apply ``config`` to one uint8 HWC RGB image with the sample's own generator."""
    # Draw every decision even when its probability is 0, so streams don't shift between configs.
    do_crop, do_low, do_photo, do_flip = rng.random(4)
    if do_crop < config.crop_p:
        image = random_crop_in_place(image, rng)
    if do_low < config.low_res_p:
        image = low_resolution(image, rng)
    if do_photo < config.photometric_p:
        image = photometric(image, rng)
    if config.flip and do_flip < 0.5:
        image = image[:, ::-1]
    return image


class TrainDataset(Dataset):
    """A hyperface dataset reader as a torch Dataset of ``(uint8 CHW tensor, label)``.

    Indices are *draw ids* from :class:`ResumableSampler`: ``epoch * len(reader) + index``, so the
    augmentation of each sample is seeded by ``(seed, epoch, index)`` even inside worker processes.
    Images are returned as uint8 (4x less inter-process traffic); the trainer normalises them on
    the device. Images of another size are resized to ``image_size`` (faces must already be
    aligned; resizing is no substitute for alignment).
    """

    def __init__(self, reader: Any, *, augment: AugmentConfig | None = None, seed: int = 0, image_size: int = 112):
        self.reader = reader
        self.augment = augment or AugmentConfig()
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.num_classes = int(reader.num_classes)
        if len(reader) == 0:
            raise HyperfaceError("the training dataset is empty: it holds no images")
        first = np.asarray(self._read(0)[0])
        if first.ndim == 3 and first.shape[:2] != (self.image_size, self.image_size):
            # Unaligned renders (generate --align none) train, resized, into a poor model: say so once.
            log.warning(
                "the training images are %dx%d (the first one read), not %dx%d: each is resized, which is no "
                "substitute for alignment; train on aligned %d px face crops (hyperface generate aligns by default)",
                first.shape[1], first.shape[0], self.image_size, self.image_size, self.image_size,
            )

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, draw: int) -> tuple[torch.Tensor, int]:
        epoch, index = divmod(int(draw), len(self.reader))
        image, label = self._read(index)
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise HyperfaceError(
                f"sample {index} has class label {label}, outside 0..{self.num_classes - 1} "
                "(the dataset's num_classes); rebuild the dataset or its property file"
            )
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise HyperfaceError(f"sample {index} is not an RGB image (shape {image.shape})")
        if image.shape[0] != self.image_size or image.shape[1] != self.image_size:
            if cv2 is None:
                raise HyperfaceError(f"sample {index} is {image.shape[1]}x{image.shape[0]}, expected {self.image_size}")
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        rng = np.random.default_rng([self.seed, epoch, index])
        image = augment(image, self.augment, rng)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), label


    def _read(self, index: int) -> tuple[Any, int]:
        """The sample at ``index``; an undecodable one is replaced by the next readable sample (with
        that sample's label), logged, so one bad file in a million neither stops nor skews a run."""
        for offset in range(MAX_SUBSTITUTIONS + 1):
            try:
                return self.reader[(index + offset) % len(self.reader)]
            except HyperfaceError as exc:
                log.warning("training sample %d is unreadable (%s); using sample %d instead",
                            (index + offset) % len(self.reader), exc, (index + offset + 1) % len(self.reader))
        raise HyperfaceError(
            f"training samples {index}..{index + MAX_SUBSTITUTIONS} are all unreadable: the dataset is damaged"
        )


def check_labels(labels: np.ndarray, num_classes: int) -> int:
    """Refuse datasets whose labels are not all in ``0..num_classes-1``; return how many of the
    classes have no image (sparse labels: each still gets a class centre)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise HyperfaceError("the training dataset is empty: it holds no images")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise HyperfaceError(
            f"class labels span {low}..{high} but the dataset declares {num_classes} classes; "
            "labels must be 0..num_classes-1 (is the property file / folder list stale?)"
        )
    return int(num_classes - np.count_nonzero(np.bincount(labels, minlength=num_classes)))


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded, resumable: DistributedSampler semantics plus a start position.

    Each epoch is a permutation seeded by ``seed + epoch`` (the same on every rank), padded by
    repeating its head so it divides by ``world_size``; rank *r* takes every ``world_size``-th
    element starting at *r*. ``set_epoch(epoch, start)`` skips the first ``start`` of this rank's
    samples (``start = steps done in the epoch * batch size``), which is how ``--resume`` continues at
    the exact next sample. Yields draw ids ``epoch * num_samples + index`` (see :class:`TrainDataset`).
    """

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise HyperfaceError("the training dataset is empty: it holds no images")
        self.num_samples, self.seed, self.shuffle = int(num_samples), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.per_rank = math.ceil(self.num_samples / self.world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=gen)
        else:
            order = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:
            order = torch.cat([order, order[: total - self.num_samples]])
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.num_samples
        for index in self.indices(self.epoch)[self.start :].tolist():
            yield offset + index

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


__all__ = [
    "AugmentConfig",
    "ResumableSampler",
    "TrainDataset",
    "augment",
    "check_labels",
    "low_resolution",
    "photometric",
    "random_crop_in_place",
]
