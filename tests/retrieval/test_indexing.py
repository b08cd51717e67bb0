"""Indexing a collection (retrieval_ext.retrieval.indexing): interrupted and failing runs lose
nothing (SIGKILL mid-index, disk full), an index of other weights or another config is refused,
files of every kind are read or listed as failed, and a collection with nothing readable is a
clear error."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval_ext.retrieval.extractor import FeatureExtractor
from retrieval_ext.retrieval.index_store import IndexMismatchError, IndexReader, IndexWriteError
from retrieval_ext.retrieval.indexing import build_index, open_index
from retrieval_ext.retrieval.queries import extract_queries
from tests.common import (
    REPO_ROOT,
    ZF_TINY,
    assert_same_index,
    broken_image_files,
    enospc_on_replace,
    make_extractor,
    pattern_image,
    register,
    rotated_with_exif,
    tiny_cfg,
    tiny_model,
    write_collection,
)

NUM_DB = 16


def _collection(root):
    db = {f"images/im{i:02d}.png": pattern_image(48 + 2 * i, 64, 10 + i) for i in range(NUM_DB)}
    db["images/zz_broken.jpg"] = b"not a jpeg"
    return write_collection(root, db, [("images/im00.png", [4, 4, 40, 40], "obj")])


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
    assert resumed.manifest == reference.manifest
    assert_same_index(resumed, reference, rtol=1e-5, atol=1e-6, region_atol=1e-5)


def test_disk_full_while_indexing_keeps_what_is_stored(zf, tmp_path, registered, monkeypatch):
    root = _collection(tmp_path / "coll")
    name = register(registered, "rel_full", root)
    extractor = make_extractor(zf)
    index_dir = tmp_path / "index"
    # the second shard cannot be renamed into place: the disk is full
    enospc_on_replace(monkeypatch, lambda src, dst: os.path.basename(dst) == "rank000-00001")
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
    assert resumed.manifest == reference.manifest
    assert_same_index(resumed, reference, rtol=1e-5, atol=1e-6, region_atol=1e-5)

    # an index under a regular file: a clear error, nothing else touched
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexWriteError, match="Not a directory"):
        build_index(extractor, name, str(tmp_path / "file" / "index"), show_progress=False)


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


def test_indexing_a_collection_of_every_kind(zf, tmp_path, registered, logs):
    upright = pattern_image(60, 90, 3)
    readable = {
        "images/a_upright.png": upright,
        "images/b_exif_rotated.png": rotated_with_exif(upright),
        "images/c_alpha.png": Image.fromarray(
            np.dstack([upright, np.full(upright.shape[:2], 200, np.uint8)]), "RGBA"
        ),
        "images/d_gray.png": Image.fromarray(upright[..., 0], "L"),
        "images/e_cmyk.jpg": Image.fromarray(upright).convert("CMYK"),
        "images/f_16bit.png": Image.fromarray(upright[..., 1].astype(np.uint16) * 257),
        "images/g_wide.png": pattern_image(10, 1000, 4),
        "images/h_tiny.png": pattern_image(8, 8, 5),
        "images/i caf\u00e9 \u540d.png": pattern_image(50, 70, 6),
        "images/j_black.png": np.zeros((40, 40, 3), np.uint8),
    }
    broken = {f"images/x_{k}": v for k, v in broken_image_files().items()}
    root = write_collection(
        tmp_path / "every",
        {**readable, **broken},
        [("images/b_exif_rotated.png", [10, 5, 60, 40], "thing")],
    )
    name = register(registered, "rel_every", root)
    extractor = make_extractor(zf)
    index = build_index(
        extractor, name, str(tmp_path / "index"), shard_size=3, dtype="float32", show_progress=False
    )

    stored = [rel.rsplit(".", 1)[0] for rel in sorted(readable)]
    assert index.image_ids == stored
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text(encoding="utf-8"))
    # every unreadable file is listed, with its reason; the loader names them with extension
    failed = manifest["failed"]
    assert len(failed) == len(broken)
    for rel in broken:
        key = rel if rel in failed else rel.rsplit(".", 1)[0]
        assert key in failed and failed[key]
    # ... and named in exactly one warning
    warnings = logs.warnings()
    for rel in broken:
        stem = rel.rsplit(".", 1)[0]
        assert sum(stem in w for w in warnings) == 1, (rel, warnings)

    # EXIF orientation is applied: the rotated copy gives the upright image's features and boxes
    a, b = index.index_of("images/a_upright"), index.index_of("images/b_exif_rotated")
    assert (index.image_field(b, "height"), index.image_field(b, "width")) == (60, 90)
    np.testing.assert_allclose(
        index.image_vectors("ipa_sum")[b], index.image_vectors("ipa_sum")[a], rtol=1e-6
    )
    np.testing.assert_array_equal(index.regions(b)["boxes"], index.regions(a)["boxes"])
    # every stored box lies inside its image (original pixels, oriented frame)
    for i in range(index.num_images):
        boxes = index.regions(i)["boxes"]
        h, w = index.image_field(i, "height"), index.image_field(i, "width")
        assert np.all(np.isfinite(index.image_vectors("ipa_sum")[i]))
        assert len(boxes) > 0 and (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()

    # the query on the EXIF-rotated file, box in the displayed frame, equals the upright query
    (q,) = extract_queries(extractor, name)
    ref = extractor.query_record_from_image(upright[..., ::-1].copy(), [10, 5, 60, 40])  # BGR
    for k in ("ipa_sum", "crop_max", "rpa_max", "box"):
        np.testing.assert_allclose(q[k], ref[k], rtol=1e-5, atol=1e-5)

    # a rerun reuses the complete index, listing the same failures
    again = build_index(
        extractor, name, str(tmp_path / "index"), dtype="float32", show_progress=False
    )
    assert again.image_ids == stored and again.failed == index.failed


def test_no_readable_database_image_is_a_clear_error(zf, tmp_path, registered):
    root = write_collection(
        tmp_path / "none",
        {"images/a.jpg": b"", "images/b.jpg": b"<html></html>", "q.png": pattern_image(30, 30, 0)},
        [("q.png", [1, 1, 20, 20], "x")],
    )
    name = register(registered, "rel_none", root)
    with pytest.raises(ValueError, match=r"none of the 2 database images of rel_none_db"):
        build_index(make_extractor(zf), name, str(tmp_path / "i"), show_progress=False)
