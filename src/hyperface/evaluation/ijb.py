"""IJB-B / IJB-C template-based 1:1 verification, as insightface's ``eval_ijbc.py`` computes it.

Input: the standard release folder (``IJB_release/IJBC``)::

    IJBC/meta/ijbc_face_tid_mid.txt         "image_name template_id media_id" per face
    IJBC/meta/ijbc_template_pair_label.txt  "template1 template2 label" per pair (1 = same)
    IJBC/meta/ijbc_name_5pts_score.txt      "image_name x1 y1 ... x5 y5 faceness_score" per face
    IJBC/loose_crop/<image_name>            the face crops

Protocol (insightface's default test mode N1 D1 F1):

1. each face is aligned to 112x112 with its five landmarks (:func:`align_ijb_face`: the crops of
   insightface's IJB scripts, bit for bit with the same scikit-image and OpenCV); its feature is the model's raw output for
   the face plus that of its horizontal mirror (F1), left un-normalised (N1) and multiplied by the
   detector's faceness score (D1);
2. within a template, faces of the same media (frames of one video) are averaged, and the media
   features are summed; the template feature is then L2-normalised;
3. a pair's score is the cosine of its two template features;
4. ROC as ``sklearn.metrics.roc_curve`` (with ``drop_intermediate``); for each target FAR in
   1e-6..1e-1, the TAR of the ROC point whose FAR is nearest (ties: the larger TAR).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hyperface.common.errors import HyperfaceError

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: FARs at which a result keeps its ROC for plots: ten per decade from 1e-6 to 1.
ROC_FARS = np.logspace(-6, 0, 61)

EmbedFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class IJBMeta:
    image_names: list[str]
    landmarks: np.ndarray  # (N, 5, 2) float32
    faceness: np.ndarray  # (N,) float32
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    pair_t1: np.ndarray  # (P,) int64
    pair_t2: np.ndarray
    pair_label: np.ndarray  # (P,) int8
    image_dir: Path


@dataclass
class IJBResult:
    target: str
    tar_at_far: dict[str, float]  # "1e-04" -> TAR (fraction)
    auc: float
    num_images: int
    num_templates: int
    num_pairs: int
    settings: dict[str, Any] = field(default_factory=dict)
    num_impostor_pairs: int | None = None  # a FAR below 1 / this is not measured, only read off the ROC's end
    # the ROC at ROC_FARS for plots: {"far": [...], "tar": [...]}, TAR = the best reached at or below each FAR
    roc: dict[str, list[float]] = field(default_factory=dict)
    # 1:N identification (``identification=True``): see :func:`identification_scores`
    identification: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _far_key(far: float) -> str:
    return f"{far:.0e}"


def _ijb_folder(root: Path, target: str) -> Path:
    for candidate in (root, root / target):
        if (candidate / "meta").is_dir():
            return candidate
    raise HyperfaceError(
        f"{root} is not an {target} release folder: expected {target}/meta/ and {target}/loose_crop/ "
        "(the insightface IJB_release layout)"
    )


def _numbers(rows: list[list[str]], columns: slice, cast: type, path: Path) -> list[list[Any]]:
    """``cast`` of ``columns`` of every row, or an error naming the file and the line."""
    out = []
    for number, row in enumerate(rows, 1):
        try:
            out.append([cast(v) for v in row[columns]])
        except ValueError:
            raise HyperfaceError(f"{path} line {number}: a non-numeric value where a number belongs ({' '.join(row)[:80]})") from None
    return out


def _read_columns(path: Path, min_columns: int, max_columns: int | None = None) -> list[list[str]]:
    if not path.is_file():
        raise HyperfaceError(f"IJB meta file not found: {path}")
    rows = []
    with open(path, "rb") as handle:  # decoded line by line, so a damaged line is named exactly
        for number, raw in enumerate(handle, 1):
            try:
                fields = raw.decode("utf-8").split()
            except UnicodeDecodeError:
                raise HyperfaceError(f"{path} line {number} is not text (UTF-8): the meta file is damaged") from None
            if not fields:
                continue
            if len(fields) < min_columns or (max_columns is not None and len(fields) > max_columns):
                expected = f"at least {min_columns}" if max_columns is None else f"{min_columns}" if max_columns == min_columns else f"{min_columns}-{max_columns}"
                raise HyperfaceError(f"{path} line {number}: expected {expected} columns, got {len(fields)}")
            rows.append(fields)
    if not rows:
        raise HyperfaceError(f"{path} is empty")
    return rows


def _read_pairs(path: Path) -> np.ndarray:
    """(P, 3) int64 (template 1, template 2, label) from the pair file: NumPy's C parser (IJB-C has
    15.7M lines: seconds and ~400 MB, against a minute and ~8 GB as Python lists); the line
    parser runs only to name the line a damaged file goes wrong at."""
    if not path.is_file():
        raise HyperfaceError(f"IJB meta file not found: {path}")
    import warnings

    try:
        with warnings.catch_warnings():  # an empty file: NumPy warns, then we say it plainly below
            warnings.simplefilter("ignore", UserWarning)
            pairs = np.loadtxt(path, dtype=np.int64, usecols=(0, 1, 2), ndmin=2, encoding="utf-8")
    except (ValueError, UnicodeDecodeError):
        rows = _read_columns(path, 3)
        try:
            for number, row in enumerate(rows, 1):
                [int(v) for v in row[:3]]
        except ValueError as exc:
            raise HyperfaceError(f"{path}: pair {number} holds a non-numeric value where a number belongs ({exc})") from None
        raise HyperfaceError(f"{path}: cannot read it as lines of three integers (template, template, label)") from None
    if pairs.shape[0] == 0:
        raise HyperfaceError(f"{path} is empty")
    labels = pairs[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise HyperfaceError(f"{path}: pair {int(bad[0]) + 1} has label {int(labels[bad[0]])}; labels are 1 (same subject) or 0")
    return pairs


def read_ijb_meta(root: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    """Parse the three meta files of an IJB-B or IJB-C release."""
    target = target.upper()
    if target not in ("IJBB", "IJBC"):
        raise HyperfaceError(f"--ijb-target must be IJBB or IJBC, got {target}")
    folder = _ijb_folder(Path(root), target)
    prefix = target.lower()
    meta = folder / "meta"
    tid_mid_file, scores_file = meta / f"{prefix}_face_tid_mid.txt", meta / f"{prefix}_name_5pts_score.txt"
    tid_mid = _read_columns(tid_mid_file, 3)
    # name, five (x, y) landmarks, faceness: exactly 12 (insightface reshapes columns 1..-1 to 5 x 2)
    landmark_rows = _read_columns(scores_file, 12, 12)
    pair_array = _read_pairs(meta / f"{prefix}_template_pair_label.txt")
    if len(tid_mid) != len(landmark_rows):
        raise HyperfaceError(
            f"{meta}: {len(tid_mid)} faces in {prefix}_face_tid_mid.txt but {len(landmark_rows)} in {prefix}_name_5pts_score.txt"
        )
    names = [row[0] for row in landmark_rows]
    for number, (row, name) in enumerate(zip(tid_mid, names), 1):
        if row[0] != name:
            raise HyperfaceError(
                f"{meta}: line {number} names {row[0]} in {prefix}_face_tid_mid.txt but {name} in "
                f"{prefix}_name_5pts_score.txt; the two files must list the faces in the same order"
            )
    scored = np.asarray(_numbers(landmark_rows, slice(1, 12), float, scores_file), dtype=np.float32)
    landmarks, faceness = scored[:, :10].reshape(-1, 5, 2), np.ascontiguousarray(scored[:, 10])
    ids = np.asarray(_numbers(tid_mid, slice(1, 3), int, tid_mid_file), dtype=np.int64)
    templates, medias = ids[:, 0], ids[:, 1]
    for values, what in ((landmarks.reshape(len(names), -1), "landmark"), (faceness[:, None], "faceness score")):
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():  # NaN scores would weight every image by NaN and turn every TAR into noise
            raise HyperfaceError(f"{scores_file} line {int(np.flatnonzero(bad)[0]) + 1}: a {what} is NaN or inf")
    image_dir = folder / "loose_crop"
    if not image_dir.is_dir():
        raise HyperfaceError(f"IJB image folder not found: {image_dir}")
    return IJBMeta(
        image_names=names,
        landmarks=landmarks,
        faceness=faceness,
        templates=templates,
        medias=medias,
        pair_t1=pair_array[:, 0],
        pair_t2=pair_array[:, 1],
        pair_label=pair_array[:, 2].astype(np.int8),
        image_dir=image_dir,
    )


#: Faces per cached block of features (``cache_dir``): a kill loses at most this many.
CACHE_BLOCK = 8192

#: The 5-point template insightface's IJB scripts (``eval_ijbc.py``, ``ijb_11.py``, ``ijb_onnx.py``)
#: align to: the 96x112 ArcFace points in float32, moved 8 px right in float32. It is
#: ``ARCFACE_TEMPLATE`` but for the right mouth corner's x, one float32 step (7.6e-6 px) larger.
IJB_TEMPLATE = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32
) + np.float32([8.0, 0.0])


def align_ijb_face(image_rgb: np.ndarray, landmarks5: np.ndarray, size: int = 112, *, what: str = "an IJB face") -> np.ndarray:
    """A loose crop aligned exactly as insightface's IJB scripts align it: scikit-image's similarity
    fit of the float32 landmarks onto :data:`IJB_TEMPLATE`, computed in float32 as theirs is (their
    landmarks and template are float32), then ``cv2.warpAffine`` (bilinear, black border).
    ``recognition.align_face`` fits onto ``ARCFACE_TEMPLATE`` instead (``norm_crop``'s); its crops differ
    from these by one grey level in a few pixels of most faces."""
    import cv2

    from hyperface.recognition.alignment import arcface_template, estimate_similarity

    src = np.asarray(landmarks5, dtype=np.float32)  # float32 points onto a float32 template: a float32 fit
    dst = IJB_TEMPLATE if size == 112 else arcface_template(size)
    try:
        matrix = estimate_similarity(src, dst)
    except HyperfaceError as exc:
        raise HyperfaceError(f"cannot align {what}: {exc}") from None
    return cv2.warpAffine(np.ascontiguousarray(image_rgb), matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def ijb_image_features(
    embed_fn: EmbedFn,
    meta: IJBMeta,
    *,
    batch_size: int = 64,
    flip: bool = True,
    image_size: int = 112,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Raw (un-normalised) features of every aligned face, mirror features added when ``flip``.

    With ``cache_dir`` (one folder per model and release: the caller keys it), every block of
    :data:`CACHE_BLOCK` faces is saved as it finishes and found again on the next call, so a killed
    IJB-C run (227k faces) resumes where it stopped."""
    if cache_dir is not None:
        return _cached_features(embed_fn, meta, Path(cache_dir), batch_size=batch_size, flip=flip, image_size=image_size)
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    from hyperface.common.runtime import progress

    def load(i: int) -> np.ndarray:
        path = meta.image_dir / meta.image_names[i]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise HyperfaceError(f"cannot read IJB image {path} (missing or not an image)")
        return align_ijb_face(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), meta.landmarks[i], size=image_size, what=f"IJB image {path}")

    count = len(meta.image_names)
    features: np.ndarray | None = None
    bar = progress(total=count, desc="IJB faces", unit="img")
    # OpenCV releases the GIL while decoding and warping: a few threads keep the model fed
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 1))))
    try:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            batch = np.stack(list(pool.map(load, range(start, stop))))
            feats = np.asarray(embed_fn(batch), dtype=np.float32)
            if flip:
                feats = feats + np.asarray(embed_fn(np.ascontiguousarray(batch[:, :, ::-1, :])), dtype=np.float32)
            broken = np.flatnonzero(~np.isfinite(feats).all(axis=1))
            if broken.size:  # NaN scores compare false: every TAR and rank would be quietly wrong
                raise HyperfaceError(
                    f"the model's features for IJB image {meta.image_names[start + int(broken[0])]} "
                    f"({broken.size} of a batch of {stop - start}) are NaN/inf: check the model (for fp16 models, try fp32)"
                )
            if features is None:
                features = np.empty((count, feats.shape[1]), dtype=np.float32)
            features[start:stop] = feats
            bar.update(stop - start)
    finally:
        pool.shutdown()
        bar.close()
    assert features is not None
    return features


def _cached_features(embed_fn: EmbedFn, meta: IJBMeta, cache: Path, **kwargs: Any) -> np.ndarray:
    from hyperface.common.io import remove_stale_temporaries, save_npy

    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache)
    count = len(meta.image_names)
    blocks = []
    for start in range(0, count, CACHE_BLOCK):
        stop = min(start + CACHE_BLOCK, count)
        path = cache / f"features-{start:08d}-{stop:08d}.npy"
        block = None
        if path.is_file():
            try:
                block = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                block = None  # written atomically, so only outside damage: compute it again
            if block is not None and (block.ndim != 2 or block.shape[0] != stop - start or not np.isfinite(block).all()):
                block = None
        if block is None:
            part = dataclasses.replace(meta, image_names=meta.image_names[start:stop], landmarks=meta.landmarks[start:stop])
            block = ijb_image_features(embed_fn, part, **kwargs)
            save_npy(path, block)
        blocks.append(block)
    return np.concatenate(blocks)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)  # sklearn.preprocessing.normalize leaves zero rows


def template_features(
    image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised template features, sorted unique template ids): media mean, then sum over media."""
    unique_templates, template_index = np.unique(templates, return_inverse=True)
    groups, group_index = np.unique(np.stack([template_index, medias]), axis=1, return_inverse=True)
    group_index = group_index.reshape(-1)
    dim = image_features.shape[1]
    media_sum = np.zeros((groups.shape[1], dim), dtype=np.float64)
    np.add.at(media_sum, group_index, image_features.astype(np.float64))
    media_mean = media_sum / np.bincount(group_index, minlength=groups.shape[1])[:, None]
    template_sum = np.zeros((unique_templates.size, dim), dtype=np.float64)
    np.add.at(template_sum, groups[0], media_mean)
    return _normalize_rows(template_sum), unique_templates


def pair_scores(
    template_feats: np.ndarray, unique_templates: np.ndarray, t1: np.ndarray, t2: np.ndarray, *, chunk: int = 16_384
) -> np.ndarray:
    """Cosine score of each template pair, computed in chunks (IJB-C has 15.7M pairs)."""
    i1 = np.searchsorted(unique_templates, t1)
    i2 = np.searchsorted(unique_templates, t2)
    for ids, idx in ((t1, i1), (t2, i2)):
        bad = (idx >= unique_templates.size) | (unique_templates[np.minimum(idx, unique_templates.size - 1)] != ids)
        if bad.any():
            raise HyperfaceError(f"template pair list names templates without faces, e.g. {np.unique(ids[bad])[:5].tolist()}")
    scores = np.empty(t1.size, dtype=np.float64)
    for start in range(0, t1.size, chunk):
        stop = start + chunk
        scores[start:stop] = np.einsum("nd,nd->n", template_feats[i1[start:stop]], template_feats[i2[start:stop]])
    return scores


#: FPIRs at which insightface's ijb_1n.py reads the TPIR.
FPIR_TARGETS = (0.01, 0.1)
#: Ranks of the closed-set identification rates.
RANKS = (1, 5, 10)


def _read_subject_list(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) of a 1:N CSV (a header line, then TEMPLATE_ID,SUBJECT_ID,... per face)."""
    if not path.is_file():
        raise HyperfaceError(f"IJB 1:N list not found: {path} (the release's meta/ holds it beside the 1:1 files)")
    try:
        table = np.loadtxt(path, dtype=np.int64, skiprows=1, delimiter=",", usecols=(0, 1), ndmin=2, encoding="utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HyperfaceError(f"{path}: cannot read TEMPLATE_ID,SUBJECT_ID columns after its header line ({exc})") from None
    if table.shape[0] == 0:
        raise HyperfaceError(f"{path} is empty")
    return table[:, 0], table[:, 1]


def read_identification_lists(root: str | os.PathLike, target: str = "IJBC") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The gallery (IJB-C G1 + G2, IJB-B S1 + S2, concatenated as insightface does) and the mixed probes."""
    target = target.upper()
    meta = _ijb_folder(Path(root), target) / "meta"
    prefix = target.lower()
    sets = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    parts = [_read_subject_list(meta / f"{prefix}_1N_gallery_{name}.csv") for name in sets]
    gallery = (np.concatenate([t for t, _ in parts]), np.concatenate([s for _, s in parts]))
    return {"gallery": gallery, "probe": _read_subject_list(meta / f"{prefix}_1N_probe_mixed.csv")}


def _template_rows(unique_templates: np.ndarray, templates: np.ndarray, subjects: np.ndarray,
                   what: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows in ``unique_templates`` (sorted) and subject ids of the templates a 1:N list names."""
    chosen, first = np.unique(templates, return_index=True)
    index = np.minimum(np.searchsorted(unique_templates, chosen), unique_templates.size - 1)
    missing = unique_templates[index] != chosen
    if missing.any():
        raise HyperfaceError(f"the 1:N {what} list names templates without faces in the release, e.g. {chosen[missing][:5].tolist()}")
    return index, subjects[first]


def _mates(gallery_ids: np.ndarray, probe_ids: np.ndarray) -> np.ndarray:
    """For each probe, the row of its subject's one gallery template (the 1:N protocol's mate)."""
    order = np.argsort(gallery_ids, kind="stable")
    left = np.searchsorted(gallery_ids[order], probe_ids, side="left")
    count = np.searchsorted(gallery_ids[order], probe_ids, side="right") - left
    wrong = np.flatnonzero(count != 1)
    if wrong.size:
        subject = int(probe_ids[wrong[0]])
        raise HyperfaceError(f"probe subject {subject} has {int(count[wrong[0]])} gallery templates "
                             f"({wrong.size} probes like it); the 1:N protocol needs exactly one")
    return order[left]


def identification_scores(
    template_feats: np.ndarray, unique_templates: np.ndarray, lists: dict[str, tuple[np.ndarray, np.ndarray]],
    *, chunk: int = 4096,
) -> dict[str, Any]:
    """1:N identification as insightface's ``ijb_1n.py``: probe templates against the gallery
    templates (cosine); rank-k rates (the mated gallery template among the k best); TPIR at each FPIR
    of :data:`FPIR_TARGETS`, read its way: the threshold is the ``ceil(FPIR x probes)``-th highest
    score of all non-mated probe-gallery pairs, and TPIR the share of probes whose mated score is
    above it. Probes are scored in chunks, keeping only the highest non-mated scores."""
    gallery_rows, gallery_ids = _template_rows(unique_templates, *lists["gallery"], "gallery")
    probe_rows, probe_ids = _template_rows(unique_templates, *lists["probe"], "probe")
    mates = _mates(gallery_ids, probe_ids)
    gallery, probes = template_feats[gallery_rows], template_feats[probe_rows]
    keep = int(math.ceil(probe_ids.size * max(FPIR_TARGETS)))
    mated = np.empty(probe_ids.size, dtype=np.float64)
    better = np.empty(probe_ids.size, dtype=np.int64)
    highest = np.empty(0, dtype=np.float64)
    for start in range(0, probe_ids.size, chunk):
        sims = probes[start : start + chunk] @ gallery.T
        rows = np.arange(sims.shape[0])
        own = mates[start : start + chunk]
        mated[start : start + sims.shape[0]] = sims[rows, own]
        # gallery templates scoring at least the mate's score rank before it: ties count against the
        # probe, so a collapsed model (every score equal) ranks last, not first
        better[start : start + sims.shape[0]] = (sims >= sims[rows, own][:, None]).sum(axis=1) - 1
        sims[rows, own] = -np.inf
        flat = sims.reshape(-1)
        pool = np.concatenate([highest, flat if flat.size <= keep else np.partition(flat, flat.size - keep)[-keep:]])
        highest = pool if pool.size <= keep else np.partition(pool, pool.size - keep)[-keep:]
    highest = np.sort(highest)[::-1]
    tpir = {}
    for fpir in FPIR_TARGETS:
        position = int(math.ceil(probe_ids.size * fpir))
        if position > highest.size or not np.isfinite(highest[position - 1]):
            tpir[_far_key(fpir)] = None  # too few non-mated pairs to reach this FPIR
            continue
        tpir[_far_key(fpir)] = float(np.mean(mated > highest[position - 1]))
    return {
        "rank": {str(k): float(np.mean(better < k)) for k in RANKS},
        "tpir_at_fpir": tpir,
        "num_probes": int(probe_ids.size),
        "num_gallery": int(gallery_ids.size),
    }


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve(labels, scores)`` with its default ``drop_intermediate=True``."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    distinct = np.where(np.diff(scores))[0]
    threshold_idx = np.r_[distinct, labels.size - 1]
    tps = np.cumsum(labels, dtype=np.float64)[threshold_idx]
    fps = 1 + threshold_idx - tps
    thresholds = scores[threshold_idx]
    if len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    if fps[-1] <= 0 or tps[-1] <= 0:
        raise HyperfaceError("the pair labels need both genuine (1) and impostor (0) pairs to compute a ROC")
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(labels: np.ndarray, scores: np.ndarray, far_targets=FAR_TARGETS) -> tuple[dict[str, float], float]:
    """TAR at each target FAR as insightface reads it off the ROC, and the area under the ROC."""
    tars, auc, _ = _read_roc(labels, scores, far_targets)
    return tars, auc


def _read_roc(labels: np.ndarray, scores: np.ndarray, far_targets=FAR_TARGETS) -> tuple[dict[str, float], float, dict[str, list[float]]]:
    """:func:`tar_at_far` plus the ROC sampled at :data:`ROC_FARS` (one sort of the scores for both)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    # for a curve: the best TAR reached at a FAR at or below each point (fpr starts at 0, rises)
    sampled = tpr[np.searchsorted(fpr, ROC_FARS, side="right") - 1]
    roc = {"far": [float(f) for f in ROC_FARS], "tar": [float(t) for t in sampled]}
    fpr, tpr = fpr[::-1], tpr[::-1]  # flipped, so the first of equally near points has the largest TAR
    result = {}
    for target in far_targets:
        result[_far_key(target)] = float(tpr[int(np.argmin(np.abs(fpr - target)))])
    return result, auc, roc


@dataclass
class IJBInputs:
    """An IJB release read and checked (:func:`prepare_ijb`): everything but the pixels."""

    target: str
    meta: IJBMeta
    lists: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # 1:N gallery and probes


def _missing_images(meta: IJBMeta) -> list[str]:
    """The face crops the meta files name that are not in ``loose_crop/`` (one listing of the folder)."""
    try:
        present = set(os.listdir(meta.image_dir))
    except OSError as exc:
        raise HyperfaceError(f"cannot list the IJB image folder {meta.image_dir} ({exc.strerror or exc})") from None
    return [name for name in meta.image_names
            if not (name in present if "/" not in name else (meta.image_dir / name).is_file())]


def prepare_ijb(root: str | os.PathLike, target: str = "IJBC", *, identification: bool = False) -> IJBInputs:
    """Read an IJB release and check all of it but the pixels: the meta files, that every template a
    pair (or a 1:N list) names has faces, that each probe has one gallery mate, that every face crop
    is there. Seconds, and before a model loads: a release mistake found after hours of embedding
    would throw the hours away."""
    target = target.upper()
    meta = read_ijb_meta(root, target)
    unique_templates = np.unique(meta.templates)
    pair_file = meta.image_dir.parent / "meta" / f"{target.lower()}_template_pair_label.txt"
    for ids in (meta.pair_t1, meta.pair_t2):
        orphan = np.flatnonzero(~np.isin(ids, unique_templates))
        if orphan.size:
            raise HyperfaceError(f"{pair_file}: pair {int(orphan[0]) + 1} names template {int(ids[orphan[0]])}, which has no faces "
                                 f"in {target.lower()}_face_tid_mid.txt ({orphan.size} pairs like it)")
    lists = None
    if identification:
        lists = read_identification_lists(root, target)
        _, gallery_ids = _template_rows(unique_templates, *lists["gallery"], "gallery")
        _, probe_ids = _template_rows(unique_templates, *lists["probe"], "probe")
        _mates(gallery_ids, probe_ids)
    missing = _missing_images(meta)
    if missing:
        raise HyperfaceError(f"{len(missing)} of the {len(meta.image_names)} faces the meta files name are not in "
                             f"{meta.image_dir}, e.g. {', '.join(missing[:3])}; is the release complete (loose_crop/)?")
    return IJBInputs(target, meta, lists)


def evaluate_ijb(
    embed_fn: EmbedFn,
    root: str | os.PathLike,
    target: str = "IJBC",
    *,
    batch_size: int = 64,
    flip: bool = True,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    image_size: int = 112,
    cache_dir: str | os.PathLike | None = None,
    identification: bool = False,
    inputs: IJBInputs | None = None,
) -> IJBResult:
    """IJB-B/C 1:1 verification of ``embed_fn`` (raw features of aligned RGB uint8 faces), and with
    ``identification`` 1:N identification on the same features; ``cache_dir``: see
    :func:`ijb_image_features`; ``inputs``: the release as :func:`prepare_ijb` already read it."""
    target = target.upper()
    if inputs is None or inputs.target != target or (identification and inputs.lists is None):
        inputs = prepare_ijb(root, target, identification=identification)  # every release mistake before embedding
    meta, lists = inputs.meta, (inputs.lists if identification else None)
    features = ijb_image_features(embed_fn, meta, batch_size=batch_size, flip=flip, image_size=image_size, cache_dir=cache_dir)
    if not use_norm_score:
        features = _normalize_rows(features)
    if use_detector_score:
        features = features * meta.faceness[:, None]
    feats, unique_templates = template_features(features, meta.templates, meta.medias)
    scores = pair_scores(feats, unique_templates, meta.pair_t1, meta.pair_t2)
    tars, auc, roc = _read_roc(meta.pair_label, scores)
    ident = identification_scores(feats, unique_templates, lists) if lists is not None else None
    return IJBResult(
        target=target,
        tar_at_far=tars,
        auc=auc,
        num_images=len(meta.image_names),
        num_templates=int(unique_templates.size),
        num_pairs=int(scores.size),
        num_impostor_pairs=int(np.count_nonzero(meta.pair_label == 0)),
        settings={"flip": flip, "norm_score": use_norm_score, "detector_score": use_detector_score},
        roc=roc,
        identification=ident,
    )


__all__ = [
    "CACHE_BLOCK",
    "FAR_TARGETS",
    "FPIR_TARGETS",
    "IJBInputs",
    "IJBMeta",
    "IJBResult",
    "IJB_TEMPLATE",
    "align_ijb_face",
    "evaluate_ijb",
    "identification_scores",
    "ijb_image_features",
    "pair_scores",
    "prepare_ijb",
    "read_identification_lists",
    "read_ijb_meta",
    "roc_curve",
    "tar_at_far",
    "template_features",
]
