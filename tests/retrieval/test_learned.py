"""Learned transforms (retrieval_ext.retrieval.learned): learning the whitening on the test dataset
itself is allowed but warned about; the region whitening (of sum-pooled vectors on the whitening
dataset, issue 12.4, or of any pooling on a sample of the collection) is checked against numpy
computations written out here."""

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


def _whitened_cosines_of(index, comp, v):
    """CA-SR's whitened cosines of every stored proposal of image 0 with query vector ``v``."""
    from retrieval_ext.retrieval.normalization import whitened_cosines

    reg = index.regions(0)
    rows = _unit(reg["rpa_sum"])
    direction, scale, offset = comp.rank_query(_unit(v))
    return whitened_cosines(rows @ direction, reg["rpa_sum_wnorm"], scale, offset)


def test_sum_pooled_region_vectors_are_whitened_on_the_whitening_dataset(datasets):
    from retrieval_ext.retrieval.compression import load_region_compression
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    opts = ("RETRIEVAL.REGION_DTYPE", "float32", "RETRIEVAL.REGION_WHITENING.DIM", "0")
    opts += ("RETRIEVAL.REGION_WHITENING.SOURCE", "whitening_dataset")
    opts += (
        "RETRIEVAL.REGION_WHITENING.EPS",
        "1e-6",
        "RETRIEVAL.REGION_WHITENING.MIN_VECTORS",
        "2",
    )
    cfg = _cfg(datasets, "white", *opts)
    ex = FeatureExtractor(cfg)
    index, _ = prepare_index(cfg, ex, "rw_syn", index_paths(cfg))
    w = load_region_compression(index.root).whitening
    white = IndexReader(datasets / "white" / "index-rw_white")
    X = _unit(np.concatenate([white.regions(i)["rpa_sum"] for i in range(white.num_images)]))
    # learned on the whitening dataset's L2-normalised rpa_sum vectors: their mean, and the
    # leading whitened directions have unit variance and no correlation on them
    np.testing.assert_allclose(w.mean, X.mean(axis=0), atol=1e-6)
    Y = (X - X.mean(axis=0)) @ w.projection.T.astype(np.float64)
    np.testing.assert_allclose(np.cov(Y[:, :4].T, bias=True), np.eye(4), atol=1e-3)
    # stored: the image's own L2-normalised vectors and the norms of their whitened vectors
    (rec,) = ex.database_records(get_dataset_dicts("rw_syn_db")[:1])[0]
    raw = rec[1]["rpa_sum"][: len(index.regions(0)["rpa_sum"])]
    np.testing.assert_allclose(index.regions(0)["rpa_sum"], _unit(raw), atol=1e-5)
    whitened = (_unit(raw) - w.mean) @ w.projection.T.astype(np.float64)
    np.testing.assert_allclose(
        index.regions(0)["rpa_sum_wnorm"], np.linalg.norm(whitened, axis=1), rtol=1e-3
    )
    # CA-SR's score of a proposal is the cosine of the whitened proposal and query vectors
    v = np.random.default_rng(0).standard_normal(raw.shape[1]).astype(np.float32)
    qw = _unit((_unit(v) - w.mean) @ w.projection.T.astype(np.float64))
    got = _whitened_cosines_of(index, load_region_compression(index.root), v)
    np.testing.assert_allclose(got, _unit(whitened) @ qw, atol=2e-3)


def test_region_whitening_learned_on_a_sample_of_the_collection(datasets):
    from retrieval_ext.retrieval.compression import load_region_compression
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    opts = ("RETRIEVAL.REGION_DTYPE", "int8", "RETRIEVAL.REGION_PQ.SAMPLE_IMAGES", "4")
    opts += ("RETRIEVAL.REGION_WHITENING.MIN_VECTORS", "8", "RETRIEVAL.REGION_WHITENING.DIM", "5")
    cfg = _cfg(datasets, "own", *opts)
    index, _ = prepare_index(cfg, FeatureExtractor(cfg), "rw_syn", index_paths(cfg))
    w = load_region_compression(index.root).whitening
    sample = IndexReader(datasets / "own" / "index-rw_syn-sample4")
    assert sample.num_images == 4 < index.num_images
    X = _unit(np.concatenate([sample.regions(i)["rpa_sum"] for i in range(4)]))
    assert w.out_dim == 5
    np.testing.assert_allclose(w.mean, X.mean(axis=0), atol=1e-6)


def test_too_few_region_vectors_learn_no_whitening(datasets, logs):
    from retrieval_ext.retrieval.compression import load_region_compression
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    opts = ("RETRIEVAL.REGION_DTYPE", "float32", "RETRIEVAL.REGION_WHITENING.MIN_VECTORS", "10000")
    cfg = _cfg(datasets, "few", *opts)
    index, _ = prepare_index(cfg, FeatureExtractor(cfg), "rw_syn", index_paths(cfg))
    assert load_region_compression(index.root).whitening is None
    assert "rpa_sum_wnorm" not in index.schema
    assert any("to learn the region whitening on" in m for m in logs.warnings())
    assert not (datasets / "few" / "index-rw_syn-sample256").exists()  # no sample pass


def test_whitening_off_keeps_sum_pooled_region_vectors_l2_only(datasets):
    from retrieval_ext.retrieval.compression import load_region_compression
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    opts = ("RETRIEVAL.REGION_DTYPE", "float32", "RETRIEVAL.REGION_WHITENING.SOURCE", "")
    cfg = _cfg(datasets, "plain", *opts)
    ex = FeatureExtractor(cfg)
    index, _ = prepare_index(cfg, ex, "rw_syn", index_paths(cfg))
    assert load_region_compression(index.root).whitening is None
    assert "rpa_sum_wnorm" not in index.schema
    (rec,) = ex.database_records(get_dataset_dicts("rw_syn_db")[:1])[0]
    raw = rec[1]["rpa_sum"][: len(index.regions(0)["rpa_sum"])]
    np.testing.assert_allclose(index.regions(0)["rpa_sum"], _unit(raw), atol=1e-5)


def test_whitening_dataset_source_needs_a_whitening_dataset(datasets):
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths
    from retrieval_ext.retrieval.pipeline import prepare_index

    opts = ("RETRIEVAL.WHITENING_DATASET", "", "RETRIEVAL.REGION_WHITENING.SOURCE")
    cfg = _cfg(datasets, "none", *opts, "whitening_dataset")
    with pytest.raises(ValueError, match="RETRIEVAL.WHITENING_DATASET"):
        prepare_index(cfg, FeatureExtractor(cfg), "rw_syn", index_paths(cfg))


def test_saved_configs_with_the_former_whitening_key_still_load(tmp_path):
    from tests.common import tiny_cfg

    path = tmp_path / "old.yaml"
    path.write_text("RETRIEVAL:\n  WHITEN_SUM_REGIONS: false\n")
    cfg = tiny_cfg("ZF", [])
    cfg.merge_from_file(str(path))  # ignored with a warning (yacs deprecated key)
    assert cfg.RETRIEVAL.REGION_WHITENING.SOURCE == "collection"
