"""Checks of query boxes, shared by the dataset loaders, the mapper, the pipeline and the API.

A query box is ``[x1, y1, x2, y2]`` (XYXY_ABS) in the pixels of the query image *as it is used*,
i.e. after its EXIF orientation has been applied. What happens to each kind of bad box:

==============================================  ===============================================
box                                             behaviour
==============================================  ===============================================
not 4 numbers, NaN / inf, a bool               :class:`InvalidBoxError`
reversed corners (x2 < x1 or y2 < y1)          :class:`InvalidBoxError` (never silently swapped)
zero or negative width / height                :class:`InvalidBoxError`
entirely outside the image                     :class:`InvalidBoxError`
partly outside the image                       clamped to the image (a warning if more than
                                               one pixel is cut: the box may be in another
                                               frame, e.g. the image before EXIF rotation)
smaller than one feature-map cell              kept; the query region pools the cells it
                                               touches, at least one (a warning names the
                                               query and the box)
==============================================  ===============================================

Every error message names the query and the box.
"""

import logging
import math
from typing import List, Sequence, Tuple

__all__ = ["InvalidBoxError", "as_box", "validate_box", "box_size_in_cells", "warn_if_below_cell"]

logger = logging.getLogger("retrieval_ext")

# Clamping that cuts more than this many pixels off a box is reported.
_CLAMP_WARN_PX = 1.0


class InvalidBoxError(ValueError):
    """A box that cannot describe a region of its image.

    Attributes:
        where (str): the query (or file and line) the box belongs to.
        box: the box as given.
    """

    def __init__(self, where: str, box, problem: str):
        self.where = where
        self.box = box
        super().__init__(f"{where}: box {box!r} {problem}")

    def __reduce__(self):
        # rebuild from the message: DataLoader workers pickle exceptions between processes
        return ValueError, (str(self),)


def as_box(box, where: str = "query") -> List[float]:
    """Checks that ``box`` is 4 finite numbers with x2 > x1 and y2 > y1.

    Args:
        box: a sequence of 4 numbers (numeric strings, as read from CSV files, are accepted).
        where: names the box's owner in the error message.

    Returns:
        list[float]: ``[x1, y1, x2, y2]``.

    Raises:
        InvalidBoxError: not 4 numbers, non-finite, reversed corners or zero area.
    """
    try:
        if isinstance(box, (str, bytes)) or len(box) != 4:
            raise TypeError
        if any(isinstance(v, bool) for v in box):
            raise TypeError
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise InvalidBoxError(where, box, "is not 4 numbers (x1, y1, x2, y2)") from None
    if not all(math.isfinite(v) for v in values):
        raise InvalidBoxError(where, box, "has a non-finite coordinate")
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        raise InvalidBoxError(
            where, box, "has reversed corners (needs x2 > x1 and y2 > y1, XYXY order)"
        )
    if x2 == x1 or y2 == y1:
        raise InvalidBoxError(where, box, "has zero area (needs x2 > x1 and y2 > y1)")
    return values


def validate_box(box, image_size: Tuple[int, int], where: str = "query") -> List[float]:
    """Checks a query box against its image; returns it clamped to the image.

    Args:
        box: ``(x1, y1, x2, y2)`` in the image's pixels (EXIF-oriented frame).
        image_size: ``(height, width)`` of the image in that frame.
        where: names the query in messages.

    Returns:
        list[float]: the box clamped to ``[0, width] x [0, height]``.

    Raises:
        InvalidBoxError: see :func:`as_box`, or the box lies entirely outside the image.
    """
    x1, y1, x2, y2 = as_box(box, where)
    h, w = float(image_size[0]), float(image_size[1])
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, w), min(y2, h)
    if cx2 <= cx1 or cy2 <= cy1:
        raise InvalidBoxError(where, box, f"lies outside the {w:g} x {h:g} (width x height) image")
    cut = max(cx1 - x1, cy1 - y1, x2 - cx2, y2 - cy2)
    if cut > _CLAMP_WARN_PX:
        logger.warning(
            f"{where}: box {[x1, y1, x2, y2]} reaches {cut:g} px outside the {w:g} x {h:g} "
            f"image; clamped to {[cx1, cy1, cx2, cy2]} (is it in the frame of the image as "
            "displayed, after EXIF rotation?)"
        )
    return [cx1, cy1, cx2, cy2]


def box_size_in_cells(box: Sequence[float], scale: Tuple[float, float], stride: int):
    """Width and height of a box in feature-map cells.

    Args:
        box: ``(x1, y1, x2, y2)`` in original-image pixels.
        scale: ``(sy, sx)``, network-input pixels per original pixel.
        stride: the feature map's stride in network-input pixels.

    Returns:
        (float, float): ``(width, height)`` in cells.
    """
    sy, sx = scale
    return (box[2] - box[0]) * sx / stride, (box[3] - box[1]) * sy / stride


def warn_if_below_cell(
    box: Sequence[float], scale: Tuple[float, float], stride: int, where: str = "query"
) -> bool:
    """Warns when a box is narrower or shorter than one feature-map cell.

    Such a box is not an error: the query region descriptor then pools the cells the box touches,
    at least one (see ``modeling.pooling.box_to_cells``), which also cover its surroundings.

    Args:
        box, scale, stride: see :func:`box_size_in_cells`.
        where: names the query in the message.

    Returns:
        bool: True if the box covers less than one cell in width or height.
    """
    cw, ch = box_size_in_cells(box, scale, stride)
    if cw >= 1.0 and ch >= 1.0:
        return False
    px_w, px_h = stride / scale[1], stride / scale[0]
    logger.warning(
        f"{where}: box {[float(v) for v in box]} is smaller than one feature-map cell "
        f"({px_w:.1f} x {px_h:.1f} px of this image); its region descriptor pools the cells it "
        "touches, so it also describes the box's surroundings"
    )
    return True
