"""Datasets and configs: unknown names, missing files, config typos, mismatching indexes, leaks."""

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from retrieval_ext.config import add_retrieval_config
from retrieval_ext.data.datasets import get_datasets_root, get_retrieval_metadata
from retrieval_ext.data.datasets.builtin import register_all_retrieval
from retrieval_ext.data.datasets.catalog import UnknownDatasetError, get_dataset_dicts
from retrieval_ext.retrieval.index_store import IndexMismatchError
from retrieval_ext.retrieval.indexing import build_index, open_index
from retrieval_ext.retrieval.learned import load_or_learn_whitening
from tests.common import tiny_model

from .conftest import ZF_TINY, make_extractor, pattern_image, register, write_collection


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


def test_config_key_typo_is_detectron2s_error(tmp_path):
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.merge_from_file(ZF_TINY)
    # yacs' own messages, naming the key (command-line opts: an AssertionError)
    with pytest.raises(AssertionError, match="Non-existent key: RETRIEVAL.TOPN"):
        cfg.merge_from_list(["RETRIEVAL.TOPN", "5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{ZF_TINY}"\nRETRIEVAL:\n  SHARDSIZE: 2\n')
    cfg = get_cfg()
    add_retrieval_config(cfg)
    with pytest.raises(KeyError, match="Non-existent config key: RETRIEVAL.SHARDSIZE"):
        cfg.merge_from_file(str(bad))


def test_index_of_another_model_or_config_is_refused(zf, tmp_path, registered):
    root = write_collection(
        tmp_path / "c",
        {f"images/{i}.png": pattern_image(40, 50, i) for i in range(3)},
        [("images/0.png", [5, 5, 30, 30], "obj")],
    )
    name = register(registered, "rel_mismatch", root)
    index_dir = str(tmp_path / "index")
    build_index(make_extractor(zf), name, index_dir, show_progress=False)

    other_weights = make_extractor(zf, model=tiny_model("ZF", seed=1))
    with pytest.raises(IndexMismatchError) as e:
        open_index(index_dir, other_weights, name)
    assert e.value.keys == ["weights_hash"] and "weights_hash" in str(e.value)
    with pytest.raises(IndexMismatchError, match="weights_hash"):  # no silent rebuild either
        build_index(other_weights, name, index_dir, show_progress=False)

    other_cfg = make_extractor(zf, ["INPUT.MIN_SIZE_TEST", "96"])
    with pytest.raises(IndexMismatchError) as e:
        open_index(index_dir, other_cfg, name)
    assert e.value.keys == ["model_config"]
    assert "MIN_SIZE_TEST: 128" in str(e.value) and "MIN_SIZE_TEST: 96" in str(e.value)
    # the refused index is untouched and still opens with its own model
    assert open_index(index_dir, make_extractor(zf), name).num_images == 3


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


@pytest.mark.parametrize("under", ["file/out", "file"])
def test_output_dir_under_a_regular_file_is_named_before_anything_runs(tmp_path, under):
    import argparse

    from retrieval_ext.engine.defaults import setup_cfg
    from retrieval_ext.utils.io import OutputWriteError

    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / under
    args = argparse.Namespace(config_file=str(ZF_TINY), opts=["OUTPUT_DIR", str(out)])
    with pytest.raises(OutputWriteError) as e:
        setup_cfg(args)
    assert str(out) in str(e.value) and "regular file" in str(e.value)
    assert (tmp_path / "file").read_text() == "a file, not a folder"
