"""Descriptor normalisation: L2 and PCA whitening (Salvador et al. 2016, Sec. 3.1).

Sum-pooled image vectors (IPA-sum) are L2-normalised, PCA-whitened and L2-normalised again;
max-pooled ones are only L2-normalised (:func:`normalize_descriptors`). The whitening follows
``pcawhitenlearn`` of cnnimageretrieval-pytorch and is learned on a different dataset than the one
searched (Paris for Oxford and vice versa). Region vectors (either pooling) are whitened the same
way by the index's region compression (``RETRIEVAL.REGION_WHITENING``,
:func:`learn_region_whitening`, :func:`~.learned.load_or_learn_region_whitening`).

Everything here is pure numpy. Inputs may be float16 (e.g. memory-mapped index arrays): they are
upcast to float32 block by block, so only the rows being processed are ever materialised in float32.
Outputs are always float32. The only I/O is :meth:`PCAWhitening.save` / :meth:`PCAWhitening.load`.
"""

import hashlib
import os
import tempfile
from dataclasses import dataclass

import numpy as np

__all__ = [
    "l2_normalize",
    "PCAWhitening",
    "learn_pca_whitening",
    "learn_region_whitening",
    "normalize_descriptors",
    "whitened_cosines",
    "POOLINGS",
]

# Pooling names understood by normalize_descriptors.
POOLINGS = ("sum", "max")

# Rows processed at once when streaming over (possibly memory-mapped) descriptor matrices.
_BLOCK_ROWS = 65536

_FORMAT_VERSION = 1


def _row_blocks(n):
    """Slices covering range(n) in blocks of _BLOCK_ROWS (read at call time, tests patch it)."""
    return [slice(s, s + _BLOCK_ROWS) for s in range(0, n, _BLOCK_ROWS)]


def _as_float(x):
    """float64 stays float64 (precision of intermediate maths); any other dtype becomes float32."""
    x = np.asarray(x)
    if x.dtype == np.float64:
        return x
    return x.astype(np.float32, copy=False)


def l2_normalize(x, axis=-1, eps=1e-12):
    """Divide ``x`` by its L2 norm along ``axis``.

    Args:
        x (array-like): any shape, e.g. (D,) or (N, D); float16/32/64.
        axis (int): axis along which the norm is taken.
        eps (float): norms smaller than ``eps`` are replaced by ``eps`` (as in
            ``torch.nn.functional.normalize``), so an all-zero vector stays all-zero instead of NaN.

    Returns:
        np.ndarray: float32 array of the same shape as ``x``, unit L2 norm along ``axis`` (except
        for vectors with norm below ``eps``).
    """
    # float16 is upcast before squaring: squares of activations overflow float16 easily.
    xf = _as_float(x)
    norm = np.linalg.norm(xf, axis=axis, keepdims=True)
    return (xf / np.maximum(norm, xf.dtype.type(eps))).astype(np.float32, copy=False)


def _check_matrix(X, name="X"):
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {X.shape}")
    return X


@dataclass(frozen=True)
class PCAWhitening:
    """A learned PCA whitening ``x -> projection @ (x - mean)``.

    Attributes:
        mean (np.ndarray): (C,) float32, mean of the training vectors.
        projection (np.ndarray): (D, C) float32, ``diag(lambda^-1/2) @ eigvec.T``; rows sorted by
            decreasing eigenvalue, each eigenvector's largest-magnitude entry made positive (so the
            result does not depend on the sign LAPACK happens to return).
        eigenvalues (np.ndarray): (D,) float64, covariance eigenvalues of the kept directions, in
            decreasing order, *before* regularisation (negative round-off clipped to 0).
        eps (float): relative regularisation used when learning (see :func:`learn_pca_whitening`).
        num_samples (int): number of vectors the whitening was learned on.
    """

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    eps: float
    num_samples: int

    @property
    def in_dim(self):
        """int: input dimension C."""
        return int(self.projection.shape[1])

    @property
    def out_dim(self):
        """int: output dimension D."""
        return int(self.projection.shape[0])

    @property
    def fingerprint(self):
        """str: 16 hex digits identifying the arrays and dimensions.

        Index files record the fingerprint of the whitening their vectors went through; a query
        whitened with a different one is not comparable with them.
        """
        h = hashlib.sha256()
        h.update(f"pcaw-v{_FORMAT_VERSION}:{self.in_dim}:{self.out_dim}".encode())
        for arr in (self.mean, self.projection, self.eigenvalues):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def transform(self, X):
        """Whiten vectors (no normalisation before or after; see :func:`normalize_descriptors`).

        Args:
            X (array-like): (C,) or (N, C), any float dtype; memory-mapped arrays are read in
                blocks of rows.

        Returns:
            np.ndarray: float32, (D,) or (N, D).
        """
        X = np.asarray(X)
        if X.shape[-1] != self.in_dim:
            raise ValueError(f"whitening expects {self.in_dim}-dim vectors, got shape {X.shape}")
        if X.ndim == 1:
            return self.transform(X[None])[0]
        X = _check_matrix(X)
        out = np.empty((X.shape[0], self.out_dim), dtype=np.float32)
        pt = self.projection.T
        for rows in _row_blocks(X.shape[0]):
            out[rows] = (X[rows].astype(np.float32, copy=False) - self.mean) @ pt
        return out

    def save(self, path):
        """Write to ``path`` (npz) atomically: a temp file in the same folder, then ``os.replace``.

        Args:
            path (str): destination file, written as is (no ``.npz`` suffix is appended).
        """
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_whitening_", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format_version=np.int64(_FORMAT_VERSION),
                    mean=self.mean,
                    projection=self.projection,
                    eigenvalues=self.eigenvalues,
                    eps=np.float64(self.eps),
                    num_samples=np.int64(self.num_samples),
                    fingerprint=np.str_(self.fingerprint),
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path):
        """Read a whitening written by :meth:`save`.

        Args:
            path (str): npz file.

        Returns:
            PCAWhitening

        Raises:
            ValueError: unknown format version, or the stored fingerprint does not match the arrays
                (a corrupted or hand-edited file).
        """
        with np.load(os.fspath(path), allow_pickle=False) as z:
            version = int(z["format_version"])
            if version != _FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported whitening format version {version}")
            w = cls(
                mean=z["mean"].astype(np.float32),
                projection=z["projection"].astype(np.float32),
                eigenvalues=z["eigenvalues"].astype(np.float64),
                eps=float(z["eps"]),
                num_samples=int(z["num_samples"]),
            )
            stored = str(z["fingerprint"])
        if stored != w.fingerprint:
            raise ValueError(
                f"{path}: fingerprint mismatch ({stored} stored, {w.fingerprint} read)"
            )
        return w


def learn_pca_whitening(X, dim=None, eps=1e-6):
    """Learn PCA whitening as ``pcawhitenlearn`` in cnnimageretrieval-pytorch.

    ``m = mean(X)``, ``Sigma = (X - m)^T (X - m) / N`` (biased covariance, as the reference),
    ``Sigma = V diag(lambda) V^T`` with ``lambda`` decreasing, ``P = diag(lambda^-1/2) V^T``, so the
    whitened training vectors ``P (x - m)`` have identity covariance in every kept direction whose
    eigenvalue was not regularised.

    Regularisation: eigenvalues below ``eps * lambda_max`` are raised to ``eps * lambda_max`` before
    the inverse square root. This matters when there are fewer vectors than dimensions (N <= C):
    the covariance then has rank at most N - 1, and its null-space eigenvalues are 0 (or round-off
    noise, possibly negative), which would give inf/NaN. Directions beyond the rank carry no
    information learned from X; they are kept (if ``dim`` asks for them) with a bounded gain of
    ``(eps * lambda_max)^-1/2`` rather than dropped, so the output dimension is always ``dim``.
    The computation is done in float64 and streamed over blocks of rows, so X may be a large
    float16 memory map.

    Args:
        X (array-like): (N, C) training vectors, normally already L2-normalised sum-pooled
            descriptors of a *different* dataset than the one searched.
        dim (int or None): output dimension D (1 <= D <= C); None keeps all C directions.
        eps (float): relative eigenvalue floor, > 0.

    Returns:
        PCAWhitening

    Raises:
        ValueError: X not 2-D, fewer than 2 vectors, all vectors identical, bad ``dim`` or ``eps``.
    """
    X = _check_matrix(X)
    n, c = X.shape
    if n < 2:
        raise ValueError(f"need at least 2 vectors to learn a whitening, got {n}")
    if dim is None:
        dim = c
    if not 1 <= int(dim) <= c:
        raise ValueError(f"dim must be in [1, {c}], got {dim}")
    dim = int(dim)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")

    total = np.zeros(c, dtype=np.float64)
    for rows in _row_blocks(n):
        total += X[rows].astype(np.float64).sum(axis=0)
    mean = total / n
    cov = np.zeros((c, c), dtype=np.float64)
    for rows in _row_blocks(n):
        xc = X[rows].astype(np.float64) - mean
        cov += xc.T @ xc
    cov /= n
    # Symmetrise as the reference does: round-off makes X^T X slightly asymmetric.
    cov = (cov + cov.T) / 2

    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 0.0, None)
    eigvec = eigvec[:, order]
    if not eigval[0] > 0:
        raise ValueError("all training vectors are identical: the covariance is zero")
    # Deterministic sign: the largest-magnitude entry of each eigenvector is positive.
    pivot = eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(c)]
    eigvec = eigvec * np.where(pivot < 0, -1.0, 1.0)

    eigval, eigvec = eigval[:dim], eigvec[:, :dim]
    regularised = np.maximum(eigval, eps * eigval[0])
    projection = eigvec.T / np.sqrt(regularised)[:, None]
    return PCAWhitening(
        mean=mean.astype(np.float32),
        projection=projection.astype(np.float32),
        eigenvalues=eigval,
        eps=float(eps),
        num_samples=int(n),
    )


def learn_region_whitening(vectors, dim=0, eps=1e-6, max_vectors=65536):
    """PCA whitening of region vectors: :func:`learn_pca_whitening` of their L2-normalised rows.

    Region vectors of one collection are many and alike (walls, sky, table tops), so their
    covariance is dominated by a few directions every region shares; whitening them (with the
    eigenvalue floor ``eps`` keeping the noisy tail from being amplified) lets the cosine weigh
    what tells one object from another.

    Args:
        vectors (array-like): (N, C) region vectors, any float dtype.
        dim (int): output dimension, at most C (a larger value is reduced to C); 0 = C.
        eps (float): relative eigenvalue floor, see :func:`learn_pca_whitening`.
        max_vectors (int): at most this many rows are used, evenly spread over ``vectors``.

    Returns:
        PCAWhitening
    """
    X = _check_matrix(vectors, "vectors")
    if X.shape[0] > max_vectors:
        X = X[np.linspace(0, X.shape[0] - 1, int(max_vectors)).round().astype(np.int64)]
    dim = min(int(dim), X.shape[1]) or None
    return learn_pca_whitening(l2_normalize(X), dim=dim, eps=eps)


def whitened_cosines(dots: np.ndarray, norms: np.ndarray, scale: float, offset: float):
    """Cosines of whitened region vectors with a whitened query, from plain stored rows.

    For unit region vectors ``x``, a whitening ``x -> P (x - m)`` and the unit whitened query
    ``w``, ``cos = (x . P^T w - m . P^T w) / |P (x - m)|``: with ``d = P^T w``, ``dots`` the
    cosines of the rows with ``d / |d|``, ``scale = |d|``, ``offset = m . d`` and ``norms`` the
    stored ``|P (x - m)|``, it is ``(scale * dots - offset) / norms``.

    Returns:
        float32, the shape of ``dots``; rows of norm 0 score 0.
    """
    norms = np.asarray(norms, dtype=np.float32)
    out = (
        np.float32(scale) * np.asarray(dots, dtype=np.float32) - np.float32(offset)
    ) / np.maximum(norms, np.float32(1e-12))
    return np.where(norms > 0, out, np.float32(0)).astype(np.float32, copy=False)


def normalize_descriptors(X, pooling, whitening=None):
    """Normalise descriptors the way the paper does for their pooling type.

    ``"sum"``: L2 -> PCA-whiten (if ``whitening`` is given) -> L2.
    ``"max"``: L2 only; ``whitening`` is ignored, as in the paper (max-pooled vectors are not
    whitened).

    Args:
        X (array-like): (C,) or (N, C) pooled activations, any float dtype (memory maps are read
            in blocks of rows).
        pooling (str): "sum" or "max".
        whitening (PCAWhitening or None): learned on sum-pooled vectors of the same layer.

    Returns:
        np.ndarray: float32, (D,) or (N, D) with D = ``whitening.out_dim`` for whitened "sum",
        else C. Rows have unit L2 norm (all-zero rows stay zero).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    X = np.asarray(X)
    if X.ndim == 1:
        return normalize_descriptors(X[None], pooling, whitening)[0]
    X = _check_matrix(X)
    use_whitening = pooling == "sum" and whitening is not None
    if use_whitening and X.shape[1] != whitening.in_dim:
        raise ValueError(
            f"whitening expects {whitening.in_dim}-dim vectors, got {X.shape[1]}-dim {pooling}"
        )
    out_dim = whitening.out_dim if use_whitening else X.shape[1]
    out = np.empty((X.shape[0], out_dim), dtype=np.float32)
    for rows in _row_blocks(X.shape[0]):
        block = l2_normalize(X[rows])
        if use_whitening:
            block = l2_normalize(whitening.transform(block))
        out[rows] = block
    return out
