"""Face-recognition training sets on disk: insightface RecordIO and image folders, read and written.

- :class:`RecordIOWriter` / :class:`RecordIODataset`: ``train.rec`` + ``train.idx`` (+ ``property``)
  exactly as insightface's arcface_torch reads them, without mxnet.
- :class:`ImageFolderWriter` / :class:`ImageFolderDataset`: one folder per identity.
- :func:`open_dataset`: picks the reader from what is on disk.
- :class:`~hyperface.datasets.subset.DatasetSubset`: the first N identities / K images of one, for ablations.

Readers return ``(RGB uint8 HWC image, int label)``, expose ``labels`` (int64) and ``num_classes``,
raise :class:`~hyperface.common.errors.HyperfaceError` on corrupt or truncated data, and pickle
cheaply for DataLoader workers (files are opened lazily in each process).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import output_stage
from hyperface.common.runtime import get_logger
from hyperface.datasets.codec import decode_image, encode_image
from hyperface.datasets.image_folder import ImageFolderDataset, ImageFolderWriter
from hyperface.datasets.recordio import RecordIODataset, RecordIOWriter

Dataset = RecordIODataset | ImageFolderDataset


#: Our other stages' output folders, which a dataset path is sometimes given by mistake: what to give.
_NOT_DATASETS = {
    "train": "give the dataset it trained on (its config.json names it); to use the model, pass the folder to "
             "`hyperface evaluate` or `embed --model`",
    "pack": "it holds identity embeddings: render a dataset from them with `hyperface generate`",
    "embed": "it holds embeddings: `hyperface report` reads them; give the image dataset they came from",
    "report": "give the dataset the report describes",
}


def resolve_generated(path: str | os.PathLike) -> Path:
    """A ``hyperface generate`` or ``hyperface dataset convert`` output folder stands for the dataset
    inside it: ``rec/`` when it was written, else ``images/``. Any other path is returned as it is."""
    path = Path(path)
    stage = output_stage(path) if path.is_dir() else ""
    if stage in _NOT_DATASETS:
        raise HyperfaceError(f"{path} is a `hyperface {stage}` output, not an image dataset: {_NOT_DATASETS[stage]}")
    if stage not in ("generate", "convert"):
        return path
    for inner in (path / "rec", path / "images"):
        if (inner / "train.rec").is_file() or (inner.name == "images" and inner.is_dir()):
            get_logger("hyperface.datasets").info("%s is a %s output folder: using %s", path, stage, inner)
            return inner
    how = ("the same generate command and --resume (sharded runs: then --merge)" if stage == "generate"
           else "the same `hyperface dataset convert` command and --resume")
    raise HyperfaceError(f"{path} is a `hyperface {stage}` run without a finished dataset (no rec/ or images/ yet): finish it with {how}")


def check_outside_datasets(out: str | os.PathLike, datasets: Sequence[str | os.PathLike], flag: str = "--out", *,
                           folder: bool = False) -> None:
    """Refuse an output among a dataset's files: inside a dataset folder (an image folder, a RecordIO
    folder, a generate or convert output), where it would become a class or be deleted with it, or
    the dataset's own .rec/.idx/property; for a ``folder`` output, also one that holds the dataset,
    which its ``--overwrite`` would delete before reading it. A .rec file given alone is just that
    file: outputs beside it are fine."""
    target = Path(out).resolve()
    for data in datasets:
        path = Path(data).resolve()
        if not path.exists():  # opening it says "not found"
            continue
        if path.is_dir():
            inside = target == path or path in target.parents
        else:
            inside = target in (path, path.with_suffix(".rec"), path.with_suffix(".idx"), path.parent / "property")
        if folder and (inside or target in path.parents):
            raise HyperfaceError(f"{flag} {out} and the dataset {data} overlap: write the output to a folder of its own")
        if not folder and inside:
            raise HyperfaceError(f"{flag} {out} is inside the dataset {data}: write it elsewhere, not among its files")


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a RecordIO file/folder (``*.rec`` or a folder with ``train.rec``), an image folder, or
    a ``hyperface generate`` output folder (its ``rec/``, else its ``images/``)."""
    path = Path(path)
    if not path.exists():
        raise HyperfaceError(f"dataset not found: {path}")
    path = resolve_generated(path)
    if path.is_file():
        if path.suffix not in (".rec", ".idx"):
            raise HyperfaceError(f"{path} is a file but not a .rec: give a .rec file or a dataset folder")
        return RecordIODataset(path.with_suffix(".rec"))
    recs = [p for p in path.glob("*.rec") if p.is_file()]
    # a .rec with its .idx, or with no class folders beside it (then the error names the missing .idx);
    # a stray notes.rec among class folders does not make an image folder a RecordIO set
    if (path / "train.rec").is_file() or any(r.with_suffix(".idx").is_file() for r in recs) or (
        recs and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
    ):
        return RecordIODataset(path)
    if (path / "train.rec.tmp").exists():
        raise HyperfaceError(f"{path} holds an unfinished RecordIO dataset (train.rec.tmp): resume or rerun the writer")
    return ImageFolderDataset(path)


__all__ = [
    "Dataset",
    "ImageFolderDataset",
    "ImageFolderWriter",
    "RecordIODataset",
    "RecordIOWriter",
    "decode_image",
    "encode_image",
    "open_dataset",
    "check_outside_datasets",
    "resolve_generated",
]
