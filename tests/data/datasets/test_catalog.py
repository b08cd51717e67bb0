"""The dataset catalog: an unknown name lists the registered ones, a missing root or ground-truth
file names the path and the expected layout."""

import pytest
from detectron2.data import DatasetCatalog

from retrieval_ext.data.datasets import get_datasets_root, get_retrieval_metadata
from retrieval_ext.data.datasets.builtin import register_all_retrieval
from retrieval_ext.data.datasets.catalog import UnknownDatasetError, get_dataset_dicts
from retrieval_ext.retrieval.indexing import build_index
from tests.common import make_extractor, register


def test_unknown_dataset_lists_the_registered_ones(zf, tmp_path):
    for call in (
        lambda: get_dataset_dicts("oxfrod5k_db"),
        lambda: build_index(make_extractor(zf), "oxfrod5k", str(tmp_path / "i")),
        lambda: get_retrieval_metadata("oxfrod5k"),
    ):
        with pytest.raises(UnknownDatasetError) as e:
            call()
        msg = str(e.value)
        assert isinstance(e.value, KeyError)
        assert msg.startswith("Retrieval dataset 'oxfrod5k' is not registered")
        for known in ("oxford5k", "paris6k", "roxford5k", "ins13", "synthetic"):
            assert known in msg
    assert not (tmp_path / "i").exists()  # nothing written for an unknown dataset


def test_missing_root_and_gt_files_name_the_path_and_layout(tmp_path, registered):
    try:
        register_all_retrieval(str(tmp_path))
        # no folder at all
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get("oxford5k_db")
        msg = str(e.value)
        assert str(tmp_path / "oxford5k") in msg and "datasets/README.md" in msg
        assert "Expected layout of dataset 'oxford5k'" in msg
        assert "gnd_oxford5k.pkl" in msg and "gt_files_170407" in msg
        # images but no ground truth
        (tmp_path / "paris6k" / "jpg").mkdir(parents=True)
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get("paris6k_query")
        msg = str(e.value)
        assert str(tmp_path / "paris6k") in msg
        assert "gnd_paris6k.pkl" in msg and "paris_120310" in msg
        with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl"):
            DatasetCatalog.get("roxford5k_1m_db")
        with pytest.raises(FileNotFoundError, match="ins.search.qrels.tv13"):
            DatasetCatalog.get("ins13_db")
    finally:
        register_all_retrieval(get_datasets_root())

    # a custom collection without its queries file
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    name = register(registered, "rel_noqueries", root)
    with pytest.raises(FileNotFoundError) as e:
        get_dataset_dicts(f"{name}_query")
    msg = str(e.value)
    assert str(root / "queries.json") in msg and "queries.json      [{" in msg
