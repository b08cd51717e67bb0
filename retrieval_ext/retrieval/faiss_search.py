"""The filtering stage on faiss: exact inner-product search, or an approximate index at scale.

Database vectors are the already-normalised (and whitened) filtering vectors, so the inner product
is the cosine similarity of :func:`~retrieval_ext.retrieval.ranking.rank`. Kinds:

- ``"flat"``: ``IndexFlatIP``, exact (the same ranking as ``rank`` up to float rounding; ties
  are broken by ascending database index here too);
- ``"ivfpq"``: ``IndexIVFPQ`` (inverted lists of ``nlist`` k-means cells, vectors coded with
  ``pq_m`` sub-quantisers of 8 bits); ``nprobe`` cells are visited per query;
- ``"hnsw"``: ``IndexHNSWFlat`` (graph with ``hnsw_m`` links per node), ``ef_search`` candidates.

Approximate indexes are trained on the stored vectors themselves and saved beside the index
(:func:`load_or_build`), keyed by a hash of the vectors and the parameters, so a rebuilt index or
a new whitening builds a new one. faiss GPU is used for ``flat`` / ``ivfpq`` when faiss has GPUs.
"""

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Tuple

import numpy as np

__all__ = ["FAISS_KINDS", "FaissParams", "FaissFilter", "recall_at_k"]

FAISS_KINDS = ("flat", "ivfpq", "hnsw")
logger = logging.getLogger("retrieval_ext")


def _faiss():
    import faiss  # imported lazily: the numpy back-end must work without it

    return faiss


@dataclass(frozen=True)
class FaissParams:
    """Index parameters (0 = chosen from the database size N and dimension D).

    Attributes:
        kind: "flat", "ivfpq" or "hnsw".
        nlist: IVF cells; 0 = about 4 sqrt(N), at most N / 39 (k-means needs ~39 points a cell).
        pq_m: PQ sub-quantisers (must divide D); 0 = the largest of 64, 32, 16, 8 ... dividing D.
        nprobe: IVF cells visited per query.
        hnsw_m: HNSW links per node.
        ef_search: HNSW candidate list length per query (>= k is raised to k).
        use_gpu: move flat/IVF indexes to the GPUs when faiss has any.
    """

    kind: str = "flat"
    nlist: int = 0
    pq_m: int = 0
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    use_gpu: bool = True

    def __post_init__(self):
        if self.kind not in FAISS_KINDS:
            raise ValueError(f"faiss index kind must be one of {FAISS_KINDS}, got {self.kind!r}")

    def resolved(self, n: int, d: int) -> "FaissParams":
        """The parameters with the automatic (0) ones chosen for N vectors of dimension D."""
        nlist = self.nlist or int(max(1, min(4 * np.sqrt(n), n // 39)))
        pq_m = self.pq_m
        if not pq_m:
            pq_m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0)
        if d % pq_m:
            raise ValueError(f"pq_m = {pq_m} must divide the vector dimension {d}")
        return FaissParams(
            self.kind, nlist, pq_m, self.nprobe, self.hnsw_m, self.ef_search, self.use_gpu
        )


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = 100) -> float:
    """Mean over queries of |approx top k  intersect  exact top k| / k.

    Args:
        approx, exact: int64 (Q, >=k) database indices per query, best first.

    Returns:
        float in [0, 1].
    """
    a, e = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, e)]))


def _sort_ties(ids: np.ndarray, sc: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, order by (descending score, ascending id); -1 ids (faiss' "no result") last."""
    key = np.where(ids < 0, np.inf, -sc.astype(np.float64))
    perm = np.lexsort((ids, key), axis=-1)
    return np.take_along_axis(ids, perm, -1), np.take_along_axis(sc, perm, -1)


class FaissFilter:
    """Top-k inner-product search of normalised query vectors against a database on faiss.

    Args:
        db: float (N, D) normalised database vectors (converted to float32 once).
        params: :class:`FaissParams`.
        index: an already built / loaded faiss index of ``db`` (skips building).
    """

    def __init__(self, db: np.ndarray, params: FaissParams = FaissParams(), index=None):
        faiss = _faiss()
        self.db = np.ascontiguousarray(db, dtype=np.float32)
        if self.db.ndim != 2:
            raise ValueError(f"db must be 2-D (N, D), got shape {self.db.shape}")
        n, d = self.db.shape
        self.params = params.resolved(n, d)
        self.index = index if index is not None else self._build(faiss)
        self._apply_search_params(faiss)
        if self.params.use_gpu and self.params.kind != "hnsw" and _num_gpus(faiss):
            self.index = faiss.index_cpu_to_all_gpus(self.index)

    @property
    def exact(self) -> bool:
        return self.params.kind == "flat"

    def _build(self, faiss):
        n, d = self.db.shape
        p = self.params
        if p.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif p.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            # PQ with 8 bits needs >= 256 training points per sub-quantiser codebook
            if n < max(p.nlist, 256):
                raise ValueError(
                    f"ivfpq needs at least {max(p.nlist, 256)} database vectors to train, got {n}"
                )
            rng = np.random.default_rng(0)
            train = self.db[rng.choice(n, min(n, 256 * max(p.nlist, 256)), replace=False)]
            index.train(train)
        index.add(self.db)
        return index

    def _apply_search_params(self, faiss):
        index = faiss.downcast_index(self.index)
        if hasattr(index, "nprobe"):
            index.nprobe = int(self.params.nprobe)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = int(self.params.ef_search)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Best ``k`` database rows per query.

        Args:
            queries: float (Q, D) or (D,) normalised query vectors.
            k: results per query (capped at N).

        Returns:
            ``order`` int64 (Q, k') and ``scores`` float32 (Q, k'), best first, ties by ascending
            index; an approximate index may return fewer than k hits, padded with index -1 and
            score -inf. 1-D for a 1-D query.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        single = q.ndim == 1
        q = q[None] if single else q
        k = min(int(k), self.db.shape[0])
        if k <= 0:
            e = (np.empty((q.shape[0], 0), np.int64), np.empty((q.shape[0], 0), np.float32))
            return (e[0][0], e[1][0]) if single else e
        faiss = _faiss()
        if self.params.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = max(int(self.params.ef_search), k)
        sc, ids = self.index.search(q, k)
        sc = np.where(ids < 0, -np.inf, sc).astype(np.float32)
        ids, sc = _sort_ties(ids.astype(np.int64), sc)
        return (ids[0], sc[0]) if single else (ids, sc)

    def rank(self, query: np.ndarray, top_k: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """A whole-database ranking for one query, as the filtering stage returns it.

        Args:
            query: (D,) normalised query vector.
            top_k: 0 = every image is scored (exact: the full ranking); > 0 = only the best
                ``top_k`` come from the index; the other images follow in ascending index order
                with score -inf (they are neither scored nor ranked).

        Returns:
            ``order`` int64 (N,) and ``scores`` float32 (N,), best first.
        """
        n = self.db.shape[0]
        k = n if (not top_k or top_k >= n) else int(top_k)
        order, scores = self.search(query, k)
        valid = order >= 0
        order, scores = order[valid], scores[valid]
        if order.size < n:
            rest = np.setdiff1d(np.arange(n, dtype=np.int64), order, assume_unique=False)
            order = np.concatenate([order, rest])
            scores = np.concatenate([scores, np.full(rest.size, -np.inf, np.float32)])
        return order, scores

    # -- persistence -----------------------------------------------------------------------
    def save(self, path):
        """Write the (CPU) faiss index to ``path`` atomically."""
        faiss = _faiss()
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and _num_gpus(faiss):
            try:
                index = faiss.index_gpu_to_cpu(index)
            except RuntimeError:  # already a CPU index
                pass
        tmp = f"{path}.tmp-{os.getpid()}"
        faiss.write_index(index, tmp)
        os.replace(tmp, path)

    @classmethod
    def load_or_build(cls, db: np.ndarray, params: FaissParams, directory) -> "FaissFilter":
        """An approximate index saved in ``directory`` for exactly these vectors and parameters,
        built and saved there if missing. Exact (flat) indexes are rebuilt: adding the vectors
        costs what reading them would.

        Args:
            db: (N, D) normalised database vectors.
            params: :class:`FaissParams`.
            directory: where the index is saved (the feature index's directory).
        """
        db = np.ascontiguousarray(db, dtype=np.float32)
        resolved = params.resolved(*db.shape)
        if resolved.kind == "flat":
            return cls(db, params)
        key = asdict(resolved)
        key.pop("use_gpu")
        h = hashlib.sha1(repr(sorted(key.items())).encode() + db.tobytes()).hexdigest()[:16]
        path = Path(directory) / f"faiss-{resolved.kind}-{h}.index"
        if path.is_file():
            return cls(db, params, index=_faiss().read_index(str(path)))
        out = cls(db, params)
        try:
            out.save(str(path))
            logger.info(f"saved the {resolved.kind} faiss index of {db.shape[0]} vectors: {path}")
        except OSError as e:  # a read-only index directory: search still works, unsaved
            logger.warning(f"could not save the faiss index to {path}: {e}")
        return out


def _num_gpus(faiss) -> int:
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
