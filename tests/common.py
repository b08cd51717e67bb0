"""Helpers shared by the tests: tiny configs and models, synthetic inputs, fixture paths."""

import json
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import retrieval_ext  # noqa: F401  registers models and datasets
from retrieval_ext.config import add_retrieval_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
# Small real files (Oxford / Paris ground truth, 10 real Oxford photos): see fixtures/README.md.
FIXTURES = REPO_ROOT / "tests" / "fixtures"


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


def _refuse_constant(token):
    raise ValueError(f"{token} is not JSON")


def load_strict_json(path):
    """Parse a JSON file as a strict parser would: NaN, Infinity and -Infinity are refused."""
    return json.loads(Path(path).read_text(), parse_constant=_refuse_constant)


def written_out_iou(a, b):
    """IoU of two XYXY boxes, written out independently of retrieval_ext.evaluation.metrics;
    a box with a NaN coordinate (no box) gives 0."""
    if any(v != v for v in list(a) + list(b)):
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
