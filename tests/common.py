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
    proposal outside the image; anchors give well-defined proposals to test pooling on. A model
    without an RPN (dense region proposals) is returned as it is.
    """
    head = getattr(model.proposal_generator, "rpn_head", None)
    if head is None:
        return model
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


def ca_sr_per_image(query_region, order, region_vectors, region_boxes, top_n):
    """CA-SR written out one image at a time, independently of retrieval_ext.retrieval.reranking
    (the per-image reference the benchmark once checked the vectorised version against).

    Cosines in float64; an image's best proposal is the first maximum; images without proposals
    (None or 0 rows) score -inf; the block is stably sorted by descending score.

    Args:
        query_region: (D,) query region vector (any scale).
        order: (L,) database indices from the filtering stage, best first.
        region_vectors, region_boxes: database index -> (K_i, D) vectors, (K_i, 4) boxes.
        top_n: images reranked.

    Returns:
        (order, scores, best_proposal, boxes) of the reranked block of ``min(top_n, L)`` images.
    """
    q = np.asarray(query_region, dtype=np.float64).ravel()
    q = q / np.linalg.norm(q)
    block = [int(i) for i in order[:top_n]]
    scores, best, boxes = [], [], []
    for i in block:
        v = region_vectors[i]
        if v is None or len(v) == 0:
            scores.append(-np.inf)
            best.append(-1)
            boxes.append([np.nan] * 4)
            continue
        v = np.asarray(v, dtype=np.float64)
        cos = (v @ q) / np.maximum(np.linalg.norm(v, axis=1), 1e-12)
        b = int(np.argmax(cos))
        scores.append(cos[b])
        best.append(b)
        boxes.append(np.asarray(region_boxes[i], dtype=np.float64)[b])
    perm = sorted(range(len(block)), key=lambda j: (-scores[j], j))
    return (
        np.array([block[j] for j in perm]),
        np.array([scores[j] for j in perm]),
        np.array([best[j] for j in perm]),
        np.array([boxes[j] for j in perm]),
    )
