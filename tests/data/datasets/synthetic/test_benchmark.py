"""Tests of the synthetic instance-search benchmark generator (tiny sizes only)."""

import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark

TINY = dict(num_instances=4, queries_per_instance=2, num_db=20, short_side=128)


def _all_files(root):
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


def _bbox_of(mask):
    """Pixel-edge XYXY box of a boolean mask, by brute force over rows and columns."""
    rows = [y for y in range(mask.shape[0]) if mask[y].any()]
    cols = [x for x in range(mask.shape[1]) if mask[:, x].any()]
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    summary = generate_synthetic_benchmark(root, seed=3, return_masks=True, **TINY)
    return root, summary


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_synthetic_benchmark(a, seed=7, **TINY)
    generate_synthetic_benchmark(b, seed=7, **TINY)
    generate_synthetic_benchmark(c, seed=8, **TINY)
    files = _all_files(a)
    assert files == _all_files(b) == _all_files(c)
    assert len(files) == 20 + 4 * 2 + 4  # images, queries, 2 json + README + meta
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    differing = [f for f in files if f.endswith(".jpg") and not filecmp.cmp(
        os.path.join(a, f), os.path.join(c, f), shallow=False)]  # fmt: skip
    assert len(differing) == 28  # every image depends on the seed


def test_counts_and_instances_have_their_own_streams(tmp_path):
    # The database plan and images draw from their own streams: a larger database changes
    # neither the instances nor their query views.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate_synthetic_benchmark(a, seed=4, **TINY)
    generate_synthetic_benchmark(b, seed=4, **dict(TINY, num_db=30))
    queries = sorted(os.listdir(os.path.join(a, "queries")))
    assert len(queries) == 8
    _, mismatch, errors = filecmp.cmpfiles(
        os.path.join(a, "queries"), os.path.join(b, "queries"), queries, shallow=False
    )
    assert mismatch == [] and errors == []
    assert filecmp.cmp(os.path.join(a, "queries.json"), os.path.join(b, "queries.json"), False)


def test_custom_format(tiny):
    root, _ = tiny
    with open(os.path.join(root, "queries.json")) as f:
        queries = json.load(f)
    with open(os.path.join(root, "relevance.json")) as f:
        relevance = json.load(f)
    db = {"images/" + n for n in os.listdir(os.path.join(root, "images"))}
    assert len(db) == 20 and all(n.startswith("images/db_") for n in db)
    assert sorted(relevance) == ["obj00", "obj01", "obj02", "obj03"]
    assert len(queries) == 8
    for q in queries:
        assert set(q) == {"image", "box", "object"}
        assert q["image"].startswith(f"queries/{q['object']}_") and q["image"] not in db
        assert os.path.isfile(os.path.join(root, q["image"]))
        _check_box(q["box"], os.path.join(root, q["image"]))
    assert sorted(q["image"] for q in queries) == sorted(
        f"queries/obj0{k}_{n}.jpg" for k in range(4) for n in (1, 2)
    )
    for name, rel in relevance.items():
        assert set(rel) == {"positives", "junk", "boxes"}
        assert len(rel["positives"]) >= 1
        assert not set(rel["positives"]) & set(rel["junk"])
        assert set(rel["positives"]) <= db and set(rel["junk"]) <= db
        assert set(rel["positives"]) <= set(rel["boxes"])
        for image, boxes in rel["boxes"].items():
            assert len(boxes) >= 1
            for box in boxes:
                _check_box(box, os.path.join(root, image))
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    assert meta["parameters"]["seed"] == 3 and meta["num_db"] == 20


def _check_box(box, image_path):
    w, h = Image.open(image_path).size
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_instances_balanced_and_junk_rules(tiny):
    root, summary = tiny
    with open(os.path.join(root, "relevance.json")) as f:
        relevance = json.load(f)
    planted = [len(r["positives"]) + len(r["junk"]) for r in relevance.values()]
    assert max(planted) - min(planted) <= 1
    # Each db image holds at most two instances (default mix 0 / 1 / 2).
    per_image = {}
    for rel in relevance.values():
        for image in rel["positives"] + rel["junk"]:
            per_image[image] = per_image.get(image, 0) + 1
    assert max(per_image.values()) <= 2
    for name, rel in relevance.items():
        for image in rel["positives"]:
            mask = summary["masks"][image][name]
            seen = mask & ~summary["hidden"][image][name]
            # Visible share of the in-image silhouette bounds the true visible share from above;
            # a positive must be at least 40% visible and not tiny (8% of the 128 px side).
            assert seen.sum() >= 0.4 * mask.sum()
            x1, y1, x2, y2 = rel["boxes"][image][0]
            assert np.sqrt((x2 - x1) * (y2 - y1)) >= 0.08 * 128


def test_boxes_are_mask_bounding_boxes(tiny):
    root, summary = tiny
    with open(os.path.join(root, "relevance.json")) as f:
        relevance = json.load(f)
    with open(os.path.join(root, "queries.json")) as f:
        queries = json.load(f)
    checked = 0
    for name, rel in relevance.items():
        for image, boxes in rel["boxes"].items():
            mask = summary["masks"][image][name]
            assert boxes[0] == _bbox_of(mask)
            x1, y1, x2, y2 = boxes[0]
            # A planar object seen at moderate perspective fills a good part of its box.
            assert mask.sum() >= 0.3 * (x2 - x1) * (y2 - y1)
            checked += 1
    for q in queries:
        assert q["box"] == _bbox_of(summary["masks"][q["image"]][q["object"]])
        checked += 1
    assert checked >= 8 + 4


def _hist(pixels):
    q = (pixels // 64).astype(np.int64)
    h = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(float)
    return np.sqrt(h / h.sum())


def test_positive_regions_look_like_their_query(tmp_path):
    # The visible object pixels of each positive are closer, in colour, to the same instance's
    # query views than to any other instance's query views, for most positives.
    root = str(tmp_path)
    s = generate_synthetic_benchmark(
        root, num_instances=4, queries_per_instance=3, num_db=40, short_side=128, seed=1,
        return_masks=True,
    )  # fmt: skip
    with open(os.path.join(root, "queries.json")) as f:
        queries = json.load(f)
    with open(os.path.join(root, "relevance.json")) as f:
        relevance = json.load(f)

    def region(image, name):
        pix = np.asarray(Image.open(os.path.join(root, image)).convert("RGB"))
        keep = s["masks"][image][name] & ~s["hidden"][image][name]
        return _hist(pix[keep])

    names = sorted(relevance)
    refs = {n: [region(q["image"], n) for q in queries if q["object"] == n] for n in names}
    hits = total = 0
    for name in names:
        for image in relevance[name]["positives"]:
            h = region(image, name)
            dist = {n: min(np.linalg.norm(h - r) for r in refs[n]) for n in names}
            hits += min(dist, key=dist.get) == name
            total += 1
    assert total >= 12
    assert hits / total >= 0.5  # chance is 0.25; seeds 0-7 give 0.65 to 0.92
