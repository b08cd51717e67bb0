"""Product-quantised region vectors, scored from their codes (asymmetric distance computation).

A unit region vector ``x`` (D,) is cut into M sub-vectors of D / M dimensions; each is replaced by
the index (one byte) of its nearest of 256 centroids learned for that sub-space (Jegou et al.,
"Product quantization for nearest neighbor search", TPAMI 2011), optionally after an orthogonal
rotation learned to balance the sub-spaces (OPQ, Ge et al. CVPR 2013). A vector costs M bytes.

Scoring needs no decoding: for a query ``q`` (float, in the same rotated space) the table
``T[m, k] = <q_m, c_{m,k}>`` gives ``<q, x_hat> = sum_m T[m, code_m]`` (ADC), and
``N[m, k] = |c_{m,k}|^2`` gives ``|x_hat|^2 = sum_m N[m, code_m]`` (the sub-spaces are
orthogonal), so :meth:`RegionPQ.cosines` returns the cosine of the query with each stored
reconstruction from two table look-ups per byte. Learning uses faiss (``ProductQuantizer``,
``OPQMatrix``); encoding, decoding and scoring are numpy on the stored centroids, which are kept
in float16 (and used in that precision everywhere, so codes are the nearest centroids of what is
stored).
"""

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["RegionPQ", "learn_region_pq"]

KSUB = 256  # centroids per sub-quantiser: one byte per code


@dataclass
class RegionPQ:
    """A learned product quantiser of D-dim vectors.

    Attributes:
        centroids: float16 (M, 256, D / M) sub-space centroids.
        rotation: float16 (D, D) OPQ rotation applied before quantising (``x @ rotation.T``),
            or None.
        trained_on: what it was learned on (recorded in the index manifest).
    """

    centroids: np.ndarray
    rotation: Optional[np.ndarray] = None
    trained_on: str = ""
    _c32: np.ndarray = field(init=False, repr=False)
    _r32: Optional[np.ndarray] = field(init=False, repr=False)
    _norms: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        c = np.asarray(self.centroids)
        if c.ndim != 3 or c.shape[1] != KSUB:
            raise ValueError(f"centroids must be (M, {KSUB}, D / M), got {c.shape}")
        self.centroids = c.astype(np.float16)
        self._c32 = self.centroids.astype(np.float32)
        self._norms = np.einsum("mkd,mkd->mk", self._c32, self._c32)
        self._r32 = None
        if self.rotation is not None:
            self.rotation = np.asarray(self.rotation).astype(np.float16)
            if self.rotation.shape != (self.dim, self.dim):
                raise ValueError(f"rotation must be ({self.dim}, {self.dim})")
            self._r32 = self.rotation.astype(np.float32)

    @property
    def m(self) -> int:
        """Sub-quantisers, i.e. bytes per code."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[0] * self.centroids.shape[2])

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """``x`` (..., D) in the quantised space (the OPQ rotation, if any), float32."""
        x = np.asarray(x, dtype=np.float32)
        return x if self._r32 is None else x @ self._r32.T

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes of (n, D) vectors (not yet rotated): uint8 (n, M), the nearest centroids."""
        x = self.rotate(np.asarray(x).reshape(-1, self.dim))
        sub = x.reshape(x.shape[0], self.m, -1)
        codes = np.empty((x.shape[0], self.m), dtype=np.uint8)
        for j in range(self.m):
            # |s - c|^2 = |s|^2 - 2 s.c + |c|^2; |s|^2 does not change the argmin
            d = self._norms[j][None, :] - 2.0 * (sub[:, j, :] @ self._c32[j].T)
            codes[:, j] = np.argmin(d, axis=1)
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstructions of (n, M) codes in the quantised (rotated) space: float32 (n, D)."""
        codes = np.asarray(codes).reshape(-1, self.m)
        parts = self._c32[np.arange(self.m)[None, :], codes.astype(np.int64)]  # (n, M, D / M)
        return parts.reshape(codes.shape[0], self.dim)

    def tables(self, q: np.ndarray) -> np.ndarray:
        """The look-up table of a query already in the quantised space, (D,): complex64
        (M * 256,) with ``<q_m, c_{m,k}>`` as real part and ``|c_{m,k}|^2`` as imaginary part, so
        one gather and one sum give both the dot product and the squared norm of a code."""
        q = np.asarray(q, dtype=np.float32).reshape(self.m, -1)
        dots = np.einsum("mkd,md->mk", self._c32, q)
        return (dots + 1j * self._norms).astype(np.complex64).reshape(-1)

    def cosines(self, parts: Sequence[np.ndarray], q: np.ndarray) -> np.ndarray:
        """Cosine of the query ``q`` (D,) (quantised space) with the reconstruction of every
        code of ``parts`` (each (K_i, M) uint8), concatenated: float32 (sum K_i,).

        Asymmetric distance computation: table look-ups, no code is decoded. Codes of norm 0
        (all-zero reconstructions) and a zero query give 0.
        """
        q = np.asarray(q, dtype=np.float32)
        table = self.tables(q / max(float(np.linalg.norm(q)), 1e-12))
        codes = parts[0] if len(parts) == 1 else np.concatenate(parts)
        offsets = np.arange(self.m, dtype=np.int32) * KSUB
        summed = np.take(table, np.add(codes, offsets, dtype=np.int32)).sum(axis=1)
        norms = np.sqrt(np.maximum(summed.imag, 0.0))
        return (summed.real / np.maximum(norms, np.float32(1e-12))).astype(np.float32)

    # -- identity and persistence ------------------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha1(self.centroids.tobytes())
        if self.rotation is not None:
            h.update(self.rotation.tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "m": self.m,
            "opq": self.rotation is not None,
            "trained_on": self.trained_on,
            "hash": self.fingerprint(),
        }

    def arrays(self) -> Dict[str, np.ndarray]:
        out = {"pq_centroids": self.centroids}
        if self.rotation is not None:
            out["pq_rotation"] = self.rotation
        return out

    @classmethod
    def from_arrays(cls, arrays, trained_on: str = "") -> "RegionPQ":
        rotation = arrays["pq_rotation"] if "pq_rotation" in arrays else None
        if rotation is not None:
            rotation = np.array(rotation)
        return cls(np.array(arrays["pq_centroids"]), rotation, trained_on)


def learn_region_pq(
    vectors: np.ndarray,
    m: int,
    opq: bool = False,
    max_train: int = 65536,
    seed: int = 0,
    trained_on: str = "",
) -> RegionPQ:
    """Learn a product quantiser (and an OPQ rotation) on unit region vectors.

    Args:
        vectors: (n, D) float vectors, L2-normalised (as stored), n >= 256.
        m: sub-quantisers; must divide D.
        opq: also learn an OPQ rotation (faiss ``OPQMatrix``).
        max_train: at most this many vectors are used, drawn at random with ``seed``.
        trained_on: what ``vectors`` are, recorded with the quantiser.

    Returns:
        RegionPQ
    """
    import faiss

    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    n, d = x.shape
    if d % int(m):
        raise ValueError(f"RETRIEVAL.REGION_PQ.M ({m}) must divide the vector dimension {d}")
    if n < KSUB:
        raise ValueError(f"learning a product quantiser needs >= {KSUB} vectors, got {n}")
    if n > max_train:
        x = x[np.sort(np.random.default_rng(seed).choice(n, max_train, replace=False))]
    rotation = None
    if opq:
        mat = faiss.OPQMatrix(d, int(m))
        inner = faiss.ProductQuantizer(d, int(m), 8)  # kept referenced: faiss holds a pointer
        inner.cp.min_points_per_centroid = 1
        inner.cp.seed = int(seed)
        mat.pq = inner
        mat.train(x)
        rotation = faiss.vector_to_array(mat.A).reshape(d, d)
        x = np.ascontiguousarray(x @ rotation.T)
    pq = faiss.ProductQuantizer(d, int(m), 8)
    pq.cp.seed = int(seed)
    # faiss warns on stderr below 39 points per centroid; the caller says how many it had
    pq.cp.min_points_per_centroid = 1
    pq.train(x)
    centroids = faiss.vector_to_array(pq.centroids).reshape(int(m), KSUB, d // int(m))
    return RegionPQ(centroids, rotation, trained_on)
