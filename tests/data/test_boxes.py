"""Bad query boxes: a clear error naming the query and the box, or the documented clamp.

Covers the shared check (retrieval_ext.data.boxes) and the dataset loaders (load time); the
query extraction's check against the real image size is in tests/retrieval/test_queries.py,
the Python API's in tests/retrieval/test_api.py.
"""

import numpy as np
import pytest

from retrieval_ext.data.boxes import (
    InvalidBoxError,
    as_box,
    box_size_in_cells,
    validate_box,
    warn_if_below_cell,
)
from retrieval_ext.data.datasets import load_custom
from tests.common import pattern_image, write_collection

# (box, words the message must hold) for a 40 wide x 30 high image
BAD_BOXES = [
    ([50, 5, 60, 20], "outside"),  # right of the image
    ([-20, -20, -5, -1], "outside"),  # above-left
    ([40, 0, 45, 30], "outside"),  # touches the right edge only: no pixel inside
    ([10, 10, 10, 20], "zero area"),
    ([10, 10, 20, 10], "zero area"),
    ([20, 10, 10, 20], "reversed corners"),  # x2 < x1: a negative width
    ([10, 20, 20, 10], "reversed corners"),
    ([1, 2, 3], "not 4 numbers"),
    ([1, 2, 3, 4, 5], "not 4 numbers"),
    (["a", 2, 3, 4], "not 4 numbers"),
    ([None, 2, 3, 4], "not 4 numbers"),
    ([[1, 2, 3, 4]], "not 4 numbers"),
    ([True, 2, 3, 4], "not 4 numbers"),
    ("1 2 3 4", "not 4 numbers"),
    (None, "not 4 numbers"),
    ([float("nan"), 2, 3, 4], "non-finite"),
    ([1, 2, float("inf"), 4], "non-finite"),
]


@pytest.mark.parametrize("box,words", BAD_BOXES)
def test_bad_boxes_raise_naming_query_and_box(box, words):
    with pytest.raises(InvalidBoxError) as e:
        validate_box(box, (30, 40), where="query 'q7' (q7.jpg)")
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert msg.startswith("query 'q7' (q7.jpg): box ") and repr(box) in msg and words in msg


def test_clamp_and_accepted_forms(logs):
    # partly outside: clamped to [0, 40] x [0, 30]; cut 10 px -> a warning naming the query
    assert validate_box([-10, 5, 30, 35], (30, 40), "query 'q'") == [0.0, 5.0, 30.0, 30.0]
    assert any("query 'q'" in w and "clamped" in w for w in logs.warnings())
    # half a pixel outside (rounded annotations): clamped silently
    n = len(logs.warnings())
    assert validate_box([0.5, -0.5, 40.5, 29], (30, 40), "q") == [0.5, 0.0, 40.0, 29.0]
    assert len(logs.warnings()) == n
    # numeric strings (CSV files), numpy arrays and tuples are boxes
    assert as_box(["1", "2.5", "3", "4"]) == [1.0, 2.5, 3.0, 4.0]
    assert as_box(np.array([1, 2, 3, 4], np.float32)) == [1.0, 2.0, 3.0, 4.0]
    assert validate_box((0, 0, 40, 30), (30, 40)) == [0.0, 0.0, 40.0, 30.0]


def test_box_below_one_feature_cell_is_kept_with_a_warning(logs):
    # input 2x the original, stride 16: one cell is 8 original pixels
    assert box_size_in_cells([0, 0, 8, 4], (2.0, 2.0), 16) == (1.0, 0.5)
    assert warn_if_below_cell([0, 0, 8, 4], (2.0, 2.0), 16, "query 'tiny'")
    (w,) = logs.warnings()
    assert "query 'tiny'" in w and "[0.0, 0.0, 8.0, 4.0]" in w and "8.0 x 8.0 px" in w
    assert not warn_if_below_cell([0, 0, 8, 8], (2.0, 2.0), 16, "q")


def test_loader_rejects_malformed_boxes_at_load_time(tmp_path):
    img = pattern_image(30, 40, 0)
    root = write_collection(
        tmp_path / "c", {"images/a.png": img}, [("images/a.png", [5, 5, 2, 20], "obj")]
    )
    with pytest.raises(
        ValueError, match=r"queries\.json, entry 0: box \[5, 5, 2, 20\] has reversed"
    ):
        load_custom(str(root))
