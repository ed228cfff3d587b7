"""The one error type for user mistakes.

Anything the user can fix (a wrong path, a bad shape, a missing weight file) raises
:class:`HyperfaceError` with a message that says what to do. The CLI prints it as one line and
exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import numbers
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
