"""Multi-scale queries: the query box seen at several sizes relative to the test image size.

A clean query view (a cover scan, a catalogue photo) fills its image, so at the test size the
object spans most of the conv map, while in the database photos it is smaller: the cells that
describe it see another scale. Extracting the query at box-relative sizes ``f * MIN_SIZE_TEST``
(``RETRIEVAL.QUERY_SCALES``) and summing the L2-normalised vectors of every size describes the
object at the sizes it takes in the photos. Scaling the *box* (not the image) treats a landmark
query whose box is part of a photo like a scan filling its image.

Pure functions: :func:`query_resize_factors` (how much to resize the query image for each size)
and :func:`combine_query_records` (the per-size records into one).
"""

import math
from typing import List, Sequence, Tuple

import numpy as np

from .normalization import l2_normalize

__all__ = [
    "QUERY_VECTOR_FIELDS",
    "combine_query_records",
    "query_resize_factors",
    "resized_shape",
]

# The vectors of a query record (see extractor.outputs_to_query); "box" is not a vector.
QUERY_VECTOR_FIELDS = ("ipa_sum", "ipa_max", "crop_sum", "crop_max", "rpa_sum", "rpa_max")


def query_resize_factors(
    box: Sequence[float],
    image_size: Tuple[int, int],
    fractions: Sequence[float],
    min_size_test: int,
    max_size_test: int,
    min_side: int,
) -> List[float]:
    """Resize factor of the query image for each box size.

    For a fraction ``f`` the factor is ``s = f * min_size_test / sqrt(box_w * box_h)``, so that the
    resized box has the area of a square of side ``f * min_size_test``, then capped:

    - the resized image's longer side stays <= ``max_size_test`` (as the test resize caps the
      database images): a tiny box is not blown up into a huge image, it stays smaller;
    - its shorter side stays >= ``min_side`` (one cell of the coarsest feature map) so that the
      conv map is not empty; with both limits in conflict, the upper one wins.

    Args:
        box: (x1, y1, x2, y2) in the image's pixels, with positive width and height.
        image_size: (height, width) of the query image.
        fractions: the ``f`` values, each > 0.
        min_size_test, max_size_test: ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` (> 0).
        min_side: smallest shorter side of a resized image, in pixels.

    Returns:
        one factor per fraction, in order.
    """
    h, w = (int(v) for v in image_size)
    bw, bh = float(box[2]) - float(box[0]), float(box[3]) - float(box[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    if not (bw > 0 and bh > 0):
        raise ValueError(f"query box {list(box)} must have a positive width and height")
    if min_size_test <= 0 or max_size_test <= 0:
        raise ValueError(
            f"INPUT.MIN_SIZE_TEST and MAX_SIZE_TEST must be > 0, got {min_size_test}, "
            f"{max_size_test}"
        )
    upper = max_size_test / max(h, w)
    lower = min(min_side / min(h, w), upper)
    out = []
    for f in fractions:
        if not (f > 0 and math.isfinite(f)):
            raise ValueError(f"RETRIEVAL.QUERY_SCALES must hold positive numbers, got {f}")
        s = f * min_size_test / math.sqrt(bw * bh)
        out.append(float(min(max(s, lower), upper)))
    return out


def resized_shape(image_size: Tuple[int, int], factor: float) -> Tuple[int, int]:
    """(height, width) of an image of ``image_size`` resized by ``factor``, at least 1 x 1."""
    h, w = image_size
    return max(1, int(round(h * factor))), max(1, int(round(w * factor)))


def combine_query_records(records: Sequence[dict]) -> dict:
    """One query record from the records of the same query at several sizes.

    Args:
        records: query records (see ``extractor.outputs_to_query``) of one query box, >= 1.

    Returns:
        a record whose :data:`QUERY_VECTOR_FIELDS` are the sums of the per-size L2-normalised
        vectors (float32; the searcher normalises them as it does single-size vectors) and whose
        other entries (the box) are the first record's.
    """
    if not records:
        raise ValueError("combine_query_records needs at least one record")
    out = dict(records[0])
    for name in QUERY_VECTOR_FIELDS:
        vectors = [l2_normalize(np.asarray(r[name], dtype=np.float32)) for r in records]
        out[name] = np.sum(vectors, axis=0).astype(np.float32)
    return out
