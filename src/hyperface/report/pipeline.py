"""``run_report``: embeddings of a dataset (from ``hyperface embed``) -> report.json, report.png,
leakage.tsv and manifest.json."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError, exception_summary
from hyperface.common.io import atomic_write, load_embeddings, prepare_output_dir, read_json, read_lines, releases_output_locks, save_json
from hyperface.common.manifest import Manifest
from hyperface.common.runtime import get_logger, resolve_device
from hyperface.packing.pipeline import load_identities
from hyperface.report.stats import DatasetStats, check_report_inputs, dataset_stats, loosest

if TYPE_CHECKING:
    from hyperface.report.compare import DatasetReport

log = get_logger("hyperface.report")

REPORT_FILE = "report.json"
PLOT_FILE = "report.png"
SHEET_FILE = "identities.jpg"
LEAKAGE_FILE = "leakage.tsv"


def _embed_manifest(embeddings: Path) -> dict[str, Any]:
    """The manifest `hyperface embed` wrote beside these embeddings ({} when there is none)."""
    from hyperface.recognition.embed import GalleryPaths

    manifest = GalleryPaths(embeddings).manifest
    return read_json(manifest) if manifest.exists() else {}


def _dataset_from_manifest(embeddings: Path) -> Path | None:
    images = (_embed_manifest(embeddings).get("params") or {}).get("images")
    return Path(images) if images else None


def _embedding_model(embeddings: Path) -> dict[str, Any] | None:
    """The FR model (path, SHA-256, kind) that `hyperface embed` used for these embeddings, if known."""
    facts = _embed_manifest(embeddings)
    model = dict((facts.get("inputs") or {}).get("model") or {})
    if facts.get("recognizer"):
        model["recognizer"] = facts["recognizer"]
    return model or None


def labels_for_embeddings(embeddings_path: str | os.PathLike, dataset: str | os.PathLike | None = None) -> tuple[np.ndarray, Path | None]:
    """Labels of the rows of a ``hyperface embed`` output, from its ``.index.txt`` and the dataset.

    Rows named ``train.rec#i`` take record i's label; rows named ``<class>/<file>`` take the label
    the image-folder reader gives that class (folders sorted by name: 0, 1, ...). ``dataset``
    defaults to the images folder the embed manifest names. Returns (labels, dataset used).
    """
    labels, dataset_used, _, _ = embedded_items(embeddings_path, dataset)
    return labels, dataset_used


def embedded_items(embeddings_path: str | os.PathLike, dataset: str | os.PathLike | None = None) -> tuple[np.ndarray, Path, np.ndarray, Any]:
    """(labels, dataset, items, reader): as :func:`labels_for_embeddings`, plus the dataset reader
    the rows were matched in and each row's item in it, to show the images behind a row."""
    from hyperface.datasets import ImageFolderDataset, RecordIODataset, resolve_generated
    from hyperface.recognition.embed import GalleryPaths

    embeddings_path = Path(embeddings_path)
    index = GalleryPaths(embeddings_path).index
    if not index.exists():
        raise HyperfaceError(f"{index} not found: give embeddings written by `hyperface embed`, or --labels LABELS.npy")
    names = read_lines(index)  # as embed wrote them, escapes undone
    dataset = Path(dataset) if dataset is not None else _dataset_from_manifest(embeddings_path)
    if dataset is None or not dataset.exists():
        raise HyperfaceError(
            f"cannot find the dataset {embeddings_path} was embedded from{f' ({dataset})' if dataset else ''}: "
            "give it with --dataset (image folder or RecordIO)"
        )
    dataset = resolve_generated(dataset)
    # records are named "<file>.rec#<i>"; an image file name always ends in its extension
    if names and re.search(r"#\d+$", names[0]):
        rec = RecordIODataset(dataset)
        try:
            rows = np.asarray([int(n.rsplit("#", 1)[1]) for n in names], dtype=np.int64)
        except ValueError as exc:
            raise HyperfaceError(f"{index}: cannot read a record number from a line ({exc})") from exc
        if rows.size and (rows.min() < 0 or rows.max() >= len(rec)):
            raise HyperfaceError(f"{index} names record {int(rows.max())} but {dataset} has {len(rec)} records: wrong --dataset?")
        return rec.labels[rows], dataset, rows, rec
    no_identities = "which names no identities: give each row's identity with --labels LABELS.npy (one integer a row)"
    if dataset.is_file() and dataset.suffix.lower() in (".rec", ".idx"):
        raise HyperfaceError(f"the rows of {embeddings_path} name image files, but {dataset} is a RecordIO file: pass "
                             "the image folder they came from with --dataset, or the labels with --labels LABELS.npy")
    if dataset.is_file():  # an image list (embed's list input) or one image: no labels in it
        raise HyperfaceError(f"{embeddings_path} was embedded from the image list {dataset}, {no_identities}")
    try:
        folder = ImageFolderDataset(dataset)
    except HyperfaceError as exc:
        if "no class sub-folders" not in str(exc):
            raise
        raise HyperfaceError(f"{embeddings_path} was embedded from {dataset}, a folder without class sub-folders, {no_identities}") from exc
    item_of = {path: i for i, path in enumerate(folder.paths)}
    missing = [n for n in names if n not in item_of]
    if missing:
        raise HyperfaceError(
            f"{len(missing)} embedded image(s) are not in the image folder {dataset} (e.g. {missing[0]!r}): "
            "embed the dataset's root folder, pass the right --dataset, or give the labels with --labels LABELS.npy"
        )
    items = np.asarray([item_of[n] for n in names], dtype=np.int64)
    return folder.labels[items], dataset, items, folder


def load_labels(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    hint = "give an integer .npy or a .txt with one label per line"
    try:
        labels = np.loadtxt(path, dtype=np.int64, ndmin=1) if path.suffix == ".txt" else np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise HyperfaceError(f"cannot read labels {path} ({exception_summary(exc)}); {hint}") from exc
    if not isinstance(labels, np.ndarray):  # an .npz archive
        raise HyperfaceError(f"labels {path} is an archive of several arrays, not one array; {hint}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise HyperfaceError(f"labels {path} must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and labels.min() < 0:  # they index --identities rows: -1 would silently mean the last one
        raise HyperfaceError(f"labels {path} must be >= 0 (identity numbers), but row {int(np.argmin(labels))} is {int(labels.min())}")
    return labels


@releases_output_locks
def run_report(
    embeddings: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dataset: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    identities: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    leak_threshold: float = 0.4,
    unique_threshold: float = 0.4,
    genuine_pairs: int = 200_000,
    impostor_pairs: int = 1_000_000,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    plot: bool = True,
    compare: Sequence["DatasetReport"] = (),
) -> dict[str, Any]:
    """Compute a dataset report (see :func:`hyperface.report.stats.dataset_stats`) and write it; with
    ``compare`` (earlier reports, :func:`hyperface.report.compare.read_dataset_reports`), also the
    comparison of this dataset with them (``comparison.txt``, ``comparison.png``)."""
    started = time.perf_counter()
    from hyperface.recognition.embed import find_embeddings

    embeddings = find_embeddings(embeddings, flag="EMBEDDINGS")
    if not 0.0 < leak_threshold <= 1.0:
        raise HyperfaceError(f"--leak-threshold must be in (0, 1], got {leak_threshold}")
    if not -1.0 <= unique_threshold <= 1.0:
        raise HyperfaceError(f"--unique-threshold must be a cosine in [-1, 1], got {unique_threshold}")
    if genuine_pairs < 0 or impostor_pairs < 0:
        raise HyperfaceError("pair counts must be >= 0")
    from hyperface.common.errors import check_seed

    check_seed(seed)
    emb = load_embeddings(embeddings, what="embeddings", mapped=True)  # embed's unit rows stay on disk
    items = reader = None  # each row's image in the dataset, when the rows came from one
    if labels is not None:
        label_array, dataset_used = load_labels(labels), None
    else:
        label_array, dataset_used, items, reader = embedded_items(embeddings, dataset)
    if len(label_array) != len(emb):
        raise HyperfaceError(f"{embeddings} has {len(emb)} rows but there are {len(label_array)} labels")
    ident = load_identities(identities) if identities is not None else None
    if reference is not None:
        reference = find_embeddings(reference, flag="--reference")  # a `hyperface embed` folder, too
    ref = load_embeddings(reference, what="reference", mapped=True) if reference is not None else None  # stays on disk
    check_report_inputs(emb, label_array, identities=ident, reference=ref)  # bad input writes nothing
    landmarks = _landmarks_of(embeddings, len(emb))  # and a landmarks file that does not fit, neither
    if ident is not None and len(ident) > int(label_array.max()) + 1:
        log.warning(
            "--identities has %d rows but the labels stop at %d: is it the file this dataset was generated from?",
            len(ident), int(label_array.max()),
        )
    torch_device = resolve_device(device)  # a bad --device is refused before the output folder exists
    out = prepare_output_dir(out_dir, overwrite=overwrite, stage="report", resumable=False)
    params = {"leak_threshold": leak_threshold, "unique_threshold": unique_threshold, "genuine_pairs": genuine_pairs, "impostor_pairs": impostor_pairs,
              "seed": seed, "device": device}
    manifest = Manifest(stage="report", params=params,
                        inputs={"embeddings": embeddings, "labels": labels, "identities": identities, "reference": reference})
    if dataset_used is not None:
        manifest.extra["dataset"] = str(Path(dataset_used).resolve())

    pose = _pose_of(landmarks)
    stats = dataset_stats(emb, label_array, identities=ident, reference=ref, leak_threshold=leak_threshold, pose=pose,
                          unique_threshold=unique_threshold,
                          genuine_pairs=genuine_pairs, impostor_pairs=impostor_pairs, seed=seed,
                          device=torch_device)
    outputs = [REPORT_FILE]
    model = _embedding_model(embeddings)
    if model is not None:  # whose eyes these statistics are seen through
        stats.report["embedding_model"] = model
        manifest.extra["embedding_model"] = model
    save_json(out / REPORT_FILE, stats.report)
    if stats.leakage is not None:
        write_leakage(out / LEAKAGE_FILE, stats, leak_threshold)
        outputs.append(LEAKAGE_FILE)
    if plot:
        from hyperface.report.plots import plot_report

        plot_report(out / PLOT_FILE, stats)
        outputs.append(PLOT_FILE)
        if items is not None:
            try:  # a picture to look at: it must not cost the report
                write_identities_sheet(out / SHEET_FILE, stats, reader, items)
                outputs.append(SHEET_FILE)
            except (HyperfaceError, OSError) as exc:
                log.warning("identities.jpg not written: %s", exc)
    if compare:
        from hyperface.common.io import describe_input
        from hyperface.report.compare import DatasetReport, labelled_uniquely, write_comparison

        if reference is not None:  # its SHA-256 for the comparison's notes, hashed once: the manifest keeps it
            manifest.inputs["reference"] = describe_input(reference)
        this = DatasetReport(out.resolve().name, stats.report, {"inputs": {"reference": manifest.inputs.get("reference")}}, out / REPORT_FILE)
        outputs += write_comparison(out, labelled_uniquely([this, *compare]), plot=plot)
        manifest.extra["compared_with"] = [str(entry.path) for entry in compare]
    manifest.time("report", time.perf_counter() - started)
    manifest.extra["outputs"] = outputs
    manifest.write(out)
    return stats.report


def write_identities_sheet(path: Path, stats: DatasetStats, source: Any, items: np.ndarray, rows: int = 4, columns: int = 8) -> None:
    """``identities.jpg``: the images behind the numbers. The ``rows`` closest identity pairs (both
    identities, one above the other: do they look like one person?), then the ``rows`` loosest
    identities (does each row look like one person?), up to ``columns`` images each. ``source`` is
    the dataset reader the rows were matched in; ``items`` each row's item in it."""
    from hyperface.datasets.preview import contact_sheet, save_contact_sheet

    classes = stats.classes
    assert classes is not None
    folder_names = getattr(source, "classes", None)  # an image folder: show its class folders' names

    def name(position: int) -> str:
        label = int(classes.labels[position])
        return str(folder_names[label]) if folder_names is not None and label < len(folder_names) else f"id {label}"

    def images_of(position: int) -> list[np.ndarray | None]:
        start = classes.starts[position]
        images: list[np.ndarray | None] = []
        for row in classes.order[start : start + min(columns, classes.counts[position])]:
            try:
                images.append(source[int(items[row])][0])
            except (HyperfaceError, OSError) as exc:  # changed since it was embedded: an empty tile
                log.warning("identities.jpg: %s", exc)
                images.append(None)
        return images

    sheet_rows = []
    for a, b, cosine in stats.closest[:rows]:
        for this, other in ((a, b), (b, a)):
            sheet_rows.append((f"{name(this)}\n~ {name(other)}\ncos {cosine:.2f}", images_of(this)))
    for c in loosest(stats.intra_mean, rows):
        sheet_rows.append((f"{name(c)}\nloose\nintra {stats.intra_mean[c]:.2f}", images_of(c)))
    save_contact_sheet(path, contact_sheet(sheet_rows, columns=columns))


def write_leakage(path: Path, stats: DatasetStats, threshold: float, top: int = 1000) -> None:
    """Identities whose centroid is nearest a reference row, most similar first: all at or above
    the threshold, and at least the top ``min(top, C)`` so there is always something to look at."""
    assert stats.leakage is not None and stats.leakage_index is not None and stats.classes is not None
    order = np.argsort(-stats.leakage, kind="stable")
    keep = max(int((stats.leakage >= threshold).sum()), min(top, len(order)))
    with atomic_write(path, "w") as handle:
        handle.write("label\tnearest_reference_row\tcosine\tat_or_above_threshold\n")
        for c in order[:keep]:
            sim = float(stats.leakage[c])
            handle.write(f"{int(stats.classes.labels[c])}\t{int(stats.leakage_index[c])}\t{sim:.5f}\t{int(sim >= threshold)}\n")


def _landmarks_of(embeddings: Path, rows: int) -> np.ndarray | None:
    """The landmarks `embed --detector` kept beside the embeddings, checked (None without them:
    aligned crops and fixed crops have no landmarks)."""
    from hyperface.recognition.embed import GalleryPaths

    path = GalleryPaths(embeddings).landmarks
    if not path.is_file():
        return None
    try:
        landmarks = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HyperfaceError(f"cannot read {path}: {exception_summary(exc)}") from exc
    if landmarks.shape != (rows, 5, 2):
        raise HyperfaceError(f"{path} holds {landmarks.shape} landmarks for {rows} embeddings: rerun `hyperface embed`")
    return landmarks if rows else None


def _pose_of(landmarks: np.ndarray | None) -> np.ndarray | None:
    """Head pose per row (see :mod:`hyperface.recognition.pose`), in steps with a progress bar."""
    if landmarks is None:
        return None
    from hyperface.common.runtime import progress
    from hyperface.recognition.pose import estimate_pose

    rows = len(landmarks)
    log.info("head pose of %d faces from their landmarks (about 0.1 ms a face)", rows)
    bar = progress(total=rows, desc="pose", unit="face")
    parts = []
    for start in range(0, rows, 8192):
        parts.append(estimate_pose(landmarks[start : start + 8192]))
        bar.update(len(parts[-1]))
    bar.close()
    return np.concatenate(parts)


def format_report(report: dict[str, Any]) -> str:
    """The few numbers people look at first."""
    lines = [
        f"{report['num_images']} images of {report['num_identities']} identities "
        f"({report['images_per_identity']['min']}-{report['images_per_identity']['max']} per identity), d={report['dim']}",
    ]
    intra = report["intra_class"]["mean_pair_cosine_per_identity"]
    if intra:
        lines.append(f"intra-class   mean pair cosine per identity: mean {intra['mean']:.3f} (p5 {intra['p5']:.3f}, p95 {intra['p95']:.3f})")
    inter = report["inter_class"]["nearest_identity_cosine"]
    closest = report["inter_class"].get("closest_pairs")
    lines.append(
        f"inter-class   nearest other identity (centroids): mean {inter['mean']:.3f}, p99 {inter['p99']:.3f}, max {inter['max']:.3f}"
        + (f" (ids {closest[0]['labels'][0]} and {closest[0]['labels'][1]})" if closest else "")
    )
    unique = report["inter_class"].get("unique_identities")
    if unique:
        lines.append(f"unique        {unique['count']} of {report['num_identities']} identities ({100 * unique['fraction']:.2f}%) "
                     f"have no earlier identity above cosine {unique['threshold']} (Vec2Face's count)")
    ver = report.get("verification")
    if ver:
        tar = ", ".join(f"TAR@FAR={k} {100 * v['tar']:.2f}%" for k, v in ver["tar_at_far"].items())
        lines.append(
            f"verification  genuine {ver['genuine_cosine']['mean']:.3f} vs impostor {ver['impostor_cosine']['mean']:.3f}, "
            f"d' {ver['d_prime']:.2f}, EER {100 * ver['eer']:.2f}%" + (f", {tar}" if tar else "")
        )
    pose = report.get("pose")
    if pose and pose.get("faces_with_pose"):
        yaw, above = pose["yaw_deg"], pose["abs_yaw_above"]
        spread = pose.get("identity_yaw_std_deg")
        lines.append(
            f"pose          yaw p5 {yaw['p5']:.1f}, p50 {yaw['p50']:.1f}, p95 {yaw['p95']:.1f} deg; |yaw| > 30: "
            f"{100 * above['30']:.1f}%, > 45: {100 * above['45']:.1f}%"
            + (f"; yaw spread within an identity {spread['mean']:.1f} deg" if spread else "")
        )
    if "target" in report:
        t = report["target"]["image_to_target_cosine"]
        lines.append(f"target        image to its target identity: mean {t['mean']:.3f} (p5 {t['p5']:.3f})")
    if "leakage" in report:
        lk = report["leakage"]
        lines.append(
            f"leakage       {lk['identities_at_or_above']} identities ({100 * lk['fraction_at_or_above']:.2f}%) at cosine >= "
            f"{lk['threshold']} to one of {lk['reference_rows']} reference rows; nearest: mean "
            f"{lk['nearest_reference_cosine']['mean']:.3f}, max {lk['nearest_reference_cosine']['max']:.3f}"
        )
    return "\n".join(lines)
