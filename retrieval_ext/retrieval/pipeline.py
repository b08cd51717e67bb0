"""The retrieval pipeline's steps, shared by tools/retrieve.py, the trainer's evaluator and the API.

index a database once -> learn (or load) the whitening -> extract the queries -> search every
query with every stage. Everything is written under the directories the caller passes.
"""

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from detectron2.utils import comm
from tqdm import tqdm

from ..data.datasets.catalog import get_dataset_dicts, get_retrieval_metadata, skipped_images
from ..evaluation.evaluator import NoGroundTruthError, db_positions, evaluate_stages
from ..utils.io import atomic_write
from .compression import COMPRESSION_FILE, RegionCompression
from .extractor import FeatureExtractor, comparable_model_config
from .faiss_search import FaissParams
from .index_store import (
    FieldSpec,
    IndexReader,
    IndexSchema,
    IndexWriteError,
    IndexWriter,
    default_schema,
)
from .normalization import PCAWhitening, l2_normalize, learn_pca_whitening
from .search import CS_STAGES, InstanceSearcher, StageResult

__all__ = [
    "index_manifest",
    "build_index",
    "open_index",
    "load_or_learn_whitening",
    "extract_queries",
    "build_searcher",
    "search_all",
    "SearchRun",
    "index_options",
    "prepare_index",
    "search_dataset",
    "score_run",
]

logger = logging.getLogger("retrieval_ext")
# how stored manifest values are compared with the current model's (see comparable_model_config)
MANIFEST_NORMALIZERS = {"model_config": comparable_model_config}


def index_manifest(extractor: FeatureExtractor, dataset: str) -> dict:
    """What an index records about how it was made; a search refuses an index that differs."""
    return {"dataset": dataset, **extractor.fingerprint}


def index_schema(class_boxes: bool) -> IndexSchema:
    """The stored fields: :func:`default_schema` with the IPA vectors kept in float32.

    IPA vectors are raw sums over whole feature maps, which can exceed float16's range; they
    cost 2 x C floats per image, negligible beside the region features.
    """
    fields = [
        FieldSpec(f.name, "image", "exact", f.shape, "float32") if f.name.startswith("ipa_") else f
        for f in default_schema(class_boxes=class_boxes).fields
    ]
    return IndexSchema(fields)


def build_index(
    extractor: FeatureExtractor,
    dataset: str,
    index_dir: str,
    shard_size: int = 256,
    dtype: str = "float16",
    batch_size: int = 1,
    show_progress: bool = True,
    compression: Optional[RegionCompression] = None,
) -> Optional[IndexReader]:
    """Extract every image of ``<dataset>_db`` once and store its features in ``index_dir``.

    With ``compression``, region features are stored compressed (fewer proposals, PCA, int8 /
    float16; see :mod:`.compression`), the compression is saved beside the index and recorded in
    its manifest.

    Resumes an interrupted run (images stored in complete shards are skipped; a run killed at
    any point, even by SIGKILL, resumes to the index an uninterrupted run gives). Under
    torch.distributed each rank extracts the pending images at its positions of the database
    (``i % world_size == rank``) into its own shards and rank 0 finalizes after all ranks are
    done.

    Unreadable images are skipped and listed in the manifest's ``failed`` ({name: reason}):
    those the dataset loader already left out (empty files, non-images, named in its warning)
    and those that fail to decode here (truncated, corrupt; named in one warning at the end).

    Returns:
        the finalized index (on every rank), or the existing one if it was already complete.

    Raises:
        IndexMismatchError: ``index_dir`` holds an index built with another model, config or
            weights (the message names what differs).
        IndexWriteError (an OSError): the index cannot be written (disk full, read-only, a path
            under a file); the images stored before stay stored and a rerun resumes.
        ValueError: no database image could be read.
    """
    db_name = f"{dataset}_db"
    dicts = get_dataset_dicts(db_name)
    db_ids = [d["image_id"] for d in dicts]
    known = set(db_ids)
    pre_skipped = {k: v for k, v in skipped_images(dataset).items() if k not in known}
    # stored images keep the database order; the loader-skipped ones follow, to be listed
    image_list = db_ids + sorted(pre_skipped)
    manifest = index_manifest(extractor, dataset)
    if compression is not None:
        manifest = dict(manifest, region_compression=compression.describe())
    if (Path(index_dir) / "manifest.json").is_file():
        index = IndexReader(index_dir)
        index.check_compatible(manifest, normalize=MANIFEST_NORMALIZERS)
        if index.info["image_list"] == image_list:
            logger.info(f"index {index_dir} is complete ({index.num_images} images), reused")
            return index
    if not image_list:
        raise ValueError(f"{db_name} has no database images: nothing to index")
    rank, world = comm.get_rank(), comm.get_world_size()
    schema = index_schema(extractor.store_class_boxes)
    stored_schema, manifest = prepare_compressed_index(compression, schema, manifest, index_dir)
    writer = IndexWriter(index_dir, manifest, shard_size, dtype, rank, stored_schema)
    failed = []
    try:
        pending = set(writer.pending(image_list))
        # each image belongs to the rank of its position in the database, not in this rank's
        # view of what is pending: ranks open their writers at different moments (another rank
        # may already have written a shard), so slicing their pending lists could skip images
        todo = [d for i, d in enumerate(dicts) if i % world == rank and d["image_id"] in pending]
        if len(pending) < len(image_list):
            stored = sum(1 for i in image_list if i in writer.done_ids)
            marked = len(image_list) - len(pending) - stored
            logger.info(
                f"resuming {index_dir}: {stored} images already stored"
                + (f", {marked} already listed as unreadable" if marked else "")
            )
        if rank == 0:
            for name in sorted(pending & set(pre_skipped)):
                writer.mark_failed(name, pre_skipped[name])
        bar = tqdm(
            total=len(todo),
            desc=f"indexing {db_name}" + (f" [rank {rank}]" if world > 1 else ""),
            disable=not show_progress,
            unit="img",
        )
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            records, bad = extractor.database_records(chunk)
            for image_id, rec in records:
                if compression is not None:
                    rec = compression.compress_record(rec, schema)
                writer.add(image_id, rec)
            for image_id, reason in bad:
                writer.mark_failed(image_id, reason)
                failed.append((image_id, reason))
            bar.update(len(chunk))
        bar.close()
        writer.close()
    except IndexWriteError as e:
        writer.abort()
        raise IndexWriteError(
            f"{e}\nindexing {db_name} stopped; the images stored so far in {index_dir} are kept: "
            "fix the cause (free disk space, a writable RETRIEVAL.INDEX_DIR / OUTPUT_DIR) and "
            "rerun to resume"
        ) from e
    except BaseException:
        writer.abort()
        raise
    finally:
        if failed:
            lines = "\n".join(f"  {i}: {r}" for i, r in failed)
            logger.warning(
                f"{len(failed)} unreadable images of {db_name} skipped (listed in the index "
                f"manifest):\n{lines}"
            )
    comm.synchronize()
    if comm.is_main_process():
        IndexWriter(index_dir, manifest, shard_size, dtype, rank, stored_schema).finalize(
            image_list
        )
    comm.synchronize()
    index = IndexReader(index_dir)
    if index.num_images == 0:
        raise ValueError(
            f"none of the {len(image_list)} database images of {db_name} could be read "
            f"(reasons in {Path(index_dir) / 'manifest.json'}, key 'failed')"
        )
    return index


def open_index(index_dir: str, extractor: Optional[FeatureExtractor], dataset: str) -> IndexReader:
    """Open a finalized index, refusing it if it was built with another model or config.

    How its region features were compressed is read from the index itself, so only the keys of
    :func:`index_manifest` (dataset, model config, weights) are compared.
    """
    index = IndexReader(index_dir)
    if extractor is not None:
        expected = index_manifest(extractor, dataset)
        index.check_compatible(expected, keys=list(expected), normalize=MANIFEST_NORMALIZERS)
    return index


def load_or_learn_whitening(
    extractor: FeatureExtractor,
    whitening_dataset: str,
    test_dataset: str,
    work_dir: str,
    dim: int = 0,
    **index_kwargs,
) -> Optional[PCAWhitening]:
    """PCA whitening learned on another dataset's database IPA-sum vectors (saved, reused).

    The paper learns it on Paris for Oxford and vice versa, so that nothing is learned from the
    test set. Learning on the test dataset itself is allowed but warned about: it leaks.

    Returns:
        None when ``whitening_dataset`` is empty.

    Raises:
        ValueError: the whitening dataset has fewer than 2 readable images.
        OutputWriteError (an OSError): the whitening file cannot be written.
    """
    if not whitening_dataset:
        return None
    if whitening_dataset == test_dataset:
        logger.warning(
            f"whitening is learned on {whitening_dataset!r}, the dataset being evaluated: "
            "it leaks ground truth (the test images' statistics) into the results; the paper "
            "learns it on another dataset, e.g. Paris 6k for Oxford 5k "
            "(RETRIEVAL.WHITENING_DATASET)"
        )
    key = extractor.fingerprint["weights_hash"]
    path = Path(work_dir) / f"whitening-{whitening_dataset}-{key}-d{dim}.npz"
    if path.is_file():
        return PCAWhitening.load(path)
    index = build_index(
        extractor,
        whitening_dataset,
        str(Path(work_dir) / f"index-{whitening_dataset}"),
        **index_kwargs,
    )
    if comm.is_main_process():
        X = l2_normalize(index.image_vectors("ipa_sum"))
        try:
            w = learn_pca_whitening(X, dim=dim or None)
        except ValueError as e:
            raise ValueError(
                f"cannot learn the whitening on {whitening_dataset!r} ({index.num_images} "
                f"readable images): {e}"
            ) from e
        atomic_write(path, w.save)
        logger.info(f"learned PCA whitening on {index.num_images} images of {whitening_dataset}")
    comm.synchronize()
    return PCAWhitening.load(path)


_QUERY_FIELDS = ("ipa_sum", "ipa_max", "box", "crop_sum", "crop_max", "rpa_sum", "rpa_max")


def _queries_signature(extractor: FeatureExtractor, dicts: Sequence[dict]) -> str:
    """What a cached query record depends on: model config, weights, images, boxes, crops."""
    parts = [
        extractor.fingerprint["model_config"],
        extractor.fingerprint["weights_hash"],
        json.dumps(
            [
                [
                    d["image_id"],
                    d["file_name"],
                    list(map(float, d["query_box"])),
                    bool(d.get("crop_query", False)),
                ]
                for d in dicts
            ]
        ),
    ]
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()


def _load_query_cache(cache: Path, signature: str, dicts: Sequence[dict]) -> Optional[List[dict]]:
    """The cached records if ``cache`` holds exactly these queries; None if absent or stale."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as data:
            if "signature" not in data.files or str(data["signature"]) != signature:
                return None
            arrays = {f: np.array(data[f]) for f in _QUERY_FIELDS if dicts}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning(f"ignoring the unreadable query cache {cache} ({e}); extracting again")
        return None
    return [_query_from_cache(arrays, i, d) for i, d in enumerate(dicts)]


def extract_queries(
    extractor: FeatureExtractor, dataset: str, cache_dir: Optional[str] = None
) -> List[dict]:
    """Records of every query of ``<dataset>_query`` (one forward pass each), cached on disk.

    Each query box is checked against its image (EXIF-oriented) by the mapper: a box that
    cannot describe a region raises an error naming the query and the box; one partly outside is
    clamped (see :mod:`retrieval_ext.data.boxes`). The cache is reused only for the same model
    config, weights, query images and boxes; it is written atomically.

    Returns:
        list of query records in query order, each with the dataset dict's ``image_id``,
        ``file_name``, ``category_id`` and ``object_name`` added.

    Raises:
        InvalidBoxError (a ValueError): a query box does not fit its image.
        UnreadableImageError: a query image cannot be read.
    """
    dicts = get_dataset_dicts(f"{dataset}_query")
    cache = None
    if cache_dir:
        key = extractor.fingerprint["weights_hash"]
        cache = Path(cache_dir) / f"queries-{dataset}-{key}.npz"
        signature = _queries_signature(extractor, dicts)
        cached = _load_query_cache(cache, signature, dicts)
        if cached is not None:
            return cached
    records = []
    for d in tqdm(dicts, desc=f"queries {dataset}", unit="query"):
        rec = extractor.query_record(d)
        records.append(_with_query_info(rec, d))
    if cache is not None and comm.is_main_process():
        arrays = {f: np.stack([r[f] for r in records]) for f in _QUERY_FIELDS} if records else {}
        arrays["image_ids"] = np.array(json.dumps([d["image_id"] for d in dicts]))
        arrays["signature"] = np.array(signature)
        atomic_write(cache, lambda tmp: np.savez(tmp, **arrays))
    return records


def _with_query_info(rec: dict, d: dict) -> dict:
    rec = dict(rec)
    for k in ("image_id", "file_name", "category_id", "object_name"):
        if k in d:
            rec[k] = d[k]
    return rec


def _query_from_cache(data, i: int, d: dict) -> dict:
    return _with_query_info({f: data[f][i] for f in _QUERY_FIELDS}, d)


def build_searcher(cfg, index: IndexReader, whitening: Optional[PCAWhitening]) -> InstanceSearcher:
    """An :class:`InstanceSearcher` with the stage settings of ``cfg.RETRIEVAL``."""
    r = cfg.RETRIEVAL
    return InstanceSearcher(
        index,
        whitening=whitening,
        filter_pooling=r.FILTER_POOLING,
        rerank_pooling=r.RERANK_POOLING,
        query_region=r.QUERY_REGION,
        top_n=r.TOP_N,
        qe_m=r.QE_M,
        qe_rerank_mode=r.QE_RERANK_MODE,
        filter_backend=r.FILTER_BACKEND,
        faiss_params=faiss_params_from_cfg(cfg),
        filter_top_k=r.FILTER_TOP_K,
    )


def faiss_params_from_cfg(cfg) -> FaissParams:
    """The faiss filtering index parameters of ``cfg.RETRIEVAL`` (FAISS_*)."""
    r = cfg.RETRIEVAL
    return FaissParams(
        kind=r.FAISS_INDEX,
        nlist=r.FAISS_NLIST,
        pq_m=r.FAISS_PQ_M,
        nprobe=r.FAISS_NPROBE,
        hnsw_m=r.FAISS_HNSW_M,
        ef_search=r.FAISS_EF_SEARCH,
    )


def region_compression_from_cfg(
    cfg, extractor: FeatureExtractor, work_dir: str, **index_kwargs
) -> Optional[RegionCompression]:
    """The region compression of ``cfg.RETRIEVAL.REGION_*``; None when nothing is compressed.

    With ``REGION_PCA_DIM`` the PCA is learned on the database region vectors
    (``rpa_sum`` and ``rpa_max`` together) of ``REGION_PCA_DATASET`` (default: the whitening
    dataset), indexed uncompressed under ``work_dir`` first, and saved there for reuse.

    Raises:
        ValueError: PCA asked without a dataset to learn it on, or on the searched dataset.
    """
    r = cfg.RETRIEVAL
    dtype = r.REGION_DTYPE or r.INDEX_DTYPE
    if not r.REGION_NUM_PROPOSALS and not r.REGION_PCA_DIM and not r.REGION_DTYPE:
        return None
    if not r.REGION_PCA_DIM:
        return RegionCompression(r.REGION_NUM_PROPOSALS, 0, dtype)
    source = r.REGION_PCA_DATASET or r.WHITENING_DATASET
    if not source or source == r.DATASET:
        raise ValueError(
            "RETRIEVAL.REGION_PCA_DIM needs REGION_PCA_DATASET (or WHITENING_DATASET): another "
            f"dataset than the searched {r.DATASET!r} to learn the region PCA on"
        )
    key = extractor.fingerprint["weights_hash"]
    path = Path(work_dir) / f"region-pca-{source}-{key}-d{r.REGION_PCA_DIM}.npz"
    if not path.is_file():
        index = build_index(
            extractor, source, str(Path(work_dir) / f"index-{source}"), **index_kwargs
        )
        if comm.is_main_process():
            vecs = [
                np.asarray(index.regions(i)[f], dtype=np.float32)
                for i in range(index.num_images)
                for f in ("rpa_sum", "rpa_max")
            ]
            learned = RegionCompression.learn(
                np.concatenate(vecs), r.REGION_NUM_PROPOSALS, r.REGION_PCA_DIM, dtype
            )
            atomic_write(path, learned.save)
            logger.info(f"learned the region PCA ({r.REGION_PCA_DIM} dims) on {source}")
        comm.synchronize()
    learned = RegionCompression.load(path)
    return RegionCompression(
        r.REGION_NUM_PROPOSALS,
        r.REGION_PCA_DIM,
        dtype,
        mean=learned.mean,
        components=learned.components,
    )


def prepare_compressed_index(
    compression: Optional[RegionCompression], schema: IndexSchema, manifest: dict, index_dir: str
):
    """What ``build_index`` changes for a compressed index, before opening its writer.

    Saves the compression beside the index (the searcher reads it from there) and returns the
    schema and manifest to write with; each record then goes through
    ``compression.compress_record(record, schema)`` (the *uncompressed* schema) before
    ``writer.add``. With ``compression`` None, returns ``schema`` and ``manifest`` unchanged.

    Returns:
        tuple(IndexSchema, dict): the stored schema and the manifest (with
        ``region_compression``, so resuming with another compression is refused).
    """
    if compression is None:
        return schema, manifest
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    if comm.is_main_process():
        atomic_write(Path(index_dir) / COMPRESSION_FILE, compression.save)
    return compression.schema(schema), dict(manifest, region_compression=compression.describe())


def available_stages(searcher: InstanceSearcher, stages: Sequence[str], num_query_classes: int):
    """The requested stages that apply: CS-SR only when the stored class scores are the query
    objects' classes (a model fine-tuned on them)."""
    cs_ok = searcher.num_classes == num_query_classes
    skipped = [s for s in stages if s in CS_STAGES and not cs_ok]
    if skipped:
        logger.info(
            f"skipping {skipped}: the index's class scores have {searcher.num_classes} classes, "
            f"not the {num_query_classes} query objects (CS-SR needs a fine-tuned model)"
        )
    return [s for s in stages if s not in skipped]


def search_all(
    searcher: InstanceSearcher, queries: Sequence[dict], stages: Sequence[str]
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


def index_options(cfg) -> dict:
    """The ``RETRIEVAL.*`` indexing options as :func:`build_index` keyword arguments."""
    r = cfg.RETRIEVAL
    return dict(shard_size=r.SHARD_SIZE, dtype=r.INDEX_DTYPE, batch_size=r.BATCH_SIZE)


def prepare_index(cfg, extractor: FeatureExtractor, dataset: str, index_dir: str):
    """Index ``dataset`` (once) into ``index_dir`` and load or learn the configured whitening.

    The whitening (and the whitening dataset's index) live in ``index_dir``'s parent folder.
    Must run on every rank (indexing is shared between ranks).

    Returns:
        (index, whitening or None)
    """
    work_dir = os.path.dirname(os.path.abspath(index_dir))
    compression = region_compression_from_cfg(cfg, extractor, work_dir, **index_options(cfg))
    index = build_index(
        extractor, dataset, index_dir, compression=compression, **index_options(cfg)
    )
    # kept beside the index it goes with, so that runs sharing an index share its whitening
    whitening = load_or_learn_whitening(
        extractor,
        cfg.RETRIEVAL.WHITENING_DATASET,
        dataset,
        work_dir,
        dim=cfg.RETRIEVAL.WHITENING_DIM,
        **index_options(cfg),
    )
    return index, whitening


def search_dataset(
    cfg,
    extractor: FeatureExtractor,
    dataset: str,
    work_dir: str,
    index_dir: str,
    queries: Optional[List[dict]] = None,
) -> Optional[SearchRun]:
    """Index (once), extract the queries (cached in ``work_dir``) and run every applicable stage.

    The one chain behind ``tools/retrieve.py`` and the trainer's retrieval evaluation. Must be
    called on every rank; the search runs on the main process only.

    Args:
        queries: query records already extracted (e.g. by the trainer's evaluator); None
            extracts them here.

    Returns:
        the :class:`SearchRun` on the main process, None on other ranks.
    """
    index, whitening = prepare_index(cfg, extractor, dataset, index_dir)
    if not comm.is_main_process():
        return None
    if queries is None:
        queries = extract_queries(extractor, dataset, cache_dir=work_dir)
    searcher = build_searcher(cfg, index, whitening)
    meta = get_retrieval_metadata(dataset)
    stages = available_stages(searcher, cfg.RETRIEVAL.STAGES, len(meta.thing_classes))
    return SearchRun(index, queries, search_all(searcher, queries, stages), meta)


def score_run(cfg, run: SearchRun) -> Optional[Dict[str, Dict[str, float]]]:
    """``{stage: {metric: value}}`` of a search, or None (warned) without ground truth."""
    db = get_dataset_dicts(run.metadata.db_dataset)
    try:
        return evaluate_stages(
            run.results,
            run.metadata,
            db_positions(run.index, db),
            loc_top_k=cfg.RETRIEVAL.LOC_TOP_K,
        )
    except NoGroundTruthError as e:
        logger.warning(str(e))
        return None
