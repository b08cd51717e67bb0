"""Scores the rankings of every pipeline stage with the dataset's own protocol.

``evaluate_stages`` is the one place that turns stage results into ``{stage: {metric: value}}``;
``tools/retrieve.py evaluate`` and the trainer's :class:`RetrievalEvaluator` both call it through
:func:`score_run`.
"""

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from tabulate import tabulate

from ..data.datasets.catalog import get_dataset_dicts
from . import metrics
from .relevance import judged_sets

__all__ = [
    "NoGroundTruthError",
    "db_positions",
    "evaluate_stages",
    "format_table",
    "score_run",
]

logger = logging.getLogger("retrieval_ext")


class NoGroundTruthError(ValueError):
    """The dataset has no relevance judgements, so there is nothing to score."""


def db_positions(index, db_dicts: Sequence[dict]) -> np.ndarray:
    """Map index positions to dataset ``db_index`` values.

    Images that could not be read are not in the index; the ground truth counts them as never
    retrieved.

    Returns:
        int64 (index.num_images,) array: ``out[p]`` is the db_index of the index's p-th image.
    """
    by_id = {d["image_id"]: d["db_index"] for d in db_dicts}
    return np.asarray([by_id[i] for i in index.image_ids], dtype=np.int64)


def evaluate_stages(
    results: Dict[str, list], metadata, positions: np.ndarray, loc_top_k: int = 10
) -> Dict[str, Dict[str, float]]:
    """Metrics of every stage.

    Args:
        results: {stage: [StageResult per query]} (rankings over index positions).
        metadata: the dataset's metadata (``protocol``, ``gnd``, ``db_shots`` for INS).
        positions: from :func:`db_positions`.
        loc_top_k: top-k results over which localisation is measured.

    Returns:
        {stage: {metric: value}}. Oxford/Paris/custom: ``mAP``; Revisited: ``mAP_easy``,
        ``mAP_medium``, ``mAP_hard`` and ``mP@k_<protocol>``; INS: ``mAP`` over shots; where the
        ground truth has database boxes and the stage locates the object: ``mean_iou`` and
        ``frac_iou@0.5`` over the true positives in the top ``loc_top_k``.

    Raises:
        NoGroundTruthError: the dataset has no relevance judgements.
    """
    gnd = getattr(metadata, "gnd", None)
    if gnd is None:
        raise NoGroundTruthError(
            f"dataset {metadata.name} has no relevance judgements (no relevance.json / gt "
            "files): search and visualisation work, but there is nothing to score"
        )
    protocol = metadata.protocol
    out: Dict[str, Dict[str, float]] = OrderedDict()
    for stage, per_query in results.items():
        if len(per_query) != len(gnd):
            raise ValueError(f"stage {stage}: {len(per_query)} results for {len(gnd)} queries")
        rankings = [positions[r.order] for r in per_query]
        scores: Dict[str, float] = OrderedDict()
        if protocol == "revisited":
            rev = metrics.revisited_map(rankings, gnd)
            for level in ("easy", "medium", "hard"):
                for k, v in rev[level].items():
                    if k != "aps":
                        scores[f"{k}_{level}"] = float(v)
        elif protocol == "ins":
            shots = metadata.db_shots
            relevant = [g["relevant_shots"] for g in gnd]
            scores["mAP"] = float(metrics.ins_map(rankings, shots, relevant)["mAP"])
        else:
            scores["mAP"] = float(metrics.oxford_paris_map(rankings, gnd)["mAP"])
        has_boxes = all("boxes" in g for g in gnd)
        if has_boxes and per_query and per_query[0].top_n > 0:
            loc = metrics.localisation_metrics(
                rankings,
                [r.boxes for r in per_query],
                [
                    {int(k): np.asarray(v, dtype=np.float32) for k, v in g["boxes"].items()}
                    for g in gnd
                ],
                [judged_sets(protocol, g)[0] for g in gnd],
                top_k=loc_top_k,
            )
            scores["mean_iou"] = float(loc["mean_iou"])
            scores["frac_iou@0.5"] = float(loc["frac_iou@0.5"])
        out[stage] = scores
    return out


def score_run(run, loc_top_k: int = 10) -> Optional[Dict[str, Dict[str, float]]]:
    """Metrics of a search (see :func:`evaluate_stages`), or None (warned) without ground truth.

    Args:
        run: a :class:`~retrieval_ext.retrieval.pipeline.SearchRun`.
        loc_top_k: top-k results over which localisation is measured.
    """
    db = get_dataset_dicts(run.metadata.db_dataset)
    try:
        return evaluate_stages(
            run.results, run.metadata, db_positions(run.index, db), loc_top_k=loc_top_k
        )
    except NoGroundTruthError as e:
        logger.warning(str(e))
        return None


def format_table(results: Dict[str, Dict[str, float]], title: str = "") -> str:
    """A table with one row per stage and one column per metric (values in percent)."""
    columns: List[str] = []
    for scores in results.values():
        columns += [c for c in scores if c not in columns]
    rows = [
        [stage] + [f"{100 * s[c]:.2f}" if c in s and np.isfinite(s[c]) else "-" for c in columns]
        for stage, s in results.items()
    ]
    table = tabulate(rows, headers=["stage"] + columns, tablefmt="pipe")
    return f"{title}\n{table}" if title else table
