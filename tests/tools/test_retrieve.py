"""tools/retrieve.py's result files are replaced atomically (its end-to-end runs are tested in
tests/retrieval/test_retrieve_tool.py)."""

import errno
import os
from types import SimpleNamespace

import numpy as np
import pytest

from retrieval_ext.utils.io import OutputWriteError
from tests.common import enospc_on_replace, load_tool, tiny_cfg


def test_result_files_are_replaced_atomically(tmp_path, monkeypatch):
    tool = load_tool("retrieve")
    cfg = tiny_cfg("ZF", ["OUTPUT_DIR", str(tmp_path), "RETRIEVAL.SAVE_TOP_K", "2"])
    index = SimpleNamespace(num_images=3, image_ids=["a", "b", "c"])
    queries = [{"image_id": "q"}]

    def results(order):
        r = SimpleNamespace(
            order=np.array(order),
            scores=np.array([0.9, 0.5, 0.1], np.float32),
            boxes=np.zeros((3, 4), np.float32),
        )
        return {"filtering": [r]}

    tool.save_rankings(cfg, index, queries, results([2, 0, 1]))
    assert list(np.load(tmp_path / "rankings.npz")["filtering/image_ids"][0]) == ["c", "a"]
    enospc_on_replace(monkeypatch, lambda src, dst: dst.endswith("rankings.npz"))
    with pytest.raises(OutputWriteError) as e:
        tool.save_rankings(cfg, index, queries, results([1, 2, 0]))
    assert e.value.errno == errno.ENOSPC and "rankings.npz" in str(e.value)
    assert "free disk space" in str(e.value) and "previous file is unchanged" in str(e.value)
    monkeypatch.undo()
    assert list(np.load(tmp_path / "rankings.npz")["filtering/image_ids"][0]) == ["c", "a"]
    assert sorted(os.listdir(tmp_path)) == ["rankings.npz"]  # no temp file left
