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
    results: Dict[str, list],
    metadata,
    positions: np.ndarray,
    loc_top_k: int = 10,
    query_names: Optional[Sequence[str]] = None,
) -> Dict[str, Dict[str, Optional[float]]]:
    """Metrics of every stage.

    Args:
        results: {stage: [StageResult per query]} (rankings over index positions).
        metadata: the dataset's metadata (``protocol``, ``gnd``, ``db_shots`` for INS).
        positions: from :func:`db_positions`.
        loc_top_k: top-k results over which localisation is measured.
        query_names: names of the queries (in ``gnd`` order) for the warning that lists those
            without a positive image.

    Returns:
        {stage: {metric: value}}. Oxford/Paris/custom: ``mAP``; Revisited: ``mAP_easy``,
        ``mAP_medium``, ``mAP_hard`` and ``mP@k_<protocol>``; INS: ``mAP`` over shots; where the
        ground truth has database boxes and the stage locates the object: ``mean_iou`` and
        ``frac_iou@0.5`` over the true positives in the top ``loc_top_k``. Queries without a
        positive are left out of every mean and counted in ``queries_without_positives``
        (``..._easy`` / ``_medium`` / ``_hard`` for Revisited). A metric with nothing to average
        is None, never NaN.

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
    _warn_queries_without_positives(metadata, gnd, query_names)
    out: Dict[str, Dict[str, Optional[float]]] = OrderedDict()
    for stage, per_query in results.items():
        if len(per_query) != len(gnd):
            raise ValueError(f"stage {stage}: {len(per_query)} results for {len(gnd)} queries")
        rankings = [positions[r.order] for r in per_query]
        scores: Dict[str, Optional[float]] = OrderedDict()
        if protocol == "revisited":
            rev = metrics.revisited_map(rankings, gnd)
            for level in ("easy", "medium", "hard"):
                for k, v in rev[level].items():
                    if k != "aps":
                        scores[f"{k}_{level}"] = _finite(v)
                scores[f"{UNSCORED}_{level}"] = int(np.isnan(rev[level]["aps"]).sum())
        else:
            if protocol == "ins":
                relevant = [g["relevant_shots"] for g in gnd]
                res = metrics.ins_map(rankings, metadata.db_shots, relevant)
            else:
                res = metrics.oxford_paris_map(rankings, gnd)
            scores["mAP"] = _finite(res["mAP"])
            scores[UNSCORED] = int(np.isnan(res["aps"]).sum())
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
            scores["mean_iou"] = _finite(loc["mean_iou"])
            scores["frac_iou@0.5"] = _finite(loc["frac_iou@0.5"])
        out[stage] = scores
    return out


# results key: queries left out of the mean because the ground truth gives them no positive
UNSCORED = "queries_without_positives"


def _finite(x) -> Optional[float]:
    """``float(x)``, or None where it is undefined (NaN / infinite): results files are strict
    JSON, and "undefined" must not read as a number."""
    x = float(x)
    return x if np.isfinite(x) else None


def _warn_queries_without_positives(metadata, gnd, query_names):
    """Names, once, the queries whose judgements hold no positive (left out of every mean)."""
    if metadata.protocol == "revisited":
        return  # the protocol itself leaves some levels empty (e.g. no easy image)
    if metadata.protocol == "ins":
        empty = [i for i, g in enumerate(gnd) if not g["relevant_shots"]]
    else:
        empty = [i for i, g in enumerate(gnd) if not judged_sets(metadata.protocol, g)[0]]
    if empty:
        names = [query_names[i] if query_names else f"query {i}" for i in empty]
        logger.warning(
            f"{len(empty)} of {len(gnd)} queries of {metadata.name} have no positive image in "
            f"the ground truth and are left out of every mean ({UNSCORED} in the results): "
            + ", ".join(map(str, names[:20]))
            + (" ..." if len(names) > 20 else "")
        )


def _cell(column: str, value) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if column.startswith(UNSCORED):
        return str(int(value))
    return f"{100 * value:.2f}"


def score_run(run, loc_top_k: int = 10) -> Optional[Dict[str, Dict[str, float]]]:
    """Metrics of a search (see :func:`evaluate_stages`), or None (warned) without ground truth.

    Args:
        run: a :class:`~retrieval_ext.retrieval.pipeline.SearchRun`.
        loc_top_k: top-k results over which localisation is measured.
    """
    db = get_dataset_dicts(run.metadata.db_dataset)
    try:
        return evaluate_stages(
            run.results,
            run.metadata,
            db_positions(run.index, db),
            loc_top_k=loc_top_k,
            query_names=[q["image_id"] for q in run.queries],
        )
    except NoGroundTruthError as e:
        logger.warning(str(e))
        return None


def format_table(results: Dict[str, Dict[str, float]], title: str = "") -> str:
    """A table with one row per stage and one column per metric (rates in percent, counts as
    they are; "-" where a metric is undefined)."""
    columns: List[str] = []
    for scores in results.values():
        columns += [c for c in scores if c not in columns]
    rows = [[stage] + [_cell(c, s.get(c)) for c in columns] for stage, s in results.items()]
    table = tabulate(rows, headers=["stage"] + columns, tablefmt="pipe")
    return f"{title}\n{table}" if title else table
