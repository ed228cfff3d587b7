"""Seeding, device selection, logging and progress bars: one way to do each, for every stage."""

from __future__ import annotations

import logging
import os
import random
import sys
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from hyperface.common.errors import HyperfaceError

T = TypeVar("T")
R = TypeVar("R")

_LOG_CONFIGURED = False


class _LevelFormatter(logging.Formatter):
    """Info lines as they are; warnings and errors say so, so they stand out in a long log."""

    def format(self, record: logging.LogRecord) -> str:
        record.level_prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return super().format(record)


def get_logger(name: str = "hyperface") -> logging.Logger:
    """A logger writing ``hyperface: message`` lines to stderr; level from $HYPERFACE_LOG (INFO)."""
    global _LOG_CONFIGURED
    if not _LOG_CONFIGURED:
        root = logging.getLogger("hyperface")
        if not root.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_LevelFormatter("%(asctime)s %(name)s: %(level_prefix)s%(message)s", "%H:%M:%S"))
            root.addHandler(handler)
        root.setLevel(os.environ.get("HYPERFACE_LOG", "INFO").upper())
        root.propagate = False
        _LOG_CONFIGURED = True
    return logging.getLogger(name if name.startswith("hyperface") else f"hyperface.{name}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Stages also pass explicit generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str = "auto"):
    """``auto`` picks CUDA when available, else CPU; ``cuda``/``cuda:N`` fail clearly without a GPU."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise HyperfaceError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise HyperfaceError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise HyperfaceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif resolved.type not in ("cpu", "mps"):
        raise HyperfaceError(f"unsupported --device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


def progress_enabled() -> bool:
    """Whether progress bars show: on a terminal, unless $HYPERFACE_PROGRESS says 1 or 0."""
    forced = os.environ.get("HYPERFACE_PROGRESS")
    return (forced != "0") if forced is not None else sys.stderr.isatty()


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool | None = None,
    **kwargs,
) -> Iterator[T]:
    """A tqdm bar on stderr when stderr is a terminal ($HYPERFACE_PROGRESS=1 forces it). Otherwise
    (a batch job, nohup, a pipe) a log line with count, rate and time left every
    $HYPERFACE_PROGRESS_SECONDS (60), so hours-long jobs still show progress in their logs;
    $HYPERFACE_PROGRESS=0 or ``disable=True`` silence both."""
    from tqdm.auto import tqdm

    if disable is None and not progress_enabled():
        if os.environ.get("HYPERFACE_PROGRESS") == "0":
            disable = True
        else:
            seconds = _progress_seconds()
            line = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, {remaining} left{postfix}"
            if total is None and (iterable is None or not hasattr(iterable, "__len__")):
                line = "{desc}: {n_fmt} {unit}, {rate_fmt}, {elapsed} elapsed{postfix}"  # no total: no percentage or time left
            if "bar_format" in kwargs:  # the caller's counter, without the bar itself
                line = kwargs["bar_format"].replace("{l_bar}{bar}| ", "{desc}: ")
            kwargs = {**kwargs, "mininterval": seconds, "maxinterval": seconds, "delay": seconds, "bar_format": line}
            return tqdm(
                iterable, total=total, desc=desc, unit=unit, file=_ProgressLog(get_logger("hyperface.progress")), **kwargs
            )
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=bool(disable), dynamic_ncols=True, **kwargs)


def show_progress_now(bar: Any) -> None:
    """Show ``bar``'s line now and count the next line's interval from here: for a loop whose steps
    are slow. Without a terminal a bar logs its first line only once a step ends after
    $HYPERFACE_PROGRESS_SECONDS (a 49 s step: at 98 s, or never in a shorter run)."""
    if getattr(bar, "disable", True):
        return
    bar.refresh()
    bar.last_print_n, bar.last_print_t = bar.n, bar._time()


def _progress_seconds() -> float:
    """$HYPERFACE_PROGRESS_SECONDS, at least 0.05 (a bad value: 60, with a warning)."""
    raw = os.environ.get("HYPERFACE_PROGRESS_SECONDS", "60")
    try:
        return max(0.05, float(raw))
    except ValueError:
        get_logger("hyperface").warning("HYPERFACE_PROGRESS_SECONDS=%r is not a number of seconds; using 60", raw)
        return 60.0


class _ProgressLog:
    """A file for tqdm that turns each refresh into one log line (no carriage returns in log files)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._last = ""

    def write(self, text: str) -> None:
        line = " ".join(text.replace("\x1b[A", "").split())
        count = line.split(",")[0]  # tqdm's closing refresh repeats the count with a new rate: once is enough
        if line and count != self._last:
            self._last = count
            self._log.info("%s", line)

    def flush(self) -> None:
        pass


def ordered_parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """``map(fn, items)`` in order, ``workers`` threads ahead of the consumer by at most ``window``
    (decoding and encoding images release the GIL, so threads overlap them with the caller's work)."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hyperface-worker")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # on error or interrupt: drop queued work, don't wait for it
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class StopRequest:
    """SIGTERM / first Ctrl-C: the long loops finish their current step, checkpoint it and stop (a
    second Ctrl-C aborts at once; a second SIGTERM does not: under Slurm + torchrun a rank gets one
    from Slurm and one from torchrun's agent). Under DDP the ranks agree through :meth:`agreed`
    (a collective every step, on every rank). Use from the main thread; :meth:`restore` puts the previous handlers back."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        import signal
        import threading

        self.requested = False
        self._log = logger or get_logger("hyperface")
        self._previous: dict[int, Any] = {}
        self._pending: list[tuple[Any, Any]] = []  # agreed's reductions in flight
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        if self.requested:
            if signum == signal.SIGTERM:
                return  # the same request again (Slurm and torchrun's agent both send one)
            raise KeyboardInterrupt
        self.requested = True
        self._log.warning("stop requested: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    #: how many calls of :meth:`agreed` a request takes to be seen by every rank
    LAG = 2

    def agreed(self, world: int, device: Any) -> bool:
        """Call once per step on every rank: whether the ranks agree to stop now. Each call starts a
        one-number all-reduce of this rank's request and reads the one started :attr:`LAG` calls
        before, so every rank reads the same answer at the same step, a request stops the job within
        ``LAG + 1`` steps (torchrun's agent SIGKILLs 30 s after its SIGTERM), and on a GPU the host
        never waits for the step it has just queued, only for one that is long done."""
        if world == 1:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.device.type == "cuda":
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(flag.device))  # the copy's stream, whatever the current device
        else:
            host, done = flag, None
        self._pending.append((host, done))
        if len(self._pending) <= self.LAG:
            return False
        host, done = self._pending.pop(0)
        if done is not None:
            done.synchronize()
        return bool(host.item() > 0)

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
