"""tools/real_photo_splits.py: validation / report views of a collection grouped by camera."""

import importlib.util
import json
import os

import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from retrieval_ext.data.datasets import register_custom_dataset
from retrieval_ext.data.datasets.catalog import get_retrieval_metadata
from retrieval_ext.data.datasets.common import unregister_retrieval_dataset
from tests.common import REPO_ROOT


def _tool():
    spec = importlib.util.spec_from_file_location(
        "real_photo_splits", REPO_ROOT / "tools" / "real_photo_splits.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    tool = _tool()
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


def test_bad_requests_name_what_is_wrong(tmp_path):
    root, out = tmp_path / "coll", tmp_path / "views"
    _collection(root)
    tool = _tool()
    with pytest.raises(ValueError, match="group 'a' is already in view 'v1'"):
        tool.parse_views(["v1=a", "v2=a,b"])
    with pytest.raises(ValueError, match="NAME=GROUP"):
        tool.parse_views(["novalue"])
    with pytest.raises(FileNotFoundError, match="images/z"):
        tool.make_view(str(root), str(out / "v"), ["z"])
    tool.make_view(str(root), str(out / "v"), ["a"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        tool.make_view(str(root), str(out / "v"), ["a"])
    tool.make_view(str(root), str(out / "v"), ["b"], overwrite=True)
    assert sorted(os.listdir(out / "v" / "images")) == ["b"]
    assert os.path.isdir(root / "images" / "a")  # the replaced view's links were not followed
    os.remove(root / "relevance.json")
    with pytest.raises(FileNotFoundError, match="relevance.json"):
        tool.make_view(str(root), str(out / "w"), ["a"])
