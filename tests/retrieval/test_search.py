"""IndexSearcher: its stage graph and its construction from a config."""

import numpy as np
import pytest

from retrieval_ext.retrieval.faiss_search import FaissParams
from retrieval_ext.retrieval.index_store import IndexReader, IndexWriter, default_schema
from retrieval_ext.retrieval.search import STAGES, IndexSearcher, stage_chain
from tests.common import tiny_cfg


def test_stage_chains_written_out():
    assert {s: stage_chain(s) for s in STAGES} == {
        "filtering": ("filtering",),
        "filtering_qe": ("filtering", "filtering_qe"),
        "ca_sr": ("filtering", "ca_sr"),
        "ca_sr_qe": ("filtering", "ca_sr", "ca_sr_qe"),
        "cs_sr": ("filtering", "cs_sr"),
        "cs_sr_qe": ("filtering", "cs_sr", "cs_sr_qe"),
    }
    with pytest.raises(ValueError, match="unknown stage 'rerank'"):
        stage_chain("rerank")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_index")
    rng = np.random.default_rng(5)
    ids = [f"im{i}" for i in range(6)]
    with IndexWriter(root, {"t": 1}, 4, "float32", 0, default_schema()) as w:
        for image_id in ids:
            k = 2
            w.add(
                image_id,
                {
                    "ipa_sum": rng.random(8),
                    "ipa_max": rng.random(8),
                    "height": 10,
                    "width": 10,
                    "boxes": np.tile([0, 0, 5, 5], (k, 1)),
                    "objectness": rng.random(k),
                    "rpa_sum": rng.random((k, 8)),
                    "rpa_max": rng.random((k, 8)),
                    "scores": rng.random((k, 3)),
                },
            )
    IndexWriter(root, {"t": 1}, 4, "float32", 0, default_schema()).finalize(ids)
    return IndexReader(root)


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
    # the same searcher from plain arguments ranks the same way
    plain = IndexSearcher(
        index,
        filter_pooling="max",
        query_region="rpa",
        top_n=4,
        qe_m=2,
        qe_rerank_mode="global",
        filter_top_k=5,
    )
    rng = np.random.default_rng(0)
    query = {"ipa_max": rng.random(8), "rpa_max": rng.random(8)}
    a, b = s.search(query, ["ca_sr_qe"]), plain.search(query, ["ca_sr_qe"])
    assert a["ca_sr_qe"].order.tolist() == b["ca_sr_qe"].order.tolist()
    assert list(a) == ["ca_sr_qe"]  # only what was asked, though filtering and ca_sr ran
