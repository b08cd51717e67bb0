"""Tests of the generic detection set generator (tiny sizes only)."""

import json
import os

import pytest
from PIL import Image

from retrieval_ext.data.datasets.synthetic import (
    GENERIC_CATEGORIES,
    generate_generic_detection_set,
    generate_synthetic_benchmark,
)


def test_generic_detection_set_is_coco_and_disjoint(tmp_path):
    from pycocotools.coco import COCO

    root = str(tmp_path / "generic")
    summary = generate_generic_detection_set(root, num_train=6, num_val=2, short_side=96, seed=0)
    docs = {}
    for split in ("annotations", "train", "val"):
        with open(os.path.join(root, f"{split}.json")) as f:
            docs[split] = json.load(f)
    all_doc = docs["annotations"]
    assert [im["id"] for im in docs["train"]["images"]] + [
        im["id"] for im in docs["val"]["images"]
    ] == [im["id"] for im in all_doc["images"]]
    assert len(docs["train"]["images"]) == 6 and len(docs["val"]["images"]) == 2
    names = [c["name"] for c in all_doc["categories"]]
    assert names == list(GENERIC_CATEGORIES)
    assert len({c["id"] for c in all_doc["categories"]}) == len(names)
    bench_root = str(tmp_path / "bench")
    bench = generate_synthetic_benchmark(
        bench_root, num_instances=4, queries_per_instance=2, num_db=20, short_side=128, seed=0
    )
    assert not set(names) & set(bench["objects"])
    assert not {n.split("_")[0] for n in bench["objects"]} & {n.split("_")[0] for n in names}

    coco = COCO(os.path.join(root, "annotations.json"))
    assert len(coco.getAnnIds()) == summary["num_annotations"] >= 8
    for ann in all_doc["annotations"]:
        im = coco.imgs[ann["image_id"]]
        w, h = Image.open(os.path.join(root, "images", im["file_name"])).size
        assert (w, h) == (im["width"], im["height"])
        x, y, bw, bh = ann["bbox"]
        assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
        assert ann["area"] == pytest.approx(bw * bh)
        assert ann["category_id"] in coco.cats

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    name = "synthetic_generic_test_tmp"
    register_coco_instances(
        name, {}, os.path.join(root, "train.json"), os.path.join(root, "images")
    )
    try:
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 6
        assert MetadataCatalog.get(name).thing_classes == list(GENERIC_CATEGORIES)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_annotation_ids_and_category_subset(tmp_path):
    root = str(tmp_path / "generic")
    cats = ("ring", "star")
    summary = generate_generic_detection_set(
        root, num_train=3, num_val=1, short_side=96, seed=2, categories=cats
    )
    with open(os.path.join(root, "annotations.json")) as f:
        doc = json.load(f)
    assert [c["name"] for c in doc["categories"]] == list(cats)
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
    counted = {c: sum(a["category_id"] == i + 1 for a in doc["annotations"]) for i, c in
               enumerate(cats)}  # fmt: skip
    assert summary["per_category"] == counted
    assert sum(counted.values()) == len(doc["annotations"]) == summary["num_annotations"]


def test_unknown_category_is_named(tmp_path):
    with pytest.raises(ValueError, match="hexagone"):
        generate_generic_detection_set(
            str(tmp_path), num_train=1, num_val=0, categories=["hexagone"]
        )
