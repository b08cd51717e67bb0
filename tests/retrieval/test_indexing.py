"""Interrupted and failing runs lose nothing: SIGKILL mid-index, disk full, atomic result files."""

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from retrieval_ext.retrieval.extractor import FeatureExtractor
from retrieval_ext.retrieval.index_store import IndexReader, IndexWriteError
from retrieval_ext.retrieval.indexing import build_index
from retrieval_ext.retrieval.queries import extract_queries
from retrieval_ext.utils.io import OutputWriteError, atomic_dir, atomic_write, atomic_write_json
from tests.common import REPO_ROOT, tiny_cfg

from .conftest import ZF_TINY, make_extractor, pattern_image, register, write_collection

NUM_DB = 16


def _collection(root):
    db = {f"images/im{i:02d}.png": pattern_image(48 + 2 * i, 64, 10 + i) for i in range(NUM_DB)}
    db["images/zz_broken.jpg"] = b"not a jpeg"
    return write_collection(root, db, [("images/im00.png", [4, 4, 40, 40], "obj")])


def _assert_same_index(a: IndexReader, b: IndexReader):
    assert a.image_ids == b.image_ids and len(set(a.image_ids)) == len(a.image_ids)
    assert a.manifest == b.manifest and a.failed == b.failed
    for f in a.schema.image_fields:
        np.testing.assert_allclose(
            a.image_vectors(f.name), b.image_vectors(f.name), rtol=1e-5, atol=1e-6
        )
    for i in range(a.num_images):
        ra, rb = a.regions(i), b.regions(i)
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-5, err_msg=k)


def _shard_names(index_dir: Path):
    d = index_dir / "shards"
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_sigkill_during_indexing_then_rerun(zf, tmp_path, registered):
    root = _collection(tmp_path / "coll")
    name = register(registered, "rel_kill", root)
    opts = list(zf["opts"]) + [
        "RETRIEVAL.DATASET",
        name,
        "RETRIEVAL.CUSTOM_DATASETS",
        f"['{name}={root}']",
        "RETRIEVAL.SHARD_SIZE",
        "2",
        "RETRIEVAL.INDEX_DTYPE",
        "float32",
        # stored uncompressed, like the in-process reference below (build_index's default)
        "RETRIEVAL.REGION_DTYPE",
        "",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    cmd = [
        sys.executable,
        str(REPO_ROOT / "tools" / "retrieve.py"),
        "index",
        "--config-file",
        ZF_TINY,
    ] + opts
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    index_dir = tmp_path / "out" / "index"

    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while not any(n.startswith("rank000-") for n in _shard_names(index_dir)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no shard appeared"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (index_dir / "manifest.json").exists()  # killed before the end
    complete = [n for n in _shard_names(index_dir) if n.startswith("rank000-")]
    assert 1 <= len(complete) < NUM_DB // 2

    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stored_before = 2 * len(complete)
    assert f"{stored_before} images already stored" in done.stderr + done.stdout
    assert not [n for n in _shard_names(index_dir) if n.startswith(".tmp-")]

    resumed = IndexReader(index_dir)
    assert resumed.image_ids == [f"images/im{i:02d}" for i in range(NUM_DB)]
    assert list(resumed.failed) == ["images/zz_broken.jpg"]
    # an uninterrupted run, in this process, with other shard boundaries
    cfg = tiny_cfg("ZF", opts)
    reference = build_index(
        FeatureExtractor(cfg),
        name,
        str(tmp_path / "ref"),
        shard_size=5,
        dtype="float32",
        show_progress=False,
    )
    _assert_same_index(resumed, reference)


def _enospc_for(monkeypatch, predicate):
    real = os.replace

    def replace(src, dst, *a, **k):
        if predicate(str(src), str(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_disk_full_while_indexing_keeps_what_is_stored(zf, tmp_path, registered, monkeypatch):
    root = _collection(tmp_path / "coll")
    name = register(registered, "rel_full", root)
    extractor = make_extractor(zf)
    index_dir = tmp_path / "index"
    # the second shard cannot be renamed into place: the disk is full
    _enospc_for(monkeypatch, lambda src, dst: os.path.basename(dst) == "rank000-00001")
    with pytest.raises(IndexWriteError) as e:
        build_index(
            extractor, name, str(index_dir), shard_size=2, dtype="float32", show_progress=False
        )
    msg = str(e.value)
    assert isinstance(e.value, OSError) and "No space left on device" in msg
    assert "rerun to resume" in msg and "rank000-00001" in msg
    assert _shard_names(index_dir) == ["rank000-00000"]  # the complete shard is intact
    monkeypatch.undo()

    resumed = build_index(
        extractor, name, str(index_dir), shard_size=2, dtype="float32", show_progress=False
    )
    reference = build_index(
        extractor, name, str(tmp_path / "ref"), shard_size=7, dtype="float32", show_progress=False
    )
    _assert_same_index(resumed, reference)

    # an index under a regular file: a clear error, nothing else touched
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexWriteError, match="Not a directory"):
        build_index(extractor, name, str(tmp_path / "file" / "index"), show_progress=False)


def _load_retrieve_tool():
    spec = importlib.util.spec_from_file_location(
        "retrieve_tool", REPO_ROOT / "tools" / "retrieve.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_result_files_are_replaced_atomically(tmp_path, monkeypatch):
    tool = _load_retrieve_tool()
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
    _enospc_for(monkeypatch, lambda src, dst: dst.endswith("rankings.npz"))
    with pytest.raises(OutputWriteError) as e:
        tool.save_rankings(cfg, index, queries, results([1, 2, 0]))
    assert e.value.errno == errno.ENOSPC and "rankings.npz" in str(e.value)
    assert "free disk space" in str(e.value) and "previous file is unchanged" in str(e.value)
    monkeypatch.undo()
    assert list(np.load(tmp_path / "rankings.npz")["filtering/image_ids"][0]) == ["c", "a"]
    assert sorted(os.listdir(tmp_path)) == ["rankings.npz"]  # no temp file left


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


def test_query_cache_is_rebuilt_when_corrupt_or_stale(zf, tmp_path, registered, logs):
    img = pattern_image(40, 50, 1)
    root = write_collection(
        tmp_path / "c", {"images/a.png": img}, [("images/a.png", [2, 2, 30, 30], "o")]
    )
    name = register(registered, "rel_cache", root)
    extractor = make_extractor(zf)
    cache_dir = tmp_path / "cache"
    (first,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    (cache,) = list(cache_dir.glob("queries-*.npz"))
    (cached,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(cached["crop_max"], first["crop_max"])

    cache.write_bytes(b"PK\x03\x04 torn by an old, non-atomic writer")
    (again,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(again["crop_max"], first["crop_max"])
    assert any("ignoring the unreadable query cache" in w for w in logs.warnings())
    np.load(cache)  # rewritten whole

    # same image id, another box: the cache must not answer
    write_collection(root, {}, [("images/a.png", [10, 10, 40, 35], "o")])
    register(registered, name, root)
    (moved,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(moved["box"], [10, 10, 40, 35])
