"""Embed any number of images into a gallery: streaming, parallel decoding, resumable.

Outputs, beside ``gallery.npy`` (the name is the ``out`` argument's):

- ``gallery.npy``: float32 (M, D), L2-normalised rows;
- ``gallery.index.txt``: line i names the source of row i (path relative to the folder, as written
  in the list file, or ``train.rec#<record>``);
- ``gallery.rejected.tsv``: ``path<TAB>reason`` for every input that was not embedded (unreadable,
  no face, too small), with a header line;
- ``gallery.aligned.jpg``: 32 of the embedded faces, spread over the gallery, aligned as the model
  saw them, in RGB (a wrong crop or a missed detection shows at a glance);
- ``gallery.landmarks.npy`` (detect mode only): each row's 5 detected landmarks;
- the manifest: parameters, model convention, counts, timings, the settings a resume must match;
  written last. ``out`` a folder: ``manifest.json`` in it (the folder is the run's); ``out`` a
  ``.npy`` path: ``gallery.manifest.json`` beside it, so several galleries can share a folder.
  Readers find either through :class:`GalleryPaths`.

Work is done in chunks of ``chunk_size`` consecutive inputs. Each finished chunk is saved atomically
under ``gallery.parts/``; a rerun with ``resume=True`` skips finished chunks and the final merge
produces the same files as an uninterrupted run. Decoding and face preprocessing run in a thread
pool (OpenCV and onnxruntime release the GIL) while the recognizer runs batches in the caller's thread.

One process per gallery: while a run works, it holds an OS lock (flock,
:func:`~hyperface.common.io.lock_output`) on ``gallery.parts/.hyperface-run``, so the same command
started twice (or a requeued job while the first still runs) is refused, ``--resume`` and
``--overwrite`` included, and deletes nothing. The lock lives in the parts folder, the run's own,
which goes when the run completes: the folder that holds ``g.npy`` may be the user's and shared by
several galleries, so nothing is added to it (a ``.hyperface-run`` there would also let another
stage's ``--overwrite`` clear it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hyperface.common.errors import HyperfaceError, exception_summary, without_object_reprs
from hyperface.common.io import (
    RUN_MARKER, atomic_write, escape_line, files_hold_no_work, lock_output, read_json, releases_output_locks,
    remove_stale_temporaries, save_json,
)
from hyperface.common.manifest import Manifest, describe_changes
from hyperface.common.runtime import get_logger, ordered_parallel_map, progress
from hyperface.datasets.preview import spread_rows
from hyperface.recognition.images import ImageSource, UnreadableImage
from hyperface.recognition.preprocess import FacePreprocessor
from hyperface.recognition.recognizers import Recognizer


log = get_logger("hyperface.embed")

PLAN_FILE = "plan.json"
#: Aligned faces shown in ``g.aligned.jpg`` (4 rows of 8), spread over the gallery.
PREVIEW_FACES = 32


@dataclass
class GalleryPaths:
    """The files one gallery run writes, all named after ``embeddings``.

    ``in_folder``: True when the run owns its folder (``--out FOLDER``: ``FOLDER/manifest.json``),
    False for the self-contained file form (``--out g.npy``: ``g.manifest.json``), None for readers
    that only know the ``.npy`` path: :attr:`manifest` then finds whichever the run wrote.
    """

    embeddings: Path
    in_folder: bool | None = None

    def __post_init__(self) -> None:
        self.embeddings = Path(self.embeddings)

    @classmethod
    def from_out(cls, out: str | os.PathLike) -> "GalleryPaths":
        out = Path(out)
        if out.suffix != ".npy":  # a folder: write gallery.npy inside it
            if out.exists() and not out.is_dir():
                raise HyperfaceError(f"--out {out}: give a .npy file path or a folder")
            return cls(out / "gallery.npy", in_folder=True)
        # A .npy path: self-contained, unless the folder's manifest.json already describes this very
        # file (by the folder form, or by an earlier hyperface): keep continuing that run.
        return cls(out, in_folder=_folder_manifest_describes(out))

    @property
    def stem(self) -> Path:
        return self.embeddings.with_suffix("")

    @property
    def index(self) -> Path:
        return self.stem.with_name(self.stem.name + ".index.txt")

    @property
    def rejected(self) -> Path:
        return self.stem.with_name(self.stem.name + ".rejected.tsv")

    @property
    def parts(self) -> Path:
        return self.stem.with_name(self.stem.name + ".parts")

    @property
    def own_manifest(self) -> Path:
        """``g.manifest.json`` beside ``g.npy``: the file form's manifest."""
        return self.stem.with_name(self.stem.name + ".manifest.json")

    @property
    def folder_manifest(self) -> Path:
        """``manifest.json`` in the folder: the folder form's manifest."""
        return self.embeddings.parent / "manifest.json"

    @property
    def manifest(self) -> Path:
        if self.in_folder is True:
            return self.folder_manifest
        if self.in_folder is False or self.own_manifest.exists():
            return self.own_manifest
        return self.folder_manifest if _folder_manifest_describes(self.embeddings) else self.own_manifest

    @property
    def landmarks(self) -> Path:
        """``g.landmarks.npy``: (M, 5, 2) float32 detected landmarks per row (detect mode only)."""
        return self.stem.with_name(self.stem.name + ".landmarks.npy")

    @property
    def preview(self) -> Path:
        """``g.aligned.jpg``: a few of the aligned faces the model embedded, to check the alignment by eye."""
        return self.stem.with_name(self.stem.name + ".aligned.jpg")

    def outputs(self) -> list[Path]:
        return [self.embeddings, self.index, self.rejected, self.landmarks, self.preview, self.manifest]

    def chunk(self, k: int) -> Path:
        return self.parts / f"chunk_{k:06d}.npz"


def find_embeddings(path: str | os.PathLike, *, flag: str) -> Path:
    """An embeddings .npy, or the output folder of ``hyperface embed`` (its gallery.npy); ``flag``
    names the option in the error when the folder has none."""
    path = Path(path)
    if not path.is_dir():
        return path
    paths = GalleryPaths.from_out(path)
    embeddings = paths.embeddings
    if not embeddings.is_file() and paths.parts.is_dir():  # an embed run killed or still running
        raise HyperfaceError(
            f"{flag} {path}: its `hyperface embed` run has not finished ({paths.parts.name}/ holds the chunks "
            f"done so far, {embeddings.name} is written at the end): run the same embed command with --resume, then this one"
        )
    if not embeddings.is_file():
        raise HyperfaceError(
            f"{flag} {path} is a folder without {embeddings.name}: give the .npy that `hyperface embed` "
            "wrote, or its output folder"
        )
    return embeddings


def _folder_manifest_describes(embeddings: Path) -> bool:
    """True when ``manifest.json`` beside ``embeddings`` is an embed manifest written for that file."""
    try:
        manifest = json.loads((embeddings.parent / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("stage") != "embed":
        return False
    return (manifest.get("outputs") or {}).get("embeddings") == embeddings.name


@dataclass
class EmbedResult:
    paths: GalleryPaths
    embedded: int
    rejected: int
    embedding_size: int
    chunks_computed: int
    seconds: float
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    # (gallery row, input index) of the faces shown in the preview: spread over the gallery
    preview_rows: list[tuple[int, int]] = field(default_factory=list)


def _fingerprint(source: ImageSource, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for i in range(len(source)):
        digest.update(source.name(i).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


@releases_output_locks
def check_output(paths: GalleryPaths, *, resume: bool) -> None:
    """Raise unless ``paths`` is free, holds only what a failed attempt left (cleared when the run
    starts), or holds an embed run and ``resume`` is set; and while another process runs there (its
    lock is tried, not kept)."""
    _prepare(paths, resume=resume, overwrite=False, clear=False)


def _lock(paths: GalleryPaths) -> None:
    """Hold the gallery's lock (its parts folder's run marker, see the module docstring) until the
    entry point returns; refuses while another process holds it."""
    lock_output(paths.parts, stage="embed", label=paths.embeddings)


def _remove(paths: GalleryPaths, path: Path) -> None:
    """Delete an output; the parts folder is emptied but keeps its run marker, whose lock this
    process holds (deleting it would let a third process lock a new one meanwhile)."""
    if path == paths.parts and not path.is_symlink() and (path / RUN_MARKER).is_file():
        for child in path.iterdir():
            if child.name != RUN_MARKER:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _prepare(paths: GalleryPaths, *, resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Make ``paths`` ready for a run: free, kept for ``resume``, or cleared (``overwrite``, or what
    an attempt that embedded nothing left: the corrected command runs without a flag). ``clear``
    False only checks."""
    if (paths.parts / RUN_MARKER).is_file():  # a run there (now, or killed): one process at a time
        _lock(paths)  # before anything is cleared or resumed
    if paths.manifest.exists():
        try:
            stage = read_json(paths.manifest).get("stage")
        except (OSError, HyperfaceError) as exc:
            # whose it is cannot be told, so neither --resume nor --overwrite may touch what is beside it
            problem = exc.args[0].split(";")[0] if isinstance(exc, HyperfaceError) else f"cannot read {paths.manifest} ({exc.strerror or exc})"
            raise HyperfaceError(
                f"{problem}; if an embed run wrote it, delete it and run again with --overwrite, otherwise choose another --out"
            ) from None
        if stage != "embed":
            raise HyperfaceError(
                f"{paths.manifest} belongs to another run ({stage or 'unknown stage'}); give --out a folder of its own"
            )
    existing = [p for p in paths.outputs() + [paths.parts] if p.exists() or p.is_symlink()]
    if not existing:
        return
    # a finished embed run (its manifest), or one interrupted after planning (parts/plan.json) or before (empty parts/)
    ours = paths.manifest.is_file() or (paths.parts / PLAN_FILE).is_file() or (
        paths.parts.is_dir() and all(p.name == RUN_MARKER for p in paths.parts.iterdir()))
    foreign = [p for p in existing if (p.is_dir() and p != paths.parts) or not ours]
    if foreign and (resume or overwrite):  # neither flag may replace what another program or stage wrote
        raise HyperfaceError(
            f"{foreign[0]} exists and was not written by `hyperface embed` (no {paths.manifest.name} beside it"
            f"{'; it is a folder' if foreign[0].is_dir() else ''}): choose another --out"
        )
    reuse = not foreign and _holds_no_work(paths, existing)  # nothing to resume, nothing to protect
    if reuse or overwrite:
        if clear:
            if reuse:
                log.info("reusing %s: an earlier attempt there embedded no image", paths.embeddings)
            for p in existing:
                _remove(paths, p)
        return
    if resume:
        # this run's own names only: galleries can share a folder
        remove_stale_temporaries(paths.embeddings.parent, [p.name for p in paths.outputs()])
        if paths.parts.is_dir():
            remove_stale_temporaries(paths.parts)
        return
    names = ", ".join(p.name for p in existing[:4])
    raise HyperfaceError(
        f"{paths.embeddings.parent} already holds {names}: pass --resume to continue that run, "
        "--overwrite to replace it, or choose another --out"
    )


def _holds_no_work(paths: GalleryPaths, existing: list[Path]) -> bool:
    """True when the outputs at ``paths`` are an attempt's that embedded no image: no gallery, no
    manifest, no chunk; the plan, an empty index and the rejected list of a run that failed with
    every input rejected (its chunks are removed then) hold nothing to resume."""
    found = existing + (list(paths.parts.rglob("*")) if paths.parts.is_dir() and not paths.parts.is_symlink() else [])
    setup = (f"{paths.parts.name}/{PLAN_FILE}", f"{paths.parts.name}/{RUN_MARKER}", paths.rejected.name)
    return files_hold_no_work(paths.embeddings.parent, found, setup)


@releases_output_locks
def embed_images(
    source: ImageSource,
    recognizer: Recognizer,
    preprocessor: FacePreprocessor,
    out: str | os.PathLike,
    *,
    workers: int = 4,
    chunk_size: int = 4096,
    resume: bool = False,
    overwrite: bool = False,
    manifest_params: dict[str, Any] | None = None,
    manifest_inputs: dict[str, Any] | None = None,
    show_progress: bool | None = None,
) -> EmbedResult:
    """Embed every image of ``source`` and write the gallery files (see module docstring).

    Raises :class:`HyperfaceError` when no image at all could be embedded (the rejected list is
    still written), when ``resume`` meets a partial run made with other inputs or settings, or while
    another process embeds into the same gallery (its lock is let go when this returns).
    """
    started = time.time()
    paths = GalleryPaths.from_out(out)
    if chunk_size < 1:
        raise HyperfaceError(f"chunk_size must be >= 1, got {chunk_size}")
    _prepare(paths, resume=resume, overwrite=overwrite)

    n_items = len(source)
    n_chunks = (n_items + chunk_size - 1) // chunk_size
    settings = _resume_settings(recognizer, preprocessor, chunk_size, n_items)
    if resume and paths.manifest.exists() and paths.embeddings.exists() and not paths.parts.exists():
        manifest = read_json(paths.manifest)
        result_settings = _result_settings(settings)
        legacy = _fingerprint(source, _as_recorded(result_settings, manifest.get("settings") or {}))
        _check_finished_run(paths, manifest, result_settings, _fingerprint(source, result_settings), legacy)
        log.info("%s is already complete; nothing to resume", paths.embeddings)
        counts = manifest.get("counts", {})
        return EmbedResult(paths, counts.get("embedded", 0), counts.get("rejected", 0),
                           counts.get("embedding_size", 0), 0, 0.0)

    fingerprint = _fingerprint(source, settings)
    paths.parts.mkdir(parents=True, exist_ok=True)
    _lock(paths)  # already held when _prepare found the parts folder
    plan_path = paths.parts / PLAN_FILE
    if plan_path.exists():
        plan = read_json(plan_path)  # damaged: one error naming it (--overwrite starts again)
        if plan.get("fingerprint") != fingerprint and plan.get("fingerprint") == _fingerprint(
            source, _as_recorded(settings, plan.get("settings") or {})
        ):
            fingerprint = plan["fingerprint"]  # a plan an older version wrote, without the model checksums
        if plan.get("fingerprint") != fingerprint:
            raise HyperfaceError(
                f"cannot --resume the partial run in {paths.parts}: "
                f"{_what_differs(plan.get('settings') or {}, settings)}; resume with the original images and "
                "settings, or pass --overwrite to start again"
            )
    else:
        save_json(plan_path, {"fingerprint": fingerprint, "settings": settings})

    todo = [k for k in range(n_chunks) if not _chunk_is_whole(paths.chunk(k))]  # a damaged chunk is embedded again
    done_items = n_items - sum(min(chunk_size, n_items - k * chunk_size) for k in todo)
    if done_items:
        log.info("resuming: %d of %d chunks already done", n_chunks - len(todo), n_chunks)

    def load_one(index: int) -> tuple[int, np.ndarray | None, str | None, np.ndarray | None]:
        try:
            image = source.load(index)
            face, reason, landmarks = preprocessor.process_with_landmarks(image)
        except UnreadableImage as exc:
            return index, None, f"unreadable: {exc}", None
        except HyperfaceError as exc:
            return index, None, str(exc), None
        except Exception as exc:  # a bad file must never stop a million-image run; it is listed
            return index, None, f"error: {type(exc).__name__}: {without_object_reprs(str(exc))[:200]}", None
        return index, face, reason, landmarks

    def indices() -> Iterator[int]:
        for k in todo:
            yield from range(k * chunk_size, min((k + 1) * chunk_size, n_items))

    times = {"decode_wait": 0.0, "embed": 0.0}
    bar = progress(total=n_items, desc="embed", unit="img", disable=(None if show_progress is None else not show_progress))
    bar.update(done_items)
    stream = ordered_parallel_map(load_one, indices(), workers, window=max(2 * recognizer.batch_size, 8 * workers))
    try:
        for k in todo:
            lo, hi = k * chunk_size, min((k + 1) * chunk_size, n_items)
            faces, face_rows, rows, embeddings = [], [], [], []
            face_landmarks, kept_landmarks = [], []
            rejected_rows, reasons = [], []

            def flush() -> None:
                if faces:
                    t0 = time.perf_counter()
                    batch, good = recognizer.embed_valid(np.stack(faces))
                    embeddings.append(batch)
                    times["embed"] += time.perf_counter() - t0
                    for row, ok, points in zip(face_rows, good, face_landmarks):  # one image the model cannot embed is rejected, not fatal
                        if ok:
                            rows.append(row)
                            kept_landmarks.append(points)
                        else:
                            rejected_rows.append(row)
                            reasons.append("the model returned NaN/inf or all-zero features for it")
                    faces.clear()
                    face_rows.clear()
                    face_landmarks.clear()

            for _ in range(lo, hi):
                t0 = time.perf_counter()
                index, face, reason, points = next(stream)
                times["decode_wait"] += time.perf_counter() - t0
                if face is None:
                    rejected_rows.append(index)
                    reasons.append(reason or "rejected")
                else:
                    faces.append(face)
                    face_rows.append(index)
                    face_landmarks.append(points if points is not None else np.full((5, 2), np.nan, np.float32))
                    if len(faces) >= recognizer.batch_size:
                        flush()
                bar.update(1)
            flush()
            dim = recognizer.embedding_size
            emb = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
            with atomic_write(paths.chunk(k), "wb") as handle:
                np.savez(
                    handle,
                    embeddings=emb.astype(np.float32),
                    rows=np.asarray(rows, dtype=np.int64),
                    rejected_rows=np.asarray(rejected_rows, dtype=np.int64),
                    rejected_reasons=np.asarray(reasons, dtype=str) if reasons else np.zeros(0, dtype="<U1"),
                    # only detect mode knows landmarks: the other modes write none
                    **({"landmarks": np.asarray(kept_landmarks, dtype=np.float32).reshape(-1, 5, 2)}
                       if preprocessor.mode == "detect" else {}),
                )
    finally:
        stream.close()
        bar.close()

    result = _merge(paths, source, n_chunks, recognizer.embedding_size, landmarks=preprocessor.mode == "detect")
    result.chunks_computed = len(todo)
    result.seconds = time.time() - started
    if result.embedded == 0:
        for k in range(n_chunks):  # nothing to resume: the corrected command reuses --out without a flag
            paths.chunk(k).unlink(missing_ok=True)
        raise HyperfaceError(
            f"no image could be embedded: all {result.rejected} inputs were rejected "
            f"({_top_reasons(result.rejected_reasons)}); see {paths.rejected}"
        )

    previewed = _write_preview(paths, source, preprocessor, result.preview_rows)
    manifest = Manifest(
        stage="embed",
        params=dict(manifest_params or {}),
        inputs=dict(manifest_inputs or {}),
        started=started,
    )
    manifest.time("decode_wait", times["decode_wait"])
    manifest.time("embed", times["embed"])
    manifest.extra.update(
        {
            "counts": {
                "inputs": n_items,
                "embedded": result.embedded,
                "rejected": result.rejected,
                "embedding_size": result.embedding_size,
                "rejected_reasons": result.rejected_reasons,
            },
            "source": source.describe(),
            "recognizer": recognizer.describe(),
            "preprocess": preprocessor.describe(),
            "outputs": {
                "embeddings": paths.embeddings.name,
                "index": paths.index.name,
                "rejected": paths.rejected.name,
                **({"landmarks": paths.landmarks.name} if paths.landmarks.exists() and preprocessor.mode == "detect" else {}),
                **({"preview": paths.preview.name} if previewed else {}),
            },
            **({"preview_rows": [row for row, _ in result.preview_rows]} if previewed else {}),
            "resumed_chunks": n_chunks - len(todo),
            # what a later --resume must match (compared with describe_changes when it does not)
            "settings": _result_settings(settings),
            "fingerprint": _fingerprint(source, _result_settings(settings)),
        }
    )
    # in its place (manifest.json, or g.manifest.json for the file form) before the parts go
    manifest.write(paths.manifest.parent, name=paths.manifest.name)
    shutil.rmtree(paths.parts)
    return result


def _resume_settings(recognizer: Recognizer, preprocessor: FacePreprocessor, chunk_size: int, count: int) -> dict[str, Any]:
    """What must match for a resume to continue a run (batch size, device and workers may change),
    as JSON stores it (so a plan or manifest read back compares equal)."""
    from hyperface.common.io import file_sha256

    model_settings = {k: v for k, v in recognizer.describe().items() if k not in ("batch_size", "device", "providers")}
    if model_settings.get("path"):
        model_path = Path(model_settings["path"]).resolve()
        model_settings["path"] = str(model_path)
        if model_path.is_file():  # the weights, not only their name: a re-export at the same path is another model
            model_settings["sha256"] = file_sha256(model_path)
    settings = {
        "recognizer": model_settings,
        "preprocess": {k: v for k, v in preprocessor.describe().items() if k != "detector"},
        "chunk_size": chunk_size,
        "count": count,
    }
    if preprocessor.mode == "detect":  # the detector's file and the settings that decide which faces are found
        detector = {k: v for k, v in preprocessor.detector.describe().items() if k not in ("device", "kind")}
        detector_path = Path(preprocessor.detector.path).resolve()
        settings["preprocess"]["detector"] = detector | {"path": str(detector_path), "sha256": file_sha256(detector_path)}
    return json.loads(json.dumps(settings, default=str))


def _as_recorded(settings: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the model checksums an older version did not record in ``recorded``
    (its plan or manifest), so its runs still resume; their paths are compared as before."""
    out = json.loads(json.dumps(settings))
    if "sha256" not in (recorded.get("recognizer") or {}):
        out.get("recognizer", {}).pop("sha256", None)
    detector = (out.get("preprocess") or {}).get("detector")
    if detector is not None and "sha256" not in (((recorded.get("preprocess") or {}).get("detector")) or {}):
        detector.pop("sha256", None)
    return out


def _result_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a finished run's files (the chunk size only matters while it runs)."""
    return {k: v for k, v in settings.items() if k != "chunk_size"}


def _what_differs(before: dict[str, Any], after: dict[str, Any]) -> str:
    changes = describe_changes(before, after)
    if changes:
        return f"it was made with other settings ({changes})"
    return "it was made from other images (the same number of inputs, but other names or order)"


def _check_finished_run(
    paths: GalleryPaths, manifest: dict[str, Any], settings: dict[str, Any], fingerprint: str, legacy_fingerprint: str | None = None
) -> None:
    """Refuse ``--resume`` on a complete run when the images or settings changed since it ran
    (``legacy_fingerprint``: the same without what an older version did not record)."""
    if "fingerprint" in manifest:
        if manifest["fingerprint"] in (fingerprint, legacy_fingerprint):
            return
        what = _what_differs(manifest.get("settings") or {}, settings)
    else:  # a manifest from before settings were recorded: compare what it does state
        before = {
            "recognizer": dict(manifest.get("recognizer") or {}),
            "preprocess": {k: v for k, v in (manifest.get("preprocess") or {}).items() if k != "detector"},
            "count": (manifest.get("counts") or {}).get("inputs"),
        }
        for key in ("batch_size", "device", "providers"):
            before["recognizer"].pop(key, None)
        if before["recognizer"].get("path"):
            before["recognizer"]["path"] = str(Path(before["recognizer"]["path"]).resolve())
        after = {
            "recognizer": {k: v for k, v in settings["recognizer"].items() if k != "sha256"},  # not recorded then
            "preprocess": {k: v for k, v in settings["preprocess"].items() if k != "detector"},
            "count": settings["count"],
        }
        changes = describe_changes(before, json.loads(json.dumps(after)))
        if not changes:
            return
        what = f"it was made with other settings ({changes})"
    raise HyperfaceError(
        f"cannot --resume {paths.embeddings}: the run is complete, and {what}; pass --overwrite to embed "
        "again with the new settings, or choose another --out"
    )


def _top_reasons(reasons: dict[str, int], k: int = 3) -> str:
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:k]
    return "; ".join(f"{n} x {r}" for r, n in top)


_CHUNK_KEYS = ("embeddings", "rows", "rejected_rows", "rejected_reasons")


def _chunk_is_whole(path: Path) -> bool:
    """Whether a chunk file exists and opens with every array a chunk holds. Chunks are written
    atomically, so only damage after the fact (a disk error, a stray edit) fails here; that chunk is
    then embedded again on --resume instead of breaking the merge."""
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as chunk:
            if not all(key in chunk.files for key in _CHUNK_KEYS):
                raise ValueError(f"missing arrays {[k for k in _CHUNK_KEYS if k not in chunk.files]}")
            for key in _CHUNK_KEYS:
                chunk[key]  # decompress and parse each: a zeroed or truncated member fails here
        return True
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s is damaged (%s): embedding its images again", path, exception_summary(exc))
        return False


def _merge(paths: GalleryPaths, source: ImageSource, n_chunks: int, dim: int, *, landmarks: bool = False) -> EmbedResult:
    """Concatenate the chunk files, in input order, into the final gallery files (atomically);
    ``landmarks``: also ``g.landmarks.npy`` (chunks written before landmarks were kept give NaN rows)."""
    total = 0
    for k in range(n_chunks):
        with np.load(paths.chunk(k), allow_pickle=False) as chunk:
            total += chunk["rows"].shape[0]
            if chunk["embeddings"].shape[0] and chunk["embeddings"].shape[1] != dim:
                raise HyperfaceError(f"{paths.chunk(k)} holds {chunk['embeddings'].shape[1]}-d rows, expected {dim}")

    reason_counts: dict[str, int] = {}
    rejected = 0
    wanted = spread_rows(total, PREVIEW_FACES)
    preview_rows: list[tuple[int, int]] = []
    written = 0
    tmp_npy = paths.embeddings.with_name(f".{paths.embeddings.name}.merge.tmp")
    # File names are written back byte for byte (surrogateescape): a name that is not UTF-8 stays
    # the name of its file, and `hyperface report` reads the index the same way.
    text = {"encoding": "utf-8", "errors": "surrogateescape"}
    try:
        # The .npy is written front to back (header, then each chunk): a memory map of the whole
        # array would hold N x d dirty pages against the process (10 GB at 5M rows).
        with open(tmp_npy, "wb") as npy, atomic_write(paths.index, "w", **text) as index_file, \
                atomic_write(paths.rejected, "w", **text) as rejected_file, \
                (atomic_write(paths.landmarks, "wb") if landmarks and total else contextlib.nullcontext()) as points_file:
            np.lib.format.write_array_header_1_0(npy, {"descr": np.dtype("<f4").str, "fortran_order": False, "shape": (total, dim)})
            if points_file is not None:
                np.lib.format.write_array_header_1_0(points_file, {"descr": "<f4", "fortran_order": False, "shape": (total, 5, 2)})
            rejected_file.write("path\treason\n")
            for k in range(n_chunks):
                with np.load(paths.chunk(k), allow_pickle=False) as chunk:
                    emb, rows = chunk["embeddings"], chunk["rows"]
                    npy.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
                    if points_file is not None:
                        points = chunk["landmarks"] if "landmarks" in chunk.files else np.full((len(rows), 5, 2), np.nan)
                        points_file.write(np.ascontiguousarray(points, dtype="<f4").tobytes())
                    index_file.writelines(escape_line(source.name(int(i))) + "\n" for i in rows)
                    preview_rows += [(g, int(rows[g - written])) for g in wanted if written <= g < written + len(rows)]
                    written += len(rows)
                    for i, reason in zip(chunk["rejected_rows"], chunk["rejected_reasons"]):
                        rejected_file.write(f"{escape_line(source.name(int(i)))}\t{escape_line(str(reason))}\n")
                        key = str(reason).split(" (")[0]
                        reason_counts[key] = reason_counts.get(key, 0) + 1
                        rejected += 1
            npy.flush()
            os.fsync(npy.fileno())
        if total:
            os.replace(tmp_npy, paths.embeddings)
    finally:
        if tmp_npy.exists():
            tmp_npy.unlink()
    return EmbedResult(paths, total, rejected, dim, 0, 0.0, reason_counts, preview_rows)


def _write_preview(paths: GalleryPaths, source: ImageSource, preprocessor: FacePreprocessor, picks: list[tuple[int, int]]) -> bool:
    """``g.aligned.jpg``: the picked inputs aligned again exactly as they were for the model, 8 per
    row, each row labelled with the gallery rows it spans. A failure is a warning: the gallery is done."""
    from hyperface.datasets.preview import contact_sheet, save_contact_sheet

    paths.preview.unlink(missing_ok=True)  # an older run's picture must not stand for this gallery
    try:
        faces = []
        for _, index in picks:
            face, _ = preprocessor.process(source.load(index))
            faces.append(face)
        rows = [(f"gallery rows\n{picks[i][0]}-{picks[min(i + 7, len(picks) - 1)][0]}", faces[i : i + 8])
                for i in range(0, len(faces), 8)]
        save_contact_sheet(paths.preview, contact_sheet(rows, columns=min(8, len(faces)), tile=preprocessor.size))
        return True
    except Exception as exc:  # noqa: BLE001 - an input changed since, a codec error: the gallery stands
        log.warning("could not draw %s: %s", paths.preview.name, exception_summary(exc))
        return False


__all__ = ["EmbedResult", "GalleryPaths", "embed_images"]
