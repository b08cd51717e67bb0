"""On-disk feature index of a database: sharded, resumable, memory-mapped.

One Faster R-CNN forward pass per database image yields image-wise vectors (IPA), per-proposal
vectors (RPA), proposal boxes and class scores. :class:`IndexWriter` stores them in **shards** and
:class:`IndexReader` serves them to search and spatial reranking without loading everything.

Layout under ``root``::

    index_config.json          manifest + schema + dtype, written by the first writer (resume check)
    shards/rank000-00000/      one complete shard (atomically renamed from a temp dir)
        ids.json               image ids of the shard, in row order
        offsets.npy            (N_s + 1,) int64: proposals of row j are [offsets[j], offsets[j+1])
        <image field>.npy      (N_s, *shape) per-image arrays stacked
        <proposal field>.npy   (sum_j K_j, *shape) per-proposal arrays concatenated
        meta.json              shard description, written last
    shards/.tmp-rank000-00001-<pid>/   a shard being written (never read; removed on next open)
    failed-rank000.jsonl       append-only log of images that could not be processed
    manifest.json              final index description, written by ``finalize`` (atomically)

Which fields exist and whether each is per image or per proposal is declared by an
:class:`IndexSchema`, so new fields (e.g. compressed RPA) need no change here. Fields of kind
``"feature"`` are stored in the index dtype (float16 or float32); fields of kind ``"exact"`` keep
their declared dtype (boxes float32, sizes int64). All boxes are XYXY in original-image pixels.

Several processes may write into one root at once, one writer per rank (shard names carry the
rank). After every rank has closed its writer, one process calls :meth:`IndexWriter.finalize` with
the ordered image list; the final index presents images in that order whatever order they were
extracted in, so an interrupted-and-resumed index equals an uninterrupted one image for image.

Only numpy and the standard library are used, so this module can be loaded without detectron2.
"""

import difflib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import yaml

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms run without the rank lock
    fcntl = None

__all__ = [
    "FORMAT_VERSION",
    "FieldSpec",
    "IndexSchema",
    "default_schema",
    "IndexStoreError",
    "IndexMismatchError",
    "IndexWriteError",
    "IndexIncompleteError",
    "IndexNotFinalizedError",
    "check_manifest_compatible",
    "IndexWriter",
    "IndexReader",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "index_config.json"
SHARDS_DIR = "shards"
_SHARD_RE = re.compile(r"^rank(\d{3,})-(\d{5,})$")
_FEATURE_DTYPES = ("float16", "float32")


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class IndexStoreError(Exception):
    """Base class of the errors raised by this module."""


class IndexMismatchError(IndexStoreError, ValueError):
    """A stored index was built with a different manifest (model, config, weights, ...).

    Attributes:
        keys (list[str]): the differing keys.
    """

    def __init__(self, message: str, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = list(keys)


class IndexWriteError(IndexStoreError, OSError):
    """Writing the index failed (unwritable root, disk full, ...). Complete data is untouched."""


class IndexIncompleteError(IndexStoreError):
    """``finalize`` found images of the list that are neither stored nor marked failed.

    Attributes:
        missing (list[str]): the missing image ids, in list order.
    """

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)


class IndexNotFinalizedError(IndexStoreError, FileNotFoundError):
    """The index root has no ``manifest.json`` (missing root, or ``finalize`` never ran)."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    """One stored field.

    Args:
        name: file-safe field name (``[A-Za-z0-9_]+``).
        scope: ``"image"`` (one value per image, stacked to (N, *shape)) or ``"proposal"`` (K_i
            values per image, concatenated to (sum K_i, *shape)).
        kind: ``"feature"`` (stored in the index dtype, float16 or float32) or ``"exact"``
            (stored in ``dtype``).
        shape: trailing shape after the leading image/proposal axis; ``None`` entries are
            inferred from the first record and then fixed (e.g. the channel count C).
        dtype: storage dtype of an ``"exact"`` field (ignored for features).
    """

    name: str
    scope: str
    kind: str
    shape: Tuple[Optional[int], ...] = ()
    dtype: Optional[str] = None

    def __post_init__(self):
        if not re.match(r"^[A-Za-z0-9_]+$", self.name) or self.name in ("ids", "offsets", "meta"):
            raise ValueError(f"invalid field name {self.name!r}")
        if self.scope not in ("image", "proposal"):
            raise ValueError(f"field {self.name}: scope must be 'image' or 'proposal'")
        if self.kind not in ("feature", "exact"):
            raise ValueError(f"field {self.name}: kind must be 'feature' or 'exact'")
        if self.kind == "exact" and self.dtype is None:
            raise ValueError(f"field {self.name}: an exact field needs a dtype")
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "scope": self.scope,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    @classmethod
    def from_json(cls, d: dict) -> "FieldSpec":
        return cls(d["name"], d["scope"], d["kind"], tuple(d["shape"]), d.get("dtype"))


class IndexSchema:
    """Ordered set of :class:`FieldSpec` describing one index record.

    Args:
        fields: the field specs; names must be unique.
    """

    def __init__(self, fields: Iterable[FieldSpec]):
        self.fields: Tuple[FieldSpec, ...] = tuple(fields)
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in schema: {names}")
        self._by_name = {f.name: f for f in self.fields}

    def __getitem__(self, name: str) -> FieldSpec:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.fields]

    @property
    def image_fields(self) -> List[FieldSpec]:
        return [f for f in self.fields if f.scope == "image"]

    @property
    def proposal_fields(self) -> List[FieldSpec]:
        return [f for f in self.fields if f.scope == "proposal"]

    def to_json(self) -> list:
        return [f.to_json() for f in self.fields]

    @classmethod
    def from_json(cls, d: list) -> "IndexSchema":
        return cls(FieldSpec.from_json(x) for x in d)

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexSchema) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"IndexSchema({', '.join(f'{f.name}:{f.scope}' for f in self.fields)})"


def default_schema(class_boxes: bool = False) -> IndexSchema:
    """Schema of one Faster R-CNN forward pass (IPA, RPA, proposals, detections).

    Args:
        class_boxes: also store class-specific regressed boxes (K_i, num_classes, 4).

    Returns:
        IndexSchema with per-image ``ipa_sum``, ``ipa_max`` (C,), ``height``, ``width`` (int64)
        and per-proposal ``boxes`` (4,) float32 XYXY original-image pixels, ``objectness`` ()
        float32, ``rpa_sum``, ``rpa_max`` (C,), ``scores`` (num_classes + 1,) and optionally
        ``class_boxes`` (num_classes, 4) float32.
    """
    fields = [
        FieldSpec("ipa_sum", "image", "feature", (None,)),
        FieldSpec("ipa_max", "image", "feature", (None,)),
        FieldSpec("height", "image", "exact", (), "int64"),
        FieldSpec("width", "image", "exact", (), "int64"),
        FieldSpec("boxes", "proposal", "exact", (4,), "float32"),
        FieldSpec("objectness", "proposal", "exact", (), "float32"),
        FieldSpec("rpa_sum", "proposal", "feature", (None,)),
        FieldSpec("rpa_max", "proposal", "feature", (None,)),
        FieldSpec("scores", "proposal", "feature", (None,)),
    ]
    if class_boxes:
        fields.append(FieldSpec("class_boxes", "proposal", "exact", (None, 4), "float32"))
    return IndexSchema(fields)


# ----------------------------------------------------------------------------------------------
# Manifest compatibility
# ----------------------------------------------------------------------------------------------
class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_SHORT = 80


def _jsonable(x):
    try:
        return json.loads(json.dumps(x, sort_keys=True))
    except (TypeError, ValueError):
        return repr(x)


def _comparable(key: str, x, normalize=None):
    """The form in which a manifest value is compared.

    Config dumps (keys ending in ``_config``) are compared as parsed YAML: a config re-loaded from
    the ``config.yaml`` a run saved dumps the same values without the anchors (``&id001``) that
    shared lists get, and must still match the index it built.
    """
    if normalize and key in normalize and isinstance(x, str):
        return _jsonable(normalize[key](x))
    if key.endswith("_config") and isinstance(x, str):
        try:
            return _jsonable(yaml.safe_load(x))
        except yaml.YAMLError:
            pass
    return _jsonable(x)


def _short_repr(x) -> str:
    r = repr(x)
    return r if len(r) <= _SHORT else r[: _SHORT - 3] + "..."


def _describe_difference(key: str, stored, expected) -> str:
    long_text = any(
        isinstance(v, str) and (len(v) > _SHORT or "\n" in v) for v in (stored, expected)
    )
    if not long_text:
        return f"  {key}: stored={_short_repr(stored)} expected={_short_repr(expected)}"
    a = "" if stored is _MISSING else str(stored)
    b = "" if expected is _MISSING else str(expected)
    diff = list(
        difflib.unified_diff(a.splitlines(), b.splitlines(), "stored", "expected", n=1, lineterm="")
    )
    max_lines = 14
    shown = diff[:max_lines]
    if len(diff) > max_lines:
        shown.append(f"... ({len(diff) - max_lines} more diff lines)")
    if not diff:  # differs only in trailing whitespace / newlines
        shown = [f"stored={_short_repr(a)}", f"expected={_short_repr(b)}"]
    body = "\n".join("    " + line for line in shown)
    return (
        f"  {key}: stored={_short_repr(stored)} expected={_short_repr(expected)}; "
        f"first differing lines:\n{body}"
    )


def check_manifest_compatible(
    stored: dict,
    expected: dict,
    keys: Optional[Sequence[str]] = None,
    normalize: Optional[Dict[str, Callable]] = None,
):
    """Raise unless ``stored`` and ``expected`` agree on ``keys``.

    Values are compared after a JSON round trip (so tuples equal lists), config dumps as parsed
    YAML (see :func:`_comparable`). A key absent from one side differs from any value on the
    other.

    Args:
        stored: manifest of an existing index (the caller's dict, e.g. ``reader.manifest``).
        expected: manifest the caller is about to write or search with.
        keys: keys to compare; ``None`` compares the union of both dicts' keys.
        normalize: {key: function of a stored string value -> the values to compare}, for keys
            whose text may differ without a difference that matters (e.g. a config dump with
            keys that do not affect the features).

    Raises:
        IndexMismatchError: naming each differing key with both values (long texts such as a
            config dump are shortened and shown as a unified diff of their first differing lines).
    """
    if keys is None:
        keys = sorted(set(stored) | set(expected))
    diffs, bad = [], []
    for key in keys:
        a = stored.get(key, _MISSING)
        b = expected.get(key, _MISSING)
        if (a is _MISSING) != (b is _MISSING) or _comparable(key, a, normalize) != _comparable(
            key, b, normalize
        ):
            bad.append(key)
            diffs.append(_describe_difference(key, a, b))
    if bad:
        raise IndexMismatchError(
            f"index manifest mismatch on {len(bad)} key(s) {bad}:\n" + "\n".join(diffs), bad
        )


# ----------------------------------------------------------------------------------------------
# Small durable-I/O helpers
# ----------------------------------------------------------------------------------------------
def _fsync_dir(path: Path):
    # utils.io has the same helper; this module imports nothing of the package so that it loads
    # as a single file (the SIGKILL-and-resume test runs it so in a child process)
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files are synced
        pass
    finally:
        os.close(fd)


def _write_bytes_synced(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _save_npy_synced(path: Path, arr: np.ndarray):
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_json(path: Path, obj):
    """Write ``obj`` to ``path`` via a synced temp file + ``os.replace``; old file kept on error."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        _write_bytes_synced(tmp, _json_bytes(obj))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise IndexWriteError(f"could not write {path}: {e.strerror or e}") from e


def _read_json(path: Path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _shard_key(name: str) -> Tuple[int, int]:
    m = _SHARD_RE.match(name)
    return int(m.group(1)), int(m.group(2))


def _list_complete_shards(shards_dir: Path) -> List[str]:
    """Names of renamed (hence complete) shard dirs, sorted by (rank, number)."""
    if not shards_dir.is_dir():
        return []
    names = [
        p.name
        for p in shards_dir.iterdir()
        if _SHARD_RE.match(p.name) and (p / "meta.json").is_file()
    ]
    return sorted(names, key=_shard_key)


def _read_failed_logs(root: Path) -> Dict[str, str]:
    """Failed image ids -> reason from every rank's log; torn lines (killed mid-write) skipped."""
    failed: Dict[str, str] = {}
    for path in sorted(root.glob("failed-rank*.jsonl")):
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    failed[str(entry["image_id"])] = str(entry["reason"])
                except (ValueError, KeyError, TypeError):
                    continue
    return failed


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------
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
        self.manifest = _jsonable(dict(manifest))
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
                _write_bytes_synced(tmp, _json_bytes(self._config()))
                try:
                    # link() fails if another rank created the config meanwhile: first one wins
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                except OSError:
                    if not path.exists():
                        os.replace(tmp, path)
                _fsync_dir(self.root)
            except OSError as e:
                raise IndexWriteError(f"cannot write {path}: {e.strerror or e}") from e
            finally:
                try:
                    tmp.unlink()
                except OSError:
                    pass
        stored = _read_json(path)
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
            m = _SHARD_RE.match(p.name)
            if m and int(m.group(1)) == self.rank:
                next_k = max(next_k, int(m.group(2)) + 1)
        for name in _list_complete_shards(self._shards_dir):
            meta = _read_json(self._shards_dir / name / "meta.json")
            self.done_ids.update(_read_json(self._shards_dir / name / "ids.json"))
            for f, shape in meta["shapes"].items():
                self._shapes.setdefault(f, tuple(shape))
        self._next_k = next_k
        self.failed: Dict[str, str] = _read_failed_logs(self.root)
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
            _write_bytes_synced(tmp / "ids.json", _json_bytes(ids))
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
            _write_bytes_synced(tmp / "meta.json", _json_bytes(meta))  # last: marks completeness
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self._shards_dir)
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
        image_list = [str(i) for i in image_list]
        if not image_list:
            raise ValueError("image_list is empty")
        if len(set(image_list)) != len(image_list):
            seen, dups = set(), []
            for i in image_list:
                if i in seen:
                    dups.append(i)
                seen.add(i)
            raise ValueError(f"image_list has duplicate ids: {dups[:10]}")
        if not self._closed:
            self.close()

        location: Dict[str, Tuple[str, int]] = {}
        shapes: Dict[str, list] = {}
        for name in _list_complete_shards(self._shards_dir):
            meta = _read_json(self._shards_dir / name / "meta.json")
            if meta["dtype"] != self.dtype or meta["schema"] != self.schema.to_json():
                raise IndexMismatchError(f"shard {name} has another dtype/schema than the index")
            for f, shape in meta["shapes"].items():
                if shapes.setdefault(f, shape) != shape:
                    raise IndexMismatchError(
                        f"shard {name}: field {f} has shape {shape}, other shards {shapes[f]}", [f]
                    )
            for row, image_id in enumerate(_read_json(self._shards_dir / name / "ids.json")):
                location.setdefault(image_id, (name, row))
        failed_all = _read_failed_logs(self.root)

        missing = [i for i in image_list if i not in location and i not in failed_all]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise IndexIncompleteError(
                f"cannot finalize {self.root}: {len(missing)} of {len(image_list)} images are "
                f"neither stored nor marked failed: {shown}{more}",
                missing,
            )
        image_ids = [i for i in image_list if i in location]
        failed = {i: failed_all[i] for i in image_list if i not in location}
        used = sorted({location[i][0] for i in image_ids}, key=_shard_key)
        shard_index = {name: k for k, name in enumerate(used)}
        locations = [[shard_index[location[i][0]], location[i][1]] for i in image_ids]
        out = {
            "format_version": FORMAT_VERSION,
            "manifest": self.manifest,
            "dtype": self.dtype,
            "schema": self.schema.to_json(),
            "feature_dims": shapes,
            "image_list": image_list,
            "image_ids": image_ids,
            "num_images": len(image_ids),
            "failed": failed,
            "num_failed": len(failed),
            "shards": used,
            "locations": locations,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _atomic_write_json(self.root / MANIFEST_NAME, out)
        for p in self._shards_dir.iterdir():
            # every writer is closed now, so any temp shard left is garbage of a killed run
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
        return out


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------
class IndexReader:
    """Read access to a finalized index, images in the finalized ``image_list`` order.

    Shard arrays are opened lazily (memory-mapped if ``mmap``) and cached; caches are built under
    a lock and the arrays returned are read-only, so concurrent reads from threads are safe.

    ``manifest.json`` keys: ``format_version``, ``manifest`` (the caller's dict), ``dtype``,
    ``schema``, ``feature_dims`` (field -> trailing shape), ``image_list`` (as given to
    ``finalize``), ``image_ids`` (stored ones, in list order), ``num_images``, ``failed``
    (id -> reason), ``num_failed``, ``shards`` (names), ``locations`` ([shard, row] per image),
    ``created``.

    Attributes:
        root (Path): the index directory.
        info (dict): the whole ``manifest.json``.
        manifest (dict): the caller's manifest given to the writer (dataset, config, weights...).
        image_ids (list[str]): stored images in final order (failed images excluded).
        num_images (int): ``len(image_ids)``.
        failed (dict[str, str]): failed image id -> reason.
        schema (IndexSchema), dtype (str): stored fields and feature dtype.
        feature_dims (dict[str, tuple]): trailing shape of every field.

    Args:
        root: index directory holding ``manifest.json``.
        mmap: memory-map shard arrays (``np.load(mmap_mode="r")``) instead of reading them.

    Raises:
        IndexNotFinalizedError: ``manifest.json`` is missing (the message names the path).
        IndexStoreError: the manifest references a missing or inconsistent shard.
    """

    def __init__(self, root, mmap: bool = True):
        self.root = Path(root)
        self.mmap = bool(mmap)
        path = self.root / MANIFEST_NAME
        if not path.is_file():
            if (self.root / SHARDS_DIR).is_dir():
                raise IndexNotFinalizedError(
                    f"{path} not found: the index at {self.root} was never finalized "
                    "(IndexWriter.finalize writes it once every image is processed)"
                )
            raise IndexNotFinalizedError(f"{path} not found: no index at {self.root}")
        info = _read_json(path)
        if info.get("format_version") != FORMAT_VERSION:
            raise IndexStoreError(
                f"{path}: unsupported format_version {info.get('format_version')} "
                f"(this code reads {FORMAT_VERSION})"
            )
        self.info = info
        self.manifest: dict = info["manifest"]
        self.image_ids: List[str] = list(info["image_ids"])
        self.num_images = len(self.image_ids)
        self.failed: Dict[str, str] = dict(info["failed"])
        self.dtype: str = info["dtype"]
        self.schema = IndexSchema.from_json(info["schema"])
        self.feature_dims = {k: tuple(v) for k, v in info["feature_dims"].items()}
        self._shards: List[str] = list(info["shards"])
        loc = np.asarray(info["locations"], dtype=np.int64).reshape(-1, 2)
        self._shard_of = loc[:, 0]
        self._row_of = loc[:, 1]
        self._lock = threading.RLock()
        self._arrays: Dict[Tuple[int, str], np.ndarray] = {}
        self._vectors: Dict[Tuple[str, str], np.ndarray] = {}
        self._index_of: Optional[Dict[str, int]] = None
        self._verify()

    def _verify(self):
        for s, name in enumerate(self._shards):
            d = self.root / SHARDS_DIR / name
            if not (d / "meta.json").is_file():
                raise IndexStoreError(f"shard {d} listed in {self.root / MANIFEST_NAME} is missing")
            ids = _read_json(d / "ids.json")
            mine = np.nonzero(self._shard_of == s)[0]
            for i in mine:
                row = int(self._row_of[i])
                if row >= len(ids) or ids[row] != self.image_ids[i]:
                    raise IndexStoreError(
                        f"shard {d} row {row} does not hold image {self.image_ids[i]!r}"
                    )

    def check_compatible(
        self, expected: dict, keys: Optional[Sequence[str]] = None, normalize=None
    ):
        """:func:`check_manifest_compatible` of this index's manifest against ``expected``."""
        check_manifest_compatible(self.manifest, expected, keys, normalize)

    def index_of(self, image_id: str) -> int:
        """Position of ``image_id`` in :attr:`image_ids` (KeyError if not stored)."""
        if self._index_of is None:
            with self._lock:
                if self._index_of is None:
                    self._index_of = {i: k for k, i in enumerate(self.image_ids)}
        return self._index_of[image_id]

    # -- raw shard access --------------------------------------------------------------------
    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        arr = self._arrays.get(key)
        if arr is None:
            with self._lock:
                arr = self._arrays.get(key)
                if arr is None:
                    path = self.root / SHARDS_DIR / self._shards[shard] / f"{name}.npy"
                    arr = np.load(path, mmap_mode="r" if self.mmap else None, allow_pickle=False)
                    if not self.mmap:
                        arr.setflags(write=False)
                    self._arrays[key] = arr
        return arr

    def _check_index(self, index) -> int:
        i = int(index)
        if not 0 <= i < self.num_images:
            raise IndexError(f"image index {index} out of range [0, {self.num_images})")
        return i

    def _field(self, name: str, scope: str) -> FieldSpec:
        if name not in self.schema:
            raise KeyError(f"no field {name!r} in index {self.root} (fields: {self.schema.names})")
        spec = self.schema[name]
        if spec.scope != scope:
            raise KeyError(f"field {name!r} is per-{spec.scope}, not per-{scope}")
        return spec

    # -- public API ----------------------------------------------------------------------------
    def image_vectors(self, field: str, dtype: Optional[str] = "auto") -> np.ndarray:
        """All images' values of a per-image field, e.g. ``ipa_sum``, in final order.

        Assembled from the shards once and cached (per field and dtype) as one C-contiguous,
        read-only array; callers wanting to modify it must copy.

        Args:
            field: a per-image field name.
            dtype: result dtype. ``"auto"`` (default): float32 for feature fields (float16
                storage is widened exactly), the stored dtype for exact fields (``height``:
                int64). ``None``: the stored dtype (half the memory for float16 indexes).

        Returns:
            array (N, *shape), e.g. (N, C) for IPA vectors.
        """
        spec = self._field(field, "image")
        stored = self.dtype if spec.kind == "feature" else spec.dtype
        if dtype == "auto":
            dtype = "float32" if spec.kind == "feature" else stored
        out_dtype = np.dtype(dtype or stored)
        key = (field, out_dtype.name)
        out = self._vectors.get(key)
        if out is None:
            with self._lock:
                out = self._vectors.get(key)
                if out is None:
                    out = np.empty((self.num_images,) + self.feature_dims[field], out_dtype)
                    for s in range(len(self._shards)):
                        pos = np.nonzero(self._shard_of == s)[0]
                        out[pos] = self._array(s, field)[self._row_of[pos]]
                    out.setflags(write=False)
                    self._vectors[key] = out
        return out

    def _span(self, i: int) -> Tuple[int, int, int]:
        s = int(self._shard_of[i])
        off = self._array(s, "offsets")
        row = int(self._row_of[i])
        return s, int(off[row]), int(off[row + 1])

    def regions(self, index: int) -> Dict[str, np.ndarray]:
        """Per-proposal arrays of image ``index`` (position in :attr:`image_ids`).

        Returns:
            field name -> read-only array (K, *shape) in stored dtype; zero-copy slices of the
            memory-mapped shard when ``mmap``. ``boxes`` are XYXY original-image pixels.
        """
        i = self._check_index(index)
        s, a, b = self._span(i)
        return {f.name: self._array(s, f.name)[a:b] for f in self.schema.proposal_fields}

    def region_accessor(self, field: str) -> Callable[[int], np.ndarray]:
        """A function ``fn(db_index) -> (K, *shape)`` array of one per-proposal field.

        Used by spatial reranking to touch only the top-N images' proposals.
        """
        self._field(field, "proposal")

        def fn(db_index: int) -> np.ndarray:
            i = self._check_index(db_index)
            s, a, b = self._span(i)
            return self._array(s, field)[a:b]

        return fn

    def num_proposals(self, index: int) -> int:
        """Number of stored proposals K of image ``index``."""
        _, a, b = self._span(self._check_index(index))
        return b - a

    def image_field(self, index: int, name: str):
        """Value of a per-image field for image ``index``: a Python scalar for scalar fields
        (``height``, ``width``), else a read-only array of the field's shape."""
        self._field(name, "image")
        i = self._check_index(index)
        value = self._array(int(self._shard_of[i]), name)[int(self._row_of[i])]
        return value.item() if np.ndim(value) == 0 else value

    def nbytes_per_image(self) -> Dict[str, float]:
        """Average stored bytes per image of each field, plus ``offsets`` and ``total``.

        Counts the final images only (duplicates and images outside the list are excluded).
        Per-proposal fields scale with the mean number of proposals per image.
        """
        n = max(self.num_images, 1)
        total_props = sum(self.num_proposals(i) for i in range(self.num_images))
        out: Dict[str, float] = {}
        for spec in self.schema.fields:
            itemsize = np.dtype(self.dtype if spec.kind == "feature" else spec.dtype).itemsize
            row = itemsize * int(np.prod(self.feature_dims[spec.name], dtype=np.int64))
            rows = self.num_images if spec.scope == "image" else total_props
            out[spec.name] = row * rows / n
        out["offsets"] = float(np.dtype(np.int64).itemsize)
        out["total"] = float(sum(out.values()))
        return out
