"""The query-set CS-SR classifier: class weights from the queries, softmax class probabilities,
and the searcher's CS-SR with RETRIEVAL.CS_SR_CLASSIFIER "queries"."""

import math

import numpy as np
import pytest

from retrieval_ext.retrieval.index_store import IndexReader, IndexWriter, default_schema
from retrieval_ext.retrieval.query_classes import class_prototypes, query_class_probabilities
from retrieval_ext.retrieval.search import IndexSearcher
from tests.common import tiny_cfg


def test_class_weights_are_the_normalised_means_of_normalised_queries():
    vectors = [[3.0, 0.0], [0.0, 2.0], [0.0, 5.0]]  # class 0: the first two, class 1: the third
    w = class_prototypes(vectors, [0, 0, 1], 2)
    # class 0: mean of (1, 0) and (0, 1) = (0.5, 0.5), normalised
    np.testing.assert_allclose(w, [[math.sqrt(0.5), math.sqrt(0.5)], [0.0, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="class 1 has no query"):
        class_prototypes(vectors, [0, 0, 0], 2)
    with pytest.raises(ValueError, match="class id 2 is not one of the 2 classes"):
        class_prototypes(vectors, [0, 1, 2], 2)


def test_probabilities_are_a_softmax_with_the_background_last():
    p = query_class_probabilities([[0.9, 0.5], [0.1, 0.2]], temperature=10.0, background=0.4)
    for row, cos in zip(p, [[0.9, 0.5], [0.1, 0.2]]):
        e = [math.exp(10 * c) for c in cos + [0.4]]
        np.testing.assert_allclose(row, [x / sum(e) for x in e], rtol=1e-5)
    assert p.shape == (2, 3) and p.dtype == np.float32
    # no overflow at a large temperature
    assert np.isfinite(query_class_probabilities([[1.0, -1.0]], 1e4, 0.0)).all()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        query_class_probabilities([[0.5]], 0.0, 0.0)


def _unit(*v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# Query objects: class 0 along e0, class 1 along e1. Image "lookalike" has a region that is class
# 1's object (cos 0.66) and closer still to class 0 (cos 0.78); image "object0" has a region
# less close to class 0 (cos 0.7) and unlike class 1; image "clutter" matches nothing.
REGIONS = {
    "lookalike": [_unit(0.75, 0.66, 0, 0), _unit(0, 0, 1, 0)],
    "object0": [_unit(0.7, 0, 0.714, 0), _unit(0, 0, 0, 1)],
    "clutter": [_unit(0, 0, 0.6, 0.8), _unit(0, 0, 1, 1)],
}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("query_classes_index")
    ids = list(REGIONS)
    with IndexWriter(root, {"t": 1}, 2, "float32", 0, default_schema()) as w:
        for i, image_id in enumerate(ids):
            r = np.stack(REGIONS[image_id])
            w.add(
                image_id,
                {
                    "ipa_sum": np.full(4, 1.0 + i),
                    "ipa_max": np.full(4, 1.0 + i),
                    "height": 10,
                    "width": 10,
                    "boxes": np.array([[0, 0, 5, 5], [5, 5, 10, 10]]) + i,
                    "objectness": np.ones(2),
                    "rpa_sum": r,
                    "rpa_max": r,
                    "scores": np.full((2, 3), 1 / 3),
                },
            )
    IndexWriter(root, {"t": 1}, 2, "float32", 0, default_schema()).finalize(ids)
    return IndexReader(root)


def _query(v, class_id):
    return {"ipa_sum": np.ones(4), "crop_max": np.asarray(v), "category_id": class_id}


def _written_out_cs_sr(query_class, weights, temperature, background):
    """Each image's best probability of ``query_class`` over its regions, by the formula."""
    best = {}
    for image_id, regions in REGIONS.items():
        probs = []
        for r in regions:
            logits = [temperature * float(np.dot(r, w)) for w in weights]
            logits.append(temperature * background)
            probs.append(math.exp(logits[query_class]) / sum(math.exp(x) for x in logits))
        best[image_id] = max(probs)
    return best


def test_cs_sr_with_the_query_classifier_equals_its_written_out_form(index):
    cfg = tiny_cfg("ZF", ["RETRIEVAL.CS_SR_CLASSIFIER", "queries", "RETRIEVAL.TOP_N", "3"])
    cfg.defrost()
    cfg.RETRIEVAL.FILTER_BACKEND = "numpy"
    s = IndexSearcher(cfg, index)
    assert (s.cs_sr_classifier, s.cs_sr_temperature, s.cs_sr_background) == ("queries", 30, 0.5)
    assert s.num_classes is None and "cs_sr" in s.supported_stages
    queries = [_query([2, 0, 0, 0], 0), _query([1, 0.1, 0, 0], 0), _query([0, 3, 0, 0], 1)]
    s.set_query_classes(queries, 2)
    assert s.num_classes == 2
    weights = [_unit(*(_unit(1, 0, 0, 0) + _unit(1, 0.1, 0, 0))), _unit(0, 1, 0, 0)]
    expected = _written_out_cs_sr(0, weights, 30.0, 0.5)
    out = s.search(queries[0], ["ca_sr", "cs_sr"], class_id=0)
    # CA-SR puts the look-alike first (cosine 0.78 > 0.70); the class probabilities put the object
    # first, because the look-alike's region also matches class 1
    assert index.image_ids[out["ca_sr"].order[0]] == "lookalike"
    cs = out["cs_sr"]
    names = [index.image_ids[i] for i in cs.order]
    assert names == sorted(expected, key=lambda k: -expected[k])
    assert names[0] == "object0"
    np.testing.assert_allclose(cs.scores, [expected[n] for n in names], rtol=1e-4)
    # the located box is the best region's
    np.testing.assert_array_equal(cs.boxes[0], [1, 1, 6, 6])


def test_the_query_classifier_needs_its_classes_before_cs_sr(index):
    s = IndexSearcher(index, cs_sr_classifier="queries")
    with pytest.raises(ValueError, match="CS-SR needs the query's class id"):
        s.search(_query([1, 0, 0, 0], 0), ["cs_sr"], class_id=0)
    with pytest.raises(ValueError, match="cs_sr_classifier must be one of"):
        IndexSearcher(index, cs_sr_classifier="prototypes")
    with pytest.raises(ValueError, match="cs_sr_temperature must be"):
        IndexSearcher(index, cs_sr_classifier="queries", cs_sr_temperature=0)
