"""tools/annotate_boxes.py on a tiny collection: a textured reference on white paper, one photo
holding it (pasted by a known homography), one without it."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from retrieval_ext.data.boxes import InvalidBoxError
from retrieval_ext.data.datasets.custom import load_custom
from retrieval_ext.data.mapper import UnreadableImageError
from retrieval_ext.evaluation.evaluator import evaluate_stages
from retrieval_ext.retrieval.stages import StageResult
from tests.common import KNOWN_H, REPO_ROOT, load_tool, projected_box, textured, warp_into

REF_W, REF_H = 90, 120
PAD_X, PAD_Y = 20, 15  # white paper around the reference in the query image

annotate_boxes = load_tool("annotate_boxes")


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    (root / "images").mkdir()
    (root / "queries").mkdir()
    reference = textured(REF_H, REF_W, seed=1)
    paper = np.full((REF_H + 2 * PAD_Y, REF_W + 2 * PAD_X, 3), 255, np.uint8)
    paper[PAD_Y : PAD_Y + REF_H, PAD_X : PAD_X + REF_W] = reference
    cv2.imwrite(str(root / "queries" / "ref.png"), paper)
    clutter = textured(240, 320, seed=2, blobs=120)
    cv2.imwrite(str(root / "images" / "a.png"), warp_into(reference, clutter, KNOWN_H))
    cv2.imwrite(str(root / "images" / "b.png"), textured(240, 320, seed=3, blobs=120))
    cv2.imwrite(str(root / "images" / "c.png"), textured(240, 320, seed=4, blobs=120))
    _write_json(
        root / "queries.json",
        [
            {
                "image": "queries/ref.png",
                "box": [0, 0, paper.shape[1], paper.shape[0]],
                "object": "obj1",
            }
        ],
    )
    _write_json(
        root / "relevance.json",
        {"obj1": {"positives": ["images/a.png", "images/b.png"], "junk": ["images/c.png"]}},
    )
    return root


def _run(root, out_dir, *extra):
    output = out_dir / "boxes.json"
    report = annotate_boxes.main(
        ["--data", str(root), "--output", str(output), "--sheet-dir", str(out_dir / "sheets")]
        + list(extra)
    )
    with open(output) as f:
        return json.load(f), report


def _with_relevance(root, relevance_file, dest):
    """A copy of the collection whose relevance.json is ``relevance_file`` (images linked)."""
    dest.mkdir()
    for name in ("images", "queries"):
        os.symlink(root / name, dest / name)
    shutil.copy(root / "queries.json", dest / "queries.json")
    shutil.copy(relevance_file, dest / "relevance.json")
    return dest


def test_boxes_of_the_trimmed_reference(collection, tmp_path):
    before = (collection / "relevance.json").read_bytes()
    out, report = _run(collection, tmp_path, "--trim-border")
    expected, _ = projected_box(KNOWN_H, REF_W, REF_H)
    assert out["obj1"]["positives"] == ["images/a.png", "images/b.png"]
    assert out["obj1"]["junk"] == ["images/c.png"]
    assert list(out["obj1"]["boxes"]) == ["images/a.png"]
    np.testing.assert_allclose(out["obj1"]["boxes"]["images/a.png"], [expected], atol=2.0)
    status = {r["image"]: r["status"] for r in report["images"]}
    assert status == {"images/a.png": "accepted", "images/b.png": "no_box"}
    no_box = next(r for r in report["images"] if r["image"] == "images/b.png")
    assert no_box["reason"] and "box" not in no_box
    assert report["images"][0]["reference_box"] == [PAD_X, PAD_Y, PAD_X + REF_W, PAD_Y + REF_H]
    assert (collection / "relevance.json").read_bytes() == before
    sheet = cv2.imread(str(tmp_path / "sheets" / "sheet_000.png"))
    refs = cv2.imread(str(tmp_path / "sheets" / "references_000.png"))
    assert sheet is not None and refs is not None
    with open(tmp_path / "boxes_report.json") as f:
        assert json.load(f)["summary"]["by_status"] == {"accepted": 1, "no_box": 1}


def test_untrimmed_reference_box_includes_the_paper(collection, tmp_path):
    out, _ = _run(collection, tmp_path, "--no-second-pass")
    # the query box covers the paper too: its projection, by hand, clipped to the 320 x 240 photo
    padded, _ = projected_box(
        KNOWN_H @ np.array([[1, 0, -PAD_X], [0, 1, -PAD_Y], [0, 0, 1]]),
        REF_W + 2 * PAD_X,
        REF_H + 2 * PAD_Y,
    )
    clipped = [max(padded[0], 0), max(padded[1], 0), min(padded[2], 320), min(padded[3], 240)]
    np.testing.assert_allclose(out["obj1"]["boxes"]["images/a.png"], [clipped], atol=2.0)


def test_output_loads_and_evaluation_scores_localisation(collection, tmp_path):
    out, _ = _run(collection, tmp_path, "--trim-border")
    root = _with_relevance(collection, tmp_path / "boxes.json", tmp_path / "copy")
    data = load_custom(str(root))
    assert [d["image_id"] for d in data.db] == ["images/a", "images/b", "images/c"]
    gnd = data.metadata["gnd"][0]
    assert gnd["ok"] == [0, 1] and gnd["junk"] == [2]
    assert list(gnd["boxes"]) == [0]
    expected, _ = projected_box(KNOWN_H, REF_W, REF_H)
    x1, y1, x2, y2 = expected
    shifted = [x1 + (x2 - x1) / 2, y1, x2 + (x2 - x1) / 2, y2]  # IoU 1/3 with the true box
    metadata = SimpleNamespace(name="copy", **data.metadata)
    for located, iou in ((expected, 1.0), (shifted, 1 / 3)):
        boxes = np.array([located, [np.nan] * 4, [np.nan] * 4], dtype=np.float32)
        result = StageResult(np.arange(3), np.ones(3, np.float32), boxes, 0.0, top_n=3)
        scores = evaluate_stages({"s": [result]}, metadata, np.arange(3))["s"]
        assert scores["mean_iou"] == pytest.approx(iou, abs=0.03)


def test_review_file_replaces_boxes_with_reasons(collection, tmp_path):
    review = tmp_path / "review.json"
    ref_box = [PAD_X + 10, PAD_Y, PAD_X + REF_W, PAD_Y + REF_H]  # drop the reference's left 10 px
    _write_json(
        review,
        {
            "references": [{"query": "queries/ref.png", "box": ref_box, "reason": "spine"}],
            "photos": [
                {
                    "object": "obj1",
                    "image": "images/b.png",
                    "box": [5, 6, 50, 60],
                    "reason": "seen by eye",
                }
            ],
        },
    )
    out, report = _run(collection, tmp_path, "--review", str(review))
    recs = {r["image"]: r for r in report["images"]}
    assert recs["images/a.png"]["reference_box"] == ref_box
    assert recs["images/a.png"]["reference_review"] == "spine"
    expected, _ = projected_box(
        KNOWN_H @ np.array([[1, 0, 10], [0, 1, 0], [0, 0, 1]]), REF_W - 10, REF_H
    )
    np.testing.assert_allclose(out["obj1"]["boxes"]["images/a.png"], [expected], atol=2.0)
    assert out["obj1"]["boxes"]["images/b.png"] == [[5, 6, 50, 60]]
    assert recs["images/b.png"]["status"] == "review_box"
    assert report["summary"]["reference_reviewed"] == 1
    # null removes a box found automatically
    _write_json(
        review,
        {"photos": [{"object": "obj1", "image": "images/a.png", "box": None, "reason": "wrong"}]},
    )
    out, report = _run(collection, tmp_path, "--review", str(review))
    assert out["obj1"]["boxes"] == {}
    assert report["images"][0]["status"] == "review_no_box"


@pytest.mark.parametrize(
    "review, message",
    [
        (
            {
                "photos": [
                    {
                        "object": "obj1",
                        "image": "images/b.png",
                        "box": [0, 0, 400, 10],
                        "reason": "r",
                    }
                ]
            },
            "photos[0]",
        ),
        (
            {"photos": [{"object": "obj1", "image": "images/c.png", "box": None, "reason": "r"}]},
            "not a positive",
        ),
        (
            {"photos": [{"object": "obj1", "image": "images/b.png", "box": None, "reason": " "}]},
            "reason",
        ),
        (
            {"references": [{"query": "queries/none.png", "box": [0, 0, 5, 5], "reason": "r"}]},
            "queries/none.png",
        ),
        (
            {"references": [{"query": "queries/ref.png", "box": [0, 0, 500, 5], "reason": "r"}]},
            "queries/ref.png",
        ),
    ],
)
def test_bad_review_entries_are_named(collection, tmp_path, review, message):
    path = tmp_path / "review.json"
    _write_json(path, review)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _run(collection, tmp_path, "--review", str(path))
    assert not (tmp_path / "boxes.json").exists()


def test_refuses_to_overwrite_the_input(collection):
    with pytest.raises(SystemExit, match="--overwrite-input"):
        annotate_boxes.main(
            ["--data", str(collection), "--output", str(collection / "relevance.json")]
        )


def _broken_copy(collection, dest):
    shutil.copytree(collection, dest)
    return dest


def test_missing_positive_is_named(collection, tmp_path):
    root = _broken_copy(collection, tmp_path / "c")
    _write_json(root / "relevance.json", {"obj1": {"positives": ["images/gone.png"]}})
    with pytest.raises(FileNotFoundError, match="images/gone.png"):
        _run(root, tmp_path)


def test_unreadable_photo_is_named(collection, tmp_path):
    root = _broken_copy(collection, tmp_path / "c")
    (root / "images" / "b.png").write_bytes(b"not an image")
    with pytest.raises(UnreadableImageError, match="b.png"):
        _run(root, tmp_path)


def test_query_box_outside_its_image_is_named(collection, tmp_path):
    root = _broken_copy(collection, tmp_path / "c")
    _write_json(
        root / "queries.json",
        [{"image": "queries/ref.png", "box": [500, 500, 600, 600], "object": "obj1"}],
    )
    with pytest.raises(InvalidBoxError, match="queries/ref.png"):
        _run(root, tmp_path)


def test_command_line(collection, tmp_path):
    output = tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "annotate_boxes.py"),
            "--data",
            str(collection),
            "--output",
            str(output),
            "--trim-border",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "accepted" in done.stdout
    assert list(json.loads(output.read_text())["obj1"]["boxes"]) == ["images/a.png"]
