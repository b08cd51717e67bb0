"""Bad query boxes: a clear error naming the query and the box, or the documented clamp.

Covers the shared check (retrieval_ext.data.boxes), the dataset loaders (load time), the
pipeline's query extraction (against the real image size) and the Python API.
"""

import math

import numpy as np
import pytest
from PIL import Image

from retrieval_ext.data.boxes import (
    InvalidBoxError,
    as_box,
    box_size_in_cells,
    validate_box,
    warn_if_below_cell,
)
from retrieval_ext.data.datasets import load_custom
from retrieval_ext.retrieval.queries import extract_queries

from .conftest import make_extractor, pattern_image, register, write_collection

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


def test_extract_queries_checks_boxes_against_the_image(zf, tmp_path, registered, logs):
    img = pattern_image(30, 40, 0)
    extractor = make_extractor(zf)

    # well-formed at load time, but outside the 40 x 30 image: refused when extracted
    root = write_collection(
        tmp_path / "out", {"images/a.png": img}, [("images/a.png", [45, 5, 60, 20], "obj")]
    )
    name = register(registered, "rel_box_out", root)
    with pytest.raises(InvalidBoxError) as e:
        extract_queries(extractor, name)
    assert "query 'images/a'" in str(e.value) and "[45.0, 5.0, 60.0, 20.0]" in str(e.value)
    assert "outside the 40 x 30" in str(e.value)

    # partly outside: the record's box is the clamped box; a sub-cell box: kept, warned, finite
    root = write_collection(
        tmp_path / "ok",
        {"images/a.png": img, "images/b.png": img},
        [("images/a.png", [20, 10, 55, 44], "obj"), ("images/b.png", [3, 3, 4, 4], "obj")],
    )
    name = register(registered, "rel_box_ok", root)
    clamped, tiny = extract_queries(extractor, name)
    np.testing.assert_array_equal(clamped["box"], [20, 10, 40, 30])
    # ZF-tiny resizes 40 x 30 to 171 x 128 (shorter side 128, 40 * 128 / 30 = 170.7 rounded);
    # stride 16, so a cell is 16 * 40 / 171 = 3.74 by 16 * 30 / 128 = 3.75 original pixels
    cell = f"{16 * 40 / 171:.1f} x {16 * 30 / 128:.1f} px"
    assert any("query 'images/b'" in w and cell in w for w in logs.warnings())
    for rec in (clamped, tiny):
        for k in ("crop_sum", "crop_max", "rpa_sum", "rpa_max", "ipa_sum"):
            assert np.all(np.isfinite(rec[k])) and np.linalg.norm(rec[k]) > 0, k


def test_api_validates_boxes(search_engine):
    engine, queries = search_engine["engine"], search_engine["queries"]
    image = queries[0]["file_name"]
    w, h = Image.open(image).size
    bad = [
        ([w + 1, 5, w + 20, 20], "outside"),
        ([5, -30, 20, -1], "outside"),
        ([10, 10, 10, 20], "zero area"),
        ([20, 10, 10, 20], "reversed corners"),
        (["x", 1, 2, 3], "not 4 numbers"),
        ([1, 2, float("nan"), 4], "non-finite"),
    ]
    for box, words in bad:
        with pytest.raises(InvalidBoxError) as e:
            engine.query(image, box, stage="ca_sr", top_k=3)
        assert image in str(e.value) and words in str(e.value)
    # an array query (in INPUT.FORMAT order) is checked against the array's size
    arr = np.zeros((30, 40, 3), np.uint8)
    with pytest.raises(InvalidBoxError, match=r"query \(array\): box \[0, 0, 41, 0\]"):
        engine.query(arr, [0, 0, 41, 0])
    hits = engine.query(arr, [-5, -5, 10, 10], stage="ca_sr", top_k=2)
    assert len(hits) == 2 and all(math.isfinite(h.score) for h in hits)
    with pytest.raises(ValueError, match="top_k"):
        engine.query(image, queries[0]["query_box"], top_k=-1)
