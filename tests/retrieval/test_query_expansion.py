import numpy as np
import pytest

from retrieval_ext.retrieval.query_expansion import (
    alpha_query_expansion,
    average_query_expansion,
    gather_best_region_vectors,
    outlier_gate,
    region_query_expansion,
)
from retrieval_ext.retrieval.reranking import RerankResult

Q = np.array([1.0, 0.0], np.float32)
DB = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], np.float32)
ORDER = np.array([2, 0, 1])


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.sqrt((v**2).sum())


def test_aqe_hand_worked():
    # m = 2: q + db[2] + db[0] = (1, 0) + (0.6, 0.8) + (0, 1) = (1.6, 1.8); norm sqrt(5.8).
    out = average_query_expansion(Q, DB, ORDER, m=2)
    assert out.shape == (2,) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.array([1.6, 1.8]) / np.sqrt(5.8), atol=1e-6)
    # m = 0: the query itself.
    np.testing.assert_allclose(average_query_expansion(Q, DB, ORDER, m=0), Q, atol=1e-7)


def test_aqe_m_larger_than_ranking():
    # m = 10 > 3 results: (1,0) + (0.6,0.8) + (0,1) + (1,0) = (2.6, 1.8).
    out = average_query_expansion(Q, DB, ORDER, m=10)
    np.testing.assert_allclose(out, _unit([2.6, 1.8]), atol=1e-6)
    # A truncated ranking (top-1 only) with m = 5 uses the one result: (1.6, 0.8).
    out1 = average_query_expansion(Q, DB, ORDER[:1], m=5)
    np.testing.assert_allclose(out1, _unit([1.6, 0.8]), atol=1e-6)


def test_aqe_brute_force_float16_memmap(tmp_path):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(50, 6))
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float16)
    np.save(tmp_path / "db.npy", db)
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    q = _unit(rng.normal(size=6))
    order = rng.permutation(50)
    out = average_query_expansion(q, mm, order, m=5)
    acc = [float(x) for x in q]
    for pos in range(5):
        for k in range(6):
            acc[k] += float(db[order[pos], k])
    np.testing.assert_allclose(out, _unit(acc), atol=1e-5)


def test_alpha_qe():
    # alpha = 2 with one result (0.6, 0.8): similarity 0.6, weight 0.36;
    # q + 0.36 * (0.6, 0.8) = (1.216, 0.288).
    out = alpha_query_expansion(Q, DB, ORDER, m=1, alpha=2.0)
    np.testing.assert_allclose(out, _unit([1.216, 0.288]), atol=1e-6)
    # Negative similarity is clipped to weight 0: the result is the query.
    db_neg = np.array([[-1.0, 0.0]], np.float32)
    np.testing.assert_allclose(alpha_query_expansion(Q, db_neg, [0], m=1, alpha=3.0), Q)
    # alpha = 0 weighs every result 1: same direction as the plain average (m = 3: (2.6, 1.8)).
    np.testing.assert_allclose(
        alpha_query_expansion(Q, DB, ORDER, m=3, alpha=0.0), _unit([2.6, 1.8]), atol=1e-6
    )
    with pytest.raises(ValueError):
        alpha_query_expansion(Q, DB, ORDER, alpha=-1.0)


def test_region_qe_hand_worked():
    # (1, 0) + (0, 1) -> (1/sqrt2, 1/sqrt2).
    out = region_query_expansion(Q, np.array([[0.0, 1.0]]))
    np.testing.assert_allclose(out, [2**-0.5, 2**-0.5], atol=1e-7)
    # No best regions: the query region itself.
    np.testing.assert_allclose(region_query_expansion(Q, np.zeros((0, 2))), Q)


def test_gather_best_region_vectors_skips_empty_and_is_lazy():
    region = {
        7: np.array([[0.0, 3.0], [4.0, 3.0]]),  # best proposal 1 -> (0.8, 0.6) after L2
        8: np.zeros((0, 2)),
        9: np.array([[0.0, -2.0]]),  # best proposal 0 -> (0, -1)
        5: np.array([[1.0, 0.0]]),
    }
    requested = []

    def acc(i):
        requested.append(i)
        return region[i]

    result = RerankResult(
        order=np.array([7, 8, 9, 5]),
        scores=np.array([0.9, -np.inf, 0.5, 0.1], np.float32),
        boxes=np.full((4, 4), np.nan, np.float32),
        best_proposal=np.array([1, -1, 0, -1]),
        top_n=3,
    )
    rows = gather_best_region_vectors(result, acc, m=5)  # m > top_n: only the block is used
    np.testing.assert_allclose(rows, [[0.8, 0.6], [0.0, -1.0]], atol=1e-7)
    assert sorted(requested) == [7, 9]
    # Region QE with them: (1,0) + (0.8,0.6) + (0,-1) = (1.8, -0.4).
    np.testing.assert_allclose(region_query_expansion(Q, rows), _unit([1.8, -0.4]), atol=1e-6)
    # m = 1: only the first image.
    np.testing.assert_allclose(gather_best_region_vectors(result, region, m=1), [[0.8, 0.6]])
    assert gather_best_region_vectors(result, region, m=0).shape[0] == 0


def test_outlier_gate_hand_worked():
    # block 0.60, 0.61, 0.62, 0.63, 0.64, 0.80: median 0.625, |dev| 0.025 0.015 0.005 0.005
    # 0.015 0.175 -> MAD 0.015, scale 1.4826 * 0.015 = 0.022239; z(0.80) = 0.175 / 0.022239
    # = 7.87, z(0.64) = 0.67, z(0.70) = 3.37
    block = [0.60, 0.61, 0.62, 0.63, 0.64, 0.80]
    gate = outlier_gate([0.80, 0.70, 0.64], block, z=4.0)
    assert gate.dtype == bool
    np.testing.assert_array_equal(gate, [True, False, False])
    np.testing.assert_array_equal(outlier_gate([0.80, 0.70, 0.64], block, z=3.0), [1, 1, 0])
    # -inf (images without proposals) is ignored: same median and MAD
    np.testing.assert_array_equal(
        outlier_gate([0.80, 0.70], block + [-np.inf, -np.inf], z=3.0), [True, True]
    )


def test_outlier_gate_degenerate_blocks_and_bad_threshold():
    # MAD 0: scores above the median pass, the median itself does not
    np.testing.assert_array_equal(outlier_gate([0.9, 0.5], [0.5, 0.5, 0.5, 0.9], 4.0), [1, 0])
    np.testing.assert_array_equal(outlier_gate([0.9], [-np.inf], 4.0), [False])
    with pytest.raises(ValueError, match="z must be > 0"):
        outlier_gate([0.9], [0.1, 0.2], 0.0)


def test_gated_qe_is_plain_qe_over_the_kept_results():
    # the gate keeps rank 1 of ORDER (db[2]); plain QE over it alone, as the wiring will call it
    scores = np.array([0.9, 0.2, 0.1, 0.12, 0.11, 0.13])
    kept = ORDER[:2][outlier_gate(scores[:2], scores, z=4.0)]
    np.testing.assert_array_equal(kept, [2])
    out = average_query_expansion(Q, DB, kept, m=2)
    np.testing.assert_allclose(out, _unit([1.6, 0.8]), atol=1e-6)
