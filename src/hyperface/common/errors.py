"""The one error type for user mistakes.

Anything the user can fix (a wrong path, a bad shape, a missing weight file) raises
:class:`HyperfaceError` with a message that says what to do. The CLI prints it as one line and
exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import numbers
import pickle
import re
from typing import Any, Callable


class HyperfaceError(Exception):
    """A problem with the user's input or environment, explained in one actionable message."""


def check_option(
    flag: str, value: Any, valid: Callable[[Any], bool], rule: str, *, integer: bool = False, finite: bool = False
) -> None:
    """Refuse an option outside its range with one line naming the flag, the rule and the value
    (``"--lr must be > 0, got -1.0"``). NaN fails every comparison, so every rule refuses it."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise HyperfaceError(f"{flag} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if finite and not math.isfinite(value):
        raise HyperfaceError(f"{flag} must be a finite number, got {value!r}")
    if not valid(value):
        raise HyperfaceError(f"{flag} must be {rule}, got {value!r}")


#: The largest seed every stage accepts: torch.manual_seed takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1


def check_seed(value: Any, flag: str = "--seed", maximum: int = MAX_SEED) -> None:
    """A seed every generator takes (0 .. 2^63 - 1): a larger one failed deep in torch with an overflow."""
    check_option(flag, value, lambda v: 0 <= v <= maximum, f"an integer from 0 to {maximum}", integer=True)


def check_paths_given(*flagged: tuple[str, str | None]) -> None:
    """Refuse an empty path argument (``""`` would silently mean the current folder); None is "not given"."""
    for flag, value in flagged:
        if value is not None and not value.strip():
            raise HyperfaceError(f"{flag} is empty: give a path")


def without_object_reprs(text: str) -> str:
    """``text`` without Python object reprs such as ``<_io.BytesIO object at 0x7f...>``."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", text).strip()


def exception_summary(exc: BaseException, limit: int = 300) -> str:
    """A library exception as one short clause for a HyperfaceError: its first non-empty line, without
    terminal colour codes or object reprs, or its type name when it has no message. A refused pickle
    says so plainly: torch's own first line suggests ``weights_only=False``, which is the unsafe fix."""
    if any(marker in str(exc) for marker in _TRUNCATED_MARKERS):
        return "it is truncated or damaged: it ends before the data it declares; copy or download it again"
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        return "it holds pickled Python objects, not plain tensors; refusing to unpickle it"
    if isinstance(exc, MemoryError):  # bare: a length field asked for more than this machine has
        return "it asks for more memory than this machine has: a damaged (or hostile) length field"
    if isinstance(exc, EOFError):
        return "it ends too early: it is truncated; copy or download it again"
    text = without_object_reprs(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if len(line) <= limit:
        return line
    # cut at a sentence end when there is one, not mid-word
    cut = line.rfind(". ", 0, limit)
    return line[: cut + 1] if cut > limit // 3 else line[: limit - 1].rstrip() + "…"


#: Library messages that mean "the file stops early": torch's zip reader (miniz), its legacy reader, pickle.
_TRUNCATED_MARKERS = (
    "failed finding central directory", "unexpected EOF", "file might be corrupted", "Ran out of input", "pickle data was truncated",
)
