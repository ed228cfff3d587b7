"""1:1 verification on insightface ``.bin`` sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW), exactly as insightface.

Protocol (insightface ``eval/verification.py``): embed every image and its horizontal mirror, sum the
two raw features, L2-normalise; the distance of a pair is the squared L2 distance; predict "same"
when ``distance < threshold``. Ten contiguous folds (``KFold(10, shuffle=False)``): on each, the
threshold in ``np.arange(0, 4, 0.01)`` with the best accuracy on the other nine folds (first maximum)
is applied to the held-out fold. Reported: mean and std of the ten fold accuracies.

``.bin`` files are untrusted pickles: :func:`load_bin` unpickles them with an allow-list that admits
only the containers, byte strings, booleans and plain NumPy arrays/scalars the format uses, so a
crafted file cannot run code.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hyperface.common.errors import HyperfaceError, exception_summary
from hyperface.datasets.codec import decode_image

#: Folds of insightface's protocol (``KFold(10, shuffle=False)``).
FOLDS = 10
#: Distance thresholds insightface searches for the accuracy.
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
#: Finer grid insightface uses for VAL@FAR.
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
#: Equal-width cosine bins over [-1, 1] of the genuine / impostor histograms a result keeps for plots.
HISTOGRAM_BINS = 100

EmbedFn = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------------
# Restricted unpickling


def _numpy_attr(name: str) -> Any:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed in a verification .bin")
    return dtype


def _safe_scalar(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only plain NumPy scalars are allowed in a verification .bin")
    return _numpy_attr("scalar")(dtype, *args)


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain NumPy arrays are allowed in a verification .bin")
    return _numpy_attr("_reconstruct")(np.ndarray, shape, dtype_code)


def _safe_codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes at pickle protocol < 3 as _codecs.encode(latin-1 text, "latin1").
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only to rebuild byte strings")
    return codecs.encode(text, encoding, errors)


_ALLOWED: dict[tuple[str, str], Any] = {("_codecs", "encode"): _safe_codecs_encode}
for _module in ("builtins", "__builtin__"):
    _ALLOWED.update({(_module, n): t for n, t in (("bytes", bytes), ("bytearray", bytearray), ("bool", bool), ("list", list), ("tuple", tuple))})
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "scalar")] = _safe_scalar
    _ALLOWED[(_module, "_reconstruct")] = _safe_reconstruct
_ALLOWED[("numpy", "dtype")] = _safe_dtype
_ALLOWED[("numpy", "ndarray")] = np.ndarray


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


class _Refused(pickle.UnpicklingError):
    pass


def _unpickle(data: bytes, path: Path) -> Any:
    """Unpickle like insightface (default, then ``encoding='bytes'``), through the allow-list."""
    last_error: Exception | None = None
    for encoding in ("ASCII", "bytes", "latin1"):  # latin1: Python-2 pickles holding NumPy arrays
        try:
            return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
        except _Refused as exc:
            raise HyperfaceError(
                f"{path} is not a plain verification .bin: it references {exc}, which could run code; refusing to load it "
                "(get the benchmark .bin files from the insightface dataset page, or rebuild them)"
            ) from None
        except EOFError as exc:  # truncated: no other encoding helps
            last_error = exc
            break
        except (UnicodeDecodeError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
            last_error = exc
    # a plain unpickling error means "not a pickle" here (a text file, an image), not "holds objects"
    plain = type(last_error) is pickle.UnpicklingError and "truncated" not in str(last_error)
    problem = f"not a pickle: {last_error}" if plain else exception_summary(last_error)
    raise HyperfaceError(f"{path} is not a readable verification .bin pickle ({problem})")


def _as_bytes(item: Any) -> bytes | None:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # a Python-2 str read with encoding='latin1': the bytes, losslessly
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    return None


def _as_bool(item: Any) -> bool | None:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    if isinstance(item, (int, np.integer)) and int(item) in (0, 1):
        return bool(item)
    return None


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """The encoded images (2N byte strings) and ``issame`` (N bools) of a verification .bin."""
    path = Path(path)
    if not path.is_file():
        raise HyperfaceError(
            f"verification set not found: {path} (insightface's lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin "
            "ship inside its training-set archives, e.g. faces_webface_112x112)"
        )
    obj = _unpickle(path.read_bytes(), path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise HyperfaceError(f"{path} must hold a pair (bins, issame_list); got {type(obj).__name__}")
    raw_bins, raw_issame = obj
    if not isinstance(raw_bins, (list, tuple)) or not isinstance(raw_issame, (list, tuple, np.ndarray)):
        raise HyperfaceError(
            f"{path}: bins must be a list of encoded images and issame_list a list of bools; got "
            f"{type(raw_bins).__name__} and {type(raw_issame).__name__}"
        )
    bins = [_as_bytes(b) for b in raw_bins]
    if any(b is None for b in bins):
        bad = next(i for i, b in enumerate(bins) if b is None)
        raise HyperfaceError(f"{path}: bins[{bad}] is a {type(raw_bins[bad]).__name__}, not encoded image bytes")
    issame_array = np.asarray(raw_issame, dtype=object)
    if issame_array.ndim != 1:
        raise HyperfaceError(f"{path}: issame_list must be a flat list of booleans, got shape {issame_array.shape}")
    issame = [_as_bool(v) for v in issame_array] if len(raw_issame) else []
    if any(v is None for v in issame):
        raise HyperfaceError(f"{path}: issame_list must hold only booleans")
    if len(issame) == 0 or len(bins) != 2 * len(issame):
        raise HyperfaceError(
            f"{path}: {len(bins)} images for {len(issame)} pairs; a verification .bin holds exactly two images per pair"
        )
    return bins, np.asarray(issame, dtype=bool)


def _decode_batch(bins: list[bytes], start: int, image_size: int, path: Path) -> np.ndarray:
    import cv2

    out = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)
    for i, data in enumerate(bins):
        image = decode_image(data, what=f"{path.name} image {start + i}")
        height, width = image.shape[:2]
        if width != image_size:  # insightface: mx.image.resize_short(img, 112), bicubic, when the width differs
            if height > width:
                size = (image_size, image_size * height // width)  # cv2 takes (width, height)
            else:
                size = (image_size * width // height, image_size)
            image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        if image.shape[:2] != (image_size, image_size):  # not square: centre crop (insightface would fail here)
            top, left = (image.shape[0] - image_size) // 2, (image.shape[1] - image_size) // 2
            image = image[max(top, 0) : max(top, 0) + image_size, max(left, 0) : max(left, 0) + image_size]
            if image.shape[:2] != (image_size, image_size):
                image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
        out[i] = image
    return out


def load_bin(path: str | os.PathLike, image_size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Decode a verification .bin: (images uint8 (2N, H, W, 3) RGB, issame bool (N,)). Pair i = images 2i, 2i+1."""
    bins, issame = read_bin(path)
    return _decode_batch(bins, 0, image_size, Path(path)), issame


# ------------------------------------------------------------------------------------------------
# The protocol


@dataclass
class VerificationResult:
    """Accuracies are fractions (0.9950 = 99.50%)."""

    accuracy: float
    std: float
    best_threshold: float
    num_pairs: int
    fold_accuracies: list[float] = field(default_factory=list)
    fold_thresholds: list[float] = field(default_factory=list)
    val: float | None = None  # TAR at FAR = far_target, mean over folds
    val_std: float | None = None
    far: float | None = None
    far_target: float = 1e-3
    xnorm: float | None = None  # mean feature norm (insightface logs it as XNorm)
    name: str = ""
    # pair cosine similarity counts in HISTOGRAM_BINS equal bins over [-1, 1] (cosine = 1 - distance / 2)
    similarity_histogram: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kfold_splits(n: int, nfolds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """sklearn ``KFold(n_splits, shuffle=False)``: contiguous folds, the first ``n % k`` one larger."""
    if nfolds < 2 or nfolds > n:
        raise HyperfaceError(f"need 2 <= folds <= pairs, got {nfolds} folds for {n} pairs")
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1
    indices = np.arange(n)
    splits = []
    start = 0
    for size in sizes:
        test = indices[start : start + size]
        train = np.concatenate([indices[:start], indices[start + size :]])
        splits.append((train, test))
        start += size
    return splits


def _counts_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many values are ``< threshold`` (as ``np.less`` counts them)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _accuracies(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    tp = _counts_below(same, thresholds)
    fp = _counts_below(diff, thresholds)
    tn = diff.size - fp
    return (tp + tn).astype(np.float64) / dist.size


def _val_far(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    val = _counts_below(same, thresholds) / max(same.size, 1)
    far = _counts_below(diff, thresholds) / max(diff.size, 1)
    return val, far


def _threshold_at_far(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    # insightface fits scipy interp1d(far, thresholds, 'slinear'): a degree-1 B-spline through the
    # (FAR, threshold) points in FAR order (knots r_[x0, x, x_last]), which recent SciPy refuses
    # because FAR values repeat. The same function without SciPy, evaluated with the spline's own
    # arithmetic (de Boor for degree 1), so the threshold agrees to the last bit: plain linear
    # interpolation rounds differently in about a third of LFW-sized folds. The interval is the last
    # one whose left FAR is <= target: a target between two FAR values interpolates between the last
    # threshold with the lower FAR and the first with the higher; a target equal to a FAR value gives
    # (to within rounding) the LAST threshold with that FAR, except the largest FAR when it repeats,
    # where the spline's empty last interval gives 0 (never at 1e-3: the largest FAR is 1); 0 if no
    # FAR reaches the target.
    if far.size == 0 or not far.max() >= target:
        return 0.0
    if target < far[0] or far.size == 1:  # a target below every FAR (only a negative one): the first threshold
        return float(thresholds[0])
    i = min(int(np.searchsorted(far, target, side="right")) - 1, far.size - 2)
    lo, hi = float(far[i]), float(far[i + 1])
    if hi == lo:
        return 0.0
    w = 1.0 / (hi - lo)
    return float(thresholds[i] * (w * (hi - target)) + thresholds[i + 1] * (w * (target - lo)))


def evaluate_embeddings(
    embeddings: np.ndarray, issame: np.ndarray, nfolds: int = FOLDS, *, far_target: float = 1e-3
) -> VerificationResult:
    """insightface's 10-fold verification accuracy for already fused and L2-normalised embeddings.

    ``embeddings`` is (2N, D): pair i is rows 2i and 2i+1. ``issame`` is (N,) bool.
    """
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise HyperfaceError(f"embeddings must be (2N, D) with pairs in consecutive rows, got shape {embeddings.shape}")
    if issame.dtype != bool or issame.shape != (embeddings.shape[0] // 2,):
        raise HyperfaceError(f"issame must be a bool array of length {embeddings.shape[0] // 2}, got {issame.dtype} {issame.shape}")
    if not np.isfinite(embeddings).all():
        raise HyperfaceError("embeddings contain NaN/inf: check the model (for fp16 models, try fp32)")
    dist = np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)
    fold_accuracies, fold_thresholds, vals, fars = [], [], [], []
    for train, test in kfold_splits(dist.size, nfolds):
        train_acc = _accuracies(dist[train], issame[train], ACCURACY_THRESHOLDS)
        best = ACCURACY_THRESHOLDS[int(np.argmax(train_acc))]
        fold_thresholds.append(float(best))
        fold_accuracies.append(float(_accuracies(dist[test], issame[test], np.asarray([best]))[0]))
        _, far_train = _val_far(dist[train], issame[train], VAL_THRESHOLDS)
        threshold = _threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
        val, far = _val_far(dist[test], issame[test], np.asarray([threshold]))
        vals.append(float(val[0]))
        fars.append(float(far[0]))
    # VAL@FAR needs both kinds of pair (insightface divides by zero without): "-" in the table
    measurable = bool(issame.any() and (~issame).any())
    return VerificationResult(
        accuracy=float(np.mean(fold_accuracies)),
        std=float(np.std(fold_accuracies)),
        best_threshold=float(np.mean(fold_thresholds)),
        num_pairs=int(dist.size),
        fold_accuracies=fold_accuracies,
        fold_thresholds=fold_thresholds,
        val=float(np.mean(vals)) if measurable else None,
        val_std=float(np.std(vals)) if measurable else None,
        far=float(np.mean(fars)) if measurable else None,
        far_target=far_target,
        similarity_histogram=similarity_histogram(1 - dist / 2, issame),
    )


def similarity_histogram(similarity: np.ndarray, issame: np.ndarray) -> dict[str, list[int]]:
    """Genuine and impostor pair counts in :data:`HISTOGRAM_BINS` equal cosine bins over [-1, 1]."""
    return {
        kind: np.histogram(np.clip(similarity[mask], -1, 1), bins=HISTOGRAM_BINS, range=(-1, 1))[0].tolist()
        for kind, mask in (("genuine", issame), ("impostor", ~issame))
    }


def _l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1)  # like sklearn.preprocessing.normalize


def embed_pairs(
    embed_fn: EmbedFn, images_or_bins: np.ndarray | list[bytes], *, batch_size: int = 64, flip: bool = True,
    image_size: int = 112, progress_desc: str = "", source: Path | None = None,
) -> tuple[np.ndarray, float]:
    """Flip-fused, L2-normalised embeddings (and the mean raw feature norm) of images or encoded bins."""
    from hyperface.common.runtime import progress

    if batch_size < 1:
        raise HyperfaceError(f"--batch-size must be >= 1, got {batch_size}")
    total = len(images_or_bins)
    fused: np.ndarray | None = None
    norm_sum = 0.0
    bar = progress(total=total, desc=progress_desc or "embedding", unit="img")
    for start in range(0, total, batch_size):
        chunk = images_or_bins[start : start + batch_size]
        if isinstance(chunk, list):
            chunk = _decode_batch(chunk, start, image_size, source or Path("bin"))
        raw = np.asarray(embed_fn(np.ascontiguousarray(chunk)), dtype=np.float32)
        if raw.ndim != 2 or raw.shape[0] != chunk.shape[0]:
            raise HyperfaceError(f"the embedding function returned shape {raw.shape} for {chunk.shape[0]} images")
        norm_sum += float(np.linalg.norm(raw, axis=1).sum())
        if flip:  # insightface: features of the image plus features of its horizontal mirror
            mirrored = np.asarray(embed_fn(np.ascontiguousarray(chunk[:, :, ::-1, :])), dtype=np.float32)
            norm_sum += float(np.linalg.norm(mirrored, axis=1).sum())
            raw = raw.astype(np.float64) + mirrored
        if fused is None:
            # float64 from here on, as insightface (np.zeros arrays, sklearn's normalize): float32
            # distances move pairs sitting on a threshold grid point to the other side.
            fused = np.empty((total, raw.shape[1]), dtype=np.float64)
        fused[start : start + raw.shape[0]] = raw
        bar.update(chunk.shape[0])
    bar.close()
    assert fused is not None
    return _l2_normalize(fused), norm_sum / max(total * (2 if flip else 1), 1)  # XNorm over both passes


def evaluate_images(
    embed_fn: EmbedFn,
    images: np.ndarray,
    issame: np.ndarray,
    *,
    batch_size: int = 64,
    flip: bool = True,
    nfolds: int = FOLDS,
) -> VerificationResult:
    """The protocol on already decoded pairs (``load_bin`` output): for periodic checks during training,
    decode a .bin once and call this every few thousand steps."""
    embeddings, xnorm = embed_pairs(embed_fn, images, batch_size=batch_size, flip=flip)
    result = evaluate_embeddings(embeddings, issame, nfolds=nfolds)
    result.xnorm = xnorm
    return result


def evaluate_bin(
    embed_fn: EmbedFn,
    path: str | os.PathLike,
    batch_size: int = 64,
    flip: bool = True,
    *,
    nfolds: int = FOLDS,
    image_size: int = 112,
) -> VerificationResult:
    """Run the full protocol on a .bin: ``embed_fn(uint8 (B,H,W,3) RGB) -> (B, D)`` raw or normalised features.

    Images are decoded batch by batch, so memory holds the encoded file plus the embeddings only.
    """
    path = Path(path)
    bins, issame = read_bin(path)
    embeddings, xnorm = embed_pairs(
        embed_fn, bins, batch_size=batch_size, flip=flip, image_size=image_size, progress_desc=path.stem, source=path
    )
    result = evaluate_embeddings(embeddings, issame, nfolds=nfolds)
    result.xnorm = xnorm
    result.name = path.stem
    return result


__all__ = [
    "ACCURACY_THRESHOLDS",
    "FOLDS",
    "HISTOGRAM_BINS",
    "VAL_THRESHOLDS",
    "VerificationResult",
    "embed_pairs",
    "evaluate_bin",
    "evaluate_embeddings",
    "evaluate_images",
    "kfold_splits",
    "load_bin",
    "read_bin",
    "similarity_histogram",
]
