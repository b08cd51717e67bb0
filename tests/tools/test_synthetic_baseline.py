"""tools/synthetic_baseline.py on a hand-made custom-format collection of flat colours."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.common import load_tool

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _tool():
    return load_tool("synthetic_baseline")


def _flat(path, colour, size=(40, 40)):
    Image.fromarray(np.full((*size, 3), colour, np.uint8)).save(path)


def _query(path, square_colour):
    """A 40x40 green image with a 20x20 square of ``square_colour`` at x, y in [10, 30)."""
    img = np.full((40, 40, 3), GREEN, np.uint8)
    img[10:30, 10:30] = square_colour
    Image.fromarray(img).save(path)
    return [10, 10, 30, 30]


@pytest.fixture
def flat_collection(tmp_path):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "queries").mkdir()
    for name, colour in (("a", RED), ("b", GREEN), ("c", BLUE), ("d", RED)):
        _flat(root / "images" / f"{name}.png", colour)
    queries = [
        {"image": "queries/red.png", "box": _query(root / "queries/red.png", RED), "object": "r"},
        {
            "image": "queries/blue.png",
            "box": _query(root / "queries/blue.png", BLUE),
            "object": "u",
        },
    ]
    relevance = {
        "r": {"positives": ["images/a.png", "images/d.png"], "junk": []},
        "u": {"positives": ["images/c.png"], "junk": ["images/b.png"]},
    }
    (root / "queries.json").write_text(json.dumps(queries))
    (root / "relevance.json").write_text(json.dumps(relevance))
    return str(root)


def test_colour_histogram_map_hand_worked(flat_collection):
    # The histogram is square-rooted and L2-normalised, so a query that is 1/4 red and 3/4 green
    # has cosine sqrt(1/4) = 0.5 with a red image, sqrt(3/4) with a green one, 0 with a blue one.
    # Red query, whole: b (green), a, d (red, stable order), c: positives at junk-free ranks 2, 3
    # of 2: AP = (1/2 * (0 + 1/2) + 1/2 * (1/2 + 2/3)) / 2 = 5/12.
    # Blue query, whole: b (junk, skipped), c first: AP 1. Cropped to the box, both are flat
    # colours whose positives come first: AP 1.
    results = _tool().measure(flat_collection, use_cnn=False)
    assert results["colour_hist"]["whole"] == pytest.approx((5 / 12 + 1) / 2)
    assert results["colour_hist"]["crop"] == pytest.approx(1.0)
    assert 0 < results["random"]["whole"] < 1


def test_missing_relevance_is_an_error(flat_collection):
    os.remove(os.path.join(flat_collection, "relevance.json"))
    with pytest.raises(ValueError, match="relevance.json"):
        _tool().measure(flat_collection, use_cnn=False)
