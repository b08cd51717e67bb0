"""Indexing a database: one forward pass per image, its features stored in an index (once).

:func:`build_index` extracts ``NAME_db`` into an :mod:`~retrieval_ext.retrieval.index_store`
index, resuming an interrupted run and sharing the work between torch.distributed ranks;
:func:`open_index` opens one for search, refusing an index another model built.
"""

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from detectron2.config import configurable
from detectron2.utils import comm
from tqdm import tqdm

from ..data.datasets.catalog import get_dataset_dicts, skipped_images
from ..utils.io import atomic_write
from .compression import COMPRESSION_FILE, RegionCompression
from .contents import IndexContents
from .extractor import FeatureExtractor, comparable_model_config
from .index_store import (
    IndexMismatchError,
    IndexReader,
    IndexSchema,
    IndexWriteError,
    IndexWriter,
)
from .index_store.manifest import jsonable
from .index_weights import WEIGHTS_KEY, adopt_index_weights, recorded_weights, weights_record

__all__ = [
    "MANIFEST_NORMALIZERS",
    "build_index",
    "check_index_model",
    "index_manifest",
    "index_schema",
    "open_index",
    "prepare_compressed_index",
]

logger = logging.getLogger("retrieval_ext")
# how stored manifest values are compared with the current model's (see comparable_model_config)
MANIFEST_NORMALIZERS = {"model_config": comparable_model_config}


def index_manifest(extractor: FeatureExtractor, dataset: str) -> dict:
    """What an index records about how it was made: the dataset, the model (config text and the
    hash of the weights its features depend on, see ``extractor.WEIGHTS_SCOPES``) and what it
    stores (``contents``)."""
    return {"dataset": dataset, **extractor.fingerprint, "contents": extractor.contents.to_json()}


def index_schema(contents: IndexContents) -> IndexSchema:
    """The stored fields of an (uncompressed) index of ``contents``."""
    return contents.schema()


def check_index_model(index: IndexReader, extractor: FeatureExtractor, dataset: str):
    """Refuse ``index`` unless it holds ``dataset`` as ``extractor``'s model computes it.

    The weights are compared in the scope the index recorded (indexes without a scope hashed
    the whole model), so that an index of region features accepts any box head.

    Raises:
        IndexMismatchError: naming what differs; for the weights, also where the index says
            its weights are.
    """
    scope = index.manifest.get("weights_scope", "all")
    fp = extractor.fingerprint_for(scope)
    expected = {
        "dataset": dataset,
        "model_config": fp["model_config"],
        "weights_hash": fp["weights_hash"],
    }
    try:
        index.check_compatible(expected, keys=list(expected), normalize=MANIFEST_NORMALIZERS)
    except IndexMismatchError as e:
        if "weights_hash" not in e.keys:
            raise
        where = recorded_weights(str(index.root), index.manifest)
        hint = (
            f"; it was built with the weights in {where}: set MODEL.WEIGHTS to that file (or "
            "leave MODEL.WEIGHTS empty to load them)"
            if where is not None
            else ""
        )
        raise IndexMismatchError(f"{e}{hint}", e.keys) from None


def _storage_note(index: IndexReader, manifest: dict, index_dir: str):
    """Log that a reused index stores other fields or another compression than the config
    asks for: it is searched as it is (each stage reads what the index holds)."""
    stored = {k: index.manifest.get(k) for k in ("contents", "region_compression")}
    wanted = {k: manifest.get(k) for k in ("contents", "region_compression")}
    if jsonable(stored) != jsonable(wanted):
        logger.warning(
            f"the index {index_dir} stores {stored}, the config asks for {wanted}; it is used "
            "as it is. To convert it without extracting again: python tools/compress_index.py "
            "--config-file CFG [the same KEY VALUE options]; or delete it to index again"
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


def _image_list(dataset: str, dicts: List[dict]) -> Tuple[List[str], Dict[str, str]]:
    """The ids an index of ``dataset`` lists, and the ones its loader skipped ({id: reason}).

    Stored images keep the database order; the loader-skipped ones follow, to be listed as
    failed.
    """
    known = {d["image_id"] for d in dicts}
    pre_skipped = {k: v for k, v in skipped_images(dataset).items() if k not in known}
    return [d["image_id"] for d in dicts] + sorted(pre_skipped), pre_skipped


def _database_images(
    dataset: str, sample_images: int
) -> Tuple[List[dict], List[str], Dict[str, str]]:
    """What an index of ``dataset`` covers: the dataset dicts of ``<dataset>_db`` to extract, the
    ids the index lists and those the loader skipped ({id: reason}, see :func:`_image_list`).

    With ``sample_images`` > 0 (and a larger database), only that many images, evenly spread over
    the database, are covered, and none is listed as skipped.
    """
    dicts = get_dataset_dicts(f"{dataset}_db")
    if sample_images and len(dicts) > sample_images:
        picks = sorted({round(x) for x in np.linspace(0, len(dicts) - 1, int(sample_images))})
        dicts = [dicts[i] for i in picks]
        return dicts, [d["image_id"] for d in dicts], {}
    image_list, pre_skipped = _image_list(dataset, dicts)
    return dicts, image_list, pre_skipped


def _complete_index(index_dir: str, extractor: FeatureExtractor, manifest: dict, image_list):
    """The index already in ``index_dir`` if it is complete for ``image_list``; else None.

    Raises:
        IndexMismatchError: it was built with another model, config or weights.
    """
    if not (Path(index_dir) / "manifest.json").is_file():
        return None
    index = IndexReader(index_dir)
    check_index_model(index, extractor, manifest["dataset"])
    if index.info["image_list"] != image_list:
        return None
    _storage_note(index, manifest, index_dir)
    logger.info(f"index {index_dir} is complete ({index.num_images} images), reused")
    return index


def _pending_here(
    writer: IndexWriter, dicts: List[dict], image_list: List[str], pre_skipped: Dict[str, str]
) -> List[dict]:
    """The dataset dicts this rank extracts: its share of the images not stored yet. Rank 0
    also lists the images the loader skipped as failed."""
    rank, world = comm.get_rank(), comm.get_world_size()
    pending = set(writer.pending(image_list))
    if len(pending) < len(image_list):
        stored = sum(1 for i in image_list if i in writer.done_ids)
        marked = len(image_list) - len(pending) - stored
        logger.info(
            f"resuming {writer.root}: {stored} images already stored"
            + (f", {marked} already listed as unreadable" if marked else "")
        )
    if rank == 0:
        for name in sorted(pending & set(pre_skipped)):
            writer.mark_failed(name, pre_skipped[name])
    # each image belongs to the rank of its position in the database, not in this rank's view
    # of what is pending: ranks open their writers at different moments (another rank may
    # already have written a shard), so slicing their pending lists could skip images
    return [d for i, d in enumerate(dicts) if i % world == rank and d["image_id"] in pending]


@contextmanager
def _writing(writer: IndexWriter, db_name: str) -> Iterator[List[Tuple[str, str]]]:
    """Closes ``writer`` after the block; yields the list the block appends (image id, reason)
    of unreadable images to, warned about once at the end.

    On an error the buffered images are dropped (complete shards stay) and an
    :class:`IndexWriteError` says how to resume.
    """
    failed: List[Tuple[str, str]] = []
    try:
        yield failed
        writer.close()
    except IndexWriteError as e:
        writer.abort()
        raise IndexWriteError(
            f"{e}\nindexing {db_name} stopped; the images stored so far in {writer.root} are "
            "kept: fix the cause (free disk space, a writable RETRIEVAL.INDEX_DIR / OUTPUT_DIR) "
            "and rerun to resume"
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


def _extract(
    writer: IndexWriter,
    extractor: FeatureExtractor,
    todo: List[dict],
    compression: Optional[RegionCompression],
    batch_size: int,
    bar: tqdm,
    failed: List[Tuple[str, str]],
):
    """One forward pass per image of ``todo``, in batches of images of one input size (read a
    few batches ahead to fill them); records go to ``writer``."""
    schema = index_schema(extractor.contents)
    window = batch_size if batch_size <= 1 else 4 * batch_size
    for start in range(0, len(todo), window):
        chunk = todo[start : start + window]
        records, bad = extractor.database_records(chunk, batch_size)
        for image_id, rec in records:
            if compression is not None:
                rec = compression.compress_record(rec, schema)
            writer.add(image_id, rec)
        for image_id, reason in bad:
            writer.mark_failed(image_id, reason)
            failed.append((image_id, reason))
        bar.update(len(chunk))
    bar.close()


def _build_index_from_config(cfg, extractor, dataset, index_dir):
    r = cfg.RETRIEVAL
    return {
        "extractor": extractor,
        "dataset": dataset,
        "index_dir": index_dir,
        "shard_size": r.SHARD_SIZE,
        "dtype": r.INDEX_DTYPE,
        "batch_size": r.BATCH_SIZE,
    }


@configurable(from_config=_build_index_from_config)
def build_index(
    extractor: FeatureExtractor,
    dataset: str,
    index_dir: str,
    shard_size: int = 256,
    dtype: str = "float16",
    batch_size: int = 1,
    show_progress: bool = True,
    compression: Optional[RegionCompression] = None,
    sample_images: int = 0,
) -> IndexReader:
    """Extract every image of ``<dataset>_db`` once and store its features in ``index_dir``.

    Called as ``build_index(cfg, extractor, dataset, index_dir, ...)``, the shard size, dtype
    and batch size are ``cfg.RETRIEVAL``'s ``SHARD_SIZE``, ``INDEX_DTYPE`` and ``BATCH_SIZE``.

    With ``compression``, region features are stored compressed (fewer proposals, PCA, int8 /
    float16; see :mod:`.compression`), the compression is saved beside the index and recorded in
    its manifest.

    Resumes an interrupted run (images stored in complete shards are skipped; a run killed at
    any point, even by SIGKILL, resumes to the index an uninterrupted run gives). Under
    torch.distributed each rank extracts the pending images at its positions of the database
    (``i % world_size == rank``) into its own shards and rank 0 finalizes after all ranks are
    done.

    With ``sample_images`` > 0, only that many images, evenly spread over the database, are
    indexed (a sample to learn a transform on).

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
    dicts, image_list, pre_skipped = _database_images(dataset, sample_images)
    manifest = index_manifest(extractor, dataset)
    if compression is not None:
        manifest = dict(manifest, region_compression=compression.describe())
    index = _complete_index(index_dir, extractor, manifest, image_list)
    if index is not None:
        return index
    if not image_list:
        raise ValueError(f"{db_name} has no database images: nothing to index")
    rank, world = comm.get_rank(), comm.get_world_size()
    work_dir = os.path.dirname(os.path.abspath(index_dir))
    manifest[WEIGHTS_KEY] = weights_record(extractor, work_dir)
    schema = index_schema(extractor.contents)
    stored_schema, manifest = prepare_compressed_index(compression, schema, manifest, index_dir)
    writer = IndexWriter(index_dir, manifest, shard_size, dtype, rank, stored_schema)
    with _writing(writer, db_name) as failed:
        todo = _pending_here(writer, dicts, image_list, pre_skipped)
        desc = f"indexing {db_name}" + (f" [rank {rank}]" if world > 1 else "")
        bar = tqdm(total=len(todo), desc=desc, disable=not show_progress, unit="img")
        _extract(writer, extractor, todo, compression, batch_size, bar, failed)
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

    When the extractor's config names no weights file, the weights the index records are loaded
    into its model first (:func:`~.index_weights.adopt_index_weights`). What the index stores and
    how its region features are compressed are read from the index itself, so only the dataset,
    the model config and the weights are compared (:func:`check_index_model`).
    """
    if extractor is not None:
        adopt_index_weights(extractor, index_dir)
    index = IndexReader(index_dir)
    if extractor is not None:
        check_index_model(index, extractor, dataset)
    return index
