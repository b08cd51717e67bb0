"""Filtering stage: rank database images by cosine similarity of image-wise vectors (IPA).

The vectors must already be normalised (:func:`retrieval_ext.retrieval.normalization.
normalize_descriptors`), so cosine similarity is a dot product and the whole stage is a matrix
product followed by a partial sort. Database matrices may be float16 memory maps with up to ~1M
rows: they are read in blocks of rows, upcast to float32 one block at a time.

Ordering is deterministic: descending score, ties broken by ascending database index, NaN scores
ranked as -inf (last). This makes results reproducible and comparable with other search back-ends.
"""

import numpy as np

__all__ = ["cosine_scores", "rank"]

# Database rows per matrix-product block (bounds the float32 copy of a float16 memory map).
_DB_BLOCK_ROWS = 65536
# Score-matrix elements per query chunk in rank() (2**24 float32 = 64 MiB).
_SCORE_BUDGET = 1 << 24


def cosine_scores(queries, db, block_rows=_DB_BLOCK_ROWS):
    """Dot products between already L2-normalised query and database vectors.

    Args:
        queries (array-like): (Q, D) or (D,) query vectors, any float dtype.
        db (array-like): (N, D) database vectors, any float dtype (memory maps welcome).
        block_rows (int): database rows multiplied at once.

    Returns:
        np.ndarray: float32 (Q, N) scores, or (N,) for a 1-D query; ``scores[q, i]`` compares
        query ``q`` with database row ``i``.
    """
    q = np.asarray(queries).astype(np.float32, copy=False)
    single = q.ndim == 1
    if single:
        q = q[None]
    db = np.asarray(db)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"shape mismatch: queries {q.shape}, db {db.shape}")
    out = np.empty((q.shape[0], db.shape[0]), dtype=np.float32)
    for s in range(0, db.shape[0], block_rows):
        rows = slice(s, s + block_rows)
        out[:, rows] = q @ db[rows].astype(np.float32, copy=False).T
    return out[0] if single else out


def _sort_key(scores):
    """Smaller key = better rank; NaN scores rank as -inf, i.e. last."""
    key = -scores
    nan = np.isnan(key)
    if nan.any():
        key = np.where(nan, np.inf, key)
    return key


def _top_k_rows(key, k):
    """Per row, indices of the k smallest keys (ties: smallest index), sorted by (key, index)."""
    out = np.empty((key.shape[0], k), dtype=np.int64)
    # argpartition picks an arbitrary subset of the elements tied with the k-th value; keeping
    # everything strictly better plus the lowest-indexed ties makes the top-k an exact prefix of
    # the full stable ranking.
    kth_pos = np.argpartition(key, k - 1, axis=1)[:, [k - 1]]
    kth = np.take_along_axis(key, kth_pos, axis=1)[:, 0]
    for r in range(key.shape[0]):
        row = key[r]
        better = np.flatnonzero(row < kth[r])
        tied = np.flatnonzero(row == kth[r])[: k - better.size]
        sel = np.concatenate([better, tied])
        out[r] = sel[np.lexsort((sel, row[sel]))]
    return out


def rank(queries, db, top_k=None):
    """Rank database vectors for each query by descending cosine similarity.

    Args:
        queries (array-like): (Q, D) or (D,) already-normalised query vectors.
        db (array-like): (N, D) already-normalised database vectors (memory maps welcome).
        top_k (int or None): keep only the best ``k = min(top_k, N)`` per query; None keeps all N.
            The top-k result is exactly the prefix of the full ranking.

    Returns:
        tuple(np.ndarray, np.ndarray): ``order`` int64 (Q, k) database indices, best first (ties by
        ascending index, NaN scores as -inf), and ``scores`` float32 (Q, k), the score of each
        ``order`` entry. For a 1-D query both are 1-D (k,).
    """
    q = np.asarray(queries)
    single = q.ndim == 1
    if single:
        q = q[None]
    n = int(np.asarray(db).shape[0])
    if top_k is None:
        k = n
    else:
        if int(top_k) < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        k = min(int(top_k), n)
    order = np.empty((q.shape[0], k), dtype=np.int64)
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    if k == 0:
        return (order[0], scores[0]) if single else (order, scores)
    chunk = max(1, _SCORE_BUDGET // max(n, 1))
    for s in range(0, q.shape[0], chunk):
        rows = slice(s, s + chunk)
        sc = cosine_scores(q[rows], db)
        key = _sort_key(sc)
        if k == n:
            # Stable sort of the key = ties keep ascending database index.
            idx = np.argsort(key, axis=1, kind="stable")
        else:
            idx = _top_k_rows(key, k)
        order[rows] = idx
        scores[rows] = np.take_along_axis(sc, idx, axis=1)
    if single:
        return order[0], scores[0]
    return order, scores
