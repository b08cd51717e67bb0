"""Learned transforms (retrieval_ext.retrieval.learned): learning the whitening on the test dataset
itself is allowed but warned about; the whitening of sum-pooled region vectors (issue 12.4) is
checked against numpy computations written out here."""

import numpy as np
import pytest

from retrieval_ext.data.datasets.catalog import get_dataset_dicts
from retrieval_ext.retrieval.index_store import IndexReader
from retrieval_ext.retrieval.learned import load_or_learn_whitening
from tests.common import make_extractor, pattern_image, register, write_benchmark, write_collection


def test_whitening_on_the_test_dataset_warns_about_the_leak(zf, tmp_path, registered, logs):
    root = write_collection(
        tmp_path / "c",
        {f"images/{i}.png": pattern_image(40, 50, i) for i in range(4)},
        [("images/0.png", [5, 5, 30, 30], "obj")],
    )
    name = register(registered, "rel_leak", root)
    extractor = make_extractor(zf)
    w = load_or_learn_whitening(extractor, name, name, str(tmp_path / "w"), show_progress=False)
    assert w is not None
    assert any("leaks ground truth" in m and repr(name) in m for m in logs.warnings())
    n = len(logs.warnings())
    other = register(registered, "rel_leak_other", root)
    load_or_learn_whitening(extractor, other, name, str(tmp_path / "w2"), show_progress=False)
    assert len(logs.warnings()) == n  # another dataset: no warning


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from retrieval_ext.data import register_custom_dataset
    from retrieval_ext.data.datasets import unregister_retrieval_dataset

    tmp = tmp_path_factory.mktemp("region_whitening")
    for name, seed in (("rw_syn", 0), ("rw_white", 1000)):
        write_benchmark(tmp / name, num_db=6, queries_per_instance=1, seed=seed)
        register_custom_dataset(name, str(tmp / name))
    yield tmp
    for name in ("rw_syn", "rw_white"):
        unregister_retrieval_dataset(name)


def _cfg(tmp, out, *opts):
    from tests.common import tiny_cfg

    base = ["MODEL.PROPOSAL_GENERATOR.NAME", "DenseRegionProposals"]
    base += ["RETRIEVAL.DATASET", "rw_syn", "RETRIEVAL.WHITENING_DATASET", "rw_white"]
    base += ["RETRIEVAL.RERANK_POOLING", "sum", "OUTPUT_DIR", str(tmp / out)]
    return tiny_cfg("ZF", base + list(opts))


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_sum_pooled_region_vectors_are_whitened_on_the_whitening_dataset(datasets):
    from retrieval_ext.retrieval.compression import load_region_compression
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index
    from retrieval_ext.retrieval.search import IndexSearcher

    cfg = _cfg(datasets, "white", "RETRIEVAL.REGION_DTYPE", "float32")
    ex = FeatureExtractor(cfg)
    index, _ = prepare_index(cfg, ex, "rw_syn", index_paths(cfg))
    comp = load_region_compression(index.root)
    white = IndexReader(datasets / "white" / "index-rw_white")
    X = _unit(np.concatenate([white.regions(i)["rpa_sum"] for i in range(white.num_images)]))
    # learned on the whitening dataset's L2-normalised rpa_sum vectors: their mean, and the
    # leading whitened directions have unit variance and no correlation on them
    np.testing.assert_allclose(comp.mean, X.mean(axis=0), atol=1e-6)
    Y = (X - X.mean(axis=0)) @ comp.components.T.astype(np.float64)
    np.testing.assert_allclose(np.cov(Y[:, :4].T, bias=True), np.eye(4), atol=1e-3)
    # stored: L2 -> whiten -> L2 of the image's own sum-pooled region vectors
    (rec,) = ex.database_records(get_dataset_dicts("rw_syn_db")[:1])[0]
    raw = rec[1]["rpa_sum"][: len(index.regions(0)["rpa_sum"])]
    expected = _unit((_unit(raw) - comp.mean) @ comp.components.T.astype(np.float64))
    np.testing.assert_allclose(index.regions(0)["rpa_sum"], expected, atol=1e-4)
    # the query region vector goes the same way
    v = np.random.default_rng(0).standard_normal(raw.shape[1]).astype(np.float32)
    searcher = IndexSearcher(index, rerank_pooling="sum", filter_backend="numpy")
    got = searcher.query_region_vector({"crop_sum": v})
    np.testing.assert_allclose(
        got, _unit((_unit(v) - comp.mean) @ comp.components.T.astype(np.float64)), atol=1e-5
    )


def test_whitening_off_keeps_sum_pooled_region_vectors_l2_only(datasets):
    from retrieval_ext.retrieval.compression import load_region_compression
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    opts = ("RETRIEVAL.REGION_DTYPE", "float32", "RETRIEVAL.WHITEN_SUM_REGIONS", "False")
    cfg = _cfg(datasets, "plain", *opts)
    ex = FeatureExtractor(cfg)
    index, _ = prepare_index(cfg, ex, "rw_syn", index_paths(cfg))
    assert load_region_compression(index.root).pca_dim == 0
    (rec,) = ex.database_records(get_dataset_dicts("rw_syn_db")[:1])[0]
    raw = rec[1]["rpa_sum"][: len(index.regions(0)["rpa_sum"])]
    np.testing.assert_allclose(index.regions(0)["rpa_sum"], _unit(raw), atol=1e-5)
