"""IndexSearcher: its construction from a config and its stages on a small stored index."""

import numpy as np
import pytest

from retrieval_ext.retrieval.faiss_search import FaissParams
from retrieval_ext.retrieval.search import IndexSearcher
from tests.common import random_record, tiny_cfg, write_index


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    rng = np.random.default_rng(5)
    records = {f"im{i}": random_record(rng, 2) for i in range(6)}
    return write_index(tmp_path_factory.mktemp("search_index"), records)


def test_from_config_takes_the_retrieval_settings(index):
    opts = ["RETRIEVAL.TOP_N", "4", "RETRIEVAL.QE_M", "2", "RETRIEVAL.FILTER_POOLING", "max"]
    opts += ["RETRIEVAL.QUERY_REGION", "rpa", "RETRIEVAL.QE_RERANK_MODE", "global"]
    opts += ["RETRIEVAL.FILTER_BACKEND", "numpy", "RETRIEVAL.FILTER_TOP_K", "5"]
    opts += ["RETRIEVAL.FAISS_INDEX", "hnsw", "RETRIEVAL.FAISS_HNSW_M", "8"]
    cfg = tiny_cfg("ZF", opts)
    args = IndexSearcher.from_config(cfg, index)
    assert args["faiss_params"] == FaissParams(kind="hnsw", nlist=0, pq_m=0, hnsw_m=8)
    s = IndexSearcher(cfg, index)
    assert (s.top_n, s.qe_m, s.filter_pooling, s.query_region) == (4, 2, "max", "rpa")
    assert (s.qe_rerank_mode, s.filter_top_k, s.whitening) == ("global", 5, None)
    # RETRIEVAL.BOX_VOTE_DELTA / BOX_VOTE_QUANTILE / QE_GATE_Z(_WHITENED) defaults reach it
    assert (s.box_vote_delta, s.box_vote_quantile) == (0.15, 0.25)
    assert (s.qe_gate_z, s.qe_gate_z_whitened) == (4.0, 7.0)
    # the same searcher from plain arguments ranks the same way
    plain = IndexSearcher(
        index,
        filter_pooling="max",
        query_region="rpa",
        top_n=4,
        qe_m=2,
        qe_rerank_mode="global",
        filter_top_k=5,
        box_vote_delta=0.15,
        box_vote_quantile=0.25,
        qe_gate_z=4.0,
        qe_gate_z_whitened=7.0,
    )
    rng = np.random.default_rng(0)
    query = {"ipa_max": rng.random(8), "rpa_max": rng.random(8)}
    a, b = s.search(query, ["ca_sr_qe"]), plain.search(query, ["ca_sr_qe"])
    assert a["ca_sr_qe"].order.tolist() == b["ca_sr_qe"].order.tolist()
    np.testing.assert_array_equal(a["ca_sr_qe"].boxes, b["ca_sr_qe"].boxes)
    assert list(a) == ["ca_sr_qe"]  # only what was asked, though filtering and ca_sr ran


# ----------------------------------------------------------------------------- gated QE
# Gated query expansion (RETRIEVAL.QE_GATE_Z), written out here: a result among the top M is
# averaged in when (s - median(block)) / (1.4826 * MAD(block)) >= z, the block being the scores
# of the ranked top N; when nothing passes the stage is the ranking it would have expanded.
DIM, N_IMAGES, TOP_N, QE_M, Z = 8, 10, 6, 2, 4.0
# top-6 block .95 .50 .49 .47 .46 .44: median .48, MAD .02 -> z(.95) = 15.8 passes, z(.50) =
# 0.67 does not: only the first result is averaged in (plain QE would also add the second)
STANDS_OUT = [0.95, 0.50, 0.49, 0.47, 0.46, 0.44, 0.30, 0.20, 0.10, 0.0]
# block .9 .8 .7 .6 .5 .4: median .65, MAD .15 -> z(.9) = 1.12: nothing passes
EVEN = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]


def _l2(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _with_cosine(rng, c):
    """A unit vector whose cosine with e0 is c (the rest random, orthogonal to e0)."""
    u = np.concatenate([[0.0], rng.standard_normal(DIM - 1)])
    return c * np.eye(DIM)[0] + np.sqrt(1 - c * c) * _l2(u)


@pytest.fixture(scope="module", params=["stands_out", "even"])
def gated(request, tmp_path_factory):
    """An index whose images score ``cos`` with the query e0 in filtering (IPA-max), in CA-SR
    (their best proposal) and in CS-SR (class 0 probability of their best proposal)."""
    cos = STANDS_OUT if request.param == "stands_out" else EVEN
    root = tmp_path_factory.mktemp(f"gated_{request.param}")
    rng = np.random.default_rng(11)
    records = {}
    for i in range(N_IMAGES):
        rpa = np.stack([_with_cosine(rng, cos[i] - 0.2), _with_cosine(rng, cos[i])])
        # the most probable proposal (class 0) is not the one most similar to the query
        probs = np.array([[cos[i], 0.0, 1 - cos[i]], [cos[i] / 4, 0.1, 1 - cos[i] / 4 - 0.1]])
        records[f"im{i}"] = {
            "ipa_sum": rng.random(DIM),
            "ipa_max": _with_cosine(rng, cos[i]),
            "height": 10,
            "width": 10,
            "boxes": np.array([[0, 0, 5, 5], [1, 1, 6, 6]], dtype=np.float64),
            "objectness": rng.random(2),
            "rpa_sum": rng.random((2, DIM)),
            "rpa_max": rpa,
            "scores": probs,
        }
    index = write_index(root, records)
    return {"index": index, "data": list(records.values()), "case": request.param}


def _rank(scores, candidates):
    """Stable descending ranking of ``candidates`` by ``scores`` (ties keep their order)."""
    return sorted(candidates, key=lambda j: (-scores[j], candidates.index(j)))


def _gate(top, block):
    block = np.asarray(block, dtype=np.float64)
    med = np.median(block)
    mad = np.median(np.abs(block - med))
    return [(s - med) / (1.4826 * mad) >= Z for s in top]


def test_gated_qe_stages_equal_their_written_out_form(gated):
    data, searcher_index = gated["data"], gated["index"]
    searcher = IndexSearcher(
        searcher_index,
        filter_pooling="max",
        top_n=TOP_N,
        qe_m=QE_M,
        qe_gate_z=Z,
        query_region="crop",
    )
    global_searcher = IndexSearcher(
        searcher_index,
        filter_pooling="max",
        top_n=TOP_N,
        qe_m=QE_M,
        qe_gate_z=Z,
        qe_rerank_mode="global",
    )
    e0 = np.eye(DIM)[0]
    query = {"ipa_max": e0, "crop_max": e0}
    db = _l2(np.stack([d["ipa_max"] for d in data]))
    images = list(range(N_IMAGES))

    def filtering(qv):
        return _rank(db @ qv, images)

    def ca(region, ranked):
        best = {j: max(_l2(data[j]["rpa_max"]) @ region) for j in ranked[:TOP_N]}
        return _rank(best, ranked[:TOP_N]) + ranked[TOP_N:], best

    def cs(ranked):
        best = {j: data[j]["scores"][:, 0].max() for j in ranked[:TOP_N]}
        return _rank(best, ranked[:TOP_N]) + ranked[TOP_N:], best

    f = filtering(e0)
    fs = db @ e0
    kept = [j for j, ok in zip(f[:QE_M], _gate(fs[f[:QE_M]], fs[f[:TOP_N]])) if ok]
    assert len(kept) == (1 if gated["case"] == "stands_out" else 0)
    expected = {"filtering_qe": filtering(_l2(e0 + db[kept].sum(axis=0))) if kept else f}

    ca_order, ca_best = ca(e0, f)
    block = [ca_best[j] for j in ca_order[:TOP_N]]
    kept = [j for j, ok in zip(ca_order[:QE_M], _gate(block[:QE_M], block)) if ok]
    assert len(kept) == (1 if gated["case"] == "stands_out" else 0)
    if kept:
        rows = [_l2(data[j]["rpa_max"])[np.argmax(_l2(data[j]["rpa_max"]) @ e0)] for j in kept]
        expected["ca_sr_qe"] = ca(_l2(e0 + np.sum(rows, axis=0)), f)[0]
        global_qv = _l2(e0 + db[kept].sum(axis=0))
        expected["ca_sr_qe_global"] = ca(e0, filtering(global_qv))[0]
    else:
        expected["ca_sr_qe"] = expected["ca_sr_qe_global"] = ca_order

    cs_order, cs_best = cs(f)
    block = [cs_best[j] for j in cs_order[:TOP_N]]
    kept = [j for j, ok in zip(cs_order[:QE_M], _gate(block[:QE_M], block)) if ok]
    assert len(kept) == (1 if gated["case"] == "stands_out" else 0)
    expected["cs_sr_qe"] = cs(filtering(_l2(e0 + db[kept].sum(axis=0))))[0] if kept else cs_order

    got = searcher.search(query, ["filtering_qe", "ca_sr_qe", "cs_sr_qe", "ca_sr"], class_id=0)
    got["ca_sr_qe_global"] = global_searcher.search(query, ["ca_sr_qe"])["ca_sr_qe"]
    for stage, order in expected.items():
        assert got[stage].order.tolist() == order, stage
    if gated["case"] == "even":
        # nothing passes: exactly the unexpanded ranking, scores and boxes included
        base = searcher.search(query, ["filtering", "ca_sr", "cs_sr"], class_id=0)
        for stage, before in [("filtering_qe", "filtering"), ("ca_sr_qe", "ca_sr")]:
            np.testing.assert_array_equal(got[stage].scores, base[before].scores)
        np.testing.assert_array_equal(got["cs_sr_qe"].scores, base["cs_sr"].scores)
        np.testing.assert_array_equal(got["ca_sr_qe"].boxes, base["ca_sr"].boxes)
    else:
        # one result passes: the expanded query moved every score (plain QE, which would also
        # average in the second result, gives other scores)
        plain = IndexSearcher(searcher_index, filter_pooling="max", top_n=TOP_N, qe_m=QE_M)
        p = plain.search(query, ["filtering_qe", "ca_sr_qe", "cs_sr_qe"], class_id=0)
        for stage in ("filtering_qe", "ca_sr_qe"):
            assert not np.allclose(p[stage].scores, got[stage].scores), stage


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_cs_sr_region_box_is_the_query_region_vote(gated, delta):
    """CS_SR_BOX "region": each CS-SR image is located by its proposals' similarity to the query
    region (voted within delta), not by its most probable proposal; the ranking is the same."""
    data = gated["data"]
    e0 = np.eye(DIM)[0]
    query = {"ipa_max": e0, "crop_max": e0}
    kwargs = dict(filter_pooling="max", top_n=TOP_N, qe_m=QE_M, box_vote_delta=delta)
    by_class = IndexSearcher(gated["index"], **kwargs).search(query, ["cs_sr"], class_id=0)
    by_region = IndexSearcher(gated["index"], cs_sr_box="region", **kwargs).search(
        query, ["cs_sr", "cs_sr_qe"], class_id=0
    )
    a, b = by_class["cs_sr"], by_region["cs_sr"]
    assert a.order.tolist() == b.order.tolist()
    np.testing.assert_array_equal(a.scores, b.scores)
    for j, i in enumerate(b.order[:TOP_N]):
        boxes = np.asarray(data[i]["boxes"], dtype=np.float64)
        sims = _l2(data[i]["rpa_max"]) @ e0  # proposal 1 is the most similar (cos vs cos - 0.2)
        voters = sims >= sims.max() - delta
        w = np.clip(sims[voters], 0, None)
        expected = (w[:, None] * boxes[voters]).sum(axis=0) / w.sum()
        np.testing.assert_allclose(b.boxes[j], expected, rtol=1e-5)
        np.testing.assert_allclose(a.boxes[j], boxes[0])  # "class": the most probable proposal
    assert np.isnan(b.boxes[TOP_N:]).all()
    qe = by_region["cs_sr_qe"]
    for j, i in enumerate(qe.order[:TOP_N]):  # CS-SR + QE locates the same way
        if delta == 0:
            np.testing.assert_allclose(qe.boxes[j], data[i]["boxes"][1])
