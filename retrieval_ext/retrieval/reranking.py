"""Spatial reranking of the top N filtered images (Salvador et al. 2016, Sec. 3.2).

* CA-SR (class-agnostic): an image scores the best cosine similarity between the query region
  vector and any of its proposals' region vectors (RPA); that proposal's box locates the object,
  or, with box voting (:func:`vote_box`), the similarity-weighted mean of the boxes that score
  nearly as well.
* CS-SR (class-specific): an image scores the best probability of the query's class among its
  proposals, with a network fine-tuned on the query objects; that proposal's (class-regressed)
  box locates the object.

Per-image region data are read through *accessors*: either a sequence (``data[i]``) or a callable
(``fn(i)``), both giving the array for database index ``i``. Only the first ``top_n`` images of the
ranking are ever accessed, so an index store can serve lazily read memory-mapped slices. Arrays may
be float16; each one is upcast to float32 when read. All boxes are XYXY in original-image pixels,
passed through unchanged.
"""

import warnings
from dataclasses import dataclass

import numpy as np

from .normalization import l2_normalize, whitened_cosines

try:
    import torch as _torch
except ImportError:  # pragma: no cover - numpy converts instead
    _torch = None

__all__ = [
    "RerankResult",
    "class_agnostic_rerank",
    "class_specific_rerank",
    "make_accessor",
    "vote_box",
]


@dataclass
class RerankResult:
    """A ranking whose first ``top_n`` entries were spatially reranked.

    Attributes:
        order (np.ndarray): int64 (L,) database indices, best first: the reranked block (``top_n``
            images sorted by rerank score, ties and -inf keeping their filtering order) followed
            by the rest of the input ranking unchanged.
        scores (np.ndarray): float32 (L,). For the block, the rerank score (cosine similarity for
            CA-SR, class probability for CS-SR, -inf for images without proposals); for the tail,
            the *filtering* scores that were passed in. The two are on different scales: compare
            scores only within the block or within the tail.
        boxes (np.ndarray): float32 (L, 4) located box per entry, XYXY in original-image pixels;
            NaN rows for the tail, for images without proposals and when no boxes were given.
        best_proposal (np.ndarray): int64 (L,) index of the best proposal within its image for the
            block; -1 for the tail and for images without proposals.
        top_n (int): size of the reranked block, ``min(top_n, L)``.
    """

    order: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    best_proposal: np.ndarray
    top_n: int


def make_accessor(data):
    """Turn a sequence or a callable into ``fn(db_index) -> np.ndarray or None``.

    Args:
        data (callable, sequence or None): ``data(i)`` or ``data[i]`` gives the array of database
            image ``i``; None gives an accessor that always returns None.

    Returns:
        callable
    """
    if data is None:
        return lambda i: None
    if callable(data):
        return data
    return lambda i: data[i]


def _read(acc, i, ndim_tail, name):
    """Read an accessor entry as float32 with shape (K, *tail); None counts as K = 0."""
    arr = acc(int(i))
    if arr is None:
        return None
    arr = np.asarray(arr).astype(np.float32, copy=False)
    if arr.ndim != ndim_tail + 1:
        raise ValueError(f"{name}[{i}] must be {ndim_tail + 1}-D, got shape {arr.shape}")
    return arr


def _check_ranking(order, scores, top_n):
    order = np.asarray(order, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if order.ndim != 1 or scores.shape != order.shape:
        raise ValueError(
            f"order and scores must be 1-D of equal length: {order.shape}, {scores.shape}"
        )
    if int(top_n) < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    return order, scores, min(int(top_n), order.size)


def _assemble(order, scores, n, block_scores, block_boxes, block_best):
    """Stable-sort the first n entries by block score (descending) and append the tail."""
    # Stable sort on the negated score keeps the filtering order among ties; -inf sorts last.
    perm = np.argsort(-block_scores, kind="stable")
    total = order.size
    out_scores = scores.copy()
    out_scores[:n] = block_scores[perm]
    boxes = np.full((total, 4), np.nan, dtype=np.float32)
    boxes[:n] = block_boxes[perm]
    best = np.full(total, -1, dtype=np.int64)
    best[:n] = block_best[perm]
    out_order = order.copy()
    out_order[:n] = order[:n][perm]
    return RerankResult(out_order, out_scores, boxes, best, n)


def vote_box(boxes, sims, delta, quantile=0.0):
    """The located box refined by voting among the proposals that match nearly as well as the best.

    Max-pooled region vectors barely change when a region takes in some background, so the single
    best proposal is often a loose or shifted box around the object while several overlapping
    proposals score within a few hundredths of it. Their similarity-weighted mean box is closer to
    the object (box voting, Gidaris and Komodakis, ICCV 2015), and needs nothing but the stored
    boxes and the similarities the reranking computed anyway. The voters are mostly parts of the
    object (a part matches the whole object's vector nearly as well), so their mean box is smaller
    than the object; ``quantile`` > 0 takes instead the box spanning the voters' edges: each left
    and top edge at the similarity-weighted ``quantile`` of the voters' left and top edges, each
    right and bottom edge at ``1 - quantile`` of theirs.

    Args:
        boxes (array-like): (K, 4) XYXY proposal boxes, K >= 1.
        sims (array-like): (K,) similarities of the same proposals to the query (cosines).
        delta (float): >= 0; proposals with ``sim >= max(sim) - delta`` vote.
        quantile (float): in [0, 0.5); 0 = the weighted mean box.

    Returns:
        np.ndarray: float32 (4,), ``sum_i w_i box_i / sum_i w_i`` over the voters with
        ``w_i = max(sim_i, 0)`` (equal weights if every voter's similarity is <= 0), or the
        quantile box with the same weights.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sims = np.asarray(sims, dtype=np.float64).reshape(-1)
    if boxes.shape[0] == 0 or sims.shape != (boxes.shape[0],):
        raise ValueError(
            f"vote_box needs (K, 4) boxes and (K,) sims, K >= 1: got {boxes.shape}, "
            f"{sims.shape}"
        )
    if not delta >= 0:
        raise ValueError(f"box voting delta must be >= 0, got {delta}")
    if not 0 <= quantile < 0.5:
        raise ValueError(f"box voting quantile must be in [0, 0.5), got {quantile}")
    voters = sims >= sims.max() - delta
    w = np.clip(sims[voters], 0.0, None)
    if w.sum() <= 0:
        w = np.ones_like(w)
    b = boxes[voters]
    if not quantile:
        return ((w[:, None] * b).sum(axis=0) / w.sum()).astype(np.float32)
    # per edge: the smallest value whose cumulative weight share (in value order) reaches q
    q = np.array([quantile, quantile, 1 - quantile, 1 - quantile])
    order = np.argsort(b, axis=0, kind="stable")
    share = np.cumsum(w[order], axis=0) / w.sum()
    first = np.argmax(share >= q - 1e-12, axis=0)  # the last share is 1 >= q: always found
    return np.take_along_axis(b, order, axis=0)[first, np.arange(4)].astype(np.float32)


def class_agnostic_rerank(
    query_region,
    order,
    scores,
    region_vectors,
    region_boxes=None,
    top_n=100,
    normalized=False,
    box_vote_delta=0.0,
    similarity=None,
    rank=None,
    box_vote_quantile=0.0,
):
    """CA-SR: rerank the top ``top_n`` images by their best proposal's similarity to the query box.

    The top images' region vectors are read in their stored dtype (memory-mapped slices) and
    converted, normalised and multiplied a block of images at a time: the cost is that of the N
    images' bytes, whatever the database size.

    Args:
        query_region (array-like): (D,) query region vector (pooled from the query box on the query
            image's conv map and normalised like the RPA vectors).
        order (array-like): (L,) database indices from the filtering stage, best first.
        scores (array-like): (L,) filtering scores of ``order``.
        region_vectors (sequence or callable): database index -> (K_i, D) RPA vectors of that
            image's proposals (K_i may be 0; None counts as no proposals). They are L2-normalised
            here, so already-normalised vectors are used as they are.
        region_boxes (sequence, callable or None): database index -> (K_i, 4) proposal boxes, XYXY
            in original-image pixels. None: located boxes are NaN.
        top_n (int): number of images reranked (the paper uses 100).
        normalized (bool): the stored vectors are already unit-norm (compressed indexes, see
            :mod:`~retrieval_ext.retrieval.compression`): skip their norms. Scale-free codes
            (int8) are NOT unit-norm and need False.
        box_vote_delta (float): 0 (the paper): the best proposal's box locates the object;
            > 0: :func:`vote_box` of the image's proposals with this delta (scores, order and
            ``best_proposal`` are unchanged).
        box_vote_quantile (float): the vote's box: 0 = the weighted mean of the voters' boxes;
            > 0 = the box spanning their edges' weighted quantiles (see :func:`vote_box`).
        similarity (callable or None): ``fn(parts, q) -> (sum K_i,)`` scores of the rows of the
            arrays ``parts`` against the unit query ``q``, for stored rows that are codes rather
            than vectors (product-quantised: :meth:`RegionPQ.cosines`); None = cosines of the
            stored vectors.
        rank (tuple or None): ``(direction, scale, offset, norms)`` to rank by another score
            than the cosine that locates: each proposal scores
            ``(scale * sim(direction) - offset) / norm`` (the whitened cosine of
            :func:`~.normalization.whitened_cosines`; ``norms`` a sequence or callable giving each
            image's (K_i,) norms), the image its best proposal's score; the located box stays
            that of the cosine with ``query_region``. None: the cosine ranks and locates.

    Returns:
        RerankResult: block scores are cosine similarities in [-1, 1]; images without proposals
        score -inf.
    """
    q = l2_normalize(np.asarray(query_region).reshape(-1))
    order, scores, n = _check_ranking(order, scores, top_n)
    if not box_vote_delta >= 0:
        raise ValueError(f"box_vote_delta must be >= 0, got {box_vote_delta}")
    vec_acc, box_acc = make_accessor(region_vectors), make_accessor(region_boxes)
    block_scores = np.full(n, -np.inf, dtype=np.float32)
    block_boxes = np.full((n, 4), np.nan, dtype=np.float32)
    block_best = np.full(n, -1, dtype=np.int64)
    parts, counts = _gather_regions(vec_acc, order[:n], q.size if similarity is None else None)
    if parts:
        score = (
            (lambda d: _cosines(parts, d, normalized))
            if similarity is None
            else (lambda d: similarity(parts, d))
        )
        sims = score(q)
        ranks = sims if rank is None else _ranking_scores(rank, score, order[:n], counts)
        ends = np.cumsum(counts)
        for j in np.flatnonzero(counts):
            seg = sims[ends[j] - counts[j] : ends[j]]
            rseg = ranks[ends[j] - counts[j] : ends[j]]
            b = int(np.argmax(rseg))
            block_scores[j], block_best[j] = rseg[b], b
            boxes = _read(box_acc, order[j], 1, "region_boxes")
            if boxes is not None:
                if boxes.shape != (counts[j], 4):
                    raise ValueError(
                        f"region_boxes[{order[j]}] has shape {boxes.shape}, expected "
                        f"({counts[j]}, 4)"
                    )
                block_boxes[j] = (
                    vote_box(boxes, seg, box_vote_delta, box_vote_quantile)
                    if box_vote_delta
                    else boxes[int(np.argmax(seg))]
                )
    return _assemble(order, scores, n, block_scores, block_boxes, block_best)


def _ranking_scores(rank, score, images, counts):
    """The ``rank`` scores of every gathered proposal (see :func:`class_agnostic_rerank`)."""
    direction, scale, offset, norms = rank
    acc = make_accessor(norms)
    parts = [_read(acc, i, 0, "norms") for i, c in zip(images, counts) if c]
    if any(p is None or p.shape != (c,) for p, c in zip(parts, counts[counts > 0])):
        raise ValueError("rank norms must give (K_i,) values for every image with proposals")
    q = np.asarray(direction, dtype=np.float32).reshape(-1)
    return whitened_cosines(score(q), np.concatenate(parts), scale, offset)


def _gather_regions(vec_acc, images, dim):
    """The stored region arrays of ``images`` (database indices), as stored (no copy).

    Args:
        vec_acc: database index -> (K_i, D) array or None (no proposals).
        images: (n,) database indices.
        dim: the query's dimension, checked against every non-empty array; None: not checked
            (rows that are codes rather than vectors).

    Returns:
        (parts, counts): the non-empty arrays in the order of ``images``, and int64 (n,) the
        number of proposals of each image (0 for none).
    """
    parts, counts = [], np.zeros(len(images), dtype=np.int64)
    for j, i in enumerate(images):
        arr = vec_acc(int(i))
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.ndim != 2:
            raise ValueError(f"region_vectors[{i}] must be 2-D, got shape {arr.shape}")
        if dim is not None and arr.shape[0] and arr.shape[1] != dim:
            raise ValueError(f"region_vectors[{i}] has dim {arr.shape[1]}, query has {dim}")
        counts[j] = arr.shape[0]
        if arr.shape[0]:
            parts.append(arr)
    return parts, counts


# Rows converted to float32 at once in _cosines: 1024 x 1280 float32 = 5 MB, a buffer reused
# block after block (a float32 copy of the whole gather costs page faults and cache misses).
_COSINE_BLOCK_ROWS = 1024


def _to_float32(dst, src):
    """Convert ``src`` into the float32 buffer ``dst`` (same shape).

    torch's float16 -> float32 copy is vectorised (about 10x numpy's ``copyto`` on the 2-core
    machine of BENCHMARKS.md); numpy is the fallback where torch is not importable.
    """
    if src.dtype == np.float16 and _torch is not None:
        with warnings.catch_warnings():
            # memory-mapped index arrays are read-only; torch only reads this one
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            _torch.from_numpy(dst).copy_(_torch.from_numpy(np.ascontiguousarray(src)))
    else:
        np.copyto(dst, src, casting="unsafe")


def _cosines(parts, q, normalized=False):
    """Cosine of each row of the arrays ``parts`` (each (K_i, D), any dtype) with the unit
    vector ``q`` (D,), concatenated in order.

    Rows are converted into one reused float32 buffer, several images at a time, and scored with
    einsum: numpy's single-threaded SIMD loops beat a multithreaded BLAS matrix-vector product
    at this size on a loaded machine (BENCHMARKS.md, section 4). Rows of norm 0 give 0.

    Returns:
        float32 (sum K_i,)
    """
    total = sum(p.shape[0] for p in parts)
    out = np.empty(total, dtype=np.float32)
    buf = np.empty((min(_COSINE_BLOCK_ROWS, total), q.size), np.float32)
    done = fill = 0

    def flush():
        v = buf[:fill]
        dots = np.einsum("ij,j->i", v, q)
        if not normalized:
            norms = np.sqrt(np.einsum("ij,ij->i", v, v))
            dots = dots / np.maximum(norms, np.float32(1e-12))
        out[done : done + fill] = dots

    for part in parts:
        for a in range(0, part.shape[0], buf.shape[0]):
            src = part[a : a + buf.shape[0]]
            if fill + src.shape[0] > buf.shape[0]:
                flush()
                done, fill = done + fill, 0
            _to_float32(buf[fill : fill + src.shape[0]], src)
            fill += src.shape[0]
    if fill:
        flush()
    return out


def class_specific_rerank(class_id, order, scores, class_scores, region_boxes=None, top_n=100):
    """CS-SR: rerank the top ``top_n`` images by their best proposal's probability of ``class_id``.

    Args:
        class_id (int): foreground class of the query object, 0 <= class_id < C.
        order (array-like): (L,) database indices from the filtering stage, best first.
        scores (array-like): (L,) filtering scores of ``order``.
        class_scores (sequence or callable): database index -> (K_i, C + 1) softmax class scores of
            that image's proposals, background last (detectron2's convention). K_i may be 0; None
            counts as no proposals.
        region_boxes (sequence, callable or None): database index -> proposal boxes, XYXY in
            original-image pixels, either class-agnostic (K_i, 4) or class-specific (K_i, C, 4) /
            (K_i, 4 * C) (detectron2's ``predict_boxes`` layout); with class-specific boxes the
            ``class_id`` box of the best proposal is returned. None: located boxes are NaN.
        top_n (int): number of images reranked.

    Returns:
        RerankResult: block scores are probabilities in [0, 1]; images without proposals score
        -inf.
    """
    class_id = int(class_id)
    if class_id < 0:
        raise ValueError(f"class_id must be >= 0, got {class_id}")
    order, scores, n = _check_ranking(order, scores, top_n)
    cls_acc, box_acc = make_accessor(class_scores), make_accessor(region_boxes)
    block_scores = np.full(n, -np.inf, dtype=np.float32)
    block_boxes = np.full((n, 4), np.nan, dtype=np.float32)
    block_best = np.full(n, -1, dtype=np.int64)
    for j, i in enumerate(order[:n]):
        probs = _read(cls_acc, i, 1, "class_scores")
        if probs is None or probs.shape[0] == 0:
            continue
        num_classes = probs.shape[1] - 1
        if class_id >= num_classes:
            raise ValueError(
                f"class_id {class_id} is not a foreground class of {num_classes} "
                f"(class_scores[{i}] has {probs.shape[1]} columns, background last)"
            )
        b = int(np.argmax(probs[:, class_id]))
        block_scores[j], block_best[j] = probs[b, class_id], b
        boxes = box_acc(int(i))
        if boxes is not None:
            block_boxes[j] = _select_box(
                np.asarray(boxes), b, class_id, probs.shape[0], num_classes, i
            )
    return _assemble(order, scores, n, block_scores, block_boxes, block_best)


def _select_box(boxes, b, class_id, k, num_classes, i):
    """Box of proposal b: class-agnostic (K, 4) or class-specific (K, C, 4) / (K, 4C)."""
    boxes = boxes.astype(np.float32, copy=False)
    if boxes.shape == (k, 4):
        return boxes[b]
    if boxes.shape == (k, num_classes, 4):
        return boxes[b, class_id]
    if boxes.shape == (k, 4 * num_classes):
        return boxes[b].reshape(num_classes, 4)[class_id]
    raise ValueError(
        f"region_boxes[{i}] has shape {boxes.shape}; expected ({k}, 4), ({k}, {num_classes}, 4) "
        f"or ({k}, {4 * num_classes})"
    )
