"""faiss filtering: exact search equals brute force; approximate indexes recall, save and reload."""

import numpy as np
import pytest

from retrieval_ext.retrieval.faiss_search import FaissFilter, FaissParams, recall_at_k
from tests.common import random_record, write_index


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q, db):
    s = db.astype(np.float64) @ q.astype(np.float64)
    return sorted(range(len(s)), key=lambda j: (-s[j], j)), s


def test_flat_full_ranking_equals_brute_force_with_ties():
    rng = np.random.default_rng(0)
    db = _unit(rng, 50, 8)
    db[7] = db[3]  # an exact tie: ascending index first
    db[20] = db[3]
    f = FaissFilter(db, FaissParams("flat", use_gpu=False))
    q = db[3] + 0.01 * _unit(rng, 1, 8)[0]
    order, scores = f.rank(q)
    want, s = _brute(q, db)
    assert order.tolist() == want
    assert np.allclose(scores, s[want], atol=1e-5)
    assert order[:3].tolist() == [3, 7, 20]


def test_top_k_keeps_the_best_and_appends_the_rest_unscored():
    rng = np.random.default_rng(1)
    db = _unit(rng, 30, 6)
    q = _unit(rng, 1, 6)[0]
    order, scores = FaissFilter(db, FaissParams("flat", use_gpu=False)).rank(q, top_k=5)
    want, _ = _brute(q, db)
    assert order[:5].tolist() == want[:5]
    assert (
        sorted(order[5:].tolist()) == order[5:].tolist() == sorted(set(range(30)) - set(want[:5]))
    )
    assert np.all(np.isneginf(scores[5:]))


def test_recall_at_k_hand_example():
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    e = np.array([[4, 3, 9, 9], [5, 0, 0, 0]])
    # query 1: {1,2,3,4} & {4,3,9} = 2 of 4; query 2: 1 of 4
    assert recall_at_k(a, e, 4) == pytest.approx((2 / 4 + 1 / 4) / 2)


# recall@100 against brute force on the clustered data below. HNSW (128 candidates for 100 on
# 3000 points) is all but exact: 0.999 measured for seeds 0-2. IVF-PQ codes 2 dimensions per byte
# (16 codes for 32-d) and visits 8 of 32 cells: 0.96-0.97 for seeds 0-2, as BENCHMARKS.md reports
# 0.93-0.96 on clustered vectors; with nprobe 1 (nprobe not applied) it falls to 0.78.
MIN_RECALL = {"hnsw": 0.98, "ivfpq": 0.93}


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_index_recall_save_and_reload(kind, tmp_path):
    rng = np.random.default_rng(2)
    # clustered data, as image descriptors are: approximate search finds the true neighbours
    centers = _unit(rng, 40, 32)
    db = centers[rng.integers(0, 40, 3000)] + 0.3 * _unit(rng, 3000, 32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries = db[rng.choice(3000, 10, replace=False)] + 0.05 * _unit(rng, 10, 32)
    params = FaissParams(kind, nlist=32, pq_m=16, nprobe=8, use_gpu=False)
    f = FaissFilter.load_or_build(db, params, tmp_path)
    saved = list(tmp_path.glob(f"faiss-{kind}-*.index"))
    assert len(saved) == 1
    exact = np.stack([_brute(q, db)[0][:100] for q in queries])
    approx, _ = f.search(queries, 100)
    assert recall_at_k(approx, exact, 100) >= MIN_RECALL[kind]
    again = FaissFilter.load_or_build(db, params, tmp_path)  # loaded, not rebuilt
    assert np.array_equal(again.search(queries, 100)[0], approx)
    order, scores = f.rank(queries[0], top_k=100)
    assert sorted(order.tolist()) == list(range(3000))
    assert np.all(np.isneginf(scores[100:]))


def test_searcher_faiss_backend_matches_numpy_backend(tmp_path):
    from retrieval_ext.retrieval.search import IndexSearcher

    rng = np.random.default_rng(3)
    index = write_index(tmp_path, {f"im{i}": random_record(rng, 3) for i in range(12)})
    query = {"ipa_sum": rng.random(8), "ipa_max": rng.random(8), "crop_max": rng.random(8)}
    a = IndexSearcher(index, top_n=5).search(query, ["filtering", "ca_sr"])
    b = IndexSearcher(index, top_n=5, filter_backend="faiss").search(query, ["filtering", "ca_sr"])
    for s in a:
        assert a[s].order.tolist() == b[s].order.tolist()
        assert np.allclose(a[s].scores, b[s].scores, atol=1e-5)
