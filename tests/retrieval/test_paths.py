"""index_paths: where a run's index, learned transforms and query cache are, written out by hand."""

import os

from detectron2.config import get_cfg

from retrieval_ext.config import add_retrieval_config
from retrieval_ext.retrieval.paths import IndexPaths, index_paths


def _cfg(output_dir, index_dir=""):
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.merge_from_list(["OUTPUT_DIR", output_dir, "RETRIEVAL.INDEX_DIR", index_dir])
    return cfg


def test_default_index_is_under_the_output_dir(tmp_path):
    out = str(tmp_path / "run")
    assert index_paths(_cfg(out)) == IndexPaths(
        index_dir=f"{out}/index", work_dir=out, cache_dir=out
    )


def test_an_index_dir_keeps_what_is_learned_beside_it(tmp_path):
    out, shared = str(tmp_path / "run"), str(tmp_path / "shared" / "oxford")
    assert index_paths(_cfg(out, shared)) == IndexPaths(
        index_dir=shared, work_dir=str(tmp_path / "shared"), cache_dir=out
    )


def test_a_relative_index_dir_gets_an_absolute_work_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = index_paths(_cfg("run", "idx/oxford"))
    assert paths.index_dir == "idx/oxford"
    assert paths.work_dir == os.path.join(str(tmp_path), "idx")
    assert paths.cache_dir == "run"


def test_an_evaluation_folder_holds_its_own_index(tmp_path):
    """The trainer evaluates new weights: RETRIEVAL.INDEX_DIR (built with others) is not used."""
    ev = str(tmp_path / "eval_0000299")
    paths = index_paths(_cfg(str(tmp_path / "run"), str(tmp_path / "shared")), output_dir=ev)
    assert paths == IndexPaths(index_dir=f"{ev}/index", work_dir=ev, cache_dir=ev)
