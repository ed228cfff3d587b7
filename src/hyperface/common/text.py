"""Text the commands print: labels told apart, tables of aligned columns."""

from __future__ import annotations

from typing import Sequence


def unique_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` with repeats told apart: the second ``hf-r50`` becomes ``hf-r50 (2)`` (or the next
    number free, so a label already named ``hf-r50 (2)`` keeps its name)."""
    taken = set(labels)
    seen: set[str] = set()
    out = []
    for label in labels:
        name, number = label, 1
        while name in seen or (name != label and name in taken):  # taken: another label is called that
            number += 1
            name = f"{label} ({number})"
        seen.add(name)
        out.append(name)
    return out


def side_by_side(labels: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], *, min_width: int) -> list[str]:
    """Aligned text columns, one per label (at least ``min_width`` wide): a header line of the labels,
    then a line per (row name, one cell per label). Comparisons of models and of datasets print this."""
    first = max(len(name) for name, _ in rows)
    widths = [max(min_width, len(label)) for label in labels]
    lines = [f"{'':<{first}}  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, widths))]
    lines += [f"{name:<{first}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) for name, cells in rows]
    return lines


def print_text(text: str) -> None:
    """Print ``text`` with file names as they are on disk: a name that is not UTF-8 (held as
    surrogates) goes out as its own bytes instead of failing on a strict UTF-8 stdout."""
    import sys

    try:
        print(text)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape") + b"\n")
        sys.stdout.buffer.flush()


def display_name(text: str) -> str:
    """``text`` fit for a figure or a terminal that takes only valid Unicode: the bytes of a file
    name that is not UTF-8 (held as surrogates) shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


__all__ = ["display_name", "print_text", "side_by_side", "unique_labels"]
