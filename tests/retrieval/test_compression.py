"""Region-feature compression: PCA, int8 codes, kept proposals, compressed index and its search."""

import numpy as np
import pytest

from retrieval_ext.retrieval.compression import (
    RegionCompression,
    compress_index,
    learn_region_pca,
    load_region_compression,
    quantize_int8,
)
from retrieval_ext.retrieval.index_store import IndexReader, IndexWriter, default_schema
from retrieval_ext.retrieval.search import IndexSearcher
from tests.common import write_index


def test_quantize_int8_hand_example():
    x = np.array([[0.5, -0.25, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]], np.float32)
    # row 1: scale 127 / 0.5 = 254 -> [127, -63.5 -> -64 (round half to even), 0, 25.4 -> 25]
    assert quantize_int8(x).tolist() == [[127, -64, 0, 25], [0, 0, 0, 0]]


def test_pca_matches_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1])
    mean, comps = learn_region_pca(x, 3)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cov = np.cov(xn.T)
    w, v = np.linalg.eigh(cov)
    top = v[:, np.argsort(w)[::-1][:3]].T
    assert np.allclose(mean, xn.mean(0), atol=1e-6)
    for c, t in zip(comps, top):  # same axes up to sign
        assert abs(abs(float(c @ t)) - 1) < 1e-4


def test_keep_highest_objectness_in_stored_order():
    c = RegionCompression(num_proposals=2)
    assert c.keep(np.array([0.1, 0.9, 0.3, 0.9])).tolist() == [1, 3]
    assert RegionCompression(num_proposals=9).keep(np.ones(3)).tolist() == [0, 1, 2]


def _index(root, n=10, k=6, c=16, seed=0):
    rng = np.random.default_rng(seed)
    recs = {}
    for i in range(n):
        kk = 0 if i == 4 else k  # an image without proposals
        recs[f"im{i}"] = {
            "ipa_sum": rng.random(c),
            "ipa_max": rng.random(c),
            "height": 50,
            "width": 60,
            "boxes": rng.random((kk, 4)) * 50,
            "objectness": rng.random(kk),
            "rpa_sum": rng.random((kk, c)),
            "rpa_max": rng.random((kk, c)),
            "scores": rng.random((kk, 3)),
        }
    return write_index(root, recs), recs


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_compressed_index_search_equals_brute_force(tmp_path, dtype):
    src, recs = _index(tmp_path / "src")
    rng = np.random.default_rng(5)
    comp = RegionCompression.learn(rng.random((300, 16)), num_proposals=4, pca_dim=8, dtype=dtype)
    dst = compress_index(src, tmp_path / "dst", comp, shard_size=3)
    assert dst.image_ids == src.image_ids
    assert load_region_compression(dst.root).describe() == comp.describe()
    # bytes: 4 of 6 proposals, 8 dims, 2 (float16) or 1 (int8) bytes, two RPA fields
    item = 2 if dtype == "float16" else 1
    props = 4 * 9 / 10  # image 4 has none
    assert dst.nbytes_per_image()["rpa_max"] == pytest.approx(props * 8 * item)

    def encode(v):  # written out: L2, centre, project, L2
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        p = (v - comp.mean) @ comp.components.T
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    query = {"ipa_sum": rng.random(16), "ipa_max": rng.random(16), "crop_max": rng.random(16)}
    res = IndexSearcher(dst, top_n=10).search(query, ["filtering", "ca_sr"])["ca_sr"]
    qv = query["crop_max"] / np.linalg.norm(query["crop_max"])
    qp = (qv - comp.mean) @ comp.components.T
    qp /= np.linalg.norm(qp)
    tol = 2e-3 if dtype == "float16" else 2e-2
    for pos, i in enumerate(res.order):
        rec = recs[f"im{i}"]
        if len(rec["objectness"]) == 0:
            assert np.isneginf(res.scores[pos])
            continue
        keep = np.sort(np.argsort(-rec["objectness"], kind="stable")[:4])
        sims = encode(rec["rpa_max"][keep]) @ qp
        assert res.scores[pos] == pytest.approx(sims.max(), abs=tol)
        assert np.allclose(res.boxes[pos], rec["boxes"][keep][res.best_proposal[pos]])
        assert sims[res.best_proposal[pos]] >= sims.max() - 2 * tol


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_blocked_ca_sr_equals_per_image_brute_force(monkeypatch, dtype):
    from retrieval_ext.retrieval import reranking

    # a 7-row buffer: images straddle block flushes, one image is larger than a block
    monkeypatch.setattr(reranking, "_COSINE_BLOCK_ROWS", 7)
    rng = np.random.default_rng(4)
    sizes = [3, 0, 5, 16, 1, 6]
    parts = [(rng.standard_normal((k, 5)) * 40).astype(dtype) for k in sizes]
    q = rng.standard_normal(5)
    order = np.arange(len(sizes))
    res = reranking.class_agnostic_rerank(q, order, np.zeros(len(sizes)), parts, top_n=6)
    qn = q / np.linalg.norm(q)
    for pos, i in enumerate(res.order):
        v = parts[i].astype(np.float64)
        if len(v) == 0:
            assert np.isneginf(res.scores[pos])
            continue
        sims = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ qn
        assert res.scores[pos] == pytest.approx(sims.max(), abs=1e-5)
        assert res.best_proposal[pos] == int(np.argmax(sims))


def test_prepare_compressed_index_and_writer_round_trip(tmp_path):
    from retrieval_ext.retrieval.indexing import prepare_compressed_index

    base = default_schema()
    assert prepare_compressed_index(None, base, {"m": 1}, str(tmp_path)) == (base, {"m": 1})
    comp = RegionCompression(num_proposals=2, dtype="int8")
    schema, manifest = prepare_compressed_index(comp, base, {"m": 1}, str(tmp_path))
    assert manifest == {"m": 1, "region_compression": comp.describe()}
    assert schema["rpa_max"].dtype == "int8" and schema["boxes"] == base["boxes"]
    assert load_region_compression(tmp_path).describe() == comp.describe()
    rec = {
        "ipa_sum": np.ones(4),
        "ipa_max": np.ones(4),
        "height": 5,
        "width": 5,
        "boxes": np.arange(12.0).reshape(3, 4),
        "objectness": np.array([0.2, 0.9, 0.5]),
        "rpa_sum": np.eye(3, 4),
        "rpa_max": np.array([[2.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 4]]),
        "scores": np.ones((3, 2)),
    }
    with IndexWriter(tmp_path, manifest, 2, "float16", 0, schema) as w:
        w.add("a", comp.compress_record(rec, base))
    IndexWriter(tmp_path, manifest, 2, "float16", 0, schema).finalize(["a"])
    r = IndexReader(tmp_path).regions(0)
    # proposals 1 and 2 (objectness 0.9, 0.5) kept in stored order; unit rows scaled to 127
    assert r["boxes"].tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert r["rpa_max"].tolist() == [[0, 127, 127, 0], [0, 0, 0, 127]]


@pytest.mark.parametrize("dtype,opq", [("float32", False), ("int8", False), ("pq", True)])
def test_region_whitening_ranks_by_whitened_cosine_and_locates_by_plain(tmp_path, dtype, opq):
    from retrieval_ext.retrieval.normalization import learn_region_whitening

    src, recs = _index(tmp_path / "src", k=12, c=8)
    rng = np.random.default_rng(7)
    train = rng.random((600, 8)) ** 3  # a few dominant directions, as real region vectors
    white = learn_region_whitening(train, dim=6, eps=0.01)
    if dtype == "pq":
        comp = RegionCompression.learn(train, dtype="pq", pq_m=4, opq=opq)
    else:
        comp = RegionCompression(dtype=dtype)
    comp = RegionCompression(comp.num_proposals, 0, comp.dtype, pq=comp.pq, whitening=white)
    dst = compress_index(src, tmp_path / "dst", comp, shard_size=3)
    loaded = load_region_compression(dst.root)
    assert loaded.describe() == comp.describe()
    assert "rpa_max_wnorm" in dst.schema and dst.schema["rpa_max_wnorm"].dtype == "float16"

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def whiten(v):  # written out: L2, centre, project, L2
        return unit((unit(v) - white.mean) @ white.projection.T)

    def stored(i):  # what the index holds, as vectors of the original space
        rows = dst.regions(i)["rpa_max"]
        v = comp.pq.decode(rows) @ comp.pq.rotation.astype(np.float32) if opq else rows
        return unit(np.asarray(v, np.float64))

    query = {"ipa_sum": rng.random(8), "ipa_max": rng.random(8), "crop_max": rng.random(8)}
    res = IndexSearcher(dst, top_n=10, box_vote_delta=0.0).search(query, ["filtering", "ca_sr"])
    res = res["ca_sr"]
    qw = whiten(query["crop_max"])
    tol = 2e-3  # the stored norms are float16
    for pos, i in enumerate(res.order):
        rec = recs[f"im{i}"]
        if len(rec["objectness"]) == 0:
            assert np.isneginf(res.scores[pos])
            continue
        x = stored(i)
        # the stored rows' whitened cosine (the norms are those of the exact vectors)
        exact = np.linalg.norm((unit(rec["rpa_max"]) - white.mean) @ white.projection.T, axis=1)
        assert dst.regions(i)["rpa_max_wnorm"] == pytest.approx(exact, rel=1e-3)
        d = white.projection.T @ qw
        ranks = (x @ d - white.mean @ d) / exact
        if dtype == "float32":  # stored exactly: the whitened cosine itself
            np.testing.assert_allclose(ranks, whiten(rec["rpa_max"]) @ qw, atol=1e-4)
        assert res.scores[pos] == pytest.approx(ranks.max(), abs=tol)
        assert ranks[res.best_proposal[pos]] >= ranks.max() - 2 * tol
        # the located box is the plain cosine's best proposal, not the whitened one's
        plain = x @ unit(query["crop_max"])
        np.testing.assert_allclose(res.boxes[pos], rec["boxes"][int(np.argmax(plain))])


def test_region_whitening_refuses_a_region_pca():
    from retrieval_ext.retrieval.normalization import learn_region_whitening

    white = learn_region_whitening(np.random.default_rng(0).random((50, 4)))
    mean, comps = learn_region_pca(np.random.default_rng(1).random((50, 4)), 2)
    with pytest.raises(ValueError, match="cannot be combined"):
        RegionCompression(0, 2, "float16", mean=mean, components=comps, whitening=white)


def test_the_whitened_ca_sr_gates_its_qe_with_its_own_threshold(tmp_path, monkeypatch):
    from retrieval_ext.retrieval import search as search_mod
    from retrieval_ext.retrieval.normalization import learn_region_whitening

    src, _ = _index(tmp_path / "src", k=12, c=8)
    white = learn_region_whitening(np.random.default_rng(7).random((600, 8)) ** 3, 6, 0.01)
    comp = RegionCompression(dtype="float32", whitening=white)
    dst = compress_index(src, tmp_path / "dst", comp, shard_size=3)
    seen = []
    real = search_mod.outlier_gate
    monkeypatch.setattr(search_mod, "outlier_gate", lambda s, b, z: seen.append(z) or real(s, b, z))
    query = {"ipa_sum": np.ones(8), "crop_max": np.arange(8.0)}
    s = IndexSearcher(dst, top_n=10, qe_m=2, qe_gate_z=4.0, qe_gate_z_whitened=1e9)
    res = s.search(query, ["filtering_qe", "ca_sr", "ca_sr_qe"])
    assert seen == [4.0, 1e9]  # filtering QE with QE_GATE_Z, the whitened CA-SR with its own
    assert res["ca_sr_qe"].order.tolist() == res["ca_sr"].order.tolist()  # nothing passed
