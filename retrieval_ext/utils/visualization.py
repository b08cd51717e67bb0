"""Draw ranked results: per query, the query with its box and the top k with their located boxes.

Images are drawn with detectron2's ``Visualizer``; a relevant result gets a green border, a
non-relevant one red, and one without ground truth (or junk) grey. ``write_gallery`` also writes
an ``index.html`` linking every query's strip.
"""

import html
import os
from typing import List, Optional, Sequence

import cv2
import numpy as np
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer

__all__ = ["draw_box", "result_strip", "write_gallery", "BORDER_COLORS"]

# RGB border colours by relevance label.
BORDER_COLORS = {True: (40, 180, 40), False: (210, 40, 40), None: (150, 150, 150)}
_BORDER = 6


def draw_box(
    image_rgb: np.ndarray, box: Optional[Sequence[float]], label: str = "", color="yellow"
):
    """The image (H, W, 3 RGB uint8) with ``box`` (XYXY pixels; None or NaN: none) and a label."""
    vis = Visualizer(image_rgb, scale=1.0)
    if box is not None and np.all(np.isfinite(np.asarray(box, dtype=np.float64))):
        vis.draw_box(tuple(float(v) for v in box), edge_color=color)
    if label:
        vis.draw_text(label, (4, 4), horizontal_alignment="left", color="white", font_size=12)
    return vis.get_output().get_image()


def _tile(image_rgb, box, label, relevant, height, color="yellow"):
    drawn = draw_box(image_rgb, box, label, color)
    h, w = drawn.shape[:2]
    scaled = cv2.resize(
        drawn, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA
    )
    return cv2.copyMakeBorder(
        scaled,
        _BORDER,
        _BORDER,
        _BORDER,
        _BORDER,
        cv2.BORDER_CONSTANT,
        value=BORDER_COLORS[relevant],
    )


def result_strip(
    query_file: str,
    query_box: Sequence[float],
    result_files: Sequence[str],
    result_boxes: Sequence[Optional[Sequence[float]]],
    result_scores: Sequence[float],
    relevance: Sequence[Optional[bool]],
    height: int = 160,
) -> np.ndarray:
    """One RGB image: the query with its box, then the ranked results with their located boxes.

    Args:
        query_file, query_box: the query image and its box (original pixels).
        result_files, result_boxes, result_scores: the top k results, best first; boxes XYXY in
            each result's original pixels, None/NaN when the stage does not locate.
        relevance: per result True / False / None (unknown or junk): the border colour.
        height: height of every tile in pixels.
    """
    tiles = [_tile(read_image(query_file, "RGB"), query_box, "query", None, height, "blue")]
    for rank, (f, b, s, rel) in enumerate(
        zip(result_files, result_boxes, result_scores, relevance)
    ):
        tiles.append(_tile(read_image(f, "RGB"), b, f"#{rank + 1} {s:.3f}", rel, height))
    gap = np.full((height + 2 * _BORDER, 4, 3), 255, dtype=np.uint8)
    parts = []
    for t in tiles:
        parts += [t, gap]
    return np.concatenate(parts[:-1], axis=1)


def write_gallery(
    out_dir: str,
    title: str,
    entries: List[dict],
) -> str:
    """Write each query's strip as a JPEG and an ``index.html`` linking them all.

    Args:
        out_dir: output folder (created).
        title: page title.
        entries: per query ``{"name": str, "strip": RGB array, "caption": str}``.

    Returns:
        path of index.html.
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for e in entries:
        fname = f"{e['name']}.jpg"
        cv2.imwrite(os.path.join(out_dir, fname), cv2.cvtColor(e["strip"], cv2.COLOR_RGB2BGR))
        rows.append(
            f"<h3>{html.escape(e['name'])}</h3><p>{html.escape(e.get('caption', ''))}</p>"
            f'<a href="{html.escape(fname)}"><img src="{html.escape(fname)}" '
            f'style="max-width:100%"></a>'
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "</head><body style='font-family:sans-serif'>"
        f"<h1>{html.escape(title)}</h1><p>Green border: relevant; red: not relevant; grey: no "
        "ground truth or junk. Boxes: where the object was located.</p>"
        + "\n".join(rows)
        + "</body></html>"
    )
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path
