"""Product-quantised region vectors: codes, decoding, and scores from the codes (ADC)."""

import numpy as np
import pytest

from retrieval_ext.data.datasets.catalog import get_dataset_dicts
from retrieval_ext.retrieval.compression import RegionCompression, compress_index
from retrieval_ext.retrieval.index_store import IndexReader, IndexWriter, default_schema
from retrieval_ext.retrieval.product_quantization import KSUB, RegionPQ, learn_region_pq
from retrieval_ext.retrieval.reranking import class_agnostic_rerank
from retrieval_ext.retrieval.search import IndexSearcher
from tests.common import ca_sr_per_image, tiny_cfg, write_benchmark


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_codes_are_the_nearest_centroids_written_out():
    """Hand-sized quantiser: 2 sub-spaces of 2 dims; each code is the nearest centroid of its
    sub-vector, checked by brute force over all 256 centroids."""
    rng = np.random.default_rng(0)
    pq = RegionPQ(rng.standard_normal((2, KSUB, 2)))
    x = rng.standard_normal((5, 4)).astype(np.float32)
    codes = pq.encode(x)
    c = pq.centroids.astype(np.float64)
    for i in range(5):
        for m in range(2):
            d = [np.sum((x[i, 2 * m : 2 * m + 2] - c[m, k]) ** 2) for k in range(KSUB)]
            assert codes[i, m] == int(np.argmin(d))
    rec = pq.decode(codes)
    assert np.array_equal(rec[:, :2], c[0, codes[:, 0]].astype(np.float32))
    assert np.array_equal(rec[:, 2:], c[1, codes[:, 1]].astype(np.float32))


@pytest.mark.parametrize("opq", [False, True])
def test_adc_cosines_equal_decode_then_cosine(opq):
    """Scores from the look-up tables equal the cosine of the query with each decoded vector,
    computed in float64 here, within 1e-5 (float32 sums of 16 table entries)."""
    rng = np.random.default_rng(1)
    x = _unit(rng, 2000, 32)
    pq = learn_region_pq(x, 16 if not opq else 8, opq=opq)
    assert pq.m == (16 if not opq else 8) and (pq.rotation is not None) == opq
    db = _unit(rng, 300, 32)
    parts = [pq.encode(db[:120]), pq.encode(db[120:121]), pq.encode(db[121:])]
    q = pq.rotate(_unit(rng, 1, 32)[0])
    got = pq.cosines(parts, q)
    rec = pq.decode(np.concatenate(parts)).astype(np.float64)
    want = rec @ q.astype(np.float64) / np.linalg.norm(rec, axis=1) / np.linalg.norm(q)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the reconstruction is close to the vector it encodes (a real quantiser)
    err = np.linalg.norm(rec - pq.rotate(db).astype(np.float64), axis=1)
    assert np.median(err) < 0.8


def test_pq_ca_sr_ranks_as_decoded_brute_force(tmp_path):
    """CA-SR on a PQ index (scored from codes) gives the ranking, best proposals and boxes of the
    per-image brute force over the decoded vectors."""
    rng = np.random.default_rng(2)
    ids = [f"im{i}" for i in range(12)]
    schema = default_schema()
    with IndexWriter(tmp_path / "f", {"d": 1}, 5, "float32", 0, schema) as w:
        for image_id in ids:
            k = int(rng.integers(0, 7))
            rec = {"ipa_sum": rng.random(16), "ipa_max": rng.random(16), "height": 9, "width": 9}
            xy = rng.uniform(0, 50, (k, 2))
            rec.update({"boxes": np.concatenate([xy, xy + 5], 1), "objectness": rng.random(k)})
            rec.update({"rpa_sum": _unit(rng, k, 16), "rpa_max": _unit(rng, k, 16)})
            rec.update({"scores": rng.random((k, 3))})
            w.add(image_id, rec)
    IndexWriter(tmp_path / "f", {"d": 1}, 5, "float32", 0, schema).finalize(ids)
    ref = IndexReader(tmp_path / "f")
    comp = RegionCompression.learn(_unit(rng, 600, 16), dtype="pq", pq_m=4, trained_on="test")
    pq_index = compress_index(ref, tmp_path / "pq", comp)
    assert pq_index.schema["rpa_max"].dtype == "uint8"
    searcher = IndexSearcher(pq_index, top_n=8)
    query = {"ipa_sum": rng.random(16), "crop_max": rng.standard_normal(16)}
    got = searcher.search(query, ["ca_sr"])["ca_sr"]
    loaded = searcher.region_compression
    decoded = [loaded.decode(pq_index.regions(i)["rpa_max"]) for i in range(len(ids))]
    boxes = [pq_index.regions(i)["boxes"] for i in range(len(ids))]
    filt = searcher.search(query, ["filtering"])["filtering"]
    q = loaded.project_query(query["crop_max"])
    order, scores, best, located = ca_sr_per_image(q, filt.order, decoded, boxes, 8)
    assert got.order[:8].tolist() == order.tolist()
    assert got.best_proposal[:8].tolist() == best.tolist()
    finite = np.isfinite(scores)
    np.testing.assert_allclose(got.scores[:8][finite], scores[finite], atol=1e-5)
    np.testing.assert_allclose(got.boxes[:8][finite], located[finite])
    # a query vector through the full chain equals class_agnostic_rerank on decoded floats
    plain = class_agnostic_rerank(q, filt.order, filt.scores, decoded, boxes, 8)
    assert plain.order.tolist() == got.order.tolist()


def test_pq_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(3)
    comp = RegionCompression.learn(
        _unit(rng, 800, 16), dtype="pq", pq_m=8, opq=True, trained_on="600 region vectors"
    )
    comp.save(tmp_path / "c.npz")
    back = RegionCompression.load(tmp_path / "c.npz")
    assert back.describe() == comp.describe() and back.describe()["pq"]["opq"]
    assert back.describe()["pq"]["trained_on"] == "600 region vectors"
    x = _unit(rng, 10, 16)
    assert np.array_equal(back.encode(x), comp.encode(x))


def test_indexing_learns_the_quantiser_on_a_sample_of_the_collection(tmp_path):
    """REGION_DTYPE pq: a sample of the collection is indexed once more (uncompressed, beside
    the index), the quantiser learned on it is saved in the index and named in its manifest,
    and the stored codes are those of the collection's own region vectors."""
    from retrieval_ext.data import register_custom_dataset
    from retrieval_ext.data.datasets import unregister_retrieval_dataset
    from retrieval_ext.retrieval.compression import load_region_compression
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    write_benchmark(tmp_path / "d", num_db=24, queries_per_instance=1, seed=0)
    register_custom_dataset("pq_syn", str(tmp_path / "d"))
    try:
        opts = ["MODEL.PROPOSAL_GENERATOR.NAME", "DenseRegionProposals"]
        opts += ["RETRIEVAL.DATASET", "pq_syn", "OUTPUT_DIR", str(tmp_path / "out")]
        opts += ["RETRIEVAL.REGION_DTYPE", "pq", "RETRIEVAL.REGION_PQ.M", "8"]
        opts += ["RETRIEVAL.REGION_PQ.SAMPLE_IMAGES", "20"]
        # 24 images x 16 proposals cannot give faiss' 9984 vectors: int8, and no sample pass
        few = tiny_cfg("ZF", opts + ["OUTPUT_DIR", str(tmp_path / "few")])
        index, _ = prepare_index(few, FeatureExtractor(few), "pq_syn", index_paths(few))
        assert index.manifest["region_compression"]["dtype"] == "int8"
        assert not (tmp_path / "few" / "index-pq_syn-sample20").exists()
        cfg = tiny_cfg("ZF", opts + ["RETRIEVAL.REGION_PQ.MIN_VECTORS", "256"])
        ex = FeatureExtractor(cfg)
        index, _ = prepare_index(cfg, ex, "pq_syn", index_paths(cfg))
        sample = tmp_path / "out" / "index-pq_syn-sample20"
        assert IndexReader(sample).num_images == 20 and index.num_images == 24
        comp = load_region_compression(index.root)
        described = index.manifest["region_compression"]["pq"]
        assert described == comp.pq.describe() and described["m"] == 8
        assert "20 sampled images of pq_syn" in described["trained_on"]
        # the codes are the quantiser's codes of this image's region vectors (extracted again)
        (rec,) = ex.database_records(get_dataset_dicts("pq_syn_db")[:1])[0]
        assert np.array_equal(index.regions(0)["rpa_max"], comp.encode(rec[1]["rpa_max"]))
    finally:
        unregister_retrieval_dataset("pq_syn")
