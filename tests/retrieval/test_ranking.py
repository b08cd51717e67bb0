import numpy as np
import pytest

from retrieval_ext.retrieval import ranking
from retrieval_ext.retrieval.ranking import cosine_scores, rank


def _brute_scores(q, db):
    q, db = np.asarray(q, np.float64), np.asarray(db, np.float64)
    out = np.zeros((q.shape[0], db.shape[0]))
    for a in range(q.shape[0]):
        for i in range(db.shape[0]):
            out[a, i] = sum(q[a, d] * db[i, d] for d in range(q.shape[1]))
    return out


def _brute_order(scores_row):
    # Descending score, ties by ascending index.
    return sorted(range(len(scores_row)), key=lambda i: (-scores_row[i], i))


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_hand_worked_ranking():
    # q = (1, 0): dot with each db row is its first coordinate:
    # 0.6, 1.0, 0.0, -1.0, 0.8 -> order 1 (1.0), 4 (0.8), 0 (0.6), 2 (0.0), 3 (-1.0).
    q = np.array([1.0, 0.0], np.float32)
    db = np.array([[0.6, 0.8], [1, 0], [0, 1], [-1, 0], [0.8, 0.6]], np.float32)
    np.testing.assert_allclose(cosine_scores(q, db), [0.6, 1.0, 0.0, -1.0, 0.8], atol=1e-7)
    order, scores = rank(q, db)
    assert order.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(order, [1, 4, 0, 2, 3])
    np.testing.assert_allclose(scores, [1.0, 0.8, 0.6, 0.0, -1.0], atol=1e-7)
    order2, scores2 = rank(q, db, top_k=2)
    np.testing.assert_array_equal(order2, [1, 4])
    np.testing.assert_allclose(scores2, [1.0, 0.8], atol=1e-7)


def test_ties_are_broken_by_ascending_index():
    # Scores for q = (1, 0): 0, 1, 0, 1, 1 -> ties {1, 3, 4} first, then {0, 2}.
    q = np.array([[1.0, 0.0]], np.float32)
    db = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    np.testing.assert_array_equal(rank(q, db)[0], [[1, 3, 4, 0, 2]])
    for k in range(6):
        np.testing.assert_array_equal(rank(q, db, top_k=k)[0], [[1, 3, 4, 0, 2][:k]])


def test_cosine_scores_brute_force_blocks_and_float16():
    rng = np.random.default_rng(0)
    q = _unit_rows(rng, 3, 4)
    db = _unit_rows(rng, 11, 4).astype(np.float16)
    s = cosine_scores(q, db, block_rows=3)  # 11 rows in blocks of 3, last block partial
    assert s.shape == (3, 11) and s.dtype == np.float32
    np.testing.assert_allclose(s, _brute_scores(q, db), atol=1e-5)


def test_full_and_top_k_ranking_match_brute_force_with_many_ties(monkeypatch):
    # Force several query chunks in rank().
    monkeypatch.setattr(ranking, "_SCORE_BUDGET", 50)
    rng = np.random.default_rng(1)
    # Integer vectors give exact, heavily tied float32 dot products.
    q = rng.integers(-2, 3, size=(7, 3)).astype(np.float32)
    db = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)
    brute = _brute_scores(q, db)
    full_order, full_scores = rank(q, db)
    for a in range(7):
        expected = _brute_order(brute[a])
        np.testing.assert_array_equal(full_order[a], expected)
        np.testing.assert_allclose(full_scores[a], brute[a][expected])
    for k in (0, 1, 5, 17, 39, 40, 100):
        order_k, scores_k = rank(q, db, top_k=k)
        kk = min(k, 40)
        assert order_k.shape == (7, kk) and scores_k.shape == (7, kk)
        np.testing.assert_array_equal(order_k, full_order[:, :kk])
        np.testing.assert_array_equal(scores_k, full_scores[:, :kk])


def test_memmap_database(tmp_path):
    rng = np.random.default_rng(2)
    db = _unit_rows(rng, 30, 5).astype(np.float16)
    np.save(tmp_path / "db.npy", db)
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    q = _unit_rows(rng, 2, 5)
    brute = _brute_scores(q, db)
    order, scores = rank(q, mm, top_k=10)
    for a in range(2):
        np.testing.assert_array_equal(order[a], _brute_order(brute[a])[:10])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), atol=1e-5)


def test_nan_scores_rank_last():
    # Row 1 gives NaN; the others score 0.5 and 1.0.
    q = np.array([1.0, 0.0], np.float32)
    db = np.array([[0.5, 0.0], [np.nan, 0.0], [1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(rank(q, db)[0], [2, 0, 1])
    np.testing.assert_array_equal(rank(q, db, top_k=2)[0], [2, 0])
    np.testing.assert_array_equal(rank(q, db, top_k=3)[0], [2, 0, 1])


def test_rank_validates_input():
    with pytest.raises(ValueError):
        rank(np.ones((1, 2)), np.ones((3, 2)), top_k=-1)
    with pytest.raises(ValueError):
        cosine_scores(np.ones((1, 2)), np.ones((3, 4)))
