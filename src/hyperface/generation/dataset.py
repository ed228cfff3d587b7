"""Render a face-recognition dataset from identity embeddings: batched, filtered, sharded, resumable.

Work is organised by identity. Each shard (``--shard i/n`` or torchrun's RANK/WORLD_SIZE) takes the
identities ``i, i+n, i+2n, ...`` and streams its finished identities into its own part folder::

    OUT/run.json                                   what is being generated (checked on resume)
    OUT/parts/shard-00001-of-00004/images.bin      encoded images, appended identity by identity
    OUT/parts/shard-00001-of-00004/journal.jsonl   one line per finished identity (offset, sizes, stats)

An identity counts as done once its journal line is on disk, and that line is written only after
its images are fsynced; on rerun a half-written tail of either file is cut off and finished
identities are skipped, so a kill at any moment loses at most the identities in flight and never
duplicates one. :func:`merge_parts` then streams every part, in label order, into the final
dataset: ``OUT/images/<label:06d>/<k:04d>.jpg`` and/or ``OUT/rec/train.rec`` (+ ``train.idx``,
``property``), exactly N x K images, plus ``OUT/acceptance.json`` and ``OUT/manifest.json``.

Each image is a function of (seed, identity, image index) only (:mod:`.variation`). With a quality
filter, an identity renders image indices 0, 1, 2, ... until K of them reach ``min_similarity`` to
the identity's reference embedding or ``max_attempts`` renders were spent; then the best-scoring
rejected renders fill the quota (counted as ``filled`` in the statistics), so the dataset always has
exactly K images per identity.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import (
    LOCK_HELD_ERRNOS, array_sha256, hold_lock, holds_lock, read_json, release_lock, remove_stale_temporaries, save_json,
    save_json_if_absent,
)
from hyperface.common.manifest import Manifest, describe_changes
from hyperface.common.runtime import get_logger, progress
from hyperface.generation.base import IdentityGenerator
from hyperface.generation.postprocess import Aligner, EmbedFn, cosine_to_references, make_aligner
from hyperface.generation.variation import Perturbation, image_seed

log = get_logger("hyperface.generation")

#: The final formats each --format value asks for, and where each one lives in --out.
FORMAT_KINDS = {"folder": ("folder",), "rec": ("rec",), "both": ("folder", "rec")}
FORMATS = tuple(FORMAT_KINDS)
KIND_FOLDERS = {"folder": "images", "rec": "rec"}
RUN_FILE = "run.json"
PARTS_DIR = "parts"
SAMPLES_FILE = "samples.jpg"  # a contact sheet of the result, written by the merge


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: identities ``i`` with ``i % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise HyperfaceError(f"bad shard {self.index}/{self.count}: need 0 <= i < n (e.g. --shard 0/4)")

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        """``"i/n"``; or, when None, torchrun's RANK / WORLD_SIZE (else 0/1)."""
        if text:
            try:
                index, count = (int(part) for part in text.split("/"))
            except ValueError as exc:
                raise HyperfaceError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from exc
            return cls(index, count)
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def identities(self, num_identities: int) -> range:
        return range(self.index, num_identities, self.count)


@dataclass
class GenerationConfig:
    """What to render per identity and how to keep it (everything that defines the images)."""

    images_per_identity: int
    seed: int = 0
    batch_size: int = 16
    perturbation: Perturbation = field(default_factory=Perturbation)
    min_similarity: float | None = None
    max_attempts: int | None = None  # renders per identity; default 2*K with a filter, else K
    image_format: str = "jpg"
    quality: int = 95

    def __post_init__(self):
        k = self.images_per_identity
        if k < 1:
            raise HyperfaceError(f"--images-per-identity must be >= 1, got {k}")
        if self.batch_size < 1:
            raise HyperfaceError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise HyperfaceError(f"--min-similarity is a cosine in [-1, 1], got {self.min_similarity}")
        if self.max_attempts is not None and self.max_attempts < k:
            raise HyperfaceError(f"--max-attempts ({self.max_attempts}) must be >= --images-per-identity ({k})")
        if self.image_format not in ("jpg", "png"):
            raise HyperfaceError(f"--image-format must be jpg or png, got {self.image_format!r}")

    @property
    def filtered(self) -> bool:
        return self.min_similarity is not None

    @property
    def attempts_limit(self) -> int:
        if not self.filtered:
            return self.images_per_identity
        return self.max_attempts if self.max_attempts is not None else 2 * self.images_per_identity

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["perturbation"] = {"kind": self.perturbation.kind, "scale": self.perturbation.scale}
        out["max_attempts"] = self.attempts_limit
        return out


# ----------------------------------------------------------------------------------------------
# The per-shard journal
# ----------------------------------------------------------------------------------------------


class ShardPart:
    """A shard's append-only ``images.bin`` + ``journal.jsonl``, recovered to the last whole identity."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data_path = self.folder / "images.bin"
        self.journal_path = self.folder / "journal.jsonl"
        self.entries: dict[int, dict] = {}
        self._recover()
        self._data = open(self.data_path, "ab")
        self._journal = open(self.journal_path, "ab")

    @staticmethod
    def read_journal(journal_path: Path, data_size: int | None = None) -> tuple[list[dict], int, int]:
        """Whole, consistent entries; their journal byte length; the data bytes they cover."""
        entries: list[dict] = []
        journal_end = data_end = 0
        if not journal_path.exists():
            return entries, 0, 0
        raw = journal_path.read_bytes()
        position = 0
        for line in raw.split(b"\n")[:-1]:  # a last line without "\n" is half-written
            try:
                entry = json.loads(line)
                start, lengths = int(entry["offset"]), [int(n) for n in entry["lengths"]]
                int(entry["identity"])
            except (ValueError, KeyError, TypeError):
                break
            end = start + sum(lengths)
            if start != data_end or (data_size is not None and end > data_size):
                break
            entries.append(entry)
            position += len(line) + 1
            journal_end, data_end = position, end
        return entries, journal_end, data_end

    def _recover(self) -> None:
        data_size = self.data_path.stat().st_size if self.data_path.exists() else 0
        entries, journal_end, data_end = self.read_journal(self.journal_path, data_size)
        # Cut whatever a kill left after the last whole identity.
        if self.journal_path.exists() and self.journal_path.stat().st_size != journal_end:
            with open(self.journal_path, "r+b") as handle:
                handle.truncate(journal_end)
        if data_size != data_end:
            with open(self.data_path, "ab") as handle:
                handle.truncate(data_end)
        for entry in entries:
            self.entries.setdefault(int(entry["identity"]), entry)

    def commit(self, finished: list[tuple[dict, list[bytes]]]) -> None:
        """Append identities (stats entry, encoded images) durably: data fsync, then journal fsync."""
        if not finished:
            return
        try:
            lines = []
            offset = self._data.tell()
            for entry, images in finished:
                entry = dict(entry, offset=offset, lengths=[len(b) for b in images])
                for blob in images:
                    self._data.write(blob)
                offset += sum(entry["lengths"])
                lines.append(json.dumps(entry, separators=(",", ":")) + "\n")
            self._data.flush()
            os.fsync(self._data.fileno())
            self._journal.write("".join(lines).encode())
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise HyperfaceError(
                    f"disk full while writing {self.folder}: the identities finished so far are kept; free space "
                    "and rerun with --resume"
                ) from exc
            raise
        for entry, _ in finished:
            self.entries.setdefault(int(entry["identity"]), entry)

    def close(self) -> None:
        self._data.close()
        self._journal.close()


# ----------------------------------------------------------------------------------------------
# Rendering one shard
# ----------------------------------------------------------------------------------------------


@dataclass
class _IdentityState:
    identity: int
    next_index: int = 0
    accepted: list = field(default_factory=list)  # (image_index, similarity, encoded stored image)
    rejected: list = field(default_factory=list)
    no_face: int = 0
    in_flight: int = 0  # rendered or being rendered, not yet aligned and filtered
    shown: int = 0  # its renders the progress bar counted: at most K, its share of the total

    def done(self, k: int, limit: int) -> bool:
        return self.in_flight == 0 and (len(self.accepted) >= k or self.next_index >= limit)


def _encode(image: np.ndarray, image_format: str, quality: int) -> bytes:
    from hyperface.datasets.codec import encode_image

    return encode_image(image, image_format=image_format, quality=quality)


def _retire(state: _IdentityState, config: GenerationConfig) -> tuple[dict, list[bytes]]:
    """The identity's K kept images (first accepted by index, then the best rejects) and its stats."""
    k = config.images_per_identity
    kept = sorted(state.accepted, key=lambda r: r[0])[:k]
    filled = sorted(state.rejected, key=lambda r: -r[1])[: k - len(kept)]
    kept = kept + sorted(filled, key=lambda r: r[0])
    entry = {
        "identity": state.identity,
        "indices": [r[0] for r in kept],
        "similarities": [None if np.isnan(r[1]) else round(r[1], 5) for r in kept],
        "attempts": state.next_index,
        "accepted": min(len(state.accepted), k),
        "filled": len(filled),
        "no_face": state.no_face,
    }
    return entry, [r[2] for r in kept]


def render_shard(
    generator: IdentityGenerator,
    embeddings: np.ndarray,
    out_dir: str | Path,
    config: GenerationConfig,
    *,
    shard: Shard = Shard(),
    aligner: Aligner | None = None,
    embed_fn: EmbedFn | None = None,
    on_identity_done: Callable[[int], None] | None = None,
    show_progress: bool | None = None,
    overlap: bool = True,
    commit_guard: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Render this shard's unfinished identities into ``out_dir/parts/<shard>``; return its summary.
    Each journal write runs inside ``commit_guard()`` (which may raise to stop: run.json replaced).

    With ``overlap`` (the default) one batch is aligned, encoded and filtered on a helper thread while
    the generator renders the next, so the GPU does not wait for the detector, the FR model or the
    encoder (not with a generator that captures CUDA graphs, see below). Batches are then planned as
    if the renders in flight will all be accepted; since an identity never asks for more than its
    shortfall, it renders the same image indices either way, and the dataset is the same as without
    overlap.
    """
    from concurrent.futures import Future, ThreadPoolExecutor, wait

    if config.filtered and embed_fn is None:
        raise HyperfaceError("--min-similarity needs --fr-model (the FR model the identities live in, e.g. Arc2Face's arcface.onnx)")
    aligner = aligner or make_aligner("ffhq")
    part = ShardPart(Path(out_dir) / PARTS_DIR / shard.name)
    # Identities finished under another sharding (e.g. a restart with fewer GPUs) are not redone.
    done = set(part.entries) | _identities_done_in_other_parts(Path(out_dir), part.folder)
    mine = shard.identities(embeddings.shape[0])
    todo = [i for i in mine if i not in done]
    k, limit, batch_size = config.images_per_identity, config.attempts_limit, config.batch_size
    # The bar counts images as they are rendered (img/s, time left), not as identities finish: each
    # identity's first K renders (every identity renders at least K; with a filter, the renders past K
    # show in the postfix's count), so it ends at N x K. The postfix counts finished identities.
    bar = progress(total=len(mine) * k, desc=f"generate {shard.index}/{shard.count}", unit="img", disable=None if show_progress is None else not show_progress)
    bar.update((len(mine) - len(todo)) * k)
    identities_done = len(mine) - len(todo)
    pending = iter(todo)
    active: "OrderedDict[int, _IdentityState]" = OrderedDict()
    exhausted = False
    rendered = 0
    started = time.time()

    def plan() -> list[tuple[_IdentityState, int]]:
        """The next batch: first the identities in flight, then new ones, each asking only for what
        it still needs (counting its renders in flight as accepted) and may still try."""
        nonlocal exhausted
        items: list[tuple[_IdentityState, int]] = []

        def request(state: _IdentityState) -> None:
            want = min(k - len(state.accepted) - state.in_flight, limit - state.next_index)
            take = max(0, min(want, batch_size - len(items)))
            items.extend((state, state.next_index + j) for j in range(take))
            state.next_index += take
            state.in_flight += take

        for state in active.values():
            if len(items) >= batch_size:
                break
            request(state)
        while len(items) < batch_size and not exhausted:
            identity = next(pending, None)
            if identity is None:
                exhausted = True
                break
            active[identity] = _IdentityState(identity)
            request(active[identity])
        return items

    def postprocess(items: list[tuple[_IdentityState, int]], images: list) -> tuple[list, np.ndarray]:
        """Align, encode and score one batch (thread-safe: reads nothing the planner writes)."""
        aligned = [aligner(np.asarray(image)) for image in images]
        encoded = [_encode(stored, config.image_format, config.quality) for stored, _, _ in aligned]
        if embed_fn is not None:  # scored whenever there is an FR model; only a threshold rejects
            crops = np.stack([crop for _, crop, _ in aligned])
            identities = np.array([state.identity for state, _ in items])
            similarity = cosine_to_references(embed_fn, crops, embeddings[identities])
        else:
            similarity = np.full(len(items), np.nan, dtype=np.float32)
        return [(blob, no_face) for blob, (_, _, no_face) in zip(encoded, aligned)], similarity

    def settle(items: list[tuple[_IdentityState, int]], processed: list, similarity: np.ndarray) -> None:
        """Keep or reject one processed batch, then retire and commit the identities it completes."""
        nonlocal identities_done
        for (state, index), (stored, no_face), sim in zip(items, processed, similarity):
            state.in_flight -= 1
            state.no_face += int(no_face)
            record = (index, float(sim), stored)
            if not config.filtered or sim >= config.min_similarity:
                state.accepted.append(record)
            else:  # only the best K rejects can ever fill the quota: keep no more
                state.rejected = sorted([*state.rejected, record], key=lambda r: -r[1])[:k]
        finished = [_retire(active.pop(i), config) for i in [i for i, s in active.items() if s.done(k, limit)]]
        with commit_guard() if finished and commit_guard is not None else contextlib.nullcontext():
            part.commit(finished)
        identities_done += len(finished)
        bar.set_postfix(identities=f"{identities_done}/{len(mine)}", renders=rendered, refresh=False)
        if on_identity_done is not None:
            for entry, _ in finished:
                on_identity_done(entry["identity"])

    # A generator that captures CUDA graphs may record one whenever a new batch shape appears, and a
    # capture must not see another thread's CUDA work (the FR model, an ONNX detector): no overlap.
    overlap = overlap and not getattr(generator, "captures_cuda_graphs", False)
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hyperface-postprocess") if overlap else None
    processing: tuple[list, Future] | None = None  # the batch being aligned and filtered
    try:
        while True:
            items = plan()
            if not items and processing is None:
                break
            if items:
                seeds = [image_seed(config.seed, state.identity, index) for state, index in items]
                conditioning = np.stack(
                    [config.perturbation.apply(embeddings[state.identity], seed) for (state, _), seed in zip(items, seeds)]
                )
                images = generator.generate(conditioning, seeds)  # the previous batch is processed meanwhile
                if len(images) != len(items):
                    raise HyperfaceError(f"the generator returned {len(images)} images for a batch of {len(items)}")
                rendered += len(images)
                shown = 0
                for state, _ in items:
                    if state.shown < k:
                        state.shown += 1
                        shown += 1
                bar.set_postfix(identities=f"{identities_done}/{len(mine)}", renders=rendered, refresh=False)
                bar.update(shown)
            if processing is not None:
                (batch, result), processing = processing, None
                settle(batch, *result.result())
            if items:
                if helper is not None:
                    processing = (items, helper.submit(postprocess, items, images))
                else:
                    settle(items, *postprocess(items, images))
    except BaseException:
        # Rendering failed (out of memory, a kill signal) while the helper held a batch: commit what
        # it finished, as the sequential loop would have, so a resume redoes less.
        if processing is not None:
            (batch, result), processing = processing, None
            try:
                wait([result])
                if result.exception() is None:
                    settle(batch, *result.result())
            except Exception as exc:  # the error that stopped the run is the one to report
                log.warning("could not commit the last processed batch (%s); --resume renders it again", exc)
        raise
    finally:
        if helper is not None:
            helper.shutdown(wait=True, cancel_futures=True)  # a batch not settled is not committed
        bar.close()
        part.close()
    elapsed = time.time() - started
    return {
        "shard": f"{shard.index}/{shard.count}",
        "identities": len(mine),
        "identities_done": len(mine) - len(todo) + len([i for i in todo if i in part.entries]),
        "rendered_this_run": rendered,
        "seconds_this_run": round(elapsed, 3),
        "renders_per_second": round(rendered / elapsed, 3) if elapsed > 0 else None,
    }


# ----------------------------------------------------------------------------------------------
# Run bookkeeping and merging
# ----------------------------------------------------------------------------------------------


#: A shard's lock (``parts/<shard>/lock``) and its record of the settings it renders with.
LOCK_FILE, SHARD_SETTINGS_FILE = "lock", "settings.json"
MERGE_LOCK_FILE, RUN_LOCK_FILE = ".merge.lock", ".run.lock"  # one merge at a time; one run.json decision at a time


def comparable_settings(facts: dict[str, Any], saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """What must agree between two renders of one dataset. The same identities and weights may come
    from other paths (they are compared by content); the batch size changes images only by float
    rounding (the same batch size gives the same bits), so it may change on resume. Weights an older
    ``saved`` run did not record: unknown."""
    skip = {"identities_path", "model_paths"} | ({"weights"} if saved is not None and "weights" not in saved else set())
    facts = json.loads(json.dumps({k: v for k, v in facts.items() if k not in skip}))
    facts.get("config", {}).pop("batch_size", None)
    if saved is not None and isinstance(facts.get("weights"), dict) and isinstance(saved.get("weights"), dict):
        for key in set(facts["weights"]) - set(saved["weights"]):  # a file an older version did not fingerprint
            facts["weights"].pop(key)
    return facts


#: run.json's config fields as the flags that set them, for refusals that name what changed.
CONFIG_FLAGS = {"images_per_identity": "-k/--images-per-identity", "seed": "--seed", "min_similarity": "--min-similarity",
                "max_attempts": "--max-attempts", "image_format": "--image-format"}
PERTURBATION_FLAGS = {"kind": "--perturbation", "scale": "--perturbation-scale"}


def describe_run_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    """:func:`describe_changes` of two runs' :func:`comparable_settings`, naming the flags that set
    them (``-k/--images-per-identity 2 -> 3``). ``max_attempts`` is named only where a side set it:
    its default (K, 2K with a filter) follows -k, which is the change to name then."""

    def derived(config: dict[str, Any]) -> bool:
        k = config.get("images_per_identity")
        if not isinstance(k, int):
            return False
        return config.get("max_attempts") == (2 * k if config.get("min_similarity") is not None else k)

    def flags(facts: dict[str, Any], drop: set[str]) -> dict[str, Any]:
        facts = dict(facts)
        config = facts.pop("config") if isinstance(facts.get("config"), dict) else {}
        for key, value in config.items():
            if key in drop:
                continue
            if key == "perturbation" and isinstance(value, dict):
                facts.update({PERTURBATION_FLAGS.get(k, f"--perturbation {k}"): v for k, v in value.items()})
            else:
                facts[CONFIG_FLAGS.get(key, f"config.{key}")] = value
        for key in ("format", "align"):  # set by --format and --align
            if key in facts:
                facts[f"--{key}"] = facts.pop(key)
        return facts

    configs = [facts.get("config") if isinstance(facts.get("config"), dict) else {} for facts in (before, after)]
    drop = {"max_attempts"} if all(derived(config) for config in configs) else set()
    return describe_changes(flags(before, drop), flags(after, drop))


def claim_shard(out_dir: Path, shard: Shard) -> None:
    """Hold ``parts/<shard>/lock`` (:func:`~hyperface.common.io.hold_lock`: an OS lock the kernel drops
    when the process ends, a kill included), so a second process on the same shard (a requeued job
    while the first still runs) is refused instead of interleaving its journal."""
    folder = out_dir / PARTS_DIR / shard.name
    for attempt in range(3):  # another process clearing a failed attempt's folder may remove it meanwhile
        folder.mkdir(parents=True, exist_ok=True)
        try:
            hold_lock(
                folder / LOCK_FILE, attempts=20,  # another process's running_shards() probe holds it for microseconds
                busy=f"another process is rendering shard {shard.index}/{shard.count} into {out_dir}: wait for it, or "
                     "stop it and rerun with --resume",
                unchecked="two processes on one shard will not be told apart",
            )
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def release_shard(out_dir: Path, shard: Shard) -> None:
    release_lock(out_dir / PARTS_DIR / shard.name / LOCK_FILE)


def running_shards(out_dir: Path) -> list[str]:
    """Part folders whose lock another process holds (shards rendering now)."""
    try:
        import fcntl
    except ImportError:
        return []
    running = []
    for lock in sorted((out_dir / PARTS_DIR).glob(f"*/{LOCK_FILE}")):
        if holds_lock(lock):
            continue
        try:
            handle = open(lock, "rb")
        except FileNotFoundError:  # its folder removed meanwhile (--no-keep-parts, a cleared attempt)
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in LOCK_HELD_ERRNOS:
                    running.append(lock.parent.name)
                else:  # no locks on this file system: nothing can be told
                    return []
    return running


def finished_formats(out_dir: Path) -> dict[str, bool]:
    """Which final formats a merge has finished in ``out_dir``: the image folder is renamed into
    place whole; the RecordIO writer writes property, renames train.rec, then train.idx, so train.idx
    marks a finished one."""
    return {"folder": (out_dir / "images").is_dir(), "rec": (out_dir / "rec" / "train.idx").exists()}


def finished_run(out_dir: Path) -> dict[str, Any]:
    """The manifest of a generate run whose merge completed, or {}."""
    manifest = read_json(out_dir / "manifest.json") if (out_dir / "manifest.json").is_file() else {}
    return manifest if manifest.get("stage") == "generate" and manifest.get("status") == "complete" else {}


def _dataset_written(out_dir: Path) -> bool:
    """Whether a merge has written (part of) the dataset: its images are not to be re-rendered differently."""
    return (out_dir / "manifest.json").is_file() or any(finished_formats(out_dir).values())


def write_or_check_run(out_dir: Path, run: dict[str, Any], shard: Shard | None = None) -> None:
    """Store what this output folder generates; on resume and for every shard, refuse different
    settings. One process at a time decides (``.run.lock``), and with ``shard`` records in its part
    folder the settings it renders with, in the same turn."""
    with _folder_lock(out_dir, RUN_LOCK_FILE):
        path = out_dir / RUN_FILE
        if path.exists() or not save_json_if_absent(path, run):
            saved = read_json(path)
            changes = describe_run_changes(comparable_settings(saved, saved), comparable_settings(run, saved))
            if changes and not _parts_hold_work(out_dir) and not _dataset_written(out_dir):
                # Nothing rendered under the old settings yet (a failed attempt, models re-downloaded):
                # the new settings take their place. A shard still starting with the old ones stops at
                # its first commit (run.json is checked before each), so no dataset mixes the two.
                log.info("%s: no images rendered yet, so run.json takes the new settings (%s)", out_dir, changes)
                save_json(path, run)
            elif changes:
                where = ""
                if saved.get("weights") != run.get("weights") and saved.get("model_paths"):
                    where = f" (its models came from {', '.join(f'{k} {v}' for k, v in saved['model_paths'].items() if v)})"
                raise HyperfaceError(
                    f"{out_dir} holds a run with other settings ({changes}){where}; rerun with the same settings "
                    "to resume, or choose another --out"
                )
        if shard is not None:
            check_shard_settings(out_dir, shard, run)


@contextlib.contextmanager
def run_unchanged(out_dir: Path, run: dict[str, Any]):
    """Hold ``.run.lock`` around a journal write, after checking that ``run.json`` still holds
    ``run``'s settings: the check and the write are one step for a shard deciding run.json."""
    with _folder_lock(out_dir, RUN_LOCK_FILE):
        check_run_unchanged(out_dir, run)
        yield


def check_run_unchanged(out_dir: Path, run: dict[str, Any]) -> None:
    """Raise if ``run.json`` no longer holds ``run``'s settings: another shard replaced them (nothing
    was rendered yet) while this one started."""
    saved = read_json(out_dir / RUN_FILE)
    changes = describe_run_changes(comparable_settings(run, saved), comparable_settings(saved, saved))
    if changes:
        raise HyperfaceError(
            f"another shard replaced {out_dir / RUN_FILE} with other settings ({changes}) before this one wrote any "
            "image: start every shard with the same settings (this shard's renders were not kept)"
        )


def check_shard_settings(out_dir: Path, shard: Shard, run: dict[str, Any]) -> None:
    """Record in the shard's folder the settings it renders with; refuse to add to images it holds
    from other settings (which only a race of shards with other settings could have left)."""
    folder = out_dir / PARTS_DIR / shard.name
    path = folder / SHARD_SETTINGS_FILE
    now = comparable_settings(run)
    if path.is_file() and (folder / "journal.jsonl").is_file() and (folder / "journal.jsonl").stat().st_size > 0:
        before = read_json(path)
        changes = describe_run_changes(before, comparable_settings(run, before))  # a file it did not fingerprint: not held against it
        if changes:
            raise HyperfaceError(
                f"{folder} holds images rendered with other settings ({changes}) than {out_dir / RUN_FILE}: delete that "
                "folder and render the shard again"
            )
    folder.mkdir(parents=True, exist_ok=True)
    save_json(path, now)


def _parts_hold_work(out_dir: Path) -> bool:
    """Whether any shard has journaled a finished identity (a non-empty journal)."""
    return any(journal.stat().st_size > 0 for journal in (out_dir / PARTS_DIR).glob("*/journal.jsonl"))


def _identities_done_in_other_parts(out_dir: Path, own: Path) -> set[int]:
    done: set[int] = set()
    parts_root = out_dir / PARTS_DIR
    for folder in sorted(parts_root.iterdir()) if parts_root.is_dir() else []:
        if folder.resolve() == own.resolve() or not folder.is_dir():
            continue
        data = folder / "images.bin"
        entries, _, _ = ShardPart.read_journal(folder / "journal.jsonl", data.stat().st_size if data.exists() else 0)
        done.update(int(entry["identity"]) for entry in entries)
    return done


def _collect_parts(out_dir: Path, num_identities: int) -> dict[int, tuple[Path, int, list[int], dict]]:
    """identity -> (data file, offset, lengths, entry) over every part folder (first one wins)."""
    found: dict[int, tuple[Path, int, list[int], dict]] = {}
    parts_root = out_dir / PARTS_DIR
    for folder in sorted(parts_root.iterdir()) if parts_root.is_dir() else []:
        data = folder / "images.bin"
        size = data.stat().st_size if data.exists() else 0
        entries, _, _ = ShardPart.read_journal(folder / "journal.jsonl", size)
        for entry in entries:
            identity = int(entry["identity"])
            if 0 <= identity < num_identities and identity not in found:
                sims = [s for s in entry["similarities"] if s is not None]
                slim = {key: entry[key] for key in ("attempts", "accepted", "filled", "no_face")}
                slim["mean_similarity"] = float(np.mean(sims)) if sims else float("nan")  # small: 1e5 identities
                found[identity] = (data, int(entry["offset"]), [int(n) for n in entry["lengths"]], slim)
    return found


def _iter_identity_images(found: dict, identities: Iterable[int]) -> Iterable[tuple[int, list[bytes]]]:
    handles: dict[Path, Any] = {}
    try:
        for identity in identities:
            data, offset, lengths, _ = found[identity]
            handle = handles.get(data) or handles.setdefault(data, open(data, "rb"))
            handle.seek(offset)
            blob = handle.read(sum(lengths))
            images, position = [], 0
            for n in lengths:
                images.append(blob[position : position + n])
                position += n
            yield identity, images
    finally:
        for handle in handles.values():
            handle.close()


def merge_parts(out_dir: str | Path, *, formats: str | None = None, keep_parts: bool = True, show_progress: bool | None = None) -> dict[str, Any]:
    """Build the final dataset (image folder and/or RecordIO) from every shard's part; N x K images.

    Safe to rerun after a kill: the image folder is built as ``images.tmp`` with deterministic
    names (rewritten, never duplicated) and renamed when complete; RecordIO is rewritten from the
    start and renamed by its writer.
    """
    out_dir = Path(out_dir)
    if not (out_dir / RUN_FILE).exists():
        raise HyperfaceError(f"{out_dir} holds no generation run ({RUN_FILE} missing); give the --out of `hyperface generate`")
    with _folder_lock(out_dir, MERGE_LOCK_FILE, busy=f"another process is merging {out_dir}: wait for it (its result is the same)"):
        return _merge_parts(out_dir, formats=formats, keep_parts=keep_parts, show_progress=show_progress)


@contextlib.contextmanager
def _folder_lock(out_dir: Path, name: str, *, busy: str | None = None):
    """Hold ``out_dir/name`` (an flock) for the block: waiting for it, or, with ``busy``, refusing
    with that message while another process holds it. Outside ``parts/``, which --no-keep-parts
    deletes. No lock where ``fcntl`` is missing or the file system has none."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out_dir / name, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except OSError as exc:
            if exc.errno in LOCK_HELD_ERRNOS and busy:
                raise HyperfaceError(busy) from None
        yield


def _merge_parts(out_dir: Path, *, formats: str | None, keep_parts: bool, show_progress: bool | None) -> dict[str, Any]:
    running = running_shards(out_dir)
    if running:
        raise HyperfaceError(f"shards are still rendering into {out_dir} ({', '.join(running)}): merge once they are done")
    # The merge's own files, and run.json's from a run killed while writing it (every rank writes
    # run.json at its start, so only the merge, which runs alone, may sweep it).
    remove_stale_temporaries(out_dir, ("acceptance.json", "manifest.json", SAMPLES_FILE, RUN_FILE))
    run = read_json(out_dir / RUN_FILE)
    num_identities, k = int(run["num_identities"]), int(run["config"]["images_per_identity"])
    formats = formats or run.get("format", "both")
    if formats not in FORMATS:
        raise HyperfaceError(f"--format must be one of {', '.join(FORMATS)}, got {formats!r}")
    expected = comparable_settings(run, run)
    for settings_file in sorted((out_dir / PARTS_DIR).glob(f"*/{SHARD_SETTINGS_FILE}")):
        journal = settings_file.parent / "journal.jsonl"
        if journal.is_file() and journal.stat().st_size > 0:
            changes = describe_run_changes(expected, comparable_settings(read_json(settings_file), run))
            if changes:
                raise HyperfaceError(
                    f"{settings_file.parent} was rendered with other settings ({changes}) than {out_dir / RUN_FILE}: one "
                    "dataset never mixes two; delete that folder and render its shard again with the run's settings"
                )
    finished = finished_run(out_dir)
    if finished and not _parts_hold_work(out_dir):
        on_disk = finished_formats(out_dir)
        lacking = [kind for kind in FORMAT_KINDS[formats] if not on_disk[kind]]
        if lacking:
            raise HyperfaceError(f"{out_dir} was merged without the {' and '.join(lacking)} format and its parts are gone "
                                 f"(--no-keep-parts): make it from the set itself, `hyperface dataset convert {out_dir} "
                                 f"--format {lacking[0]} --out NEW`")
        log.info("%s is merged already and its parts are gone (--no-keep-parts): nothing to merge", out_dir)
        return {"outputs": finished.get("outputs", {}), "num_identities": num_identities,
                "num_images": finished.get("num_images", num_identities * k), "acceptance": finished.get("acceptance", {})}
    found = _collect_parts(out_dir, num_identities)
    missing = [i for i in range(num_identities) if i not in found]
    if missing:
        raise HyperfaceError(
            f"{len(missing)} of {num_identities} identities are not generated yet (e.g. {missing[:5]}): finish every "
            "shard (rerun it with --resume) before merging"
        )
    bad = [i for i, (_, _, lengths, _) in found.items() if len(lengths) != k]
    if bad:
        raise HyperfaceError(f"identities {bad[:5]} have a number of images other than {k}: the parts are inconsistent")
    started = time.time()
    wanted = list(FORMAT_KINDS[formats])
    try:
        outputs = _write_formats(out_dir, run, found, wanted, num_identities, k, show_progress)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HyperfaceError(
                f"disk full while merging into {out_dir}: the generated parts are intact; free space and rerun "
                "`hyperface generate --merge`"
            ) from exc
        raise
    for kind, done in finished_formats(out_dir).items():  # formats an earlier merge wrote stay listed
        if done and kind not in outputs:
            outputs[kind] = str(out_dir / KIND_FOLDERS[kind])
    stats = acceptance_statistics(found, num_identities, run)
    save_json(out_dir / "acceptance.json", stats)
    try:  # a picture to look at: it must not cost the merge
        write_samples_sheet(out_dir / SAMPLES_FILE, found, num_identities)
        outputs["samples"] = str(out_dir / SAMPLES_FILE)
    except (HyperfaceError, OSError) as exc:
        log.warning("%s not written: %s", SAMPLES_FILE, exc)
    on_disk = {kind for kind, done in finished_formats(out_dir).items() if done}
    # params.format: the formats on disk now (a `--merge --format both` of a rec run is "both")
    params = {**run, "format": next((name for name, kinds in FORMAT_KINDS.items() if set(kinds) == on_disk), formats)}
    manifest = Manifest(stage="generate", params=params, inputs={"identities": run.get("identities_path")})
    shards, commands = [], []
    for part_manifest in sorted((out_dir / PARTS_DIR).glob("*/manifest.json")):
        part = read_json(part_manifest)
        summary = part.get("summary", {})
        shards.append(summary)
        if part.get("command") and part["command"] not in commands:
            commands.append(part["command"])
        manifest.time("render_last_run", float(summary.get("seconds_this_run") or 0.0))
        with contextlib.suppress(TypeError, ValueError):  # the run began when its first shard (last) started
            manifest.started = min(manifest.started, datetime.datetime.fromisoformat(part["started"]).timestamp())
    manifest.time("merge", time.time() - started)
    manifest.extra.update({"outputs": outputs, "num_images": num_identities * k, "acceptance": stats["summary"], "shards": shards})
    if commands:  # what made the dataset is the rendering command (shard 0's), not `--merge`; parts/ may go
        merge_command = " ".join(sys.argv)
        manifest.command = commands[0]
        if len(commands) > 1:
            manifest.extra["render_commands"] = commands
        if merge_command not in commands:
            manifest.extra["merged_by"] = merge_command
    manifest.write(out_dir)  # the identities file's SHA-256 (as pack's and report's manifests record it)
    if not keep_parts:
        shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
    return {"outputs": outputs, "num_identities": num_identities, "num_images": num_identities * k, "acceptance": stats["summary"]}


def write_samples_sheet(path: Path, found: dict, num_identities: int, rows: int = 8, columns: int = 8) -> None:
    """``samples.jpg``: the first images of identities spread over the set, with their acceptance."""
    from hyperface.datasets.codec import decode_image
    from hyperface.datasets.preview import contact_sheet, save_contact_sheet, spread_rows

    sheet_rows = []
    for identity, blobs in _iter_identity_images(found, spread_rows(num_identities, rows)):
        entry = found[identity][3]
        lines = [f"id {identity}"]
        if not np.isnan(entry["mean_similarity"]):
            lines.append(f"cos {entry['mean_similarity']:.2f}")
        if entry["filled"]:
            lines.append(f"{entry['filled']} filled")
        sheet_rows.append(("\n".join(lines), [decode_image(blob) for blob in blobs[:columns]]))
    widest = max((len(images) for _, images in sheet_rows), default=1)  # -k 2: two columns, not eight
    save_contact_sheet(path, contact_sheet(sheet_rows, columns=min(columns, max(1, widest))))


def _write_formats(out_dir: Path, run: dict, found: dict, wanted: list[str], num_identities: int, k: int, show_progress) -> dict[str, str]:
    from hyperface.datasets import ImageFolderWriter, RecordIOWriter

    outputs: dict[str, str] = {}
    done = finished_formats(out_dir)
    for kind in wanted:
        final = out_dir / KIND_FOLDERS[kind]
        outputs[kind] = str(final)
        if done[kind]:  # finished by an earlier merge
            continue
        bar = progress(total=num_identities * k, desc=f"merge {kind}", unit="img", disable=None if show_progress is None else not show_progress)
        if kind == "folder":
            staging = out_dir / "images.tmp"
            writer = ImageFolderWriter(staging, image_format=run["config"]["image_format"])
            for identity, images in _iter_identity_images(found, range(num_identities)):
                for index, blob in enumerate(images):
                    writer.add(blob, identity, index=index)
                bar.update(len(images))
            writer.close()
            os.replace(staging, final)
        else:
            writer = RecordIOWriter(final, image_format=run["config"]["image_format"], overwrite=True)
            try:
                for identity, images in _iter_identity_images(found, range(num_identities)):
                    for blob in images:
                        writer.add(blob, identity)
                    bar.update(len(images))
                writer.close()
            except BaseException:
                writer.abort()
                raise
        bar.close()
    return outputs


def acceptance_statistics(found: dict, num_identities: int, run: dict) -> dict[str, Any]:
    attempts = np.array([found[i][3]["attempts"] for i in range(num_identities)])
    accepted = np.array([found[i][3]["accepted"] for i in range(num_identities)])
    filled = np.array([found[i][3]["filled"] for i in range(num_identities)])
    no_face = np.array([found[i][3]["no_face"] for i in range(num_identities)])
    mean_sim = np.array([found[i][3]["mean_similarity"] for i in range(num_identities)], dtype=np.float64)
    summary = {
        "identities": num_identities,
        "images": int(sum(len(found[i][2]) for i in range(num_identities))),
        "renders": int(attempts.sum()),
        "acceptance_rate": float(accepted.sum() / max(1, attempts.sum())),
        "identities_filled_below_threshold": int((filled > 0).sum()),
        "images_filled_below_threshold": int(filled.sum()),
        "no_face_renders": int(no_face.sum()),
        "mean_similarity": None if np.isnan(mean_sim).all() else float(np.nanmean(mean_sim)),
        "min_similarity": run["config"].get("min_similarity"),
    }
    return {
        "summary": summary,
        "per_identity": {
            "attempts": attempts.tolist(),
            "accepted": accepted.tolist(),
            "filled": filled.tolist(),
            "no_face": no_face.tolist(),
            "mean_similarity": [None if np.isnan(v) else round(float(v), 5) for v in mean_sim],
        },
    }


#: Below this acceptance rate the filter is more likely misconfigured than strict (see acceptance_warning).
LOW_ACCEPTANCE = 0.2


def acceptance_line(summary: dict[str, Any]) -> str:
    """One line for the log: how the renders fared in the quality filter."""
    parts = [f"{summary['images']} images from {summary['renders']} renders"]
    if summary.get("min_similarity") is not None:
        parts.append(f"{100 * summary['acceptance_rate']:.1f}% cleared --min-similarity {summary['min_similarity']}")
    if summary.get("mean_similarity") is not None:
        parts.append(f"mean cosine to the identity {summary['mean_similarity']:.3f}")
    if summary.get("images_filled_below_threshold"):
        parts.append(
            f"{summary['images_filled_below_threshold']} images of {summary['identities_filled_below_threshold']} "
            "identities filled below the threshold"
        )
    if summary.get("no_face_renders"):
        parts.append(f"{summary['no_face_renders']} renders without a detected face")
    return "; ".join(parts)


def acceptance_warning(summary: dict[str, Any]) -> str | None:
    """A warning when the filter rejected most renders: usually the wrong --fr-model, not bad images."""
    if summary.get("min_similarity") is None or summary["acceptance_rate"] >= LOW_ACCEPTANCE:
        return None
    return (
        f"only {100 * summary['acceptance_rate']:.1f}% of renders cleared --min-similarity {summary['min_similarity']}, "
        f"so {summary['images_filled_below_threshold']} images are below it: is --fr-model the FR model the "
        "identities live in (Arc2Face's arcface.onnx)? Otherwise lower --min-similarity or raise --max-attempts "
        "(acceptance.json has the per-identity figures)"
    )


def open_run(
    out_dir: str | Path,
    embeddings: np.ndarray,
    config: GenerationConfig,
    *,
    embedding_dim: int,
    formats: str = "both",
    shard: Shard = Shard(),
    align_mode: str = "ffhq",
    resume: bool = False,
    overwrite: bool = False,
    identities_path: str | None = None,
    run_info: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Claim ``out_dir`` for a run and store (or, on resume and for every shard, check) its
    ``run.json``. Cheap: the CLI calls it before loading any model, so a wrong --out or a changed
    setting fails in a second, not after minutes of loading. ``run_info`` may be a function (e.g.
    hashing the weights), called only once the folder is known to be usable. Returns (folder, run facts).
    The shard's lock (:func:`claim_shard`) is held from here until :func:`generate_dataset` ends;
    a caller that stops after ``open_run`` releases it with :func:`release_shard`."""
    from hyperface.common.io import prepare_output_dir, validate_embeddings
    from hyperface.datasets.recordio import check_recordio_capacity

    # the identities as the renderer will see them (validated, normalised), so hashes agree
    embeddings = validate_embeddings(np.asarray(embeddings), what="identity embeddings", dim=embedding_dim, require_unit=True)
    if formats not in FORMATS:
        raise HyperfaceError(f"--format must be one of {', '.join(FORMATS)}, got {formats!r}")
    if formats in ("rec", "both"):  # before any rendering, not at the merge
        check_recordio_capacity(len(embeddings) * config.images_per_identity, len(embeddings))
    out_dir = Path(out_dir)
    if shard.count > 1 and out_dir.is_dir() and any(out_dir.iterdir()):
        from hyperface.common.io import RUN_MARKER

        if not (out_dir / RUN_MARKER).exists():
            raise HyperfaceError(f"output folder {out_dir} is not empty and was not written by hyperface; choose another --out")
    if out_dir.is_dir() and not (resume or shard.count > 1):  # not cleared (--overwrite, a failed attempt) under a running job
        busy = running_shards(out_dir)
        if busy:
            raise HyperfaceError(f"another process is generating into {out_dir} ({', '.join(busy)}): wait for it, or stop "
                                 "it and rerun with --resume")
    # Several ranks share one --out: only a single-shard run insists on an empty folder.
    # A failed attempt's folder is reused in place, not cleared: another copy of this command may be
    # starting in it at this moment (its lock and run.json decide which one runs).
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite and shard.count == 1, resume=resume or shard.count > 1, stage="generate", exclusive=False,
                                 setup_files=(RUN_FILE, f"{PARTS_DIR}/*/{SHARD_SETTINGS_FILE}"), clear_unfinished=False)
    run = {
        "num_identities": int(embeddings.shape[0]),
        "embeddings_sha256": array_sha256(embeddings),
        "identities_path": identities_path,
        "config": config.describe(),
        "format": formats,
        "align": align_mode,
        **((run_info() if callable(run_info) else run_info) or {}),
    }
    claim_shard(out_dir, shard)  # before run.json: a running shard's settings are never replaced
    try:
        write_or_check_run(out_dir, run, shard)
    except BaseException:
        release_shard(out_dir, shard)  # refused: the shard is not ours to hold (an API caller's process lives on)
        raise
    return out_dir, run


def generate_dataset(
    generator: IdentityGenerator,
    embeddings: np.ndarray,
    out_dir: str | Path,
    config: GenerationConfig,
    *,
    formats: str = "both",
    shard: Shard = Shard(),
    aligner: Aligner | None = None,
    align_mode: str = "ffhq",
    embed_fn: EmbedFn | None = None,
    resume: bool = False,
    overwrite: bool = False,
    identities_path: str | None = None,
    run_info: dict[str, Any] | None = None,
    merge: bool | None = None,
    keep_parts: bool = True,
    on_identity_done: Callable[[int], None] | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Render ``embeddings`` (N, 512 unit rows) into ``out_dir``: K images per identity.

    With one shard (the default) the dataset is merged at the end; with several, each call renders
    its shard and :func:`merge_parts` (``hyperface generate --merge``) builds the dataset once all
    are done. ``run_info`` adds facts (e.g. generator settings, FR model) that must match on resume.
    """
    from hyperface.common.io import validate_embeddings

    raw_embeddings = embeddings
    embeddings = validate_embeddings(np.asarray(embeddings), what="identity embeddings", dim=generator.embedding_dim, require_unit=True)
    out_dir, run = open_run(
        out_dir, raw_embeddings, config, embedding_dim=generator.embedding_dim, formats=formats, shard=shard, align_mode=align_mode, resume=resume,
        overwrite=overwrite, identities_path=identities_path, run_info=run_info,
    )
    started = time.time()
    try:
        summary = render_shard(
            generator, embeddings, out_dir, config, shard=shard, aligner=aligner, embed_fn=embed_fn,
            on_identity_done=on_identity_done, show_progress=show_progress,
            commit_guard=lambda: run_unchanged(out_dir, run),
        )
        part_manifest = Manifest(stage="generate-shard", params={**run, "shard": summary["shard"]}, extra={"summary": summary}, started=started)
        part_manifest.write(out_dir / PARTS_DIR / shard.name, checksum_inputs=False)
        if merge if merge is not None else shard.count == 1:  # still holding the shard: no second process merges too
            summary["dataset"] = merge_parts(out_dir, formats=formats, keep_parts=keep_parts, show_progress=show_progress)
    finally:
        release_shard(out_dir, shard)
    return summary


__all__ = [
    "FORMATS",
    "LOW_ACCEPTANCE",
    "acceptance_line",
    "acceptance_warning",
    "claim_shard",
    "finished_run",
    "GenerationConfig",
    "Shard",
    "ShardPart",
    "generate_dataset",
    "merge_parts",
    "open_run",
    "release_shard",
    "render_shard",
    "write_or_check_run",
]
