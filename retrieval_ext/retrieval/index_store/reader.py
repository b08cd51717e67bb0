"""Reading a finalized index: per-image vectors assembled once, per-proposal rows memory-mapped."""

import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import IndexNotFinalizedError, IndexStoreError
from .layout import FORMAT_VERSION, MANIFEST_NAME, SHARDS_DIR, read_json
from .manifest import check_manifest_compatible
from .schema import FieldSpec, IndexSchema

__all__ = ["IndexReader"]


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
        info = read_json(path)
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
            ids = read_json(d / "ids.json")
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
