"""Writing an index: records buffered into atomically renamed shards, resumable, one writer per
rank, and the final ``manifest.json`` that orders them (:meth:`IndexWriter.finalize`)."""

import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...utils.io import fsync_dir
from .errors import IndexMismatchError, IndexWriteError
from .finalize import checked_image_list, write_manifest
from .layout import (
    CONFIG_NAME,
    FORMAT_VERSION,
    SHARD_RE,
    SHARDS_DIR,
    json_bytes,
    list_complete_shards,
    read_failed_logs,
    read_json,
)
from .manifest import check_manifest_compatible, jsonable
from .schema import FieldSpec, IndexSchema, default_schema

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms run without the rank lock
    fcntl = None

__all__ = ["IndexWriter"]

_FEATURE_DTYPES = ("float16", "float32")


# Shard files are written into a temp shard folder renamed as a whole once complete: each file
# only has to reach the disk before that rename.
def _write_bytes_synced(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_npy_synced(path: Path, arr: np.ndarray):
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class IndexWriter:
    """Buffers per-image records and writes them as atomically renamed shards.

    Opening a root that already holds shards resumes: :attr:`done_ids` lists the images stored in
    complete shards (by any rank) and :attr:`failed` the images marked failed, so the caller skips
    them (see :meth:`pending`). Temp shards left by a killed writer of the same rank are deleted.
    A resume whose manifest, dtype or schema differs from the stored one is refused.

    One writer per rank at a time (enforced with a lock file where ``fcntl`` exists). Not
    thread-safe: call it from one thread.

    Args:
        root: index directory (created if missing).
        manifest: JSON-serialisable description of what produced the features (dataset name,
            model config text, weights hash, ...); compared on resume and by readers.
        shard_size: images per shard; a smaller last shard is written by :meth:`close`.
        dtype: storage dtype of ``"feature"`` fields, ``"float16"`` (half the size) or
            ``"float32"``.
        rank: this process' rank in distributed indexing; part of every shard name.
        schema: stored fields; defaults to :func:`default_schema`.

    Raises:
        IndexWriteError: the root cannot be created or another writer holds this rank.
        IndexMismatchError: the root holds an index built with another manifest/dtype/schema.
    """

    def __init__(
        self,
        root,
        manifest: dict,
        shard_size: int = 256,
        dtype: str = "float16",
        rank: int = 0,
        schema: Optional[IndexSchema] = None,
    ):
        if np.dtype(dtype).name not in _FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {_FEATURE_DTYPES}, got {dtype!r}")
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.root = Path(root)
        self.manifest = jsonable(dict(manifest))
        self.shard_size = int(shard_size)
        self.dtype = np.dtype(dtype).name
        self.rank = int(rank)
        self.schema = schema if schema is not None else default_schema()
        self._shards_dir = self.root / SHARDS_DIR
        self._lock_file = None
        self._failed_file = None
        self._closed = False
        self._buffer: List[Tuple[str, Dict[str, np.ndarray]]] = []
        self._buffer_ids = set()
        self.shards_written: List[str] = []

        try:
            self._shards_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexWriteError(
                f"cannot create index directory {self._shards_dir}: {e.strerror or e}"
            ) from e
        self._acquire_lock()
        try:
            self._check_or_write_config()
            self._remove_own_temp_shards()
            self._scan()
        except BaseException:
            self._release_lock()
            raise

    # -- setup ---------------------------------------------------------------------------------
    def _acquire_lock(self):
        path = self.root / f".lock-rank{self.rank:03d}"
        try:
            f = open(path, "a+")
        except OSError as e:
            raise IndexWriteError(f"cannot create lock file {path}: {e.strerror or e}") from e
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.close()
                raise IndexWriteError(
                    f"another IndexWriter holds rank {self.rank} of {self.root} ({path})"
                ) from e
        self._lock_file = f

    def _release_lock(self):
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def _config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "manifest": self.manifest,
            "dtype": self.dtype,
            "schema": self.schema.to_json(),
        }

    def _check_or_write_config(self):
        path = self.root / CONFIG_NAME
        if not path.exists():
            tmp = path.with_name(f".{CONFIG_NAME}.tmp-{os.getpid()}-{self.rank}")
            try:
                _write_bytes_synced(tmp, json_bytes(self._config()))
                try:
                    # link() fails if another rank created the config meanwhile: first one wins
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                except OSError:
                    if not path.exists():
                        os.replace(tmp, path)
                fsync_dir(self.root)
            except OSError as e:
                raise IndexWriteError(f"cannot write {path}: {e.strerror or e}") from e
            finally:
                try:
                    tmp.unlink()
                except OSError:
                    pass
        stored = read_json(path)
        if stored.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(
                f"{path}: format_version {stored.get('format_version')} != {FORMAT_VERSION}",
                ["format_version"],
            )
        try:
            check_manifest_compatible(stored["manifest"], self.manifest)
            check_manifest_compatible(stored, self._config(), keys=("dtype", "schema"))
        except IndexMismatchError as e:
            raise IndexMismatchError(
                f"refusing to resume the index at {self.root} with a different setup; use "
                f"another root or the original setup.\n{e}",
                e.keys,
            ) from None

    def _remove_own_temp_shards(self):
        # only this rank's: another rank may be writing its own temp shard right now
        prefix = f".tmp-rank{self.rank:03d}-"
        for p in self._shards_dir.iterdir():
            if p.name.startswith(prefix):
                shutil.rmtree(p, ignore_errors=True)

    def _scan(self):
        self.done_ids = set()
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        next_k = 0
        for p in self._shards_dir.iterdir():
            m = SHARD_RE.match(p.name)
            if m and int(m.group(1)) == self.rank:
                next_k = max(next_k, int(m.group(2)) + 1)
        for name in list_complete_shards(self._shards_dir):
            meta = read_json(self._shards_dir / name / "meta.json")
            self.done_ids.update(read_json(self._shards_dir / name / "ids.json"))
            for f, shape in meta["shapes"].items():
                self._shapes.setdefault(f, tuple(shape))
        self._next_k = next_k
        self.failed: Dict[str, str] = read_failed_logs(self.root)
        self._repair_failed_log()

    def _repair_failed_log(self):
        # A SIGKILL can leave a torn last line; appending after it would corrupt the next entry.
        path = self._failed_path
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    @property
    def _failed_path(self) -> Path:
        return self.root / f"failed-rank{self.rank:03d}.jsonl"

    # -- public API ----------------------------------------------------------------------------
    def pending(self, image_list: Sequence[str]) -> List[str]:
        """Images of ``image_list`` neither stored nor marked failed (nor buffered), in order."""
        return [
            i
            for i in image_list
            if i not in self.done_ids and i not in self.failed and i not in self._buffer_ids
        ]

    def add(self, image_id: str, record: Dict[str, np.ndarray]):
        """Buffer one image's record; writes a shard once ``shard_size`` images are buffered.

        Args:
            image_id: unique image id (a database image name).
            record: one array per schema field. Image fields have the field's shape (e.g.
                ``ipa_sum`` (C,), ``height`` ()); proposal fields have shape (K, *shape) with
                the same K (may be 0) for all of them, e.g. ``boxes`` (K, 4) XYXY original-image
                pixels, ``rpa_sum`` (K, C), ``scores`` (K, num_classes + 1).

        Raises:
            ValueError: unknown/missing field, wrong shape, inconsistent K, non-finite value,
                float16 overflow, or an image id already stored or buffered.
        """
        self._check_open()
        if not isinstance(image_id, str):
            raise TypeError(f"image_id must be a str, got {type(image_id).__name__}")
        if image_id in self.done_ids or image_id in self._buffer_ids:
            raise ValueError(f"image {image_id!r} is already stored in {self.root}")
        missing = [n for n in self.schema.names if n not in record]
        extra = [n for n in record if n not in self.schema]
        if missing or extra:
            raise ValueError(
                f"image {image_id!r}: record fields do not match the schema "
                f"(missing {missing}, unknown {extra})"
            )
        converted = {}
        num_props = None
        for spec in self.schema.fields:
            arr = self._convert(image_id, spec, record[spec.name])
            if spec.scope == "proposal":
                if num_props is not None and arr.shape[0] != num_props:
                    raise ValueError(
                        f"image {image_id!r}: field {spec.name} has {arr.shape[0]} proposals, "
                        f"other proposal fields have {num_props}"
                    )
                num_props = arr.shape[0]
            converted[spec.name] = arr
        for spec in self.schema.fields:
            shape = converted[spec.name].shape[1 if spec.scope == "proposal" else 0 :]
            self._shapes.setdefault(spec.name, shape)
        self._buffer.append((image_id, converted))
        self._buffer_ids.add(image_id)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def _convert(self, image_id: str, spec: FieldSpec, value) -> np.ndarray:
        arr = np.asarray(value)
        lead = 1 if spec.scope == "proposal" else 0
        trailing = arr.shape[lead:]
        known = self._shapes.get(spec.name)
        if arr.ndim != lead + len(spec.shape) or any(
            want is not None and want != got for want, got in zip(spec.shape, trailing)
        ):
            raise ValueError(
                f"image {image_id!r}: field {spec.name} has shape {arr.shape}, expected "
                f"{('(K, ' if lead else '(') + ', '.join(str(s or '*') for s in spec.shape)})"
            )
        if known is not None and tuple(known) != tuple(trailing):
            raise ValueError(
                f"image {image_id!r}: field {spec.name} has trailing shape {tuple(trailing)}, "
                f"the index stores {tuple(known)}"
            )
        target = np.dtype(self.dtype if spec.kind == "feature" else spec.dtype)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"image {image_id!r}: field {spec.name} has dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"image {image_id!r}: field {spec.name} has non-finite values")
        # a copy: the caller may reuse its buffers before the shard is written
        with np.errstate(over="ignore"):  # overflow is reported just below, with the field name
            out = np.array(arr, dtype=target, order="C", copy=True)
        if target.kind == "f" and not np.all(np.isfinite(out)):
            raise ValueError(
                f"image {image_id!r}: field {spec.name} overflows {target.name} (max |x| = "
                f"{float(np.abs(arr).max()):.6g}); store float32 or scale the features"
            )
        if target.kind in "iu" and not np.array_equal(out, arr):
            raise ValueError(
                f"image {image_id!r}: field {spec.name} is not exactly representable as "
                f"{target.name}"
            )
        return out

    def mark_failed(self, image_id: str, reason: str):
        """Record that ``image_id`` could not be processed (appended, flushed and fsync'd).

        A failed image is listed by :meth:`finalize` instead of being reported missing. If the
        image is stored later (a successful retry), the stored copy wins.
        """
        self._check_open()
        try:
            if self._failed_file is None:
                self._failed_file = open(self._failed_path, "a", encoding="utf-8")
            line = json.dumps(
                {"image_id": str(image_id), "reason": str(reason), "time": time.time()}
            )
            self._failed_file.write(line + "\n")
            self._failed_file.flush()
            os.fsync(self._failed_file.fileno())
        except OSError as e:
            raise IndexWriteError(f"cannot append to {self._failed_path}: {e.strerror or e}") from e
        self.failed[str(image_id)] = str(reason)

    def flush(self) -> Optional[str]:
        """Write the buffered images as one shard now.

        Returns:
            the shard name, or ``None`` if nothing was buffered.

        Raises:
            IndexWriteError: the shard could not be written; its temp dir is removed, complete
                shards and the buffer are left untouched (a later flush retries).
        """
        self._check_open()
        if not self._buffer:
            return None
        name = f"rank{self.rank:03d}-{self._next_k:05d}"
        tmp = self._shards_dir / f".tmp-{name}-{os.getpid()}"
        final = self._shards_dir / name
        ids = [image_id for image_id, _ in self._buffer]
        counts = [
            (
                rec[self.schema.proposal_fields[0].name].shape[0]
                if self.schema.proposal_fields
                else 0
            )
            for _, rec in self._buffer
        ]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        try:
            tmp.mkdir()
            _write_bytes_synced(tmp / "ids.json", json_bytes(ids))
            _save_npy_synced(tmp / "offsets.npy", offsets)
            for spec in self.schema.fields:
                parts = [rec[spec.name] for _, rec in self._buffer]
                stacked = np.stack(parts) if spec.scope == "image" else np.concatenate(parts)
                _save_npy_synced(tmp / f"{spec.name}.npy", stacked)
            meta = {
                "format_version": FORMAT_VERSION,
                "rank": self.rank,
                "number": self._next_k,
                "num_images": len(ids),
                "num_proposals": int(offsets[-1]),
                "dtype": self.dtype,
                "schema": self.schema.to_json(),
                "shapes": {n: list(s) for n, s in self._shapes.items()},
            }
            _write_bytes_synced(tmp / "meta.json", json_bytes(meta))  # last: marks completeness
            fsync_dir(tmp)
            os.replace(tmp, final)
            fsync_dir(self._shards_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise IndexWriteError(
                f"could not write shard {final} ({len(ids)} images): {e.strerror or e}"
            ) from e
        self.done_ids.update(ids)
        self._buffer.clear()
        self._buffer_ids.clear()
        self._next_k += 1
        self.shards_written.append(name)
        return name

    def close(self):
        """Write the buffered images (a last, smaller shard) and release the rank lock."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._shutdown()

    def abort(self):
        """Drop the buffered images without writing them and release the rank lock.

        This leaves the root exactly as a crash would (complete shards only), e.g. to abandon a
        run; a later writer resumes from there.
        """
        self._buffer.clear()
        self._buffer_ids.clear()
        self._shutdown()

    def _shutdown(self):
        if self._failed_file is not None:
            self._failed_file.close()
            self._failed_file = None
        self._release_lock()
        self._closed = True

    def _check_open(self):
        if self._closed:
            raise RuntimeError(f"IndexWriter for {self.root} (rank {self.rank}) is closed")

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        # Records already added are complete, so keep them even if the caller's loop crashed;
        # a second write error must not hide the original exception.
        try:
            self.close()
        except IndexWriteError:
            self._shutdown()

    def finalize(self, image_list: Sequence[str]) -> dict:
        """Flush, close, and write ``manifest.json`` describing the whole index.

        Call it once, after every rank has closed its writer. Every image of ``image_list`` must
        be stored (by any rank) or marked failed. An image stored twice (a crash between a shard's
        rename and the caller's bookkeeping) is taken from the first shard in (rank, number)
        order and counted once. Stored images not in ``image_list`` are left out.

        Args:
            image_list: the database image ids in final order.

        Returns:
            the manifest written (see :class:`IndexReader` for its keys).

        Raises:
            ValueError: ``image_list`` is empty or has duplicates.
            IndexIncompleteError: listing the missing images.
            IndexWriteError: the manifest could not be written (a previous one stays intact).
        """
        image_list = checked_image_list(image_list)
        if not self._closed:
            self.close()
        return write_manifest(self.root, self.manifest, self.dtype, self.schema, image_list)
