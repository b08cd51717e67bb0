import os

import numpy as np
import pytest

from retrieval_ext.retrieval import normalization
from retrieval_ext.retrieval.normalization import (
    PCAWhitening,
    l2_normalize,
    learn_pca_whitening,
    normalize_descriptors,
)


def _anisotropic(n, c, seed):
    """Correlated Gaussian data with well separated variances and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(c, c)) * np.linspace(3.0, 0.3, c)[:, None]
    return (rng.normal(size=(n, c)) @ mix + rng.normal(size=c)).astype(np.float32)


def _centred_cov(y):
    y = y.astype(np.float64)
    yc = y - y.mean(axis=0)
    return yc.T @ yc / y.shape[0]


# ----------------------------------------------------------------------------- l2_normalize


def test_l2_normalize_hand_worked():
    # |(3, 4)| = 5 -> (0.6, 0.8); |(0, -2)| = 2 -> (0, -1); zero stays zero (no NaN).
    x = np.array([[3.0, 4.0], [0.0, -2.0], [0.0, 0.0]], dtype=np.float32)
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, -1.0], [0.0, 0.0]], atol=1e-7)


def test_l2_normalize_axis0_and_float16_overflow():
    # Columns: (300, 400) -> norm 500; 300**2 = 90000 overflows float16 (max 65504), so the
    # function must upcast before squaring.
    x = np.array([[300.0, 0.0], [400.0, 5.0]], dtype=np.float16)
    y = l2_normalize(x, axis=0)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.0], [0.8, 1.0]], atol=1e-6)


# ----------------------------------------------------------------------------- whitening


@pytest.mark.parametrize("dim", [None, 3])
def test_whitened_training_data_has_identity_covariance(dim):
    x = _anisotropic(2000, 6, seed=0)
    w = learn_pca_whitening(x, dim=dim)
    d = 6 if dim is None else dim
    y = w.transform(x)
    assert y.shape == (2000, d) and y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(_centred_cov(y), np.eye(d), atol=1e-4)


def test_whitening_streams_over_blocks(monkeypatch):
    # Blocks of 7 rows (not a divisor of 500) for learning and transforming: the identity
    # covariance property must still hold.
    monkeypatch.setattr(normalization, "_BLOCK_ROWS", 7)
    x = _anisotropic(500, 5, seed=1)
    y = learn_pca_whitening(x).transform(x)
    np.testing.assert_allclose(_centred_cov(y), np.eye(5), atol=1e-4)


def test_whitening_matches_svd_reference():
    x = _anisotropic(300, 5, seed=2).astype(np.float64)
    w = learn_pca_whitening(x, dim=4)
    # Independent route: SVD of the centred data scaled by 1/sqrt(N). Singular values squared are
    # the covariance eigenvalues; rows of Vt are the eigenvectors.
    xc = (x - x.mean(axis=0)) / np.sqrt(x.shape[0])
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref_p = vt[:4] / s[:4, None]
    np.testing.assert_allclose(w.mean, x.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w.eigenvalues, s[:4] ** 2, rtol=1e-6)
    for row, ref in zip(w.projection.astype(np.float64), ref_p):
        sign = np.sign(row @ ref)
        np.testing.assert_allclose(row, sign * ref, rtol=1e-4, atol=1e-5)
    # Deterministic sign convention: largest-magnitude entry of each eigenvector is positive.
    for row in w.projection:
        assert row[np.argmax(np.abs(row))] > 0


def test_rank_deficient_covariance_is_regularised():
    # 5 vectors in 10-D: the centred covariance has rank 4, eigenvalues 5..10 are zero.
    x = _anisotropic(5, 10, seed=3)
    w = learn_pca_whitening(x, eps=1e-6)
    y = w.transform(x)
    assert np.all(np.isfinite(w.projection)) and np.all(np.isfinite(y))
    assert np.all(w.eigenvalues[4:] < 1e-9 * w.eigenvalues[0])
    # The 4 informative directions are still exactly whitened.
    np.testing.assert_allclose(_centred_cov(y[:, :4]), np.eye(4), atol=1e-3)
    # The null-space gain is bounded by (eps * lambda_max) ** -0.5.
    gains = np.linalg.norm(w.projection.astype(np.float64), axis=1)
    bound = (1e-6 * w.eigenvalues[0]) ** -0.5
    assert np.all(gains <= bound * (1 + 1e-5))
    np.testing.assert_allclose(gains[4:], bound, rtol=1e-5)


def test_learn_from_float16_memmap(tmp_path):
    x16 = _anisotropic(400, 4, seed=4).astype(np.float16)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=x16.shape)
    mm[:] = x16
    mm.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    w = learn_pca_whitening(mm)
    # Property on the exactly representable (float16-rounded) values, computed independently.
    y = w.transform(mm)
    assert y.dtype == np.float32
    np.testing.assert_allclose(_centred_cov(y), np.eye(4), atol=1e-4)


def test_learn_rejects_bad_input():
    with pytest.raises(ValueError):
        learn_pca_whitening(np.ones((1, 3)))
    with pytest.raises(ValueError):
        learn_pca_whitening(np.ones((4, 3)))  # identical vectors: zero covariance
    with pytest.raises(ValueError):
        learn_pca_whitening(_anisotropic(10, 3, 0), dim=4)
    with pytest.raises(ValueError):
        learn_pca_whitening(_anisotropic(10, 3, 0), dim=0)
    with pytest.raises(ValueError):
        learn_pca_whitening(np.ones(3))
    w = learn_pca_whitening(_anisotropic(10, 3, 0))
    with pytest.raises(ValueError):
        w.transform(np.ones((2, 4)))


def test_save_load_round_trip(tmp_path):
    x = _anisotropic(100, 6, seed=5)
    w = learn_pca_whitening(x, dim=5)
    path = tmp_path / "sub" / "whiten_paris"  # no .npz suffix: must be written as named
    w.save(path)
    assert sorted(os.listdir(tmp_path / "sub")) == ["whiten_paris"]  # no temp file left
    w2 = PCAWhitening.load(path)
    np.testing.assert_array_equal(w2.mean, w.mean)
    np.testing.assert_array_equal(w2.projection, w.projection)
    np.testing.assert_array_equal(w2.eigenvalues, w.eigenvalues)
    assert (w2.eps, w2.num_samples, w2.in_dim, w2.out_dim) == (w.eps, 100, 6, 5)
    assert w2.fingerprint == w.fingerprint
    np.testing.assert_array_equal(w2.transform(x), w.transform(x))
    # Overwrite in place works (os.replace onto an existing file).
    w.save(path)
    assert PCAWhitening.load(path).fingerprint == w.fingerprint


def test_load_detects_tampering(tmp_path):
    w = learn_pca_whitening(_anisotropic(50, 4, seed=6))
    path = tmp_path / "w.npz"
    w.save(path)
    with np.load(path) as z:
        items = dict(z)
    items["projection"] = items["projection"] * 2
    np.savez(path, **items)
    with pytest.raises(ValueError, match="fingerprint"):
        PCAWhitening.load(path)


def test_fingerprint_depends_on_content():
    x = _anisotropic(100, 6, seed=7)
    f_full = learn_pca_whitening(x).fingerprint
    assert len(f_full) == 16
    assert learn_pca_whitening(x).fingerprint == f_full
    assert learn_pca_whitening(x, dim=5).fingerprint != f_full
    assert learn_pca_whitening(x[:-1]).fingerprint != f_full


# ----------------------------------------------------------------------------- normalize


def _hand_whitening():
    # mean (0.2, 0); projection swaps the axes and doubles the new second one.
    return PCAWhitening(
        mean=np.array([0.2, 0.0], np.float32),
        projection=np.array([[0.0, 1.0], [2.0, 0.0]], np.float32),
        eigenvalues=np.array([1.0, 0.25]),
        eps=1e-6,
        num_samples=2,
    )


def test_normalize_sum_hand_worked():
    # x = (3, 4): L2 -> (0.6, 0.8); minus mean -> (0.4, 0.8); projection -> (0.8, 0.8);
    # L2 -> (1/sqrt2, 1/sqrt2).
    w = _hand_whitening()
    y = normalize_descriptors(np.array([3.0, 4.0]), "sum", w)
    assert y.shape == (2,) and y.dtype == np.float32
    np.testing.assert_allclose(y, [2**-0.5, 2**-0.5], atol=1e-7)
    # Without a whitening "sum" is plain L2.
    np.testing.assert_allclose(normalize_descriptors([[3.0, 4.0]], "sum"), [[0.6, 0.8]], atol=1e-7)


def test_normalize_max_ignores_whitening():
    w = _hand_whitening()
    x = np.array([[3.0, 4.0], [0.0, 5.0]], dtype=np.float16)
    y = normalize_descriptors(x, "max", w)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 1.0]], atol=1e-7)


def test_normalize_sum_matches_direct_formula(monkeypatch):
    monkeypatch.setattr(normalization, "_BLOCK_ROWS", 3)
    rng = np.random.default_rng(8)
    train = rng.random((200, 5))
    w = learn_pca_whitening(train, dim=3)
    x = rng.random((10, 5)).astype(np.float16)
    y = normalize_descriptors(x, "sum", w)
    # Row by row with plain numpy in float64.
    for xi, yi in zip(x.astype(np.float64), y):
        a = xi / np.sqrt((xi**2).sum())
        b = w.projection.astype(np.float64) @ (a - w.mean.astype(np.float64))
        np.testing.assert_allclose(yi, b / np.sqrt((b**2).sum()), atol=1e-5)
    assert y.shape == (10, 3)


def test_normalize_rejects_unknown_pooling_and_dim_mismatch():
    with pytest.raises(ValueError):
        normalize_descriptors(np.ones((2, 2)), "avg")
    with pytest.raises(ValueError):
        normalize_descriptors(np.ones((2, 3)), "sum", _hand_whitening())


def test_whitened_cosines_from_plain_rows_equal_the_cosine_of_whitened_vectors():
    from retrieval_ext.retrieval.normalization import learn_region_whitening, whitened_cosines

    rng = np.random.default_rng(3)
    train = rng.random((400, 6)) ** 3
    w = learn_region_whitening(train, dim=4, eps=0.01)
    assert w.out_dim == 4 and learn_region_whitening(train, dim=99).out_dim == 6  # at most C
    x = l2_normalize(rng.random((5, 6)))
    q = l2_normalize(rng.random(6))
    xw = l2_normalize(w.transform(x))
    qw = l2_normalize(w.transform(q))
    d = w.projection.T @ qw
    got = whitened_cosines(
        x @ (d / np.linalg.norm(d)),
        np.linalg.norm(w.transform(x), axis=1),
        np.linalg.norm(d),
        w.mean @ d,
    )
    np.testing.assert_allclose(got, xw @ qw, atol=1e-5)
    assert whitened_cosines(np.ones(2), np.zeros(2), 1.0, 0.0).tolist() == [0.0, 0.0]


def test_region_whitening_learns_on_an_even_spread_of_at_most_max_vectors():
    from retrieval_ext.retrieval.normalization import learn_region_whitening

    x = np.random.default_rng(4).random((101, 3))
    w = learn_region_whitening(x, max_vectors=11)
    assert w.num_samples == 11
    np.testing.assert_allclose(w.mean, l2_normalize(x[::10]).mean(axis=0), atol=1e-6)
