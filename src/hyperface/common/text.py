"""Text the commands print: labels told apart, tables of aligned columns."""

from __future__ import annotations

from typing import Sequence


def unique_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` with repeats told apart: the second ``hf-r50`` becomes ``hf-r50 (2)``."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def side_by_side(labels: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], *, min_width: int) -> list[str]:
    """Aligned text columns, one per label (at least ``min_width`` wide): a header line of the labels,
    then a line per (row name, one cell per label). Comparisons of models and of datasets print this."""
    first = max(len(name) for name, _ in rows)
    widths = [max(min_width, len(label)) for label in labels]
    lines = [f"{'':<{first}}  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, widths))]
    lines += [f"{name:<{first}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) for name, cells in rows]
    return lines


__all__ = ["side_by_side", "unique_labels"]
