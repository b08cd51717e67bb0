"""Exact retrieval metrics for Oxford/Paris, Revisited Oxford/Paris and TRECVid INS.

Pure numpy, no detectron2 and no I/O. Conventions shared by every function here:

- A *ranking* is a 1-D integer array of database indices, best first. It may be shorter than the
  database (e.g. a reranked top-N list): positives that are not in it count as never retrieved, so
  they add nothing to AP but still count in its denominator.
- *Ranks* are 0-based positions in a ranking. "Junk-free ranks" are positions after the junk
  images were deleted from the ranking (junk is skipped without advancing the rank).
- An image may not be both a positive and junk for the same query (``ValueError``); a ranking may
  not list an image twice (``ValueError``).
- A query without positives has AP ``nan`` and is left out of every mean, as in
  cnnimageretrieval-pytorch's ``compute_map``.
- All values are fractions in [0, 1], never percent.
"""

from typing import Any, Dict, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "ranks_of",
    "junk_free_ranks",
    "compute_ap",
    "precision_at_k",
    "average_precision",
    "mean_precision_at_k",
    "oxford_paris_map",
    "revisited_map",
    "ins_shot_ranking",
    "ins_average_precision",
    "ins_map",
    "box_iou",
    "localisation_metrics",
]


def _as_index_array(values: Iterable[int], name: str, flatten: bool = True) -> np.ndarray:
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if flatten:
        arr = arr.reshape(-1)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_ranking(ranking: Iterable[int]) -> np.ndarray:
    arr = _as_index_array(ranking, "ranking", flatten=False)
    if arr.ndim != 1:
        raise ValueError(f"a ranking must be 1-D, got shape {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError("database indices must be non-negative")
    # A repeated entry would count a positive twice and could push AP above 1. bincount is
    # linear, which matters with 1M-distractor rankings.
    if arr.size and np.bincount(arr).max() > 1:
        raise ValueError("a ranking must not list the same database index twice")
    return arr


def _isin(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    # The lookup-table variant is linear in len(values) + index range, much faster than sorting
    # for long rankings; it needs integer input, which every caller here guarantees.
    if members.size == 0 or values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    return np.isin(values, members, kind="table")


def _as_ranking_list(rankings: Any) -> list:
    """Splits a Q x N array (one row per query) or a sequence of 1-D rankings into a list."""
    if isinstance(rankings, np.ndarray):
        if rankings.ndim != 2:
            raise ValueError(f"a ranking array must be Q x N, got shape {rankings.shape}")
        return [rankings[q] for q in range(rankings.shape[0])]
    return list(rankings)


def ranks_of(ranking: Iterable[int], indices: Iterable[int]) -> np.ndarray:
    """Positions in a ranking of the given database indices.

    Args:
        ranking: 1-D integer array (L,), database indices best first.
        indices: database indices to look for; those absent from the ranking are ignored.

    Returns:
        Sorted int64 array of the 0-based positions in ``ranking`` holding one of ``indices``.
    """
    ranking = _as_ranking(ranking)
    indices = _as_index_array(indices, "indices")
    return np.flatnonzero(_isin(ranking, indices))


def junk_free_ranks(
    ranking: Iterable[int], positives: Iterable[int], junk: Iterable[int] = ()
) -> np.ndarray:
    """0-based ranks of the retrieved positives once junk images are deleted from the ranking.

    This is the position bookkeeping of cnnimageretrieval-pytorch's ``compute_map``: each
    positive's position is decreased by the number of junk images ranked before it.

    Args:
        ranking: 1-D integer array (L,), database indices best first.
        positives: database indices of the positives.
        junk: database indices to ignore; must not intersect ``positives``.

    Returns:
        Sorted int64 array (P_found,) of junk-free ranks; positives missing from the ranking are
        absent, so ``P_found <= len(set(positives))``.
    """
    ranking = _as_ranking(ranking)
    positives = _as_index_array(positives, "positives")
    junk = _as_index_array(junk, "junk")
    if np.intersect1d(positives, junk).size:
        raise ValueError("an image cannot be both a positive and junk for the same query")
    is_pos = _isin(ranking, positives)
    is_junk = _isin(ranking, junk)
    pos_idx = np.flatnonzero(is_pos)
    # Positives and junk are disjoint, so the cumulative count at a positive's position is the
    # number of junk images strictly before it.
    junk_before = np.cumsum(is_junk)[pos_idx]
    return (pos_idx - junk_before).astype(np.int64)


def compute_ap(pos_ranks: Iterable[int], num_positives: int) -> float:
    """Average precision by the trapezoid rule of the official Oxford ``compute_ap.cpp``.

    Identical to cnnimageretrieval-pytorch's ``compute_ap(ranks, nres)``. The official code walks
    the junk-free ranking; at every position it has a precision and a recall, and it adds the
    trapezoid ``(recall - old_recall) * (old_precision + precision) / 2`` with ``old_recall = 0``
    and ``old_precision = 1`` before the first position. Only positions holding a positive change
    the recall, so for the ``j``-th retrieved positive (0-based) at junk-free rank ``r`` the
    trapezoid spans recall ``1 / num_positives`` between the precision just before it,
    ``j / r`` (1 when ``r == 0``), and the precision at it, ``(j + 1) / (r + 1)``.

    Args:
        pos_ranks: strictly increasing 0-based junk-free ranks of the retrieved positives,
            shape (P_found,). Positives never retrieved are simply not listed.
        num_positives: number of positives of the query (the denominator), ``>= P_found``.

    Returns:
        AP in [0, 1]; ``nan`` when ``num_positives == 0``.
    """
    r = _as_index_array(pos_ranks, "pos_ranks").astype(np.float64)
    if num_positives <= 0:
        if r.size:
            raise ValueError("pos_ranks given for a query without positives")
        return float("nan")
    if r.size > num_positives:
        raise ValueError(f"{r.size} positive ranks but only {num_positives} positives")
    if r.size == 0:
        return 0.0
    if r[0] < 0 or np.any(np.diff(r) <= 0):
        raise ValueError("pos_ranks must be non-negative and strictly increasing")
    j = np.arange(r.size, dtype=np.float64)
    precision_before = np.ones_like(r)
    nonzero = r > 0
    precision_before[nonzero] = j[nonzero] / r[nonzero]
    precision_at = (j + 1.0) / (r + 1.0)
    # Dividing once at the end keeps the ideal ranking at exactly 1.0 (2P / 2P).
    return float(np.sum(precision_before + precision_at) / (2.0 * num_positives))


def precision_at_k(pos_ranks: Iterable[int], num_positives: int, k: int) -> float:
    """Precision at ``k`` as defined by cnnimageretrieval-pytorch's ``compute_map``.

    With ``pos`` the 1-based junk-free ranks of the positives, the official code uses
    ``kq = min(max(pos), k)`` and returns ``(pos <= kq).sum() / kq``: when every positive is ranked
    within the top ``k``, the divisor shrinks to the rank of the last positive, so a query with
    fewer than ``k`` positives can still score 1. Positives missing from a truncated ranking sit
    beyond it, so when some are missing ``max(pos)`` is treated as infinite and ``kq = k``.

    Args:
        pos_ranks: strictly increasing 0-based junk-free ranks of the retrieved positives.
        num_positives: number of positives of the query.
        k: cut-off, ``>= 1``.

    Returns:
        Precision in [0, 1]; ``nan`` when ``num_positives == 0``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pos = _as_index_array(pos_ranks, "pos_ranks") + 1
    if num_positives <= 0:
        return float("nan")
    if pos.size > num_positives:
        raise ValueError(f"{pos.size} positive ranks but only {num_positives} positives")
    kq = k if pos.size < num_positives else min(int(pos.max()), k)
    return float(np.count_nonzero(pos <= kq) / kq)


def average_precision(
    ranking: Iterable[int], positives: Iterable[int], junk: Iterable[int] = ()
) -> float:
    """AP of one query under the Oxford/Paris protocol (junk skipped, official trapezoid rule).

    Args:
        ranking: 1-D integer array (L,), database indices best first; may be shorter than the
            database (missing positives count as never retrieved).
        positives: database indices of the positives (for Oxford/Paris: good + ok).
        junk: database indices skipped without advancing the rank.

    Returns:
        AP in [0, 1]; ``nan`` if the query has no positives (callers leave it out of the mean).
    """
    num_positives = np.unique(_as_index_array(positives, "positives")).size
    if num_positives == 0:
        return float("nan")
    return compute_ap(junk_free_ranks(ranking, positives, junk), num_positives)


def _compute_map(
    rankings: Any, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = ()
) -> Dict[str, Any]:
    """mAP and mean precision at each kappa, with gnd[i] = {"ok": positives, "junk": junk}."""
    rankings = _as_ranking_list(rankings)
    if len(rankings) != len(gnd):
        raise ValueError(f"{len(rankings)} rankings but {len(gnd)} ground-truth entries")
    num_q = len(gnd)
    aps = np.full(num_q, np.nan)
    prs = np.full((num_q, len(kappas)), np.nan)
    for q in range(num_q):
        positives = np.unique(_as_index_array(gnd[q]["ok"], "ok"))
        if positives.size == 0:
            continue
        pos_ranks = junk_free_ranks(rankings[q], positives, gnd[q].get("junk", ()))
        aps[q] = compute_ap(pos_ranks, positives.size)
        for i, k in enumerate(kappas):
            prs[q, i] = precision_at_k(pos_ranks, positives.size, k)
    valid = ~np.isnan(aps)
    if valid.any():
        mean_ap = float(aps[valid].mean())
        mean_pr = prs[valid].mean(axis=0)
    else:
        mean_ap = float("nan")
        mean_pr = np.full(len(kappas), np.nan)
    return {"mAP": mean_ap, "aps": aps, "mP": mean_pr, "prs": prs}


def mean_precision_at_k(
    rankings: Any, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> np.ndarray:
    """Mean over queries with positives of :func:`precision_at_k` for each kappa.

    Args:
        rankings: Q x N integer array (one row per query) or a sequence of Q 1-D rankings.
        gnd: Q dicts ``{"ok": positive indices, "junk": junk indices}``.
        kappas: cut-offs.

    Returns:
        float array (len(kappas),); ``nan`` entries when no query has positives.
    """
    return _compute_map(rankings, gnd, kappas)["mP"]


def oxford_paris_map(rankings: Any, gnd: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """mAP under the original Oxford 5k / Paris 6k protocol.

    Args:
        rankings: Q x N integer array (one row per query, database indices best first) or a
            sequence of Q 1-D rankings of any lengths.
        gnd: Q dicts in the cnnimageretrieval ``gnd_oxford5k.pkl`` form,
            ``{"ok": good + ok indices, "junk": junk indices, ...}`` (other keys ignored).

    Returns:
        ``{"mAP": float, "aps": float array (Q,)}``; ``aps`` is ``nan`` for queries without
        positives, which the mean leaves out.
    """
    out = _compute_map(rankings, gnd)
    return {"mAP": out["mAP"], "aps": out["aps"]}


_REVISITED_PROTOCOLS = {
    # protocol: (keys that are positives, keys that are junk), Radenovic et al. 2018.
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def revisited_map(
    rankings: Any, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> Dict[str, Dict[str, Any]]:
    """mAP and mP@k under the Revisited Oxford / Paris Easy, Medium and Hard protocols.

    Easy: positives easy, junk = junk + hard. Medium: positives easy + hard, junk = junk.
    Hard: positives hard, junk = junk + easy. Queries without positives under a protocol are left
    out of that protocol's means. mP@k follows :func:`precision_at_k`.

    Args:
        rankings: Q x N integer array (one row per query) or a sequence of Q 1-D rankings.
        gnd: Q dicts ``{"easy": indices, "hard": indices, "junk": indices, ...}``
            (the ``gnd_roxford5k.pkl`` form).
        kappas: cut-offs for mP@k.

    Returns:
        ``{"easy" | "medium" | "hard": {"mAP": float, "mP@<k>": float for each k,
        "aps": float array (Q,)}}``, values in [0, 1].
    """
    rankings = _as_ranking_list(rankings)
    results = {}
    for name, (pos_keys, junk_keys) in _REVISITED_PROTOCOLS.items():
        gnd_t = [
            {
                "ok": np.concatenate([_as_index_array(g.get(k, ()), k) for k in pos_keys]),
                "junk": np.concatenate([_as_index_array(g.get(k, ()), k) for k in junk_keys]),
            }
            for g in gnd
        ]
        out = _compute_map(rankings, gnd_t, kappas)
        res = {"mAP": out["mAP"]}
        for i, k in enumerate(kappas):
            res[f"mP@{k}"] = float(out["mP"][i])
        res["aps"] = out["aps"]
        results[name] = res
    return results


def ins_shot_ranking(
    keyframe_ranking: Iterable[int],
    keyframe_shots: Sequence[Hashable],
    max_results: Optional[int] = None,
) -> list:
    """Turns a keyframe ranking into a shot ranking: a shot scores as its best keyframe.

    Args:
        keyframe_ranking: 1-D integer array of keyframe (database) indices, best first.
        keyframe_shots: shot id of every database keyframe, indexed by database index.
        max_results: keep at most this many shots (TRECVid runs submit at most 1000).

    Returns:
        List of shot ids in order of their first (best) keyframe, without repeats.
    """
    ranking = _as_ranking(keyframe_ranking)
    seen = set()
    shots = []
    for idx in ranking.tolist():
        shot = keyframe_shots[idx]
        if shot in seen:
            continue
        seen.add(shot)
        shots.append(shot)
        if max_results is not None and len(shots) >= max_results:
            break
    return shots


def ins_average_precision(
    keyframe_ranking: Iterable[int],
    keyframe_shots: Sequence[Hashable],
    relevant_shots: Iterable[Hashable],
    max_results: Optional[int] = None,
) -> float:
    """Non-interpolated AP of one TRECVid INS topic over the shot ranking (trec_eval's AP).

    AP = (sum of the precision at the rank of each retrieved relevant shot) / (number of
    relevant shots); relevant shots not retrieved within ``max_results`` contribute 0.

    Args:
        keyframe_ranking: 1-D integer array of keyframe (database) indices, best first.
        keyframe_shots: shot id of every database keyframe, indexed by database index.
        relevant_shots: shot ids judged relevant for the topic.
        max_results: truncate the shot ranking to this many shots (``None``: no limit).

    Returns:
        AP in [0, 1]; ``nan`` when the topic has no relevant shots.
    """
    relevant = set(relevant_shots)
    if not relevant:
        return float("nan")
    shots = ins_shot_ranking(keyframe_ranking, keyframe_shots, max_results)
    hits = np.array([s in relevant for s in shots], dtype=bool)
    if not hits.any():
        return 0.0
    hit_ranks = np.flatnonzero(hits)
    precisions = np.arange(1, hit_ranks.size + 1) / (hit_ranks + 1.0)
    return float(precisions.sum() / len(relevant))


def ins_map(
    rankings: Any,
    keyframe_shots: Sequence[Hashable],
    relevant_shots_per_topic: Sequence[Iterable[Hashable]],
    max_results: Optional[int] = None,
) -> Dict[str, Any]:
    """mAP over TRECVid INS topics, see :func:`ins_average_precision`.

    Args:
        rankings: T x N integer array (one keyframe ranking per topic) or a sequence of T rankings.
        keyframe_shots: shot id of every database keyframe, indexed by database index.
        relevant_shots_per_topic: T collections of relevant shot ids, aligned with ``rankings``.
        max_results: truncate each shot ranking to this many shots (``None``: no limit).

    Returns:
        ``{"mAP": float, "aps": float array (T,)}``; topics without relevant shots have AP
        ``nan`` and are left out of the mean.
    """
    rankings = _as_ranking_list(rankings)
    if len(rankings) != len(relevant_shots_per_topic):
        raise ValueError(
            f"{len(rankings)} rankings but {len(relevant_shots_per_topic)} topics of ground truth"
        )
    aps = np.array(
        [
            ins_average_precision(r, keyframe_shots, rel, max_results)
            for r, rel in zip(rankings, relevant_shots_per_topic)
        ],
        dtype=np.float64,
    )
    valid = ~np.isnan(aps)
    mean_ap = float(aps[valid].mean()) if valid.any() else float("nan")
    return {"mAP": mean_ap, "aps": aps}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of boxes.

    Args:
        a: (N, 4) boxes, XYXY absolute pixel coordinates of the same image.
        b: (M, 4) boxes, same frame.

    Returns:
        (N, M) float64 IoU matrix. Pairs with an empty union (degenerate boxes) and pairs
        involving a box with NaN coordinates get 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    iou[~np.isfinite(iou) | (union <= 0)] = 0.0
    return iou


def localisation_metrics(
    rankings: Any,
    located_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[Mapping[int, np.ndarray]],
    positives: Sequence[Iterable[int]],
    top_k: int = 10,
    iou_threshold: float = 0.5,
) -> Dict[str, Any]:
    """How well the returned boxes localise the query object in the true positives of the top k.

    For every query and every true positive among the first ``top_k`` entries of its ranking
    (raw positions, junk included), the IoU between the box the system returned for that
    database image and the best-matching ground-truth box of the object in it (max over the
    image's ground-truth boxes). Pairs of all queries are pooled. True positives without any
    ground-truth box in ``gt_boxes[q]`` cannot be scored and are skipped.

    Args:
        rankings: Q x N integer array or a sequence of Q 1-D rankings (database indices).
        located_boxes: Q float arrays (L_q, 4), L_q >= min(top_k, len(rankings[q])); row i is
            the box (XYXY, absolute pixels of the original database image) returned for
            ``rankings[q][i]``; a NaN row means "no box" and scores IoU 0.
        gt_boxes: Q dicts ``{database index: (M, 4) XYXY boxes of the object, same frame}``.
        positives: Q collections of the database indices that contain the query object.
        top_k: number of top results examined per query.
        iou_threshold: IoU at or above which a localisation counts as correct.

    Returns:
        ``{"mean_iou": float, "frac_iou@<thr>": float, "count": int}`` where ``count`` is the
        number of scored (query, image) pairs; both rates are ``nan`` when ``count == 0``.
    """
    rankings = _as_ranking_list(rankings)
    num_q = len(rankings)
    if not (len(located_boxes) == len(gt_boxes) == len(positives) == num_q):
        raise ValueError(
            "rankings, located_boxes, gt_boxes and positives must have one entry/query"
        )
    ious = []
    for q in range(num_q):
        top = _as_ranking(rankings[q])[:top_k]
        boxes = np.asarray(located_boxes[q], dtype=np.float64).reshape(-1, 4)
        if boxes.shape[0] < top.size:
            raise ValueError(
                f"query {q}: {boxes.shape[0]} located boxes for {top.size} top-{top_k} results"
            )
        pos = set(int(p) for p in positives[q])
        for i, db_idx in enumerate(top.tolist()):
            if db_idx not in pos:
                continue
            gt = np.asarray(gt_boxes[q].get(db_idx, np.zeros((0, 4))), dtype=np.float64)
            gt = gt.reshape(-1, 4)
            if gt.shape[0] == 0:
                continue
            ious.append(float(box_iou(boxes[[i]], gt).max()))
    ious = np.asarray(ious, dtype=np.float64)
    key = f"frac_iou@{iou_threshold:g}"
    if ious.size == 0:
        return {"mean_iou": float("nan"), key: float("nan"), "count": 0}
    return {
        "mean_iou": float(ious.mean()),
        key: float(np.mean(ious >= iou_threshold)),
        "count": int(ious.size),
    }
