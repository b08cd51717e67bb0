"""search_all (retrieval_ext.retrieval.pipeline) on degenerate numbers, end to end: black images,
dead activations, images without proposals, a one-image database, top-N and M larger than the
ranking.

Rankings are recomputed here by brute force (plain loops over the stored vectors).
"""

import os

import numpy as np
import pytest
import torch

from retrieval_ext.retrieval.indexing import build_index
from retrieval_ext.retrieval.learned import load_or_learn_whitening
from retrieval_ext.retrieval.pipeline import search_all
from retrieval_ext.retrieval.queries import extract_queries
from retrieval_ext.retrieval.search import IndexSearcher
from retrieval_ext.retrieval.stages import STAGES
from tests.common import make_extractor, pattern_image, register, write_collection

CA_STAGES = [s for s in STAGES if not s.startswith("cs_")]


class FaultyModel(torch.nn.Module):
    """The shared model, except that named images lose all proposals or all activations (the
    outputs a real network gives for e.g. a blank frame: no objectness, ReLU all zero)."""

    def __init__(self, inner, no_proposals=(), dead=()):
        super().__init__()
        self.inner, self.no_proposals, self.dead = inner, set(no_proposals), set(dead)

    def forward(self, inputs):
        return self._faults(inputs, self.inner(inputs))

    def inference(self, inputs, class_outputs=True):
        # indexing without class outputs calls this (the box head skipped)
        return self._faults(inputs, self.inner.inference(inputs, class_outputs=class_outputs))

    def _faults(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            base = os.path.basename(x.get("file_name", ""))
            if base in self.no_proposals:
                out["proposals"] = out["proposals"][:0]
            if base in self.dead:
                out["ipa_sum"] = torch.zeros_like(out["ipa_sum"])
                out["ipa_max"] = torch.zeros_like(out["ipa_max"])
        return outputs

    def query_inference(self, inputs):
        # queries (a.png, b_black.png) are none of the faulty images: the model's own outputs
        return self.inner.query_inference(inputs)


def _l2(x):
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _rank(scores):
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def _searcher(index, top_n, qe_m, zf):
    # plain average QE (the paper; QE_GATE_Z 0), which the brute force below writes out
    opts = ["RETRIEVAL.TOP_N", str(top_n), "RETRIEVAL.QE_M", str(qe_m)]
    opts += ["RETRIEVAL.QE_GATE_Z", "0.0"]
    cfg = make_extractor(zf, opts).cfg
    return IndexSearcher(cfg, index, None)


def test_black_dead_and_proposal_less_images(zf, tmp_path, registered):
    db = {
        "images/a.png": pattern_image(40, 60, 1),
        "images/b_black.png": np.zeros((40, 60, 3), np.uint8),
        "images/c_dead.png": pattern_image(40, 60, 2),
        "images/d_noprop.png": pattern_image(40, 60, 3),
        "images/e.png": pattern_image(40, 60, 4),
    }
    root = write_collection(
        tmp_path / "c",
        db,
        [("images/a.png", [5, 5, 40, 30], "x"), ("images/b_black.png", [0, 0, 30, 30], "y")],
    )
    name = register(registered, "rel_numeric", root)
    model = FaultyModel(zf["model"], no_proposals=["d_noprop.png"], dead=["c_dead.png"])
    extractor = make_extractor(zf, model=model)
    index = build_index(extractor, name, str(tmp_path / "i"), dtype="float32", show_progress=False)
    queries = extract_queries(extractor, name)
    n = index.num_images
    dead, noprop = index.index_of("images/c_dead"), index.index_of("images/d_noprop")
    assert n == 5 and index.num_proposals(noprop) == 0
    assert not index.image_vectors("ipa_sum")[dead].any()

    # TOP_N 100 > 5 images, QE_M 10 > 5 images
    results = search_all(_searcher(index, 100, 10, zf), queries, CA_STAGES)
    db_vec = _l2(index.image_vectors("ipa_sum"))
    for qi, q in enumerate(queries):
        for stage in CA_STAGES:
            r = results[stage][qi]
            assert sorted(r.order.tolist()) == list(range(n)), stage  # each image exactly once
            assert not np.isnan(r.scores).any(), stage
        qv = _l2(q["ipa_sum"])
        f_scores = [float(db_vec[j] @ qv) for j in range(n)]
        assert f_scores[dead] == 0.0  # a zero vector: similarity 0, not NaN
        f_order = _rank(f_scores)
        assert results["filtering"][qi].order.tolist() == f_order
        # QE with M larger than the ranking averages the whole ranking
        qe = _l2(qv + db_vec.sum(axis=0))
        assert results["filtering_qe"][qi].order.tolist() == _rank(
            [float(db_vec[j] @ qe) for j in range(n)]
        )
        # CA-SR of all 5: best proposal cosine; no proposal: -inf, last, no box
        region = _l2(q["crop_max"])
        best = []
        for j in f_order:
            rpa = index.regions(j)["rpa_max"]
            best.append(max(float(_l2(v) @ region) for v in rpa) if len(rpa) else -np.inf)
        ca = results["ca_sr"][qi]
        assert ca.order.tolist() == [f_order[k] for k in _rank(best)]
        assert ca.order[-1] == noprop and ca.scores[-1] == -np.inf and ca.top_n == n
        assert np.isnan(ca.boxes[-1]).all() and np.isfinite(ca.boxes[:-1]).all()
        qe_ca = results["ca_sr_qe"][qi]
        assert qe_ca.order[-1] == noprop and np.isfinite(qe_ca.scores[:-1]).all()


def test_database_of_one_image(zf, tmp_path, registered):
    root = write_collection(
        tmp_path / "one",
        {"images/only.png": pattern_image(50, 50, 9)},
        [("images/only.png", [10, 10, 40, 40], "x")],
    )
    name = register(registered, "rel_one", root)
    # the query in one pass at the test size (no RETRIEVAL.QUERY_SCALES), as the database image
    extractor = make_extractor(zf, ["RETRIEVAL.QUERY_SCALES", "[]"])
    index = build_index(extractor, name, str(tmp_path / "i"), show_progress=False)
    queries = extract_queries(extractor, name)
    results = search_all(_searcher(index, 100, 5, zf), queries, CA_STAGES)
    for stage in CA_STAGES:
        (r,) = results[stage]
        assert r.order.tolist() == [0] and np.isfinite(r.scores).all(), stage
    assert np.isfinite(results["ca_sr"][0].boxes).all()
    # the same image as query and database: cosine 1 at filtering
    assert results["filtering"][0].scores[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"cannot learn the whitening on 'rel_one' \(1 readable"):
        load_or_learn_whitening(extractor, name, "other", str(tmp_path / "w"), show_progress=False)
