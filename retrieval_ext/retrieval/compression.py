"""Compact region features: fewer proposals, PCA learned on another dataset, float16 / int8 codes.

Region vectors (RPA, K proposals x C floats per image) are most of an index's bytes. A
:class:`RegionCompression` shrinks them in three independent ways:

- ``num_proposals``: keep only the K' proposals of highest objectness (0 = keep all);
- ``pca_dim``: project the L2-normalised vectors on the top ``pca_dim`` principal components
  learned on *another* dataset's region vectors (0 = no projection);
- ``dtype``: store the L2-normalised (projected) vectors as ``float32``, ``float16`` or ``int8``
  (each vector scaled so that its largest magnitude is 127, then rounded), or as product-quantised
  codes (``"pq"``: M bytes per vector, :mod:`.product_quantization`), which CA-SR scores from the
  codes by asymmetric distance (:meth:`RegionCompression.similarity`).

With a region ``whitening`` (:class:`~.normalization.PCAWhitening` of the L2-normalised vectors,
``RETRIEVAL.REGION_WHITENING``) the vectors are stored as they are and each proposal also stores
the norm of its whitened vector (``<field>_wnorm``, float16): CA-SR then ranks by the cosine of
the whitened vectors, computed from the stored rows with a transformed query
(:meth:`RegionCompression.rank_query`, :func:`~.normalization.whitened_cosines`), while the
plain cosine still locates the object.

Spatial reranking only needs cosine similarities, which do not change when a vector is scaled, so
stored vectors need no per-vector scale: the reranker L2-normalises what it reads. The query's
region vector goes through the same projection (:meth:`RegionCompression.project_query`).
Stored compressed vectors are unit-norm up to rounding, so a reranker may skip re-normalising
them (``normalized=True`` in :func:`~retrieval_ext.retrieval.reranking.class_agnostic_rerank`).

Pure numpy, no detectron2: the math is tested against a hand-written PCA and quantiser.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .index_store import FieldSpec, IndexSchema
from .normalization import PCAWhitening
from .product_quantization import RegionPQ, learn_region_pq

__all__ = [
    "REGION_DTYPES",
    "COMPRESSION_FILE",
    "RegionCompression",
    "learn_region_pca",
    "quantize_int8",
    "load_region_compression",
    "WNORM_SUFFIX",
]

REGION_DTYPES = ("float32", "float16", "int8", "pq")
# Saved beside manifest.json; a searcher finding it projects query region vectors with it.
COMPRESSION_FILE = "region_compression.npz"
# Name suffix of the per-proposal norms of the whitened region vectors (float16).
WNORM_SUFFIX = "_wnorm"


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def learn_region_pca(vectors: np.ndarray, dim: int):
    """Principal components of L2-normalised region vectors.

    Args:
        vectors: (M, C) region vectors of another dataset (any float dtype), M >= 2.
        dim: components kept, 1 <= dim <= min(M, C).

    Returns:
        tuple(np.ndarray, np.ndarray): ``mean`` float32 (C,) of the normalised vectors and
        ``components`` float32 (dim, C), orthonormal rows, largest variance first.
    """
    x = _l2(np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)).astype(np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 region vectors, got {x.shape[0]}")
    if not 1 <= int(dim) <= min(x.shape):
        raise ValueError(f"pca dim must be in [1, {min(x.shape)}], got {dim}")
    mean = x.mean(axis=0)
    # SVD of the centred data: right singular vectors are the covariance eigenvectors.
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[: int(dim)]
    # A deterministic sign per component: the largest-magnitude coordinate is positive.
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    return mean.astype(np.float32), comps.astype(np.float32)


def quantize_int8(x: np.ndarray) -> np.ndarray:
    """Per-row symmetric 8-bit codes: ``round(127 * x / max|x|)`` (zero rows stay zero).

    Args:
        x: (K, D) float vectors.

    Returns:
        int8 (K, D) codes; each row is proportional to its input up to rounding.
    """
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=-1, keepdims=True) if x.size else np.zeros(x.shape[:-1] + (1,))
    scale = np.where(peak > 0, 127.0 / np.maximum(peak, 1e-30), 0.0).astype(np.float32)
    return np.clip(np.rint(x * scale), -127, 127).astype(np.int8)


@dataclass
class RegionCompression:
    """How region vectors are stored. All-default = keep all proposals, no PCA, float16.

    Attributes:
        num_proposals: proposals kept per image, highest objectness first; 0 = all.
        pca_dim: PCA output dimension; 0 = no projection (then ``mean``/``components`` are None).
        dtype: "float32", "float16" or "int8" storage of the region vectors.
        fields: the per-proposal vector fields compressed (the other proposal fields, boxes,
            objectness, class scores, are only truncated to the kept proposals).
        mean: float32 (C,) PCA mean (of L2-normalised vectors), or None.
        components: float32 (pca_dim, C) PCA rows, or None.
        pq: the product quantiser of ``dtype`` "pq" (learned on the transformed vectors).
        whitening: the region whitening CA-SR ranks with (vectors stored unwhitened, with the
            norms of their whitened vectors); None = rank by the plain cosine.
    """

    num_proposals: int = 0
    pca_dim: int = 0
    dtype: str = "float16"
    fields: Sequence[str] = ("rpa_sum", "rpa_max")
    mean: Optional[np.ndarray] = field(default=None, repr=False)
    components: Optional[np.ndarray] = field(default=None, repr=False)
    pq: Optional[RegionPQ] = field(default=None, repr=False)
    whitening: Optional[PCAWhitening] = field(default=None, repr=False)

    def __post_init__(self):
        if self.dtype not in REGION_DTYPES:
            raise ValueError(f"region dtype must be one of {REGION_DTYPES}, got {self.dtype!r}")
        if int(self.num_proposals) < 0 or int(self.pca_dim) < 0:
            raise ValueError("num_proposals and pca_dim must be >= 0")
        if self.pca_dim and (self.components is None or self.mean is None):
            raise ValueError("pca_dim > 0 needs the learned mean and components")
        if self.components is not None and self.components.shape[0] != int(self.pca_dim):
            raise ValueError(
                f"components have {self.components.shape[0]} rows, pca_dim is {self.pca_dim}"
            )
        if (self.dtype == "pq") != (self.pq is not None):
            raise ValueError("dtype 'pq' needs a learned product quantiser, and only it")
        if self.whitening is not None and self.pca_dim:
            raise ValueError("a region whitening and a region PCA cannot be combined")
        self.fields = tuple(self.fields)

    @property
    def storage_dtype(self) -> str:
        """The numpy dtype of the stored codes (uint8 for product-quantised codes)."""
        return "uint8" if self.dtype == "pq" else self.dtype

    @classmethod
    def learn(
        cls,
        vectors: np.ndarray,
        num_proposals=0,
        pca_dim=0,
        dtype="float16",
        pq_m: int = 0,
        opq: bool = False,
        trained_on: str = "",
        **kw,
    ) -> "RegionCompression":
        """A compression whose PCA (if ``pca_dim``) and product quantiser (``dtype`` "pq", of
        ``pq_m`` bytes, with an OPQ rotation if ``opq``) are learned on ``vectors`` (M, C)."""
        mean = comps = pq = None
        if pca_dim:
            mean, comps = learn_region_pca(vectors, pca_dim)
        if dtype == "pq":
            plain = cls(num_proposals, pca_dim, "float32", mean=mean, components=comps)
            pq = learn_region_pq(plain.transform(vectors), pq_m, opq, trained_on=trained_on)
        return cls(num_proposals, pca_dim, dtype, mean=mean, components=comps, pq=pq, **kw)

    def describe(self) -> dict:
        """JSON-able description (goes into the index manifest: resuming with another
        compression is refused). The PCA is identified by a hash of its arrays."""
        d = {
            "num_proposals": int(self.num_proposals),
            "pca_dim": int(self.pca_dim),
            "dtype": self.dtype,
            "fields": list(self.fields),
        }
        if self.pca_dim:
            import hashlib

            h = hashlib.sha1(self.mean.tobytes() + self.components.tobytes()).hexdigest()[:16]
            d["pca_hash"] = h
        if self.pq is not None:
            d["pq"] = self.pq.describe()
        if self.whitening is not None:
            d["whitening"] = {"dim": self.whitening.out_dim, "hash": self.whitening.fingerprint}
        return d

    # -- vectors ---------------------------------------------------------------------------
    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """L2-normalise, project (if PCA) and L2-normalise again, in float32.

        Args:
            vectors: (K, C) or (C,) region vectors.

        Returns:
            float32 (K, D) or (D,), D = ``pca_dim`` or C; unit rows (zero rows stay zero).
        """
        x = _l2(vectors)
        if self.pca_dim:
            x = _l2((x - self.mean) @ self.components.T)
        return x

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Stored codes of (K, C) region vectors: (K, D) in ``dtype``."""
        x = self.transform(np.asarray(vectors).reshape(-1, np.asarray(vectors).shape[-1]))
        if self.dtype == "int8":
            return quantize_int8(x)
        if self.pq is not None:
            return self.pq.encode(x)
        return x.astype(self.dtype)

    def project_query(self, vector: np.ndarray) -> np.ndarray:
        """The query region vector (C,) in the stored vectors' space: float32 (D,), unit norm
        (for product-quantised codes: rotated as the codes were). Not quantised: only the
        database side pays the rounding."""
        x = self.transform(np.asarray(vector).reshape(-1))
        return self.pq.rotate(x) if self.pq is not None else x

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Stored rows (K, D') as float32 vectors (K, D) of the query's space (see
        :meth:`project_query`), proportional to the stored unit vectors (PQ: reconstructions)."""
        if self.pq is not None:
            return self.pq.decode(codes)
        return np.asarray(codes, dtype=np.float32)

    def similarity(self):
        """How CA-SR scores stored rows against the projected query: ``fn(parts, q) -> cosines``
        from the codes (asymmetric distance) for product-quantised codes; None (cosines of the
        stored vectors) otherwise."""
        return self.pq.cosines if self.pq is not None else None

    def rank_query(self, q: np.ndarray):
        """How CA-SR ranks with the whitening: ``(direction, scale, offset)`` for
        :func:`~.normalization.whitened_cosines`, ``direction`` (D,) a unit vector of the stored
        rows' space scored like a query. ``q``: a query region vector of that space (from
        :meth:`project_query`, or an expanded query of region QE). None without a whitening."""
        if self.whitening is None:
            return None
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        if self.pq is not None and self.pq.rotation is not None:
            q = q @ self.pq.rotation.astype(np.float32)  # back to the unrotated space
        w = _l2(self.whitening.transform(_l2(q)))
        d = w @ self.whitening.projection
        scale = float(np.linalg.norm(d))
        offset = float(self.whitening.mean @ d)
        direction = d / max(scale, 1e-12)
        return (self.pq.rotate(direction) if self.pq is not None else direction), scale, offset

    def whitened_norms(self, vectors: np.ndarray) -> np.ndarray:
        """``|P (x - m)|`` of the L2-normalised (K, C) region vectors: float16 (K,)."""
        x = _l2(np.asarray(vectors).reshape(-1, np.asarray(vectors).shape[-1]))
        return np.linalg.norm(self.whitening.transform(x), axis=1).astype(np.float16)

    def keep(self, objectness: np.ndarray) -> np.ndarray:
        """Indices of the kept proposals: the ``num_proposals`` of highest objectness (ties: the
        earlier one), in their stored order. int64 (K',)."""
        k = objectness.shape[0]
        if not self.num_proposals or k <= self.num_proposals:
            return np.arange(k, dtype=np.int64)
        best = np.argsort(-np.asarray(objectness, dtype=np.float64), kind="stable")
        return np.sort(best[: int(self.num_proposals)])

    # -- index records and schema ------------------------------------------------------------
    def compress_record(self, record: Dict[str, np.ndarray], schema: IndexSchema) -> dict:
        """One image's index record with kept proposals only and compressed region vectors.

        Args:
            record: field -> array as given to :meth:`IndexWriter.add` (proposal fields (K, ...),
                best first; ``objectness`` (K,) when stored decides which are kept).
            schema: the uncompressed schema (tells which fields are per proposal).

        Returns:
            a new record for the schema :meth:`schema` returns.
        """
        if "objectness" in record:
            keep = self.keep(np.asarray(record["objectness"]))
        elif self.num_proposals:  # proposals are stored best first
            keep = slice(0, int(self.num_proposals))
        else:
            keep = slice(None)
        out = {}
        for spec in schema.fields:
            v = np.asarray(record[spec.name])
            if spec.scope == "proposal":
                v = v[keep]
                if spec.name in self.fields:
                    if self.whitening is not None:
                        out[spec.name + WNORM_SUFFIX] = self.whitened_norms(v)
                    empty = np.zeros((0, self.dim(v)), self.storage_dtype)
                    v = self.encode(v) if v.shape[0] else empty
            out[spec.name] = v
        return out

    def dim(self, v: np.ndarray) -> int:
        """Stored dimension for input vectors ``v`` (..., C): bytes per code for PQ."""
        if self.pq is not None:
            return self.pq.m
        return int(self.pca_dim) or int(v.shape[-1])

    def schema(self, schema: IndexSchema) -> IndexSchema:
        """``schema`` with the compressed fields stored as exact fields of ``dtype``, so that
        they keep their code type whatever the index's feature dtype."""
        fields = []
        for f in schema.fields:
            if f.name in self.fields:
                dim = self.pq.m if self.pq is not None else int(self.pca_dim) or None
                f = FieldSpec(f.name, f.scope, "exact", (dim,), self.storage_dtype)
                if self.whitening is not None:
                    fields.append(FieldSpec(f.name + WNORM_SUFFIX, f.scope, "exact", (), "float16"))
            fields.append(f)
        return IndexSchema(fields)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path):
        """Write to ``path`` (an .npz; a file-like object works too)."""
        arrays = {"config": np.array(json.dumps(self.describe()))}
        if self.pca_dim:
            arrays["mean"], arrays["components"] = self.mean, self.components
        if self.pq is not None:
            arrays.update(self.pq.arrays())
        if self.whitening is not None:
            w = self.whitening
            arrays.update(
                whitening_mean=w.mean,
                whitening_projection=w.projection,
                whitening_eigenvalues=w.eigenvalues,
                whitening_meta=np.array([w.eps, w.num_samples], dtype=np.float64),
            )
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> "RegionCompression":
        with np.load(path, allow_pickle=False) as d:
            cfg = json.loads(str(d["config"]))
            mean = np.array(d["mean"]) if "mean" in d.files else None
            comps = np.array(d["components"]) if "components" in d.files else None
            pq = None
            if "pq_centroids" in d.files:
                pq = RegionPQ.from_arrays(d, cfg["pq"].get("trained_on", ""))
            whitening = None
            if "whitening_mean" in d.files:
                eps, num = (float(v) for v in d["whitening_meta"])
                whitening = PCAWhitening(
                    np.array(d["whitening_mean"]),
                    np.array(d["whitening_projection"]),
                    np.array(d["whitening_eigenvalues"]),
                    eps,
                    int(num),
                )
        return cls(
            cfg["num_proposals"],
            cfg["pca_dim"],
            cfg["dtype"],
            cfg["fields"],
            mean,
            comps,
            pq,
            whitening,
        )


def load_region_compression(index_root) -> Optional[RegionCompression]:
    """The compression saved beside an index (``COMPRESSION_FILE``), or None if uncompressed."""
    path = Path(index_root) / COMPRESSION_FILE
    return RegionCompression.load(path) if path.is_file() else None


def compress_index(source, dest, compression: RegionCompression, shard_size: int = 256):
    """Write a compressed copy of a finalized index (no network pass: stored features only).

    Images keep their order, ids and failed list; the manifest gains ``region_compression``
    (:meth:`RegionCompression.describe`) and the compression is saved beside it.

    Args:
        source: an :class:`~retrieval_ext.retrieval.index_store.IndexReader` of an uncompressed
            index (float32 preferably: float16 sources compress their rounded values).
        dest: directory of the new index (must not hold another index).
        compression: what to apply.
        shard_size: images per shard of the new index.

    Returns:
        IndexReader of the new index.
    """
    from .index_store import IndexReader, IndexWriter

    if load_region_compression(source.root) is not None:
        raise ValueError(f"{source.root} is already compressed")
    dest = Path(dest)
    manifest = dict(source.manifest, region_compression=compression.describe())
    schema = compression.schema(source.schema)
    dest.mkdir(parents=True, exist_ok=True)
    compression.save(dest / COMPRESSION_FILE)
    with IndexWriter(dest, manifest, shard_size, source.dtype, 0, schema) as writer:
        for i, image_id in enumerate(source.image_ids):
            if image_id in writer.done_ids:
                continue
            rec = {f.name: source.image_field(i, f.name) for f in source.schema.image_fields}
            rec.update(source.regions(i))
            writer.add(image_id, compression.compress_record(rec, source.schema))
        for image_id, reason in source.failed.items():
            if image_id not in writer.failed:
                writer.mark_failed(image_id, reason)
    IndexWriter(dest, manifest, shard_size, source.dtype, 0, schema).finalize(
        source.info["image_list"]
    )
    return IndexReader(dest)
