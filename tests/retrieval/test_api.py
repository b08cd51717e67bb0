"""The Python search API is safe to call from several threads on one loaded index."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from retrieval_ext.retrieval.api import InstanceSearch
from retrieval_ext.retrieval.search import STAGES

CA_STAGES = [s for s in STAGES if not s.startswith("cs_")]


def _key(hits):
    return [(h.rank, h.image_id, h.file_name, h.score, h.box) for h in hits]


def test_threads_give_the_sequential_results(search_engine):
    engine, queries = search_engine["engine"], search_engine["queries"]
    # image queries (model + search) and record searches (search only), every stage, twice over
    jobs = [("image", q["file_name"], q["query_box"], s) for q in queries for s in CA_STAGES]
    records = [engine.query_record(q["file_name"], q["query_box"]) for q in queries]
    jobs += [("record", i, None, s) for i in range(len(records)) for s in CA_STAGES]
    jobs = jobs * 2

    def run(eng, job):
        kind, what, box, stage = job
        if kind == "image":
            return _key(eng.query(what, box, stage=stage, top_k=4))
        return _key(eng.search_record(records[what], stage=stage, top_k=6))

    # a freshly loaded engine, so that its lazily built caches are built under contention
    fresh = InstanceSearch(search_engine["cfg"])
    with ThreadPoolExecutor(max_workers=6) as pool:
        threaded = list(pool.map(lambda j: run(fresh, j), jobs))
    sequential = [run(engine, j) for j in jobs]
    assert threaded == sequential
    # the results are real rankings: every stage returns distinct images, best first
    for hits in sequential:
        ids = [h[1] for h in hits]
        assert len(set(ids)) == len(ids) and len(ids) in (4, 6)
        assert all(np.isfinite(h[3]) for h in hits)
