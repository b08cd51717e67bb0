"""A loaded InstanceSearch over a tiny synthetic index, shared by the API tests of this folder."""

import pytest
from detectron2.data import DatasetCatalog

from retrieval_ext.data.datasets import register_config_datasets, unregister_retrieval_dataset
from retrieval_ext.retrieval.api import InstanceSearch
from retrieval_ext.retrieval.extractor import FeatureExtractor
from retrieval_ext.retrieval.indexing import build_index
from tests.common import tiny_cfg, write_benchmark


@pytest.fixture(scope="session")
def search_engine(zf, tmp_path_factory):
    """An InstanceSearch over an index of a tiny synthetic benchmark (6 images, 4 queries)."""
    tmp = tmp_path_factory.mktemp("engine")
    write_benchmark(tmp / "bench", num_instances=2, queries_per_instance=2, num_db=6, seed=3)
    name = "rel_engine"
    opts = list(zf["opts"]) + [
        "RETRIEVAL.DATASET",
        name,
        "RETRIEVAL.CUSTOM_DATASETS",
        [f"{name}={tmp / 'bench'}"],
        "RETRIEVAL.TOP_N",
        3,
        "RETRIEVAL.QE_M",
        2,
        "RETRIEVAL.INDEX_DTYPE",
        "float32",
        "OUTPUT_DIR",
        str(tmp / "out"),
    ]
    cfg = tiny_cfg("ZF", opts)
    register_config_datasets(cfg)
    extractor = FeatureExtractor(cfg)
    build_index(
        extractor,
        name,
        str(tmp / "out" / "index"),
        shard_size=2,
        dtype="float32",
        show_progress=False,
    )
    engine = InstanceSearch(cfg)
    yield {"engine": engine, "queries": DatasetCatalog.get(f"{name}_query"), "cfg": cfg}
    unregister_retrieval_dataset(name)
