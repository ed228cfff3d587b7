"""Contact sheets: a few images of a few identities in one picture, to judge a dataset at a glance.

One row per identity (its label, and optional caption lines, in a strip on the left), one column per
image; every image is fitted into a ``tile`` x ``tile`` square, keeping its aspect ratio. Rows with
fewer images, and ``None`` entries (an image that could not be read), leave dark tiles.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import atomic_write
from hyperface.datasets.codec import check_rgb_uint8, encode_image

#: Width of the label strip left of each row, in pixels.
LABEL_WIDTH = 96
BACKGROUND = (24, 24, 24)


def spread_rows(num_identities: int, rows: int) -> list[int]:
    """``rows`` identity indices spread evenly over ``0 .. num_identities - 1`` (first and last included)."""
    if num_identities <= 0:
        return []
    rows = min(rows, num_identities)
    return sorted({int(round(x)) for x in np.linspace(0, num_identities - 1, rows)})


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[np.ndarray | None]]], *, columns: int | None = None, tile: int = 112
) -> np.ndarray:
    """An RGB uint8 picture: per row, a label strip (the row's text, ``\\n`` between lines) and its images."""
    import cv2

    if not rows:
        raise HyperfaceError("a contact sheet needs at least one row")
    columns = columns or max(len(images) for _, images in rows)
    sheet = np.full((len(rows) * tile, LABEL_WIDTH + columns * tile, 3), BACKGROUND, dtype=np.uint8)
    for r, (text, images) in enumerate(rows):
        top = r * tile
        for line_number, line in enumerate(str(text).split("\n")[:4]):
            cv2.putText(sheet, line, (6, top + 22 + 20 * line_number), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (230, 230, 230), 1, cv2.LINE_AA)
        for c, image in enumerate(list(images)[:columns]):
            if image is None:
                continue
            image = check_rgb_uint8(image)
            height, width = image.shape[:2]
            if (height, width) != (tile, tile):
                scale = tile / max(height, width)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
                height, width = image.shape[:2]
            y0, x0 = top + (tile - height) // 2, LABEL_WIDTH + c * tile + (tile - width) // 2
            sheet[y0 : y0 + height, x0 : x0 + width] = image
        sheet[top + tile - 1, :] = BACKGROUND  # a thin rule between rows
    return sheet


def save_contact_sheet(path: str | os.PathLike, sheet: np.ndarray, *, quality: int = 90) -> None:
    """Write the sheet as a JPEG, atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(encode_image(sheet, image_format="jpg", quality=quality))


__all__ = ["LABEL_WIDTH", "contact_sheet", "save_contact_sheet", "spread_rows"]
