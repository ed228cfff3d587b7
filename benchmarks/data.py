"""Training-data throughput (images/s) of `hyperface train`'s loader vs an arcface_torch-style one.

Can the CPUs feed the GPU? The H100 trains r50 at about 4,400 img/s (BENCHMARKS.md), so this prints
images/s per loader worker and how many workers that rate needs.

Both loaders read the same insightface RecordIO (written here: 112x112 JPEGs at quality 95, blurred
noise so they compress like faces) through a shuffling sampler, batch 256:

- baseline (arcface_torch's ``MXFaceDataset``): decode the record, then torchvision-style
  transforms (PIL image, random horizontal flip, float tensor, normalise to [-1, 1]) in the worker,
  so float32 batches cross the process boundary. Emulated with OpenCV, PIL and NumPy (no mxnet or
  torchvision here); the decode is the same libjpeg work.
- ours: :class:`hyperface.training.data.TrainDataset` exactly as ``hyperface train`` runs it:
  uint8 batches (the trainer normalises on the device), flip or ``--augment adaface``.

    python benchmarks/data.py                 # ~1 min on 2 cores
    python benchmarks/data.py --workers 8 --images 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

H100_TRAIN_RATE = 4423  # img/s, r50 batch 256 on an H100 (BENCHMARKS.md)


def write_dataset(folder: Path, images: int, seed: int = 0) -> None:
    import cv2

    from hyperface.datasets.recordio import RecordIOWriter

    rng = np.random.default_rng(seed)
    distinct = [cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (7, 7), 2) for _ in range(64)]
    with RecordIOWriter(folder) as writer:
        for i in range(images):
            writer.add(distinct[i % len(distinct)], i // 50)  # 50 images per identity


class ArcfaceTorchStyleDataset(torch.utils.data.Dataset):
    """MXFaceDataset's per-sample work: decode, PIL, random flip, float tensor normalised to [-1, 1]."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        from PIL import Image

        from hyperface.datasets.codec import decode_image

        data, label = self.reader.read_raw(index)
        image = Image.fromarray(decode_image(data))
        if np.random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        return (tensor - 0.5) / 0.5, torch.tensor(label, dtype=torch.long)


def images_per_second(dataset, workers: int, batch_size: int, rounds: int) -> float:
    from hyperface.training.data import ResumableSampler

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=ResumableSampler(len(dataset), seed=0), num_workers=workers,
        drop_last=True, persistent_workers=workers > 0,
    )
    best = 0.0
    for _ in range(rounds + 1):  # the first pass starts the workers and warms the page cache
        started, count = time.perf_counter(), 0
        for images, _ in loader:
            count += images.shape[0]
        best = max(best, count / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192, help="images in the dataset (default: 8192)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes, best kept (default: 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from hyperface.datasets.recordio import RecordIODataset
    from hyperface.training.data import AugmentConfig, TrainDataset

    with tempfile.TemporaryDirectory(prefix="hyperface-data-bench-") as tmp:
        write_dataset(Path(tmp), args.images)
        reader = RecordIODataset(tmp)
        baseline = images_per_second(ArcfaceTorchStyleDataset(reader), args.workers, args.batch_size, args.rounds)
        print(f"baseline (arcface_torch-style: PIL, flip, float32 in the worker), {args.workers} workers: {baseline:.0f} img/s")
        results = {}
        for name, augment in (("flip", AugmentConfig()), ("adaface", AugmentConfig.adaface())):
            rate = images_per_second(TrainDataset(reader, augment=augment), args.workers, args.batch_size, args.rounds)
            results[name] = rate
            per_worker = rate / max(args.workers, 1)
            print(f"hyperface --augment {name}, {args.workers} workers: {rate:.0f} img/s ({per_worker:.0f} per worker; "
                  f"{H100_TRAIN_RATE / per_worker:.1f} workers feed the H100's {H100_TRAIN_RATE} img/s)")
        print(f"ratio hyperface (flip) / baseline: {results['flip'] / baseline:.2f}x")


if __name__ == "__main__":
    main()
