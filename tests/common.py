"""Helpers shared by the tests: tiny configs and models, synthetic inputs, fixture paths."""

import os
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import retrieval_ext  # noqa: F401  registers models and datasets
from retrieval_ext.config import add_retrieval_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
# The real ground-truth fixtures live in ../shared/data beside the checkout (CI lays them there).
SHARED_DATA = Path(
    os.environ.get("RETRIEVAL_EXT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
)


def tiny_cfg(name="R50-C4", opts=()):
    """A frozen config from configs/quick_schedules/<name>-tiny.yaml plus ``opts``."""
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "quick_schedules" / f"{name}-tiny.yaml"))
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def tame_rpn(model):
    """Zero the RPN's box-delta predictor so that proposals are anchors.

    With random backbone weights the activations are large and the predicted deltas throw every
    proposal outside the image; anchors give well-defined proposals to test pooling on.
    """
    head = model.proposal_generator.rpn_head
    torch.nn.init.zeros_(head.anchor_deltas.weight)
    torch.nn.init.zeros_(head.anchor_deltas.bias)
    return model


def tiny_model(name="R50-C4", opts=(), seed=0):
    """An eval-mode model with random weights (seeded) and tamed RPN."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(name, opts))
    return tame_rpn(model).eval()


def random_image(height, width, seed=0):
    """A ``(3, H, W)`` float tensor with 0..255 values, as detectron2 models take."""
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.integers(0, 256, (3, height, width)).astype(np.float32))


def written_out_ap(ranked_ids, positives, junk):
    """Oxford's compute_ap written out independently of retrieval_ext.evaluation.metrics: junk
    skipped, trapezoids with precision 1 at recall 0."""
    ranked = [r for r in ranked_ids if r not in junk]
    ap, old_recall, old_precision, hits = 0.0, 0.0, 1.0, 0
    for i, r in enumerate(ranked):
        if r in positives:
            hits += 1
        recall, precision = hits / len(positives), hits / (i + 1)
        if r in positives:
            ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
    return ap
