"""The retrieval pipeline, stage by stage, as ``tools/retrieve.py`` and the trainer run it.

index the database once (:mod:`.indexing`) -> load or learn the transforms learned on another
dataset (:mod:`.learned`) -> extract the queries (:mod:`.queries`) -> search every query with
every applicable stage (:mod:`.search`). Where each piece is kept: :mod:`.paths`. The results are
scored by :func:`retrieval_ext.evaluation.evaluator.score_run`.
"""

import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.utils import comm
from tqdm import tqdm

from ..data.datasets.catalog import get_dataset_dicts, get_retrieval_metadata
from .compression import RegionCompression
from .contents import MissingFieldError
from .extractor import FeatureExtractor
from .index_store import IndexReader
from .index_weights import adopt_index_weights
from .indexing import build_index
from .learned import (
    load_or_learn_region_pca,
    load_or_learn_region_pq,
    load_or_learn_region_whitening,
    load_or_learn_whitening,
)
from .normalization import PCAWhitening
from .paths import IndexPaths
from .queries import extract_queries
from .search import IndexSearcher
from .stages import CS_STAGES, StageResult

__all__ = [
    "SearchRun",
    "available_stages",
    "prepare_index",
    "region_compression",
    "search_all",
    "search_dataset",
]

logger = logging.getLogger("retrieval_ext")


def region_compression(
    cfg, extractor: FeatureExtractor, dataset: str, work_dir: str, whitening="config"
) -> Optional[RegionCompression]:
    """The region compression of ``cfg.RETRIEVAL.REGION_*``; None when nothing is compressed.

    With ``REGION_PCA_DIM`` the PCA is learned on ``REGION_PCA_DATASET`` (default: the whitening
    dataset), see :func:`~.learned.load_or_learn_region_pca`; with ``REGION_DTYPE`` "pq" the
    product quantiser is learned as ``REGION_PQ`` says (:func:`_region_pq`). The compression
    carries the region whitening CA-SR ranks with (:func:`region_whitening`; ``whitening``: a
    given :class:`PCAWhitening` or None instead of the config's).

    Raises:
        ValueError: PCA asked without a dataset to learn it on, or on the searched ``dataset``.
    """
    r = cfg.RETRIEVAL
    dtype = r.REGION_DTYPE or r.INDEX_DTYPE
    if r.REGION_WHITENING.SOURCE and r.REGION_PCA_DIM:
        raise ValueError(
            "RETRIEVAL.REGION_PCA_DIM and the region whitening (RETRIEVAL.REGION_WHITENING) "
            "cannot be combined: set REGION_WHITENING.SOURCE '' or REGION_PCA_DIM 0"
        )
    if isinstance(whitening, str):
        whitening = region_whitening(cfg, extractor, dataset, work_dir)
    if not (r.REGION_NUM_PROPOSALS or r.REGION_PCA_DIM or r.REGION_DTYPE or whitening):
        return None
    if dtype == "pq":
        return replace(_region_pq(cfg, extractor, dataset, work_dir), whitening=whitening)
    if not r.REGION_PCA_DIM:
        return RegionCompression(r.REGION_NUM_PROPOSALS, 0, dtype, whitening=whitening)
    source = r.REGION_PCA_DATASET or r.WHITENING_DATASET
    if not source or source == dataset:
        raise ValueError(
            "RETRIEVAL.REGION_PCA_DIM needs REGION_PCA_DATASET (or WHITENING_DATASET): another "
            f"dataset than the searched {dataset!r} to learn the region PCA on"
        )
    return load_or_learn_region_pca(
        extractor, source, work_dir, r.REGION_PCA_DIM, r.REGION_NUM_PROPOSALS, dtype, cfg=cfg
    )


def region_whitening(cfg, extractor, dataset, work_dir) -> Optional[PCAWhitening]:
    """The whitening of the searched region vectors (``RETRIEVAL.REGION_WHITENING``): learned on
    a sample of ``dataset`` itself (SOURCE "collection") or on ``WHITENING_DATASET``'s region
    vectors ("whitening_dataset"); None with SOURCE "" or too few vectors to learn on.

    Raises:
        ValueError: an unknown SOURCE, or "whitening_dataset" without a WHITENING_DATASET.
    """
    r = cfg.RETRIEVAL
    w = r.REGION_WHITENING
    if not w.SOURCE:
        return None
    source, sample = _whitening_source(r, dataset)
    if not _gives_vectors(cfg, source, sample, w.MIN_VECTORS):
        logger.warning(
            f"{source} cannot give RETRIEVAL.REGION_WHITENING.MIN_VECTORS ({w.MIN_VECTORS}) "
            "region vectors to learn the region whitening on: region vectors are not whitened"
        )
        return None
    return load_or_learn_region_whitening(
        extractor,
        source,
        work_dir,
        r.RERANK_POOLING,
        w.DIM,
        w.EPS,
        sample_images=sample,
        min_vectors=w.MIN_VECTORS,
        cfg=cfg,
    )


def _whitening_source(r, dataset: str) -> Tuple[str, int]:
    """(dataset, images sampled: 0 = all) the region whitening of ``r.REGION_WHITENING`` is
    learned on."""
    source = r.REGION_WHITENING.SOURCE
    if source == "collection":
        return dataset, r.REGION_PQ.SAMPLE_IMAGES
    if source != "whitening_dataset":
        raise ValueError(
            "RETRIEVAL.REGION_WHITENING.SOURCE must be 'collection', 'whitening_dataset' or '', "
            f"got {source!r}"
        )
    if not r.WHITENING_DATASET:
        raise ValueError(
            "RETRIEVAL.REGION_WHITENING.SOURCE 'whitening_dataset' needs a "
            "RETRIEVAL.WHITENING_DATASET"
        )
    if r.WHITENING_DATASET == dataset:
        logger.warning(
            f"the region whitening is learned on {dataset!r}, the dataset searched, with "
            "RETRIEVAL.REGION_WHITENING.SOURCE 'whitening_dataset': say 'collection' to learn "
            "it on a sample of the collection on purpose"
        )
    return r.WHITENING_DATASET, 0


def _gives_vectors(cfg, source: str, sample: int, min_vectors: int) -> bool:
    """Whether ``source``'s database (``sample`` of its images; 0 = all) can give
    ``min_vectors`` region vectors to learn on (images x ``MODEL.RETRIEVAL.NUM_PROPOSALS``),
    checked before any image is indexed for it."""
    most = min(len(get_dataset_dicts(f"{source}_db")), sample or 2**62)
    return most * cfg.MODEL.RETRIEVAL.NUM_PROPOSALS >= min_vectors


def _region_pq(cfg, extractor, dataset, work_dir) -> RegionCompression:
    """The product-quantised region compression of ``RETRIEVAL.REGION_PQ``: learned on a sample
    of ``dataset`` itself, or on ``REGION_PQ.DATASET``."""
    r = cfg.RETRIEVAL
    if r.REGION_PCA_DIM:
        raise ValueError(
            "RETRIEVAL.REGION_DTYPE 'pq' quantises the full region vectors: set "
            "RETRIEVAL.REGION_PCA_DIM 0 (or another REGION_DTYPE to store PCA-projected vectors)"
        )
    source = r.REGION_PQ.DATASET or dataset
    own = source == dataset
    sample = r.REGION_PQ.SAMPLE_IMAGES if own else 0
    if not _gives_vectors(cfg, source, sample, r.REGION_PQ.MIN_VECTORS):
        logger.warning(
            f"{source} cannot give RETRIEVAL.REGION_PQ.MIN_VECTORS ({r.REGION_PQ.MIN_VECTORS}) "
            "region vectors to learn a product quantiser on: region vectors are stored int8"
        )
        return RegionCompression(r.REGION_NUM_PROPOSALS, 0, "int8")
    return load_or_learn_region_pq(
        extractor,
        source,
        work_dir,
        r.REGION_PQ.M,
        r.REGION_PQ.OPQ,
        r.REGION_NUM_PROPOSALS,
        sample_images=sample,
        min_vectors=r.REGION_PQ.MIN_VECTORS,
        cfg=cfg,
    )


def prepare_index(
    cfg, extractor: FeatureExtractor, dataset: str, paths: IndexPaths
) -> Tuple[IndexReader, Optional[PCAWhitening]]:
    """Index ``dataset`` (once) into ``paths.index_dir``; load or learn the configured whitening.

    The whitening, the region PCA and the indexes they are learned on live in
    ``paths.work_dir``, beside the index they go with, so that runs sharing an index share them.
    Must run on every rank (indexing is shared between ranks).

    When the config names no weights file, the weights an existing index in
    ``paths.index_dir`` was built with are loaded first (see :mod:`.index_weights`).

    Returns:
        (index, whitening or None)
    """
    # first: the region compression and the whitening are keyed by the weights' hash
    adopt_index_weights(extractor, paths.index_dir)
    compression = region_compression(cfg, extractor, dataset, paths.work_dir)
    index = build_index(cfg, extractor, dataset, paths.index_dir, compression=compression)
    whitening = load_or_learn_whitening(
        extractor,
        cfg.RETRIEVAL.WHITENING_DATASET,
        dataset,
        paths.work_dir,
        dim=cfg.RETRIEVAL.WHITENING_DIM,
        cfg=cfg,
    )
    return index, whitening


def available_stages(searcher: IndexSearcher, stages: Sequence[str], num_query_classes: int):
    """The requested stages that apply: CS-SR only when the stored class scores are the query
    objects' classes (a model fine-tuned on them).

    Raises:
        MissingFieldError: another requested stage needs a field the index does not store (the
            message names the key to set).
    """
    cs_ok = searcher.num_classes == num_query_classes
    skipped = [s for s in stages if s in CS_STAGES and not cs_ok]
    if skipped:
        held = (
            f"class scores of {searcher.num_classes} classes"
            if searcher.num_classes is not None
            else "no class scores"
        )
        logger.info(
            f"skipping {skipped}: the index stores {held}, not of the {num_query_classes} query "
            "objects (CS-SR needs a model fine-tuned on them)"
        )
    for s in stages:
        problem = None if s in skipped else searcher.unsupported(s)
        if problem:
            raise MissingFieldError(f"index {searcher.index.root}: {problem}")
    return [s for s in stages if s not in skipped]


def search_all(
    searcher: IndexSearcher, queries: Sequence[dict], stages: Sequence[str]
) -> Dict[str, List[StageResult]]:
    """Search every query with every stage.

    Returns:
        {stage: [StageResult per query, in query order]}
    """
    results: Dict[str, List[StageResult]] = {s: [] for s in stages}
    for q in tqdm(queries, desc="searching", unit="query"):
        out = searcher.search(q, stages, class_id=q.get("category_id"))
        for s in stages:
            results[s].append(out[s])
    return results


@dataclass
class SearchRun:
    """Everything one search of a dataset produced (main process only).

    Attributes:
        index: the database index that was searched.
        queries: the query records, in ``<dataset>_query`` order.
        results: {stage: [StageResult per query]}.
        metadata: the dataset's metadata (protocol, ground truth, classes).
    """

    index: IndexReader
    queries: List[dict]
    results: Dict[str, List[StageResult]]
    metadata: Any


def search_dataset(
    cfg,
    extractor: FeatureExtractor,
    dataset: str,
    paths: IndexPaths,
    queries: Optional[List[dict]] = None,
) -> Optional[SearchRun]:
    """Index (once), extract the queries (cached in ``paths.cache_dir``) and run every
    applicable stage of ``RETRIEVAL.STAGES``.

    The one chain behind ``tools/retrieve.py`` and the trainer's retrieval evaluation. Must be
    called on every rank; the search runs on the main process only.

    Args:
        queries: query records already extracted (e.g. by the trainer's evaluator); None
            extracts them here.

    Returns:
        the :class:`SearchRun` on the main process, None on other ranks.
    """
    index, whitening = prepare_index(cfg, extractor, dataset, paths)
    if not comm.is_main_process():
        return None
    if queries is None:
        queries = extract_queries(extractor, dataset, cache_dir=paths.cache_dir)
    searcher = IndexSearcher(cfg, index, whitening)
    meta = get_retrieval_metadata(dataset)
    if searcher.cs_sr_classifier == "queries":
        searcher.set_query_classes(queries, len(meta.thing_classes))
    stages = available_stages(searcher, cfg.RETRIEVAL.STAGES, len(meta.thing_classes))
    return SearchRun(index, queries, search_all(searcher, queries, stages), meta)
