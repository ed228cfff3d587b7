"""Files every stage writes: atomically, checksummed, never half-written.

A file appears under its final name only once it is complete (write to a temporary file in the same
folder, fsync, then ``os.replace``), so a kill at any moment leaves either the old file or the new
one, never a truncated one that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError, exception_summary
from hyperface.common.runtime import get_logger

log = get_logger("hyperface")

#: File that marks a folder as written by hyperface, so ``--overwrite`` never deletes user data.
RUN_MARKER = ".hyperface-run"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; outputs are meant to be shared like any other file the user writes.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary sibling of ``path`` for writers that want a file name (safetensors, torch.onnx):
    fsynced and renamed onto ``path`` when the block succeeds, removed when it fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file asked for, not a temporary the user never heard of
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    try:
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename == tmp:  # e.g. a full disk: name the file asked for
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        if isinstance(exc, RuntimeError) and tmp in str(exc):  # torch's writers report failures this way
            raise HyperfaceError(f"cannot write {path}: {exception_summary(exc).replace(tmp, str(path))}") from exc
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> int:
    """Delete the temporary siblings :func:`atomic_path` made for ``folder/<name>`` that a kill left
    behind (``.<name>.XXXX.tmp``; every name when ``names`` is None); returns how many. Only for
    names this process alone writes in ``folder``: a concurrent writer's temporary would be taken
    for a stale one."""
    removed = 0
    patterns = [".*.tmp"] if names is None else [f".{glob.escape(name)}.*.tmp" for name in names]
    for pattern in patterns:
        for stale in Path(folder).glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing (``open_kwargs`` go to :func:`open`);
    rename it onto ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as .npy atomically."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _json_text(obj: Any) -> str:
    """``obj`` as the indented JSON text every file we write holds (NaN/inf as null)."""
    return json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n"


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (NaN/inf are written as null)."""
    text = _json_text(obj)
    with atomic_write(path, "w") as handle:
        handle.write(text)


def save_json_if_absent(path: str | os.PathLike, obj: Any) -> bool:
    """:func:`save_json`, but only where no file is: of two processes doing this at once exactly
    one writes (the file is complete before its name appears). Returns whether this call wrote it."""
    path = Path(path)
    text = _json_text(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: claim the name exclusively, then move the full file onto it
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
            except FileExistsError:
                return False
            os.replace(tmp, path)  # a reader sees the empty claim or the whole file, never a part of it
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


_LINE_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_LINE_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_line(text: str) -> str:
    r"""``text`` as one field of a line-per-entry file (index.txt, tsv): backslash, tab, newline and
    carriage return escaped as ``\\``, ``\t``, ``\n``, ``\r``. :func:`unescape_line` inverts it."""
    return "".join(_LINE_ESCAPES.get(c, c) for c in text) if any(c in text for c in _LINE_ESCAPES) else text


def unescape_line(line: str) -> str:
    r"""The text :func:`escape_line` escaped (an unknown escape, ``\x``, stays as written)."""
    if "\\" not in line:
        return line
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line) and line[i + 1] in _LINE_UNESCAPES:
            out.append(_LINE_UNESCAPES[line[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_lines(path: str | os.PathLike) -> list[str]:
    """The entries of a line-per-entry file written with :func:`escape_line`, byte for byte (names
    that are not UTF-8 come back as surrogates). Splits on newlines only: ``str.splitlines`` would
    also split inside a name holding a form feed or U+2028."""
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [unescape_line(line) for line in lines]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_file(
    path: str | os.PathLike, flag: str, inputs: Sequence[tuple[str, str | os.PathLike | None]] = ()
) -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder, a parent that
    is a file, or a folder without write permission (the nearest existing one is checked); and one
    that is one of ``inputs`` ((what it is, path) pairs: the model, a benchmark file), or an
    existing file inside an input folder, which writing it would destroy."""
    path = Path(path)
    if path.is_dir():
        raise HyperfaceError(f"{flag} {path} is a folder; give a file path such as {path / 'results.json'}")
    target = path.resolve()
    for what, source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if target == source or (source.is_dir() and target.is_relative_to(source) and target.exists()):
            where = "is" if target == source else "lies inside"
            raise HyperfaceError(f"{flag} {path} {where} {what} ({source}): it would be overwritten; write to another file")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HyperfaceError(f"{flag} {path}: {ancestor} is a file, not a folder")
    try:  # really write there: permission bits say nothing about root, read-only mounts or /sys
        fd, probe = tempfile.mkstemp(prefix=".hyperface-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HyperfaceError(f"{flag} {path}: cannot write in {ancestor} ({exc.strerror or exc})") from None


def describe_input(path: str | os.PathLike | None) -> dict[str, str] | None:
    """A manifest's record of an input: its absolute path, and its SHA-256 when it is a file."""
    if path is None:
        return None
    entry = {"path": str(Path(path).resolve())}
    if Path(path).is_file():
        entry["sha256"] = file_sha256(path)
    return entry


def files_sha256(files: Sequence[str | os.PathLike], root: str | os.PathLike) -> str:
    """One SHA-256 over ``files``: each file's name relative to ``root`` and its content. Names a set
    of weight files by content, wherever the folder holding them is copied."""
    digest = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        digest.update(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of a float32 matrix's values (its shape included), streamed in row blocks."""
    digest = hashlib.sha256(repr(array.shape).encode())
    for start in range(0, array.shape[0], 65536):
        digest.update(np.ascontiguousarray(array[start : start + 65536], dtype=np.float32).tobytes())
    return digest.hexdigest()


def prepare_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    stage: str = "",
    setup_files: Sequence[str] = (),
    resumable: bool = True,
    clear_unfinished: bool = True,
    exclusive: bool = True,
) -> Path:
    """Create ``out`` for a run, refusing to mix a new run into an old one.

    - empty or missing: created;
    - left by an attempt of hyperface that failed before doing any work (the run marker, the stage's
      ``setup_files``, empty files and folders only): cleared and reused, so the corrected command
      just runs again (kept as it is with ``clear_unfinished=False``, for stages whose setup files
      other processes may be using at that moment);
    - non-empty otherwise: error, unless ``resume`` (keep it) or ``overwrite`` (clear it, only if
      hyperface wrote it: the run marker must be there);
    - unwritable: error naming the folder;
    - ``exclusive``: held by another process (its run marker locked): error. The lock is this
      process's until the stage's entry point returns (see :func:`releases_output_locks`); stages
      whose processes share a folder (generate's shards) lock their own parts instead.
    """
    out = Path(out)
    if out.is_symlink():  # a link to a folder on a bigger disk: work in the folder it names
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise HyperfaceError(f"--out {out} is a file; give a folder path")
    if exclusive and (out / RUN_MARKER).is_file():
        try:
            lock_output(out)  # before anything is cleared or resumed
        except OSError as exc:  # opening the marker to lock it (an unwritable folder): as below
            raise HyperfaceError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc
    non_empty = out.is_dir() and any(out.iterdir())
    owner = output_stage(out)
    if non_empty and stage and owner and owner != stage and (resume or not _holds_no_work(out, setup_files)):
        # One mistyped --out must not clear (or resume into) another stage's work, and no flag would help.
        raise HyperfaceError(f"output folder {out} holds a `hyperface {owner}` run, not a {stage} run; choose another --out")
    if non_empty and resume and not owner and not (out / RUN_MARKER).exists():
        # resuming would claim the folder (its run marker), and a later --overwrite would then clear it
        raise HyperfaceError(f"cannot --resume in {out}: it holds files hyperface did not write; choose another --out")
    if non_empty and not resume:
        if _holds_no_work(out, setup_files):
            log.info("reusing %s: an earlier attempt left it without results", out)
            if clear_unfinished:
                _remove_tree(out)
        elif not overwrite:
            again = "--resume to continue the run there, " if resumable else ""
            raise HyperfaceError(f"output folder {out} is not empty: pass {again}--overwrite to replace it, or choose another --out")
        elif not (out / RUN_MARKER).exists():
            raise HyperfaceError(
                f"refusing to --overwrite {out}: it holds files hyperface did not write; "
                "choose another --out"
            )
        else:
            shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / RUN_MARKER
        with open(probe, "a", encoding="utf-8") as handle:
            if stage and probe.stat().st_size == 0:
                handle.write(stage + "\n")
        if exclusive:
            lock_output(out)
    except OSError as exc:
        raise HyperfaceError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc
    return out


#: OS locks this process holds (:func:`hold_lock`), by the lock file's resolved path.
_HELD_LOCKS: dict[str, IO[Any]] = {}
#: flock's errors that mean "another process holds it" (anything else: the file system has no locks).
LOCK_HELD_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def hold_lock(path: str | os.PathLike, *, busy: str, attempts: int = 1, content: str = "", unchecked: str = "") -> None:
    """Hold an exclusive OS lock (flock) on the file ``path`` (created if missing; ``content`` written
    into it while it is empty) until :func:`release_lock`, :func:`releases_output_locks`, or the end
    of the process: the kernel drops it then, a kill included, so no stale lock is ever left. Held by
    another process: ``HyperfaceError(busy)``, after ``attempts`` tries 50 ms apart. Called again for
    a file this process holds: nothing to do (a file replaced on disk meanwhile is locked anew). No
    lock where ``fcntl`` is missing; on a file system without locks, a warning naming what goes
    ``unchecked``."""
    try:
        import fcntl
    except ImportError:
        return
    import time

    path = Path(path)
    key = str(path.resolve())
    held = _HELD_LOCKS.get(key)
    if held is not None:
        try:
            if os.fstat(held.fileno()).st_ino == os.stat(path).st_ino:
                return
        except OSError:
            pass
        _HELD_LOCKS.pop(key).close()
    handle = open(path, "a", encoding="utf-8")
    for attempt in range(max(1, attempts)):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in LOCK_HELD_ERRNOS:  # no locks on this file system (NFS without lockd, some FUSE)
                handle.close()
                log.warning("cannot lock %s (%s): %s", path, exc.strerror or exc, unchecked or "a second process would not be refused")
                return
            if attempt >= attempts - 1:
                handle.close()
                raise HyperfaceError(busy) from None
            time.sleep(0.05)
    try:
        if content and os.fstat(handle.fileno()).st_size == 0:
            handle.write(content)
            handle.flush()
    except BaseException:  # a full disk: the lock goes with the handle, not left held by nobody's record
        handle.close()
        raise
    _HELD_LOCKS[key] = handle


def release_lock(path: str | os.PathLike) -> None:
    """Let go of a lock :func:`hold_lock` took (nothing to do if this process does not hold it)."""
    handle = _HELD_LOCKS.pop(str(Path(path).resolve()), None)
    if handle is not None:
        handle.close()


def holds_lock(path: str | os.PathLike) -> bool:
    """Whether this process holds the lock on ``path`` (:func:`hold_lock`)."""
    return str(Path(path).resolve()) in _HELD_LOCKS


def lock_output(out: str | os.PathLike, *, stage: str = "", label: str | os.PathLike | None = None) -> None:
    """Hold the lock on ``out``'s run marker (:func:`hold_lock`; a missing marker is created, naming
    ``stage``), so a second process on the same folder (the command started twice, a requeued job
    while the first still runs) is refused instead of interleaving checkpoints. ``label`` is what the
    refusal names (default: ``out``)."""
    hold_lock(
        Path(out) / RUN_MARKER, content=f"{stage}\n" if stage else "", unchecked="a second process on this folder would not be refused",
        busy=f"another process is writing into {label or out} now (the same command started twice, or a requeued job "
             "while the first still runs): wait for it or stop it, then rerun; or choose another --out",
    )


def releases_output_locks(function):
    """Decorator for a stage's entry point: the output locks it took are let go when it returns or
    fails, so the folder is free for the next run (in this process or another)."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        before = set(_HELD_LOCKS)
        try:
            return function(*args, **kwargs)
        finally:
            for key in set(_HELD_LOCKS) - before:
                _HELD_LOCKS.pop(key).close()

    return wrapper


def _remove_tree(folder: Path) -> None:
    """``shutil.rmtree``, where another process clearing the same folder at the same moment is no
    error: files it removed first, or the folder it already made again (its own, left alone)."""

    def gone_already(function, path, exc_info) -> None:
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError) or (function is os.rmdir and getattr(exc, "errno", None) == errno.ENOTEMPTY):
            return
        raise exc

    shutil.rmtree(folder, onerror=gone_already)


def run_stage(folder: str | os.PathLike) -> str:
    """The stage named in ``folder``'s run marker ("" when there is none or it names none)."""
    try:
        return (Path(folder) / RUN_MARKER).read_text(encoding="utf-8").split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError):
        return ""


def output_stage(folder: str | os.PathLike) -> str:
    """The stage that made an output folder: its run marker's, else its manifest's ("" for neither)."""
    return run_stage(folder) or _manifest_stage(Path(folder))


def _manifest_stage(folder: Path) -> str:
    """The stage a folder's manifest.json names, for outputs without a run marker (``embed``'s)."""
    try:
        stage = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return ""
    return stage if stage in ("embed", "pack", "generate", "train", "report") else ""


def _holds_no_work(out: Path, setup_files: Sequence[str]) -> bool:
    """True for a folder hyperface made whose only files are its marker, setup files (names relative
    to ``out``, glob patterns allowed) or empty files."""
    return (out / RUN_MARKER).is_file() and files_hold_no_work(out, out.rglob("*"), (RUN_MARKER, *setup_files))


def files_hold_no_work(root: Path, paths: Iterable[Path], setup_files: Sequence[str]) -> bool:
    """True when ``paths`` (under ``root``) are only folders, empty files and ``setup_files`` (names
    relative to ``root``, glob patterns allowed): what an attempt that failed before finishing any
    work leaves, which the corrected command may clear without --overwrite. Any link is work."""
    import fnmatch

    for path in paths:
        if path.is_symlink() or (path.is_file() and path.stat().st_size > 0
                                 and not any(fnmatch.fnmatchcase(path.relative_to(root).as_posix(), pattern) for pattern in setup_files)):
            return False
    return True


def load_embeddings(
    path: str | os.PathLike,
    *,
    what: str = "embeddings",
    dim: int | None = None,
    require_unit: bool = False,
    unit_tol: float = 1e-3,
    mapped: bool = False,
) -> np.ndarray:
    """Load an (M, d) float array from .npy, validate it, return it L2-normalised as float32.

    Rejects (with the offending row numbers): a missing/corrupt file, wrong rank, a dimension other
    than ``dim``, non-finite values, zero rows and, with ``require_unit``, rows whose norm is not 1.
    ``mapped``: a file that already holds unit float32 rows (as `hyperface embed` writes them) is
    returned as its read-only memory map, not copied: 5M x 512 rows stay on disk (10 GB).
    """
    path = Path(path)
    if not path.is_file():
        raise HyperfaceError(f"{what} file not found: {path}")
    save_hint = "save a float array with numpy.save(path, array)"
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise HyperfaceError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
    if head.startswith(b"PK"):
        raise HyperfaceError(f"{what} file {path} is a .npz archive, not a numeric .npy array; {save_hint}")
    if head != b"\x93NUMPY":
        raise HyperfaceError(f"{what} file {path} is not a numeric .npy array (no .npy header); {save_hint}")
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        # numpy's own messages point at allow_pickle for object arrays: never a fix for untrusted data
        problem = "it holds Python objects, not numbers" if "pickle" in str(exc) or "object" in str(exc) else "it is truncated or corrupt"
        raise HyperfaceError(f"{what} file {path} is not a numeric .npy array ({problem}); {save_hint}") from exc
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise HyperfaceError(f"{what} file {path} is not a numeric .npy array (it holds Python objects); {save_hint}")
    if mapped and _already_unit_float32(array, dim):
        return array
    return validate_embeddings(array, what=f"{what} {path}", dim=dim, require_unit=require_unit, unit_tol=unit_tol)


def _already_unit_float32(array: np.ndarray, dim: int | None, tol: float = 1e-6) -> bool:
    """True for a C-ordered little-endian float32 (M, d) array whose rows are all unit-norm (to
    float32 rounding), read in blocks. Anything else takes the validating, normalising copy."""
    if array.ndim != 2 or array.dtype != np.dtype("<f4") or not array.flags.c_contiguous or array.shape[0] == 0:
        return False
    if dim is not None and array.shape[1] != dim:
        return False
    for start in range(0, array.shape[0], 65536):
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.linalg.norm(np.asarray(array[start : start + 65536], dtype=np.float64), axis=1)
        if not (np.abs(norms - 1.0) <= tol).all():  # NaN fails too
            return False
    return True


def validate_embeddings(
    array: np.ndarray,
    *,
    what: str = "embeddings",
    dim: int | None = None,
    require_unit: bool = False,
    unit_tol: float = 1e-3,
) -> np.ndarray:
    """Validate an (M, d) array of embeddings and return it L2-normalised as float32."""
    if array.ndim != 2:
        raise HyperfaceError(f"{what} must be a 2-D array (rows x dim), got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] < 2:
        raise HyperfaceError(f"{what} must have at least one row and two columns, got shape {tuple(array.shape)}")
    if dim is not None and array.shape[1] != dim:
        raise HyperfaceError(f"{what} has dimension {array.shape[1]}, expected {dim}")
    if not np.issubdtype(array.dtype, np.floating):
        raise HyperfaceError(f"{what} must hold floats, got dtype {array.dtype}")
    out = np.empty(array.shape, dtype=np.float32)
    step = 65536  # stream so a memory-mapped 1M x 512 gallery never needs a float64 copy
    for start in range(0, array.shape[0], step):
        block = np.asarray(array[start : start + step], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = start + np.flatnonzero(~finite)
            raise HyperfaceError(f"{what} has NaN/inf in {bad.size} row(s), e.g. rows {bad[:5].tolist()}")
        with np.errstate(over="ignore", under="ignore"):
            norms = np.linalg.norm(block, axis=1)
        # A float32 norm overflows past ~1e19 per value and underflows below ~1e-19: such rows are
        # normalised in float64 (the rest keep their float32 arithmetic, so results stay bit-stable).
        extreme = ~np.isfinite(norms) | (norms < 1e-12)
        if extreme.any():
            wide = block[extreme].astype(np.float64)
            wide_norms = np.linalg.norm(wide, axis=1)
            zero = wide_norms == 0
            if zero.any():
                bad = start + np.flatnonzero(extreme)[zero]
                raise HyperfaceError(f"{what} has {bad.size} all-zero row(s), e.g. rows {bad[:5].tolist()}")
            block = block.copy()
            block[extreme] = (wide / wide_norms[:, None]).astype(np.float32)
            norms = norms.copy()
            norms[extreme] = 1.0
            if require_unit:
                bad = start + np.flatnonzero(extreme)
                raise HyperfaceError(
                    f"{what} rows must be unit-norm (L2-normalised); rows {bad[:5].tolist()} have norms "
                    f"{[float(f'{v:.3g}') for v in wide_norms[:5]]}"
                )
        if require_unit and np.abs(norms - 1.0).max() > unit_tol:
            bad = start + np.flatnonzero(np.abs(norms - 1.0) > unit_tol)
            raise HyperfaceError(
                f"{what} rows must be unit-norm (L2-normalised); rows {bad[:5].tolist()} have norms "
                f"{norms[bad[:5] - start].round(4).tolist()}"
            )
        out[start : start + step] = block / norms[:, None]
    return out


def duplicate_rows(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """True for each row equal (bit for bit) to an earlier row. Rows are hashed first and only rows
    sharing a hash are compared: ``np.unique(x, axis=0)`` sorts whole rows, 6 GB and 40 s at 1M x 512."""
    bits = np.ascontiguousarray(x).view(np.uint32).reshape(len(x), -1)
    weights = np.random.default_rng(0x5EED).integers(1, 2**63, bits.shape[1], dtype=np.uint64) | np.uint64(1)
    hashes = np.empty(len(x), dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping arithmetic is the hash
        for start in range(0, len(x), chunk):
            hashes[start : start + chunk] = (bits[start : start + chunk].astype(np.uint64) * weights).sum(axis=1)
    dup = np.zeros(len(x), dtype=bool)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by hash, ascending within a group
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for group in np.flatnonzero(counts > 1):
        rows = order[starts[group] : starts[group] + counts[group]]  # the first of equal rows is kept
        _, first = np.unique(x[rows], axis=0, return_index=True)
        dup[rows] = True
        dup[rows[first]] = False
    return dup


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure atomically, in the format its suffix names (.png, .pdf, .svg, ...),
    and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path


def load_safetensors(
    path: str | os.PathLike, device: Any = "cpu", *, hint: str = "the file is truncated or damaged (copy it again), or not a safetensors file"
) -> dict[str, Any]:
    """All tensors of a .safetensors file (no pickle involved); a missing or damaged file is a one-line
    error ending in ``hint`` (what to do about it)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HyperfaceError(f"file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, a Rust panic's)
        raise HyperfaceError(f"cannot read {path} as a safetensors file ({exception_summary(exc, 200)}): {hint}") from exc


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object hyperface (or a model folder) keeps, e.g. a manifest or run.json; a damaged file is
    one HyperfaceError naming it, not a traceback. A missing file raises FileNotFoundError as usual."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HyperfaceError(f"{path} is damaged: not valid JSON ({exception_summary(exc)}); restore it, or delete it and rerun") from None
    if not isinstance(data, dict):
        raise HyperfaceError(f"{path} is damaged: it holds a JSON {type(data).__name__}, not an object; restore it, or delete it and rerun")
    return data


__all__ = [
    "LOCK_HELD_ERRNOS",
    "hold_lock",
    "holds_lock",
    "release_lock",
    "releases_output_locks",
    "load_safetensors",
    "RUN_MARKER",
    "atomic_path",
    "atomic_write",
    "duplicate_rows",
    "escape_line",
    "file_sha256",
    "files_hold_no_work",
    "load_embeddings",
    "lock_output",
    "prepare_output_dir",
    "read_json",
    "read_lines",
    "remove_stale_temporaries",
    "save_bytes",
    "save_figure",
    "save_json",
    "save_npy",
    "unescape_line",
    "validate_embeddings",
]

