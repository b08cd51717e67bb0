"""Validation / report views of a collection grouped by camera (data.datasets.splits and its
command line, tools/real_photo_splits.py)."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from retrieval_ext.data.datasets import register_custom_dataset
from retrieval_ext.data.datasets.catalog import get_retrieval_metadata
from retrieval_ext.data.datasets.common import unregister_retrieval_dataset
from retrieval_ext.data.datasets.splits import make_view, parse_views
from tests.common import load_tool


def _collection(root):
    """Two objects, photos by cameras a, b and c; object y has no photo by camera c."""
    for cam, names in {"a": ["1", "2"], "b": ["1", "2"], "c": ["1"]}.items():
        os.makedirs(root / "images" / cam)
        for n in names:
            Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "images" / cam / f"{n}.jpg")
    os.makedirs(root / "queries")
    for obj in ("x", "y"):
        Image.new("RGB", (20, 20), (200, 0, 0)).save(root / "queries" / f"{obj}.jpg")
    queries = [{"image": f"queries/{o}.jpg", "box": [0, 0, 20, 20], "object": o} for o in "xy"]
    (root / "queries.json").write_text(json.dumps(queries))
    relevance = {
        "x": {
            "positives": ["images/a/1.jpg", "images/b/1.jpg", "images/c/1.jpg"],
            "junk": ["images/b/2.jpg"],
            "boxes": {"images/a/1.jpg": [[1, 2, 30, 25]], "images/c/1.jpg": [[0, 0, 5, 5]]},
        },
        "y": {"positives": ["images/a/2.jpg", "images/b/2.jpg"], "junk": []},
    }
    (root / "relevance.json").write_text(json.dumps(relevance))


def test_views_keep_only_their_cameras_judgements(tmp_path):
    root, out = tmp_path / "coll", tmp_path / "views"
    _collection(root)
    tool = load_tool("real_photo_splits")
    tool.main(["--root", str(root), "--output", str(out), "--view", "val=c", "--view", "rep=a,b"])

    val = json.loads((out / "val" / "relevance.json").read_text())
    assert val == {
        "x": {
            "positives": ["images/c/1.jpg"],
            "junk": [],
            "boxes": {"images/c/1.jpg": [[0, 0, 5, 5]]},
        },
        "y": {"positives": [], "junk": []},
    }
    rep = json.loads((out / "rep" / "relevance.json").read_text())
    assert rep["x"]["positives"] == ["images/a/1.jpg", "images/b/1.jpg"]
    assert rep["x"]["junk"] == ["images/b/2.jpg"]
    assert rep["x"]["boxes"] == {"images/a/1.jpg": [[1, 2, 30, 25]]}
    assert rep["y"]["positives"] == ["images/a/2.jpg", "images/b/2.jpg"]
    # nothing copied: images and queries are links into the collection
    assert os.path.islink(out / "rep" / "images" / "a")
    assert sorted(os.listdir(out / "rep" / "images")) == ["a", "b"]
    assert os.path.islink(out / "val" / "queries.json")

    # the view loads as a custom dataset: its database is the view's photos only
    register_custom_dataset("split_test_rep", str(out / "rep"))
    try:
        db = DatasetCatalog.get("split_test_rep_db")
        assert sorted(d["image_id"] for d in db) == [
            "images/a/1",
            "images/a/2",
            "images/b/1",
            "images/b/2",
        ]
        gnd = get_retrieval_metadata("split_test_rep").gnd
        ids = {d["image_id"]: d["db_index"] for d in db}
        assert gnd[0]["ok"] == sorted([ids["images/a/1"], ids["images/b/1"]])
    finally:
        unregister_retrieval_dataset("split_test_rep")


def test_a_view_of_every_group_with_other_judgements(tmp_path):
    """groups None: the whole database, the judgements kept whole, from another file if given."""
    root, out = tmp_path / "coll", tmp_path / "views"
    _collection(root)
    other = {"x": {"positives": ["images/c/1.jpg"], "junk": []}, "y": {"positives": []}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    counts = make_view(str(root), str(out / "all"), None, relevance=str(tmp_path / "other.json"))
    assert counts == {"images": 5, "positives": 1}
    assert json.loads((out / "all" / "relevance.json").read_text()) == other
    assert os.path.islink(out / "all" / "images")
    # a group view with the other judgements filters them
    counts = make_view(str(root), str(out / "a"), ["a"], relevance=str(tmp_path / "other.json"))
    assert counts == {"images": 2, "positives": 0}


def test_bad_requests_name_what_is_wrong(tmp_path):
    root, out = tmp_path / "coll", tmp_path / "views"
    _collection(root)
    with pytest.raises(ValueError, match="group 'a' is already in view 'v1'"):
        parse_views(["v1=a", "v2=a,b"])
    with pytest.raises(ValueError, match="NAME=GROUP"):
        parse_views(["novalue"])
    with pytest.raises(FileNotFoundError, match="images/z"):
        make_view(str(root), str(out / "v"), ["z"])
    make_view(str(root), str(out / "v"), ["a"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_view(str(root), str(out / "v"), ["a"])
    make_view(str(root), str(out / "v"), ["b"], overwrite=True)
    assert sorted(os.listdir(out / "v" / "images")) == ["b"]
    assert os.path.isdir(root / "images" / "a")  # the replaced view's links were not followed
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        make_view(str(root), str(out / "w"), ["a"], relevance=str(tmp_path / "bad.json"))
    os.remove(root / "relevance.json")
    with pytest.raises(FileNotFoundError, match="relevance.json"):
        make_view(str(root), str(out / "w"), ["a"])
