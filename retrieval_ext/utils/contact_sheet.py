"""Contact sheets: many photos on one page, each with a drawn outline and a caption.

Made for checking automatic annotations by eye (``tools/annotate_boxes.py``): every tile shows a
photo shrunk to fit a square, the projected outline of the object (a quadrilateral) and its
axis-aligned box, the reference image small beside it and two caption lines. OpenCV + numpy only.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["Tile", "draw_tile", "contact_sheets"]

# BGR colours
_QUAD_OK = (60, 200, 60)
_QUAD_BAD = (40, 40, 230)
_BOX = (0, 220, 255)
_CAPTION_H = 34
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class Tile:
    """One photo of a contact sheet.

    Attributes:
        image (np.ndarray): (H, W, 3) BGR uint8 photo.
        caption (list[str]): up to two short lines written under it.
        quad (np.ndarray or None): (4, 2) outline in the photo's continuous pixels.
        box (list or None): ``[x1, y1, x2, y2]`` in the photo's continuous pixels.
        good (bool): outline drawn green (accepted) or red (rejected); the caption likewise.
        inset (np.ndarray or None): (h, w, 3) BGR reference image drawn small beside the photo.
    """

    image: np.ndarray
    caption: List[str]
    quad: Optional[np.ndarray] = None
    box: Optional[Sequence[float]] = None
    good: bool = True
    inset: Optional[np.ndarray] = None


def _fit(image: np.ndarray, side: int) -> Tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _tile_size(side: int) -> Tuple[int, int]:
    """(height, width) of a tile: the photo's square, the inset column beside it, the caption."""
    return side + _CAPTION_H, side + side // 4


def draw_tile(tile: Tile, side: int = 300) -> np.ndarray:
    """One tile: the photo fitted in a ``side`` square, the inset to its right, the caption below.

    Args:
        tile: what to draw.
        side: the photo's longer side in the tile, in pixels.

    Returns:
        np.ndarray: (side + 34, side + side // 4, 3) BGR uint8.
    """
    canvas = np.full(_tile_size(side) + (3,), 255, dtype=np.uint8)
    photo, scale = _fit(tile.image, side)
    canvas[: photo.shape[0], : photo.shape[1]] = photo
    if tile.inset is not None:
        inset, _ = _fit(tile.inset, side // 4 - 6)
        canvas[2 : 2 + inset.shape[0], side + 4 : side + 4 + inset.shape[1]] = inset
    # shift=2 draws at quarter-pixel precision; continuous pixel x maps to x * scale - 0.5
    if tile.box is not None:
        x1, y1, x2, y2 = (int(round((v * scale - 0.5) * 4)) for v in tile.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), _BOX, 1, cv2.LINE_AA, shift=2)
    if tile.quad is not None and np.all(np.abs(tile.quad) < 1e6):
        pts = np.round((np.asarray(tile.quad) * scale - 0.5) * 4).astype(np.int32)
        colour = _QUAD_OK if tile.good else _QUAD_BAD
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], True, colour, 2, cv2.LINE_AA, shift=2)
    text_colour = (0, 110, 0) if tile.good else (0, 0, 200)
    for i, line in enumerate(tile.caption[:2]):
        y = side + 14 + 16 * i
        cv2.putText(canvas, line, (3, y), _FONT, 0.45, text_colour, 1, cv2.LINE_AA)
    return canvas


def contact_sheets(
    tiles: Sequence[Tile], per_sheet: int = 12, columns: int = 4, side: int = 300
) -> List[np.ndarray]:
    """Tiles laid out in pages of ``per_sheet`` (rows of ``columns``), 4 px apart.

    Args:
        tiles: in reading order.
        per_sheet: tiles per page.
        columns: tiles per row.
        side: see :func:`draw_tile`.

    Returns:
        list[np.ndarray]: BGR pages, all of one size; empty slots are grey.
    """
    if per_sheet < 1 or columns < 1:
        raise ValueError(f"per_sheet and columns must be positive, got {per_sheet}, {columns}")
    gap = 4
    th, tw = _tile_size(side)
    rows = -(-min(per_sheet, max(len(tiles), 1)) // columns)
    cols = min(columns, per_sheet)
    pages = []
    for start in range(0, len(tiles), per_sheet):
        page = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), 128, np.uint8)
        for k, tile in enumerate(tiles[start : start + per_sheet]):
            r, c = divmod(k, cols)
            y, x = gap + r * (th + gap), gap + c * (tw + gap)
            page[y : y + th, x : x + tw] = draw_tile(tile, side)
        pages.append(page)
    return pages
