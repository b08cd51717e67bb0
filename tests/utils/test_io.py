"""Atomic writes (retrieval_ext.utils.io): a file or folder is replaced whole or not at all, and
an unwritable destination is a clear error."""

import errno
import json
import os
from pathlib import Path

import pytest

from retrieval_ext.utils.io import OutputWriteError, atomic_dir, atomic_write, atomic_write_json


def test_atomic_write_helpers(tmp_path):
    target = tmp_path / "r\u00e9sultats 1.json"
    atomic_write_json(target, {"mAP": 0.5, "name": "caf\u00e9"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"mAP": 0.5, "name": "caf\u00e9"}

    def half_then_full(path):
        with open(path, "w") as f:
            f.write('{"mAP": 0.')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError, match="No space left on device"):
        atomic_write(target, half_then_full)
    assert json.loads(target.read_text(encoding="utf-8"))["mAP"] == 0.5
    assert os.listdir(tmp_path) == [target.name]
    with pytest.raises(TypeError):  # unserialisable: raised before the disk is touched
        atomic_write_json(target, {"x": object()})
    assert json.loads(target.read_text(encoding="utf-8"))["mAP"] == 0.5

    (tmp_path / "plain").write_text("x")
    with pytest.raises(OutputWriteError) as e:
        atomic_write_json(tmp_path / "plain" / "out" / "latency.json", {})
    assert e.value.errno in (errno.ENOTDIR, errno.EEXIST) and "regular file" in str(e.value)

    # a folder (the visualization gallery) is swapped in whole, or not at all
    gallery = tmp_path / "vis"
    with atomic_dir(gallery) as tmp:
        Path(tmp, "index.html").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(gallery) as tmp:
            Path(tmp, "index.html").write_text("new, half done")
            raise RuntimeError("drawing failed")
    assert (gallery / "index.html").read_text() == "old"
    with atomic_dir(gallery) as tmp:
        Path(tmp, "index.html").write_text("new")
    assert os.listdir(gallery) == ["index.html"] and (gallery / "index.html").read_text() == "new"
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []
