"""Collection-level steps of the box annotation: passes, review file, relevance output."""

import json

import cv2
import pytest

from retrieval_ext.data.box_annotation import (
    STATUS_NONE,
    Review,
    annotate_photo,
    annotated_relevance,
    load_review,
    summarise,
)
from retrieval_ext.data.reference_boxes import MatchParams, detect_and_describe
from tests.common import KNOWN_H, textured, warp_into


@pytest.fixture(scope="module")
def photo_and_reference(tmp_path_factory):
    reference = textured(120, 90, seed=1)
    photo = warp_into(reference, textured(240, 320, seed=2, blobs=120), KNOWN_H)
    path = tmp_path_factory.mktemp("photo") / "p.png"
    cv2.imwrite(str(path), photo)
    ref = {"features": detect_and_describe(reference), "local_box": [0, 0, 90, 120]}
    return str(path), ref


def test_a_later_pass_takes_over_when_the_first_rejects(photo_and_reference):
    path, ref = photo_and_reference
    impossible = MatchParams(min_inliers=10**6)
    status, got, loc = annotate_photo(
        path, [ref], [("first", impossible, 1.0), ("second", MatchParams(), 2.0)]
    )
    assert status == "second" and got is ref and loc.accepted


def test_no_pass_accepts(photo_and_reference):
    path, ref = photo_and_reference
    impossible = MatchParams(min_inliers=10**6)
    status, got, loc = annotate_photo(path, [ref], [("a", impossible, 1.0), ("b", impossible, 2.0)])
    assert status == STATUS_NONE and not loc.accepted
    assert "too few inliers" in loc.reason


def test_the_reference_with_most_inliers_wins(photo_and_reference):
    path, ref = photo_and_reference
    other = {
        "features": detect_and_describe(textured(120, 90, seed=9)),
        "local_box": [0, 0, 90, 120],
    }
    status, got, _ = annotate_photo(path, [other, ref], [("only", MatchParams(), 1.0)])
    assert status == "only" and got is ref


def test_annotated_relevance_keeps_judgements_and_fills_boxes():
    relevance = {
        "o1": {"positives": ["images/a.jpg", "images/b.jpg"], "junk": ["images/j.jpg"]},
        "o2": {"positives": ["images/c.jpg"], "boxes": {"images/c.jpg": [[1, 2, 3, 4]]}},
    }
    records = [
        {"object": "o1", "image": "images/a.jpg", "status": "accepted", "box": [1.5, 2, 30, 40]},
        {"object": "o1", "image": "images/b.jpg", "status": "no_box"},
        {"object": "o2", "image": "images/c.jpg", "status": "given", "boxes": [[1, 2, 3, 4]]},
    ]
    out = annotated_relevance(relevance, records)
    assert out == {
        "o1": {
            "positives": ["images/a.jpg", "images/b.jpg"],
            "junk": ["images/j.jpg"],
            "boxes": {"images/a.jpg": [[1.5, 2, 30, 40]]},
        },
        "o2": {"positives": ["images/c.jpg"], "boxes": {"images/c.jpg": [[1, 2, 3, 4]]}},
    }
    assert "boxes" not in relevance["o1"]  # the input is not modified
    summary = summarise(records)
    assert summary["by_status"] == {"accepted": 1, "no_box": 1, "given": 1}


def test_load_review(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "references": [
                    {"query": "queries/q.jpg", "box": [1, 2, 30, 40], "reason": "spine"}
                ],
                "photos": [
                    {"object": "o", "image": "images/a.jpg", "box": None, "reason": "wrong cover"}
                ],
            }
        )
    )
    review = load_review(str(path))
    assert review.references == {"queries/q.jpg": ([1.0, 2.0, 30.0, 40.0], "spine")}
    assert review.photos[0]["box"] is None and review.photos[0]["reason"] == "wrong cover"
    assert isinstance(Review(), Review)


@pytest.mark.parametrize(
    "content, message",
    [
        ([], "expected"),
        ({"photo": []}, "expected"),
        ({"references": [{"query": "q", "box": [3, 0, 1, 5], "reason": "r"}]}, r"references\[0\]"),
        ({"references": [{"query": "q", "box": [0, 0, 1, 5]}]}, "reason"),
        ({"photos": [{"object": "o", "image": "i", "reason": "r"}]}, r"photos\[0\]"),
    ],
)
def test_bad_review_file(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_review(str(path))
