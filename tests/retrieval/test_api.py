"""The Python search API (InstanceSearch): boxes are checked, and it is safe to call from several
threads on one loaded index. The ``search_engine`` fixture is in tests/retrieval/conftest.py."""

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from retrieval_ext.data.boxes import InvalidBoxError
from retrieval_ext.retrieval.api import InstanceSearch
from retrieval_ext.retrieval.stages import STAGES

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


def test_api_validates_boxes(search_engine):
    engine, queries = search_engine["engine"], search_engine["queries"]
    image = queries[0]["file_name"]
    w, h = Image.open(image).size
    bad = [
        ([w + 1, 5, w + 20, 20], "outside"),
        ([5, -30, 20, -1], "outside"),
        ([10, 10, 10, 20], "zero area"),
        ([20, 10, 10, 20], "reversed corners"),
        (["x", 1, 2, 3], "not 4 numbers"),
        ([1, 2, float("nan"), 4], "non-finite"),
    ]
    for box, words in bad:
        with pytest.raises(InvalidBoxError) as e:
            engine.query(image, box, stage="ca_sr", top_k=3)
        assert image in str(e.value) and words in str(e.value)
    # an array query (in INPUT.FORMAT order) is checked against the array's size
    arr = np.zeros((30, 40, 3), np.uint8)
    with pytest.raises(InvalidBoxError, match=r"query \(array\): box \[0, 0, 41, 0\]"):
        engine.query(arr, [0, 0, 41, 0])
    hits = engine.query(arr, [-5, -5, 10, 10], stage="ca_sr", top_k=2)
    assert len(hits) == 2 and all(math.isfinite(h.score) for h in hits)
    with pytest.raises(ValueError, match="top_k"):
        engine.query(image, queries[0]["query_box"], top_k=-1)
