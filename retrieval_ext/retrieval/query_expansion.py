"""Query expansion (Salvador et al. 2016, Sec. 3.3): average the query with its top results.

* Global QE (:func:`average_query_expansion`): the query's image vector is averaged with the image
  vectors of the top M database images of a ranking, and the database is searched again.
* Region QE (:func:`region_query_expansion`): after spatial reranking, the query *region* vector is
  averaged with the RPA vectors of the best proposal of each of the top M reranked images.
* alpha-QE (:func:`alpha_query_expansion`, Radenovic et al., TPAMI 2019) is an extra: a weighted
  average with weights ``sim^alpha``; alpha = 0 gives global QE.
* Gated QE (:func:`outlier_gate`) is an extra for collections where a query may have fewer
  relevant images than M: only the top results whose score stands out from the bulk of the
  ranking's scores (a robust z-score) are averaged in; the others would pull the query towards
  look-alikes.

All vectors are expected already L2-normalised (as the ranking uses them); they are averaged as
given and the result is L2-normalised. Database matrices may be float16 memory maps: only the M
rows used are read and upcast. Outputs are float32 (D,).
"""

import numpy as np

from .normalization import l2_normalize
from .reranking import make_accessor

__all__ = [
    "average_query_expansion",
    "alpha_query_expansion",
    "outlier_gate",
    "region_query_expansion",
    "gather_best_region_vectors",
    "block_region_vectors",
]


def _top_rows(db, order, m):
    """float32 (m', D) rows of db for the first m' = min(m, len(order)) entries of order."""
    if int(m) < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    idx = np.asarray(order, dtype=np.int64).reshape(-1)[: int(m)]
    # Fancy indexing a memory map reads only these rows.
    return np.asarray(db)[idx].astype(np.float32, copy=False)


def _check_dim(query, rows, what):
    if rows.ndim != 2 or rows.shape[1] != query.size:
        raise ValueError(f"{what} must be (M, {query.size}), got shape {rows.shape}")


def average_query_expansion(query, db, order, m=5):
    """Global average query expansion.

    Args:
        query (array-like): (D,) normalised query vector.
        db (array-like): (N, D) normalised database vectors (memory maps welcome).
        order (array-like): (L,) database indices, best first (a ranking of this query).
        m (int): number of top results averaged with the query; if the ranking has fewer, all of
            it is used; m = 0 returns the (normalised) query.

    Returns:
        np.ndarray: float32 (D,), ``l2(query + sum of top-m rows) / (1 + m')`` (the division does
        not change the direction, it is the mean).
    """
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    rows = _top_rows(db, order, m)
    _check_dim(q, rows, "db")
    return l2_normalize((q + rows.sum(axis=0)) / (1 + rows.shape[0]))


def alpha_query_expansion(query, db, order, m=5, alpha=3.0):
    """alpha-weighted query expansion (alpha-QE, Radenovic, Tolias and Chum, TPAMI 2019).

    Each of the top m vectors x_i is weighted by ``max(x_i . query, 0) ** alpha``; the query has
    weight 1. Negative similarities are clipped to 0 so that non-integer alpha is defined.
    alpha = 0 gives every result weight 1, i.e. :func:`average_query_expansion`.

    Args:
        query (array-like): (D,) normalised query vector.
        db (array-like): (N, D) normalised database vectors.
        order (array-like): (L,) database indices, best first.
        m (int): number of top results used (fewer if the ranking is shorter).
        alpha (float): exponent, >= 0.

    Returns:
        np.ndarray: float32 (D,) L2-normalised expanded query.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    rows = _top_rows(db, order, m)
    _check_dim(q, rows, "db")
    sims = np.clip(rows @ q, 0.0, None)
    # 0 ** 0 is 1 in numpy, which is the alpha = 0 limit we want.
    weights = np.power(sims, np.float32(alpha))
    return l2_normalize(q + weights @ rows)


def outlier_gate(top_scores, block_scores, z=4.0):
    """Which of the top results stand out from the scores of the whole ranked block.

    A result passes when its robust z-score ``(s - median(block)) / (1.4826 * MAD(block))`` is at
    least ``z``: the median and the median absolute deviation (scaled to a standard deviation
    under normality) describe the non-matching bulk and are barely moved by the few true matches
    at the top. With one relevant image per query and M = 5, plain QE averages 4 wrong images into
    the query; this gate keeps only results that are clear outliers.

    Args:
        top_scores (array-like): (M,) scores of the results that may be averaged in, best first.
        block_scores (array-like): (L,) the scores of the block they come from (e.g. the CA-SR
            scores of the reranked top N, or the filtering scores of the top N); non-finite
            entries (images without proposals) are ignored.
        z (float): threshold, > 0.

    Returns:
        np.ndarray: bool (M,). All False when the block has no finite score. When the MAD is 0
        (most scores equal), any score above the median passes.
    """
    if not z > 0:
        raise ValueError(f"gate threshold z must be > 0, got {z}")
    top = np.asarray(top_scores, dtype=np.float64).reshape(-1)
    block = np.asarray(block_scores, dtype=np.float64).reshape(-1)
    block = block[np.isfinite(block)]
    if block.size == 0:
        return np.zeros(top.shape, dtype=bool)
    med = np.median(block)
    scale = 1.4826 * np.median(np.abs(block - med))
    if scale == 0:
        return top > med
    return (top - med) / scale >= z


def region_query_expansion(query_region, best_region_vectors):
    """Region-level query expansion after spatial reranking.

    Args:
        query_region (array-like): (D,) normalised query region vector.
        best_region_vectors (array-like): (M', D) normalised RPA vectors of the best proposal of
            each of the top M reranked images (see :func:`gather_best_region_vectors`); M' may be 0.

    Returns:
        np.ndarray: float32 (D,), the L2-normalised mean of the query region and the M' vectors.
    """
    q = np.asarray(query_region, dtype=np.float32).reshape(-1)
    rows = np.asarray(best_region_vectors).astype(np.float32, copy=False).reshape(-1, q.size)
    return l2_normalize((q + rows.sum(axis=0)) / (1 + rows.shape[0]))


def gather_best_region_vectors(result, region_vectors, m=5):
    """RPA vectors of the best proposals of the top m reranked images, for region QE.

    Images without a proposal (``best_proposal == -1``) are skipped, so fewer than m vectors may
    come back. Only images of the reranked block are considered.

    Args:
        result (RerankResult): output of a reranking.
        region_vectors (sequence or callable): database index -> (K_i, D) RPA vectors, the same
            ones the reranking used; only the (at most m) images needed are accessed. Like in
            :func:`~retrieval_ext.retrieval.reranking.class_agnostic_rerank`, the returned vectors
            are L2-normalised.
        m (int): number of top reranked images.

    Returns:
        np.ndarray: float32 (M', D) with M' <= min(m, result.top_n); (0, 0) if none.
    """
    if int(m) < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    acc = make_accessor(region_vectors)
    rows = []
    for j in range(min(int(m), result.top_n)):
        b = int(result.best_proposal[j])
        if b < 0:
            continue
        vecs = np.asarray(acc(int(result.order[j])))
        rows.append(l2_normalize(vecs[b]))
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(rows)


def block_region_vectors(result, images, region_vectors, decode=None) -> np.ndarray:
    """L2-normalised region vectors of the located proposals of ``images`` (database indices of
    the reranked block of ``result``), (M', D) in the order given; ``decode`` maps stored rows
    (product-quantised codes) to float vectors."""
    position = {int(i): j for j, i in enumerate(result.order[: result.top_n])}
    rows = []
    for i in images:
        j = position[int(i)]
        rows.append(np.asarray(region_vectors(int(i)))[int(result.best_proposal[j])])
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    rows = np.stack(rows)
    return l2_normalize(decode(rows) if decode is not None else rows)
