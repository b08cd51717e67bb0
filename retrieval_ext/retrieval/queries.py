"""Query records of a dataset's queries (:meth:`FeatureExtractor.query_record`: one forward pass
per query, or one per box size of ``RETRIEVAL.QUERY_SCALES``), cached on disk for the same model
and query sizes.

A query record holds the query image's IPA vectors and its box's region vectors (the paper's
crop of the conv map, and the box through the RoI pooler), plus the dataset dict's identity
(``image_id``, ``file_name``, ``category_id``, ``object_name``).
"""

import hashlib
import json
import logging
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from detectron2.utils import comm
from tqdm import tqdm

from ..data.datasets.catalog import get_dataset_dicts
from ..utils.io import atomic_write
from .extractor import FeatureExtractor

__all__ = ["extract_queries"]

logger = logging.getLogger("retrieval_ext")

_QUERY_FIELDS = ("ipa_sum", "ipa_max", "box", "crop_sum", "crop_max", "rpa_sum", "rpa_max")


def _queries_signature(extractor: FeatureExtractor, dicts: Sequence[dict]) -> str:
    """What a cached query record depends on: model config, weights, query sizes, images, boxes,
    crops."""
    parts = [
        extractor.fingerprint["model_config"],
        extractor.fingerprint["weights_hash"],
        "query_scales=" + json.dumps([float(f) for f in extractor.query_scales]),
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
    """Records of every query of ``<dataset>_query``, cached on disk.

    Each query box is checked against its image (EXIF-oriented) by the mapper: a box that
    cannot describe a region raises an error naming the query and the box; one partly outside is
    clamped (see :mod:`retrieval_ext.data.boxes`). The cache is reused only for the same model
    config, weights, query sizes (``RETRIEVAL.QUERY_SCALES``), query images and boxes; it is
    written atomically.

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
