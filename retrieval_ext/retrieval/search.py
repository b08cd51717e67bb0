"""Search a stored index with a query record: :class:`IndexSearcher` runs the stages of
:mod:`~retrieval_ext.retrieval.stages` (filtering, spatial reranking, query expansion).

Every stage reads stored features only; the network never runs here.

Gated QE (``qe_gate_z`` > 0, ``RETRIEVAL.QE_GATE_Z``): each QE stage averages in only those of
the top M whose score stands out from the ranked top N (a robust z-score, see
:meth:`IndexSearcher._gated_top`): the filtering scores for ``filtering_qe``, the CA-SR cosines
for both ``ca_sr_qe`` forms (whitened cosines, with a region whitening: their own threshold
``qe_gate_z_whitened``), the CS-SR probabilities for ``cs_sr_qe``. When none does, the stage
returns the ranking it would have expanded (filtering, CA-SR, CS-SR). With CA-SR box voting
(``box_vote_delta``) the located box is the vote of the proposals that match nearly as well as
the best.

The stage names, their graph and :class:`~retrieval_ext.retrieval.stages.StageResult` are
re-exported here for callers that import them from this module.
"""

import threading
import time
from dataclasses import replace
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import configurable

from .compression import WNORM_SUFFIX, RegionCompression, load_region_compression
from .contents import IndexContents, MissingFieldError, class_accessors
from .faiss_search import FaissFilter, FaissParams
from .normalization import PCAWhitening, l2_normalize, normalize_descriptors
from .query_classes import QueryClassifier, class_prototypes
from .query_expansion import (
    average_query_expansion,
    block_region_vectors,
    outlier_gate,
    region_query_expansion,
)
from .ranking import rank
from .reranking import class_agnostic_rerank, class_specific_rerank
from .stages import CS_STAGES, STAGE_INPUTS, STAGES, StageResult, stage_chain

__all__ = [
    "CS_STAGES",
    "STAGES",
    "STAGE_INPUTS",
    "IndexSearcher",
    "StageResult",
    "stage_chain",
]


def _no_boxes(n):
    return np.full((n, 4), np.nan, dtype=np.float32)


class _Query(NamedTuple):
    """One search's inputs, passed to every stage."""

    record: dict
    class_id: Optional[int]
    top_n: int
    qe_m: int


class IndexSearcher:
    """Runs the stages on one stored index. Thread-safe: search keeps no state between calls.

    Build it from plain arguments, or from a config as detectron2 builds its models:
    ``IndexSearcher(cfg, index, whitening)`` takes the stage settings from ``cfg.RETRIEVAL``
    (see :meth:`from_config`).

    Args:
        index: an :class:`~retrieval_ext.retrieval.index_store.IndexReader`.
        whitening: PCA whitening applied to sum-pooled filtering vectors (queries and database).
        filter_pooling: "sum" or "max" IPA for filtering.
        rerank_pooling: "sum" or "max" region vectors for CA-SR.
        query_region: "crop" (the box pooled on the query's conv map, as the paper) or "rpa" (the
            box through the RoI pooler).
        top_n: images reranked (the paper's N).
        qe_m: images averaged into an expanded query (the paper's M).
        qe_rerank_mode: "region" or "global" form of ``ca_sr_qe`` (see
            :mod:`~retrieval_ext.retrieval.stages`).
        filter_backend: "numpy" (:func:`~retrieval_ext.retrieval.ranking.rank`) or "faiss"
            (:mod:`~retrieval_ext.retrieval.faiss_search`).
        faiss_params: a :class:`~retrieval_ext.retrieval.faiss_search.FaissParams` for the faiss
            back-end (default: exact flat search); approximate indexes are saved in the index's
            directory.
        filter_top_k: 0 = filtering scores the whole database; > 0 = only the best k (with an
            approximate faiss index, the only ones it scores) are ranked, the other images
            follow in index order with score -inf. Must be >= ``top_n`` to rerank N images.
        region_compression: how the index stores region vectors; "auto" (default) reads the
            compression saved beside the index (none: plain RPA). Query region vectors are
            projected with it.
        box_vote_delta: CA-SR located box: 0 = the best proposal's (the paper); > 0 = the vote
            of the proposals within this cosine of the best
            (:func:`~retrieval_ext.retrieval.reranking.vote_box`).
        box_vote_quantile: the vote's box: 0 = the weighted mean of the voters' boxes; in
            (0, 0.5) = the box spanning the weighted quantiles of their edges.
        qe_gate_z: 0 = every QE stage averages the top M (the paper); > 0 = only the top M
            results whose robust z-score within the ranked top N reaches it
            (:func:`~retrieval_ext.retrieval.query_expansion.outlier_gate`, see
            :meth:`_gated_top`); when none does, the stage gives the unexpanded ranking.
        qe_gate_z_whitened: the threshold of the ``ca_sr_qe`` gate when CA-SR ranks by the
            whitened cosine (an index with a region whitening); only with ``qe_gate_z`` > 0.
        cs_sr_box: the box CS-SR (and CS-SR + QE) locate the object with in each reranked image:
            "class" (the paper): the proposal with the highest probability of the query's class
            (its class-regressed box when stored); "region": the image's CA-SR located box (the
            proposals most similar to the query region, voted with ``box_vote_delta``); "auto":
            "class" with the model's class scores, "region" with the query-set classifier (it
            has no class-regressed boxes). The ranking is the same.
        cs_sr_classifier: where CS-SR reads each proposal's class probabilities: "model" (the
            paper): the class scores the index stores (a box head fine-tuned on the query
            objects); "queries": a softmax over the proposal's cosines to the query objects'
            region vectors (:mod:`~retrieval_ext.retrieval.query_classes`; no training, any
            model; the classes are set by :meth:`set_query_classes`).
        cs_sr_temperature, cs_sr_background: the "queries" classifier's scale and background
            logit (a cosine).
    """

    @configurable
    def __init__(
        self,
        index,
        whitening: Optional[PCAWhitening] = None,
        *,
        filter_pooling: str = "sum",
        rerank_pooling: str = "max",
        query_region: str = "crop",
        top_n: int = 100,
        qe_m: int = 5,
        qe_rerank_mode: str = "region",
        filter_backend: str = "numpy",
        faiss_params: Optional[FaissParams] = None,
        filter_top_k: int = 0,
        region_compression="auto",
        box_vote_delta: float = 0.0,
        box_vote_quantile: float = 0.0,
        qe_gate_z: float = 0.0,
        qe_gate_z_whitened: float = 0.0,
        cs_sr_box: str = "auto",
        cs_sr_classifier: str = "model",
        cs_sr_temperature: float = 30.0,
        cs_sr_background: float = 0.5,
    ):
        for name, value, allowed in [
            ("filter_pooling", filter_pooling, ("sum", "max")),
            ("rerank_pooling", rerank_pooling, ("sum", "max")),
            ("query_region", query_region, ("crop", "rpa")),
            ("qe_rerank_mode", qe_rerank_mode, ("region", "global")),
            ("filter_backend", filter_backend, ("numpy", "faiss")),
            ("cs_sr_box", cs_sr_box, ("auto", "class", "region")),
            ("cs_sr_classifier", cs_sr_classifier, ("model", "queries")),
        ]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value in [
            ("box_vote_delta", box_vote_delta),
            ("qe_gate_z", qe_gate_z),
            ("qe_gate_z_whitened", qe_gate_z_whitened),
        ]:
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (cs_sr_temperature > 0 and np.isfinite(cs_sr_temperature)):
            raise ValueError(
                f"cs_sr_temperature must be a finite number > 0, got {cs_sr_temperature}"
            )
        if not np.isfinite(cs_sr_background):
            raise ValueError(f"cs_sr_background must be finite, got {cs_sr_background}")
        if not 0 <= box_vote_quantile < 0.5:
            raise ValueError(f"box_vote_quantile must be in [0, 0.5), got {box_vote_quantile!r}")
        self.index = index
        self.whitening = whitening
        self.filter_pooling = filter_pooling
        self.rerank_pooling = rerank_pooling
        self.query_region = query_region
        self.top_n = int(top_n)
        self.qe_m = int(qe_m)
        self.qe_rerank_mode = qe_rerank_mode
        self.contents = IndexContents.of_index(index)
        problem = self.contents.missing("filtering", filter_pooling, rerank_pooling)
        if problem:
            raise MissingFieldError(f"index {getattr(index, 'root', '')}: {problem}")
        self.box_vote_delta = float(box_vote_delta)
        self.box_vote_quantile = float(box_vote_quantile)
        self.qe_gate_z = float(qe_gate_z)
        self.qe_gate_z_whitened = float(qe_gate_z_whitened)
        if cs_sr_box == "auto":
            cs_sr_box = "region" if cs_sr_classifier == "queries" else "class"
        self.cs_sr_box = cs_sr_box
        self.cs_sr_classifier = cs_sr_classifier
        self.cs_sr_temperature = float(cs_sr_temperature)
        self.cs_sr_background = float(cs_sr_background)
        self._query_classifier: Optional[QueryClassifier] = None
        self.db = normalize_descriptors(
            index.image_vectors(f"ipa_{filter_pooling}"), filter_pooling, whitening
        )
        self.filter_top_k = int(filter_top_k)
        root = getattr(index, "root", None)
        self._faiss = None
        if filter_backend == "faiss":
            params = faiss_params if faiss_params is not None else FaissParams()
            self._faiss = (
                FaissFilter.load_or_build(self.db, params, root)
                if root is not None
                else FaissFilter(self.db, params)
            )
        if region_compression == "auto":
            region_compression = load_region_compression(root) if root is not None else None
        self.region_compression: Optional[RegionCompression] = region_compression
        c = self.contents
        self._rpa = (
            index.region_accessor(f"rpa_{rerank_pooling}")
            if rerank_pooling in c.region_poolings
            else None
        )
        self._wnorms = None  # the whitened vectors' norms CA-SR ranks with (a region whitening)
        wnorm = f"rpa_{rerank_pooling}{WNORM_SUFFIX}"
        if region_compression is not None and region_compression.whitening is not None:
            if wnorm not in index.schema:
                raise ValueError(
                    f"{root}: the region compression whitens, but the index stores no {wnorm}"
                )
            self._wnorms = index.region_accessor(wnorm)
        self._boxes = index.region_accessor("boxes")
        self._scores = self._class_boxes = None
        if c.class_outputs:
            self._scores, self._class_boxes = class_accessors(index, c)
        self._lock = threading.Lock()
        self._num_classes = None

    @classmethod
    def from_config(cls, cfg, index, whitening: Optional[PCAWhitening] = None):
        """The arguments of a searcher of ``index`` with the stage settings of ``cfg.RETRIEVAL``
        (``FILTER_*``, ``RERANK_POOLING``, ``QUERY_REGION``, ``TOP_N``, ``QE_*``, ``FAISS_*``,
        ``BOX_VOTE_DELTA``, ``CS_SR_*``)."""
        r = cfg.RETRIEVAL
        return {
            "index": index,
            "whitening": whitening,
            "filter_pooling": r.FILTER_POOLING,
            "rerank_pooling": r.RERANK_POOLING,
            "query_region": r.QUERY_REGION,
            "top_n": r.TOP_N,
            "qe_m": r.QE_M,
            "qe_rerank_mode": r.QE_RERANK_MODE,
            "filter_backend": r.FILTER_BACKEND,
            "faiss_params": FaissParams(
                kind=r.FAISS_INDEX,
                nlist=r.FAISS_NLIST,
                pq_m=r.FAISS_PQ_M,
                nprobe=r.FAISS_NPROBE,
                hnsw_m=r.FAISS_HNSW_M,
                ef_search=r.FAISS_EF_SEARCH,
            ),
            "filter_top_k": r.FILTER_TOP_K,
            "box_vote_delta": r.BOX_VOTE_DELTA,
            "box_vote_quantile": r.BOX_VOTE_QUANTILE,
            "qe_gate_z": r.QE_GATE_Z,
            "qe_gate_z_whitened": r.QE_GATE_Z_WHITENED,
            "cs_sr_box": r.CS_SR_BOX,
            "cs_sr_classifier": r.CS_SR_CLASSIFIER,
            "cs_sr_temperature": r.CS_SR_TEMPERATURE,
            "cs_sr_background": r.CS_SR_BACKGROUND,
        }

    def unsupported(self, stage: str) -> Optional[str]:
        """Why ``stage`` cannot run on this index (the field it lacks and the key to set), or
        None when it can."""
        for s in stage_chain(stage):
            if s in CS_STAGES and self.cs_sr_classifier == "queries":
                s = "ca_sr"  # the query-set classifier scores the stored region vectors
            problem = self.contents.missing(s, self.filter_pooling, self.rerank_pooling)
            if problem:
                return problem
        return None

    @property
    def supported_stages(self) -> Tuple[str, ...]:
        """The stages this index has the stored fields for."""
        return tuple(s for s in STAGES if self.unsupported(s) is None)

    @property
    def num_classes(self) -> Optional[int]:
        """Object classes of the stored class scores (without background); None if the index
        stores none (or, for an index without recorded contents, has no proposal). With the
        "queries" classifier: the classes :meth:`set_query_classes` set (None before)."""
        if self.cs_sr_classifier == "queries":
            q = self._query_classifier
            return None if q is None else q.num_classes
        if self._scores is None:
            return None
        if self.contents.num_classes:
            return self.contents.num_classes
        with self._lock:
            if self._num_classes is None:
                for i in range(self.index.num_images):
                    s = self._scores(i)
                    if len(s):
                        self._num_classes = int(s.shape[1]) - 1
                        break
        return self._num_classes

    def set_query_classes(self, queries: Sequence[dict], num_classes: int) -> None:
        """The classes of the "queries" CS-SR classifier: class ``c``'s weight is the mean region
        vector of the queries whose ``category_id`` is ``c`` (every class needs one)."""
        vectors = [self.query_region_vector(q) for q in queries]
        weights = class_prototypes(vectors, [q["category_id"] for q in queries], int(num_classes))
        self._query_classifier = QueryClassifier(
            weights, self.cs_sr_temperature, self.cs_sr_background, self._rpa, self._decode_rows
        )

    def query_vector(self, query: dict) -> np.ndarray:
        """The query's normalised (and whitened) filtering vector, (D,)."""
        v = np.asarray(query[f"ipa_{self.filter_pooling}"], dtype=np.float32)[None]
        return normalize_descriptors(v, self.filter_pooling, self.whitening)[0]

    def query_region_vector(self, query: dict) -> np.ndarray:
        """The query box's normalised region vector for CA-SR, (C,)."""
        v = np.asarray(query[f"{self.query_region}_{self.rerank_pooling}"], dtype=np.float32)
        if self.region_compression is not None:
            return self.region_compression.project_query(v)
        return l2_normalize(v)

    def search(
        self,
        query: dict,
        stages: Sequence[str] = STAGES,
        class_id: Optional[int] = None,
        top_n: Optional[int] = None,
        qe_m: Optional[int] = None,
    ) -> Dict[str, StageResult]:
        """Run the requested stages (and those they build on) for one query.

        Args:
            query: a query record (see ``extractor.outputs_to_query``).
            stages: stage names, a subset of :data:`STAGES`.
            class_id: the query object's class, required by the CS-SR stages.
            top_n, qe_m: this call's N (images reranked) and M (images averaged into an expanded
                query); None = the searcher's own.

        Returns:
            {stage: StageResult} for exactly the requested stages.
        """
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
        for s in stages:
            problem = self.unsupported(s)
            if problem:
                raise MissingFieldError(f"index {getattr(self.index, 'root', '')}: {problem}")
        if any(s in CS_STAGES for s in stages):
            k = self.num_classes
            if class_id is None or k is None or not 0 <= int(class_id) < k:
                raise ValueError(
                    f"CS-SR needs the query's class id in [0, {k}) of the fine-tuned model's "
                    f"classes, got {class_id}"
                )
        n = self.top_n if top_n is None else int(top_n)
        m = self.qe_m if qe_m is None else int(qe_m)
        if n < 0 or m < 0:
            raise ValueError(f"top_n and qe_m must be >= 0, got top_n={n}, qe_m={m}")
        q = _Query(query, class_id, n, m)
        done: Dict[str, StageResult] = {}
        for s in stages:
            for stage in stage_chain(s):
                if stage not in done:
                    done[stage] = getattr(self, f"_{stage}")(q, done)
        return {s: done[s] for s in stages}

    # -- building blocks -------------------------------------------------------------------------
    def _filter(self, qv):
        if self._faiss is not None:
            return self._faiss.rank(qv, self.filter_top_k)
        if self.filter_top_k and self.filter_top_k < self.db.shape[0]:
            order, scores = rank(qv, self.db, top_k=self.filter_top_k)
            rest = np.setdiff1d(np.arange(self.db.shape[0], dtype=np.int64), order)
            return np.concatenate([order, rest]), np.concatenate(
                [scores, np.full(rest.size, -np.inf, np.float32)]
            )
        order, scores = rank(qv[None], self.db)
        return order[0], scores[0]

    def _global_qe(self, qv, order, m):
        return average_query_expansion(qv, self.db, order, m)

    def _ca(self, region, order, scores, n):
        # compressed float vectors are stored unit-norm; int8 codes are scaled per vector;
        # product-quantised codes are scored from their codes (similarity)
        # with a region whitening, the whitened cosine ranks and the plain one locates
        comp = self.region_compression
        unit = comp is not None and comp.dtype not in ("int8", "pq")
        similarity = comp.similarity() if comp is not None else None
        rank = None
        if self._wnorms is not None:
            rank = (*comp.rank_query(region), self._wnorms)
        return class_agnostic_rerank(
            region,
            order,
            scores,
            self._rpa,
            self._boxes,
            n,
            normalized=unit,
            box_vote_delta=self.box_vote_delta,
            box_vote_quantile=self.box_vote_quantile,
            similarity=similarity,
            rank=rank,
        )

    def _best_regions(self, ca, images) -> np.ndarray:
        """L2-normalised stored region vectors of the located proposals of ``images`` (database
        indices of the CA-SR block, region QE); product-quantised codes are decoded, those rows
        only."""
        return block_region_vectors(ca, images, self._rpa, self._decode_rows)

    @property
    def _decode_rows(self):
        """Stored region rows -> float vectors of the query's space (None: the rows are)."""
        comp = self.region_compression
        return comp.decode if comp is not None else None

    def _cs(self, q: "_Query", order, scores, n):
        if self.cs_sr_classifier == "queries":
            class_scores, boxes = self._query_classifier.scores, self._boxes
        else:
            class_scores = self._scores
            boxes = self._class_boxes if self._class_boxes is not None else self._boxes
        r = class_specific_rerank(int(q.class_id), order, scores, class_scores, boxes, n)
        if self.cs_sr_box == "region" and r.top_n:
            r = self._located_by_region(q, r)
        return r

    def _located_by_region(self, q: "_Query", r):
        """``r`` (a CS-SR result) with each reranked image's box replaced by its CA-SR located
        box: the proposals most similar to the query region (with box voting)."""
        n = r.top_n
        ca = self._ca(self.query_region_vector(q.record), r.order[:n], r.scores[:n], n)
        by_image = {int(i): b for i, b in zip(ca.order, ca.boxes)}
        boxes = r.boxes.copy()
        for j in np.flatnonzero(r.best_proposal[:n] >= 0):
            boxes[j] = by_image[int(r.order[j])]
        return replace(r, boxes=boxes)

    # -- stages: each reads the results of its STAGE_INPUTS from ``done`` ------------------------
    def _filtering(self, q: _Query, done) -> StageResult:
        t = time.perf_counter()
        order, scores = self._filter(self.query_vector(q.record))
        return StageResult(order, scores, _no_boxes(self.db.shape[0]), time.perf_counter() - t)

    def _filtering_qe(self, q: _Query, done) -> StageResult:
        base = done["filtering"]
        t = time.perf_counter()
        qv = self.query_vector(q.record)
        if self.qe_gate_z:
            top = self._gated_top(base.order, base.scores, q.qe_m, q.top_n)
            if top.size == 0:  # nothing stands out: the unexpanded ranking
                return StageResult(base.order, base.scores, base.boxes, time.perf_counter() - t)
            qv = self._global_qe(qv, top, q.qe_m)
        else:
            qv = self._global_qe(qv, base.order, q.qe_m)
        order, scores = self._filter(qv)
        return StageResult(order, scores, _no_boxes(self.db.shape[0]), time.perf_counter() - t)

    def _ca_sr(self, q: _Query, done) -> StageResult:
        base = done["filtering"]
        t = time.perf_counter()
        r = self._ca(self.query_region_vector(q.record), base.order, base.scores, q.top_n)
        return StageResult.from_rerank(r, time.perf_counter() - t)

    def _ca_sr_qe(self, q: _Query, done) -> StageResult:
        base, ca = done["filtering"], done["ca_sr"]
        t = time.perf_counter()
        region = self.query_region_vector(q.record)
        if self.qe_gate_z:
            # whitened cosines (a region whitening) have heavier tails: their own threshold
            z = self.qe_gate_z_whitened if self._wnorms is not None else self.qe_gate_z
            top = self._gated_top(ca.order, ca.scores, q.qe_m, ca.top_n, ca.best_proposal, z)
            if top.size == 0:  # nothing stands out: the CA-SR ranking
                return replace(ca, seconds=time.perf_counter() - t)
        else:
            top = ca.order[: min(q.qe_m, ca.top_n)]
        if self.qe_rerank_mode == "region":
            if not self.qe_gate_z:  # the top M located images
                n_top = min(q.qe_m, ca.top_n)
                top = ca.order[:n_top][ca.best_proposal[:n_top] >= 0]
            best = self._best_regions(ca, top)
            expanded = region_query_expansion(region, best) if len(best) else region
            r = self._ca(expanded, base.order, base.scores, q.top_n)
        else:
            source = top if self.qe_gate_z else ca.order
            qv = self._global_qe(self.query_vector(q.record), source, q.qe_m)
            order, scores = self._filter(qv)
            r = self._ca(region, order, scores, q.top_n)
        return StageResult.from_rerank(r, time.perf_counter() - t)

    def _cs_sr(self, q: _Query, done) -> StageResult:
        base = done["filtering"]
        t = time.perf_counter()
        r = self._cs(q, base.order, base.scores, q.top_n)
        return StageResult.from_rerank(r, time.perf_counter() - t)

    def _cs_sr_qe(self, q: _Query, done) -> StageResult:
        cs = done["cs_sr"]
        t = time.perf_counter()
        top = cs.order
        if self.qe_gate_z:
            top = self._gated_top(cs.order, cs.scores, q.qe_m, cs.top_n, cs.best_proposal)
            if top.size == 0:  # nothing stands out: the CS-SR ranking
                return replace(cs, seconds=time.perf_counter() - t)
        order, scores = self._filter(self._global_qe(self.query_vector(q.record), top, q.qe_m))
        r = self._cs(q, order, scores, q.top_n)
        return StageResult.from_rerank(r, time.perf_counter() - t)

    def _gated_top(self, order, scores, m, top_n, best_proposal=None, z=None) -> np.ndarray:
        """The database indices among the first ``m`` of a ranking that pass the QE gate.

        Candidates are the first ``m`` entries of a filtering ranking, or of a reranked one
        (``best_proposal`` given) the first ``min(m, top_n)`` that have a located proposal; each
        passes when its score's robust z-score within the scores of the first ``top_n`` entries
        (the filtering top N, or the reranked block) reaches ``z`` (default ``qe_gate_z``).

        Returns:
            int64 (M',) database indices in ranking order, M' <= m (empty: nothing passes).
        """
        if best_proposal is None:
            idx = np.arange(min(int(m), len(order)))
        else:
            idx = np.arange(min(int(m), int(top_n)))
            idx = idx[np.asarray(best_proposal)[idx] >= 0]
        z = self.qe_gate_z if z is None else z
        keep = outlier_gate(scores[idx], scores[: int(top_n)], z=z)
        return np.asarray(order, dtype=np.int64)[idx[keep]]
