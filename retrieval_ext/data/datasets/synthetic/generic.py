"""The generic detection set: shape categories in COCO json, for pretraining the RPN and box head.

It stands in for COCO: shape categories (ellipse, star, ring, ...) drawn by a different generator
(:func:`.textures.generic_shape`) from a different random stream than the benchmark's, so none of
the benchmark's instances (or its poster family) appears in it.
"""

import json
import os
from typing import List, Sequence, Tuple

import numpy as np

from . import streams
from .scene import background, finish, image_size, save_jpeg
from .textures import GENERIC_CATEGORIES, generic_shape
from .warp import Placed, mask_box, overlaps, photometric, render_mask, sample_quad

__all__ = ["GENERIC_CATEGORIES", "generate_generic_detection_set"]


def generate_generic_detection_set(
    root: str,
    num_train: int = 400,
    num_val: int = 50,
    short_side: int = 320,
    seed: int = 0,
    categories: Sequence[str] = GENERIC_CATEGORIES,
    objects_per_image: Tuple[int, int] = (2, 7),
) -> dict:
    """Generate a generic detection set (COCO json) for pretraining the RPN and box head.

    Images hold several shape objects (category ``categories``) on the same kind of procedural
    backgrounds as the benchmark; shapes come from a generator that never draws the benchmark's
    posters, with random streams disjoint from the benchmark's for any seed.

    Layout::

        ROOT/images/gen_00000.jpg ...
        ROOT/annotations.json   all images (COCO: images, annotations, categories)
        ROOT/train.json         the first num_train images
        ROOT/val.json           the last num_val images

    Register with ``register_coco_instances(name, {}, ROOT/train.json, ROOT/images)``.
    Annotation boxes are COCO XYWH absolute pixels of the warped silhouette clipped to the image
    (no segmentation); category ids are 1-based in ``categories`` order.

    Args:
        root: output folder.
        num_train, num_val: number of images in each split.
        short_side: shorter image side in pixels.
        seed: random seed (deterministic, byte-identical files for the same seed).
        categories: subset of ``GENERIC_CATEGORIES``.
        objects_per_image: [low, high) number of objects placed per image (overlapping
            placements are skipped, so some images hold fewer).

    Returns:
        Summary dict: "num_images", "num_annotations", "categories" (names), "per_category"
        ({name: annotation count}), "parameters".
    """
    unknown = set(categories) - set(GENERIC_CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; known: {GENERIC_CATEGORIES}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(num_train + num_val):
        rng = streams.rng(seed, streams.GENERIC, i)
        h, w = image_size(rng, short_side)
        img = background(rng, h, w, clutter=1.0, blobs=False)
        for ann in _place_shapes(rng, img, categories, objects_per_image):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, **ann})
        name = f"gen_{i:05d}.jpg"
        save_jpeg(finish(img, rng, 0.7), os.path.join(root, "images", name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})

    cats = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(categories)]
    for fname, ims in (
        ("annotations.json", images),
        ("train.json", images[:num_train]),
        ("val.json", images[num_train:]),
    ):
        _write_coco(os.path.join(root, fname), ims, anns, cats, seed)
    per_cat = {c: 0 for c in categories}
    for a in anns:
        per_cat[categories[a["category_id"] - 1]] += 1
    return {
        "num_images": len(images),
        "num_annotations": len(anns),
        "categories": list(categories),
        "per_category": per_cat,
        "parameters": {
            "num_train": num_train,
            "num_val": num_val,
            "short_side": short_side,
            "seed": seed,
            "objects_per_image": list(objects_per_image),
        },
    }


def _place_shapes(
    rng: np.random.Generator,
    img: np.ndarray,
    categories: Sequence[str],
    objects_per_image: Tuple[int, int],
) -> List[dict]:
    """Pastes non-overlapping shapes onto img (H, W, 3) in place.

    A shape is skipped when its patch overlaps an earlier one, when under half of it lies in the
    image, or when its box is under 6 px on a side.

    Returns:
        Per pasted shape, its COCO annotation fields ``category_id`` (1-based), ``bbox`` (XYWH
        absolute pixels of the clipped silhouette), ``area``, ``iscrowd``.
    """
    h, w = img.shape[:2]
    taken: List[Tuple[int, int, int, int]] = []
    anns = []
    for _ in range(int(rng.integers(*objects_per_image))):
        c = int(rng.integers(len(categories)))
        tex, outline = generic_shape(rng, categories[c])
        size_px = np.exp(rng.uniform(np.log(0.1), np.log(0.55))) * min(h, w)
        centre = (rng.uniform(0.2 * size_px, w - 0.2 * size_px), rng.uniform(0, h))
        dst = sample_quad(rng, outline, size_px, centre, 40.0, 0.25)
        p = Placed(photometric(tex, rng, 1.0), render_mask(tex, outline), dst)
        mask = p.full_mask(h, w)
        box = mask_box(mask)
        if box is None or overlaps(p.box(), taken, 2):
            continue
        bw, bh = box[2] - box[0], box[3] - box[1]
        visible = float(mask.sum()) / max(p.area, 1)
        if visible < 0.5 or min(bw, bh) < 6:
            continue
        p.paste(img)
        taken.append(p.box())
        anns.append(
            {
                "category_id": c + 1,
                "bbox": [box[0], box[1], bw, bh],
                "area": float(bw * bh),
                "iscrowd": 0,
            }
        )
    return anns


def _write_coco(path: str, images: List[dict], anns: List[dict], cats: List[dict], seed: int):
    """Writes a COCO json of ``images`` and their annotations among ``anns``."""
    ids = {im["id"] for im in images}
    doc = {
        "info": {"description": "retrieval_ext synthetic generic detection set", "seed": seed},
        "images": images,
        "annotations": [a for a in anns if a["image_id"] in ids],
        "categories": cats,
    }
    with open(path, "w") as f:
        json.dump(doc, f)
