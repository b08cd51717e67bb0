"""The retrieval pipeline's steps, shared by tools/retrieve.py, the trainer's evaluator and the API.

index a database once -> learn (or load) the whitening -> extract the queries -> search every
query with every stage. Everything is written under the directories the caller passes.
"""
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from tqdm import tqdm

from ..data.datasets import register_custom_dataset
from .extractor import FeatureExtractor
from .index_store import FieldSpec, IndexReader, IndexSchema, IndexWriter, default_schema
from .normalization import PCAWhitening, l2_normalize, learn_pca_whitening
from .search import CS_STAGES, InstanceSearcher, StageResult

__all__ = [
    "register_config_datasets",
    "get_dataset_dicts",
    "index_manifest",
    "build_index",
    "open_index",
    "load_or_learn_whitening",
    "extract_queries",
    "build_searcher",
    "search_all",
]

logger = logging.getLogger("retrieval_ext")


def register_config_datasets(cfg) -> List[str]:
    """Register the custom-format collections of ``cfg.RETRIEVAL.CUSTOM_DATASETS``.

    Returns:
        the registered names.
    """
    names = []
    for entry in cfg.RETRIEVAL.CUSTOM_DATASETS:
        name, sep, root = entry.partition("=")
        if not sep or not name or not root:
            raise ValueError(
                f"RETRIEVAL.CUSTOM_DATASETS entry {entry!r} must read name=/path/to/folder"
            )
        register_custom_dataset(name.strip(), os.path.expanduser(root.strip()))
        names.append(name.strip())
    return names


def get_dataset_dicts(name: str) -> List[dict]:
    """``DatasetCatalog.get(name)`` with an error that lists the registered retrieval datasets."""
    if name not in DatasetCatalog.list():
        known = sorted(n[: -len("_db")] for n in DatasetCatalog.list() if n.endswith("_db"))
        raise KeyError(f"dataset {name!r} is not registered; registered retrieval datasets: {known}")
    return DatasetCatalog.get(name)


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
) -> Optional[IndexReader]:
    """Extract every image of ``<dataset>_db`` once and store its features in ``index_dir``.

    Resumes an interrupted run (images stored in complete shards are skipped). Under
    torch.distributed each rank extracts every ``world_size``-th pending image into its own
    shards and rank 0 finalizes after all ranks are done. Unreadable images are skipped, recorded
    in the manifest and reported in one warning.

    Returns:
        the finalized index (on every rank), or the existing one if it was already complete.
    """
    db_name = f"{dataset}_db"
    dicts = get_dataset_dicts(db_name)
    image_list = [d["image_id"] for d in dicts]
    manifest = index_manifest(extractor, dataset)
    if (Path(index_dir) / "manifest.json").is_file():
        index = IndexReader(index_dir)
        index.check_compatible(manifest)
        if index.info["image_list"] == image_list:
            logger.info(f"index {index_dir} is complete ({index.num_images} images), reused")
            return index
    rank, world = comm.get_rank(), comm.get_world_size()
    schema = index_schema(extractor.store_class_boxes)
    writer = IndexWriter(index_dir, manifest, shard_size, dtype, rank, schema)
    try:
        pending = set(writer.pending(image_list))
        todo = [d for d in dicts if d["image_id"] in pending][rank::world]
        if len(pending) < len(image_list):
            logger.info(
                f"resuming {index_dir}: {len(image_list) - len(pending)} images already stored"
            )
        failed = []
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
                writer.add(image_id, rec)
            for image_id, reason in bad:
                writer.mark_failed(image_id, reason)
                failed.append((image_id, reason))
            bar.update(len(chunk))
        bar.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if failed:
        lines = "\n".join(f"  {i}: {r}" for i, r in failed)
        logger.warning(f"{len(failed)} unreadable images skipped (listed in the manifest):\n{lines}")
    comm.synchronize()
    if comm.is_main_process():
        IndexWriter(index_dir, manifest, shard_size, dtype, rank, schema).finalize(image_list)
    comm.synchronize()
    return IndexReader(index_dir)


def open_index(index_dir: str, extractor: Optional[FeatureExtractor], dataset: str) -> IndexReader:
    """Open a finalized index, refusing it if it was built with another model or config."""
    index = IndexReader(index_dir)
    if extractor is not None:
        index.check_compatible(index_manifest(extractor, dataset))
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
    """
    if not whitening_dataset:
        return None
    if whitening_dataset == test_dataset:
        logger.warning(
            f"whitening is learned on {whitening_dataset!r}, the dataset being evaluated: "
            "it leaks test-set statistics into the results (the paper learns it on another "
            "dataset, e.g. Paris 6k for Oxford 5k)"
        )
    key = extractor.fingerprint["weights_hash"]
    path = Path(work_dir) / f"whitening-{whitening_dataset}-{key}-d{dim}.npz"
    if path.is_file():
        return PCAWhitening.load(path)
    index = build_index(
        extractor, whitening_dataset, str(Path(work_dir) / f"index-{whitening_dataset}"),
        **index_kwargs
    )
    if comm.is_main_process():
        X = l2_normalize(index.image_vectors("ipa_sum"))
        w = learn_pca_whitening(X, dim=dim or None)
        w.save(path)
        logger.info(f"learned PCA whitening on {index.num_images} images of {whitening_dataset}")
    comm.synchronize()
    return PCAWhitening.load(path)


_QUERY_FIELDS = ("ipa_sum", "ipa_max", "box", "crop_sum", "crop_max", "rpa_sum", "rpa_max")


def extract_queries(
    extractor: FeatureExtractor, dataset: str, cache_dir: Optional[str] = None
) -> List[dict]:
    """Records of every query of ``<dataset>_query`` (one forward pass each), cached on disk.

    Returns:
        list of query records in query order, each with the dataset dict's ``image_id``,
        ``file_name``, ``category_id`` and ``object_name`` added.
    """
    dicts = get_dataset_dicts(f"{dataset}_query")
    cache = None
    if cache_dir:
        key = extractor.fingerprint["weights_hash"]
        cache = Path(cache_dir) / f"queries-{dataset}-{key}.npz"
        if cache.is_file():
            data = np.load(cache)
            stored_ids = json.loads(str(data["image_ids"]))
            if stored_ids == [d["image_id"] for d in dicts]:
                return [_query_from_cache(data, i, d) for i, d in enumerate(dicts)]
    records = []
    for d in tqdm(dicts, desc=f"queries {dataset}", unit="query"):
        rec = extractor.query_record(d)
        records.append(_with_query_info(rec, d))
    if cache is not None and comm.is_main_process():
        arrays = {f: np.stack([r[f] for r in records]) for f in _QUERY_FIELDS} if records else {}
        arrays["image_ids"] = np.array(json.dumps([d["image_id"] for d in dicts]))
        tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}.npz")
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
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
    )


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
