"""Tests of the on-disk feature index: round trip, ordering, resume after crashes, ranks, errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from retrieval_ext.retrieval import index_store
from retrieval_ext.retrieval.index_store import (
    FieldSpec,
    IndexIncompleteError,
    IndexMismatchError,
    IndexNotFinalizedError,
    IndexReader,
    IndexSchema,
    IndexWriteError,
    IndexWriter,
    check_manifest_compatible,
    default_schema,
)
from tests.common import assert_same_index

# Shared by the test process and the SIGKILL child (exec'd in both), so both build the very same
# records. Every 4th image has no proposals.
GEN_SRC = """
import numpy as np

def make_record(k, C=8, num_classes=3, max_props=5, class_boxes=False):
    rng = np.random.default_rng(1000 + k)
    K = 0 if k % 4 == 0 else int(rng.integers(1, max_props + 1))
    x0 = rng.uniform(0, 100, size=(K, 2))
    rec = {
        "ipa_sum": rng.uniform(0, 20, size=C),
        "ipa_max": rng.uniform(0, 5, size=C).astype(np.float32),
        "height": int(rng.integers(100, 800)),
        "width": int(rng.integers(100, 800)),
        "boxes": np.concatenate([x0, x0 + rng.uniform(1, 50, size=(K, 2))], axis=1),
        "objectness": rng.normal(size=K),
        "rpa_sum": rng.uniform(0, 30, size=(K, C)),
        "rpa_max": rng.uniform(0, 5, size=(K, C)),
        "scores": rng.dirichlet(np.ones(num_classes + 1), size=K),
    }
    if class_boxes:
        rec["class_boxes"] = rng.uniform(0, 200, size=(K, num_classes, 4))
    return rec
"""
_ns = {}
exec(GEN_SRC, _ns)
make_record = _ns["make_record"]

# the folder holding the retrieval_ext package
PACKAGE_PARENT = str(Path(index_store.__file__).resolve().parents[3])
MANIFEST = {
    "dataset": "toy_db",
    "model_config": "MODEL:\n  META_ARCHITECTURE: X\n",
    "weights": "h1",
}
# Storage dtypes written out by hand (not read from the schema under test).
FEATURE_FIELDS = ("ipa_sum", "ipa_max", "rpa_sum", "rpa_max", "scores")
EXACT_DTYPES = {"height": np.int64, "width": np.int64, "boxes": np.float32}
EXACT_DTYPES.update({"objectness": np.float32, "class_boxes": np.float32})
IMAGE_FIELDS = ("ipa_sum", "ipa_max", "height", "width")


def ids(n, start=0):
    return [f"img{k:03d}" for k in range(start, start + n)]


def expected_array(rec, field, dtype):
    target = dtype if field in FEATURE_FIELDS else EXACT_DTYPES[field]
    return np.asarray(rec[field]).astype(target)


def assert_matches_records(reader, records, dtype):
    """Every stored array equals the record cast independently with numpy."""
    assert reader.image_ids == list(records)
    for i, (image_id, rec) in enumerate(records.items()):
        for f in ("ipa_sum", "ipa_max"):
            got = reader.image_vectors(f, dtype=None)[i]
            want = expected_array(rec, f, dtype)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (image_id, f)
        assert reader.image_field(i, "height") == rec["height"]
        assert reader.image_field(i, "width") == rec["width"]
        regions = reader.regions(i)
        for f in rec:
            if f in IMAGE_FIELDS:
                continue
            want = expected_array(rec, f, dtype)
            assert regions[f].dtype == want.dtype, (image_id, f)
            assert regions[f].shape == want.shape, (image_id, f)
            assert regions[f].tobytes() == want.tobytes(), (image_id, f)


def build(root, image_ids, dtype="float16", shard_size=4, rank=0, **kw):
    with IndexWriter(root, MANIFEST, shard_size=shard_size, dtype=dtype, rank=rank, **kw) as w:
        for image_id in image_ids:
            w.add(image_id, make_record(int(image_id[3:])))
    return w


def complete_shards(root):
    d = Path(root) / "shards"
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


# ----------------------------------------------------------------------------------------------
def test_round_trip_float32_exact(tmp_path):
    names = ids(11)
    schema = default_schema(class_boxes=True)
    records = {n: make_record(k, class_boxes=True) for k, n in enumerate(names)}
    with IndexWriter(tmp_path, MANIFEST, shard_size=4, dtype="float32", schema=schema) as w:
        for n, rec in records.items():
            w.add(n, rec)
        assert w.shards_written == ["rank000-00000", "rank000-00001"]
    w.finalize(names)
    assert complete_shards(tmp_path) == ["rank000-00000", "rank000-00001", "rank000-00002"]
    r = IndexReader(tmp_path)
    assert r.num_images == 11 and r.manifest == MANIFEST and r.failed == {}
    assert_matches_records(r, records, np.float32)
    assert r.regions(0)["rpa_sum"].shape == (0, 8)  # image 0 has K = 0
    assert r.regions(0)["class_boxes"].shape == (0, 3, 4)
    assert isinstance(r.regions(1)["rpa_sum"], np.memmap)
    for i, rec in enumerate(records.values()):
        assert r.num_proposals(i) == len(rec["boxes"])


def test_round_trip_float16_and_sizes(tmp_path):
    names = ids(9)
    records = {n: make_record(k) for k, n in enumerate(names)}
    build(tmp_path, names, dtype="float16").finalize(names)
    r = IndexReader(tmp_path)
    assert_matches_records(r, records, np.float16)
    # float16 storage stays within half-precision rounding of the original values
    for i, rec in enumerate(records.values()):
        np.testing.assert_allclose(r.regions(i)["rpa_sum"], rec["rpa_sum"], rtol=2**-11, atol=1e-7)
        np.testing.assert_allclose(
            r.image_vectors("ipa_sum")[i], rec["ipa_sum"], rtol=2**-11, atol=1e-7
        )

    vecs = r.image_vectors("ipa_sum")
    want = np.stack([rec["ipa_sum"].astype(np.float16) for rec in records.values()])
    assert vecs.dtype == np.float32 and vecs.flags.c_contiguous and not vecs.flags.writeable
    np.testing.assert_array_equal(vecs, want.astype(np.float32))
    assert r.image_vectors("ipa_sum") is vecs  # cached
    assert r.image_vectors("ipa_sum", dtype=None).dtype == np.float16
    heights = r.image_vectors("height")
    assert heights.dtype == np.int64
    assert heights.tolist() == [rec["height"] for rec in records.values()]

    # Hand count with C = 8, 4 scores: per image 2 IPA x 8 x 2 B + 2 x int64 + int64 offset = 56 B;
    # per proposal box 16 B + objectness 4 B + 2 RPA x 8 x 2 B + 4 scores x 2 B = 60 B.
    total_k = sum(len(rec["boxes"]) for rec in records.values())
    sizes = r.nbytes_per_image()
    assert sizes["rpa_sum"] == pytest.approx(16 * total_k / 9)
    assert sizes["total"] == pytest.approx(56 + 60 * total_k / 9)


def test_order_independent_of_extraction_order(tmp_path):
    names = ids(13)
    shuffled = list(np.random.default_rng(0).permutation(names))
    build(tmp_path / "a", shuffled, shard_size=3).finalize(names)
    build(tmp_path / "b", names, shard_size=5).finalize(names)
    ra, rb = IndexReader(tmp_path / "a"), IndexReader(tmp_path / "b")
    assert_matches_records(ra, {n: make_record(int(n[3:])) for n in names}, np.float16)
    assert_same_index(ra, rb)


def test_resume_after_simulated_crash(tmp_path):
    names = ids(14)
    root = tmp_path / "idx"
    w = IndexWriter(root, MANIFEST, shard_size=4)
    for n in names[:10]:
        w.add(n, make_record(int(n[3:])))
    w.abort()  # 2 shards on disk, 2 buffered images lost, as after a crash
    junk = root / "shards" / ".tmp-rank000-00002-99999"  # half-written shard of a killed writer
    junk.mkdir()
    (junk / "rpa_sum.npy").write_bytes(b"partial")
    with pytest.raises(IndexNotFinalizedError):
        IndexReader(root)

    w = IndexWriter(root, MANIFEST, shard_size=4)
    assert not junk.exists()
    assert w.done_ids == set(names[:8])
    assert w.pending(names) == names[8:]
    for n in w.pending(names):
        w.add(n, make_record(int(n[3:])))
    w.finalize(names)

    build(tmp_path / "ref", names, shard_size=4).finalize(names)
    assert_same_index(IndexReader(root), IndexReader(tmp_path / "ref"))


# The child imports the index store without retrieval_ext/__init__.py (which registers the models
# and datasets, importing torch and detectron2): a bare package module stands in for it.
CHILD = """
import os, sys, time, types
pkg = types.ModuleType("retrieval_ext")
pkg.__path__ = [os.path.join({parent!r}, "retrieval_ext")]
sys.modules["retrieval_ext"] = pkg
import retrieval_ext.retrieval.index_store as m
heavy = sorted(n for n in ("torch", "detectron2") if n in sys.modules)
assert not heavy, f"the index store imported {{heavy}}"
ns = {{}}
exec({gen!r}, ns)
w = m.IndexWriter({root!r}, {manifest!r}, shard_size=4, dtype="float16")
for k in range({n}):
    w.add("img%03d" % k, ns["make_record"](k))
    time.sleep(0.04)
w.close()
"""


def test_sigkill_mid_run_then_resume(tmp_path):
    n = 100
    names = ids(n)
    root = tmp_path / "idx"
    script = CHILD.format(
        parent=PACKAGE_PARENT, gen=GEN_SRC, root=str(root), manifest=MANIFEST, n=n
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not complete_shards(root):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "child wrote no shard"
        time.sleep(0.01)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    shards = complete_shards(root)
    # the child adds images in order, 4 per shard, so complete shards hold a prefix of the list
    w = IndexWriter(root, MANIFEST, shard_size=4, dtype="float16")
    assert w.done_ids == set(names[: 4 * len(shards)])
    assert 0 < len(w.done_ids) < n
    assert not [p for p in (root / "shards").iterdir() if p.name.startswith(".tmp-")]
    for name in w.pending(names):
        w.add(name, make_record(int(name[3:])))
    w.finalize(names)

    build(tmp_path / "ref", names, shard_size=4).finalize(names)
    assert_same_index(IndexReader(root), IndexReader(tmp_path / "ref"))


def test_two_ranks_one_root(tmp_path):
    names = ids(10)
    w0 = IndexWriter(tmp_path, MANIFEST, shard_size=3, rank=0)
    w1 = IndexWriter(tmp_path, MANIFEST, shard_size=3, rank=1)
    with pytest.raises(IndexWriteError, match="another IndexWriter holds rank 1"):
        IndexWriter(tmp_path, MANIFEST, rank=1)
    for k, n in enumerate(names):
        (w0 if k % 2 == 0 else w1).add(n, make_record(k))
    w1.close()
    w0.finalize(names)
    assert complete_shards(tmp_path) == [
        "rank000-00000",
        "rank000-00001",
        "rank001-00000",
        "rank001-00001",
    ]
    r = IndexReader(tmp_path)
    assert_matches_records(r, {n: make_record(k) for k, n in enumerate(names)}, np.float16)
    assert r.info["shards"] == complete_shards(tmp_path)


def test_duplicate_image_kept_once_first_shard_wins(tmp_path):
    names = ids(4)
    build(tmp_path / "a", names).close()
    # Another rank also stored img002 (with other values) before its bookkeeping caught up.
    with IndexWriter(tmp_path / "b", MANIFEST, shard_size=4, rank=1) as w:
        w.add("img002", make_record(99))
    os.replace(tmp_path / "b" / "shards" / "rank001-00000", tmp_path / "a/shards/rank001-00000")

    w = IndexWriter(tmp_path / "a", MANIFEST)
    manifest = w.finalize(names)
    assert manifest["num_images"] == 4 and manifest["shards"] == ["rank000-00000"]
    r = IndexReader(tmp_path / "a")
    assert r.image_ids == names
    assert_matches_records(r, {n: make_record(int(n[3:])) for n in names}, np.float16)


def test_failed_images_recorded_and_listed(tmp_path):
    names = ids(8)
    w = IndexWriter(tmp_path, MANIFEST, shard_size=3)
    for k, n in enumerate(names):
        if n in ("img002", "img005"):
            w.mark_failed(n, f"corrupt JPEG {k}")
        elif n != "img007":
            w.add(n, make_record(k))
    w.mark_failed("img007", "timeout")
    w.abort()
    log = tmp_path / "failed-rank000.jsonl"
    assert len(log.read_text().splitlines()) == 3
    with open(log, "a") as f:
        f.write('{"image_id": "img00')  # torn line of a killed process

    w = IndexWriter(tmp_path, MANIFEST, shard_size=3)
    assert w.failed == {"img002": "corrupt JPEG 2", "img005": "corrupt JPEG 5", "img007": "timeout"}
    assert w.done_ids == {"img000", "img001", "img003"}
    assert w.pending(names) == ["img004", "img006"]
    for n in w.pending(names) + ["img007"]:  # img007 retried successfully: stored copy wins
        w.add(n, make_record(int(n[3:])))
    w.mark_failed("img099", "not in the list")
    manifest = w.finalize(names)
    assert manifest["num_failed"] == 2
    assert json.loads(log.read_text().splitlines()[-1])["image_id"] == "img099"

    r = IndexReader(tmp_path)
    assert r.failed == {"img002": "corrupt JPEG 2", "img005": "corrupt JPEG 5"}
    kept = [n for n in names if n not in ("img002", "img005")]
    assert r.image_ids == kept and r.info["image_list"] == names
    assert_matches_records(r, {n: make_record(int(n[3:])) for n in kept}, np.float16)


def test_finalize_lists_missing_images(tmp_path):
    names = ids(5)
    w = build(tmp_path, names[:3])
    w = IndexWriter(tmp_path, MANIFEST)
    with pytest.raises(IndexIncompleteError, match="2 of 5 images") as info:
        w.finalize(names)
    assert info.value.missing == ["img003", "img004"]
    assert "'img003'" in str(info.value) and "'img004'" in str(info.value)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ValueError, match="duplicate"):
        IndexWriter(tmp_path, MANIFEST).finalize(["img000", "img000"])


LONG_CONFIG = "\n".join(f"KEY_{k}: {k}" for k in range(40))


def test_manifest_mismatch_refused(tmp_path):
    manifest = {"dataset": "oxford5k", "weights": "abc123", "model_config": LONG_CONFIG}
    with IndexWriter(tmp_path, manifest, shard_size=2) as w:
        w.add("img000", make_record(0))
    other = dict(
        manifest, weights="def456", model_config=LONG_CONFIG.replace("KEY_17: 17", "KEY_17: 99")
    )
    with pytest.raises(IndexMismatchError) as info:
        IndexWriter(tmp_path, other)
    msg = str(info.value)
    assert info.value.keys == ["model_config", "weights"]
    assert "weights: stored='abc123' expected='def456'" in msg
    assert "-KEY_17: 17" in msg and "+KEY_17: 99" in msg
    assert "KEY_30" not in msg  # the long config is shortened to the differing lines
    assert "dataset" not in msg

    with pytest.raises(IndexMismatchError, match="dtype: stored='float16' expected='float32'"):
        IndexWriter(tmp_path, manifest, dtype="float32")
    # the refused writers released their lock, the original setup resumes
    w = IndexWriter(tmp_path, manifest)
    w.finalize(["img000"])
    r = IndexReader(tmp_path)
    r.check_compatible(manifest)
    with pytest.raises(IndexMismatchError, match="weights"):
        r.check_compatible(other)
    r.check_compatible(other, keys=("dataset",))


def test_check_manifest_compatible_unit():
    check_manifest_compatible({"a": (1, 2)}, {"a": [1, 2]})
    with pytest.raises(IndexMismatchError, match="b: stored=<missing> expected=3"):
        check_manifest_compatible({"a": 1}, {"a": 1, "b": 3})
    with pytest.raises(IndexMismatchError, match="a: stored=1 expected=2"):
        check_manifest_compatible({"a": 1, "c": 0}, {"a": 2, "c": 5}, keys=("a",))


def test_unwritable_root_gives_clear_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(IndexWriteError, match="cannot create index directory") as info:
        IndexWriter(blocker / "index", MANIFEST)
    assert str(blocker / "index") in str(info.value)


def test_disk_full_keeps_finalized_index_intact(tmp_path, monkeypatch):
    names = ids(6)
    build(tmp_path, names).finalize(names)
    manifest_bytes = (tmp_path / "manifest.json").read_bytes()
    before = complete_shards(tmp_path)

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = IndexWriter(tmp_path, MANIFEST, shard_size=4)
    for n in ids(2, start=6):
        w.add(n, make_record(int(n[3:])))
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(IndexWriteError, match="No space left on device") as info:
        w.flush()
    assert "rank000-00002" in str(info.value)
    assert complete_shards(tmp_path) == before
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(IndexWriteError):
        w.finalize(names + ids(2, start=6))  # flushing again fails the same way
    monkeypatch.undo()

    w = IndexWriter(tmp_path, MANIFEST, shard_size=4)
    for n in ids(2, start=6):
        w.add(n, make_record(int(n[3:])))
    w.flush()
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(IndexWriteError, match="manifest.json"):
        w.finalize(names + ids(2, start=6))
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_bytes() == manifest_bytes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".manifest")) == []
    assert_matches_records(
        IndexReader(tmp_path), {n: make_record(int(n[3:])) for n in names}, np.float16
    )


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(IndexNotFinalizedError, match="no index at"):
        IndexReader(tmp_path / "nothing")
    build(tmp_path, ids(2)).close()
    with pytest.raises(IndexNotFinalizedError, match="never finalized") as info:
        IndexReader(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_accessors_and_concurrent_reads(tmp_path):
    names = ids(12)
    records = {n: make_record(k) for k, n in enumerate(names)}
    build(tmp_path, names, shard_size=5).finalize(names)
    r = IndexReader(tmp_path)
    r_copy = IndexReader(tmp_path, mmap=False)
    assert not isinstance(r_copy.regions(1)["rpa_max"], np.memmap)
    assert_same_index(r, r_copy)

    rpa_max = r.region_accessor("rpa_max")
    assert r.index_of("img007") == 7
    assert r.image_field(3, "height") == records["img003"]["height"]
    with pytest.raises(KeyError, match="per-image"):
        r.region_accessor("ipa_sum")
    with pytest.raises(IndexError):
        rpa_max(12)

    want_vecs = np.stack([rec["ipa_max"].astype(np.float16) for rec in records.values()])
    barrier = threading.Barrier(8)

    def work(seed):
        barrier.wait()
        order = np.random.default_rng(seed).permutation(12)
        vecs = r.image_vectors("ipa_max")
        ok = np.array_equal(vecs, want_vecs.astype(np.float32))
        for i in order:
            want = records[names[i]]["rpa_max"].astype(np.float16)
            ok &= rpa_max(int(i)).tobytes() == want.tobytes()
            ok &= (
                r.regions(int(i))["boxes"].tobytes()
                == expected_array(records[names[i]], "boxes", None).tobytes()
            )
        return ok, id(vecs)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert all(ok for ok, _ in results)
    assert len({vid for _, vid in results}) == 1  # one cached array shared by all threads


def test_extended_schema(tmp_path):
    schema = IndexSchema(
        list(default_schema().fields)
        + [
            FieldSpec("rpa_pca", "proposal", "feature", (None,)),
            FieldSpec("qe", "image", "exact", (2,), "int32"),
        ]
    )
    names = ids(5)
    records = {}
    with IndexWriter(tmp_path, MANIFEST, shard_size=2, dtype="float32", schema=schema) as w:
        for k, n in enumerate(names):
            rec = make_record(k)
            rec["rpa_pca"] = rec["rpa_sum"][:, :3] * 2
            rec["qe"] = np.array([k, -k])
            records[n] = rec
            w.add(n, rec)
    w.finalize(names)
    r = IndexReader(tmp_path)
    assert r.schema == schema and r.feature_dims["rpa_pca"] == (3,)
    for i, rec in enumerate(records.values()):
        assert r.regions(i)["rpa_pca"].tobytes() == rec["rpa_pca"].astype(np.float32).tobytes()
        np.testing.assert_array_equal(r.image_field(i, "qe"), [i, -i])
        assert r.image_field(i, "qe").dtype == np.int32


def test_add_validation(tmp_path):
    w = IndexWriter(tmp_path, MANIFEST, shard_size=10)
    w.add("img001", make_record(1))
    with pytest.raises(ValueError, match="already stored"):
        w.add("img001", make_record(1))
    bad = make_record(2)
    del bad["scores"]
    with pytest.raises(ValueError, match=r"missing \['scores'\]"):
        w.add("img002", bad)
    bad = make_record(2)
    bad["rpa_max"] = np.concatenate([bad["rpa_max"]] * 2)
    with pytest.raises(ValueError, match="proposals"):
        w.add("img002", bad)
    bad = make_record(2, C=6)
    with pytest.raises(ValueError, match=r"trailing shape \(6,\), the index stores \(8,\)"):
        w.add("img002", bad)
    bad = make_record(2)
    bad["ipa_sum"][0] = 1e6
    with pytest.raises(ValueError, match="overflows float16"):
        w.add("img002", bad)
    bad = make_record(2)
    bad["rpa_sum"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        w.add("img002", bad)
    bad = make_record(2)
    bad["height"] = 480.5
    with pytest.raises(ValueError, match="not exactly representable"):
        w.add("img002", bad)
    w.add("img002", make_record(2))
    w.finalize(["img001", "img002"])
    assert IndexReader(tmp_path).num_images == 2


def test_a_config_reloaded_from_its_saved_yaml_still_matches_its_index(tmp_path):
    """Serving an index with the config.yaml its run saved: same values, but the dump of the
    re-loaded config lacks the YAML anchors (&id001) that shared lists had in the original."""
    from retrieval_ext.retrieval.extractor import model_fingerprint
    from tests.common import make_cfg, tiny_cfg, tiny_model

    cfg = tiny_cfg("ZF")
    model = tiny_model("ZF")
    built = model_fingerprint(cfg, model)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    again = make_cfg(tmp_path / "config.yaml", freeze=False)
    reloaded = model_fingerprint(again, model)
    assert "&id" in built["model_config"] and "&id" not in reloaded["model_config"]
    check_manifest_compatible(built, reloaded)
    again.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    with pytest.raises(IndexMismatchError, match="model_config"):
        check_manifest_compatible(built, model_fingerprint(again, model))


def test_fine_tuning_settings_do_not_make_an_index_foreign(tmp_path):
    """MODEL.FINETUNE (strategy, augmentation, ...) says how weights were trained, not what the
    network computes: an index stays usable when those keys change or new ones appear (indexes
    written before held them in their config text), while a feature-shaping key still counts."""
    from retrieval_ext.retrieval.extractor import model_fingerprint
    from retrieval_ext.retrieval.indexing import MANIFEST_NORMALIZERS
    from tests.common import tiny_cfg, tiny_model

    model = tiny_model("ZF")
    now = model_fingerprint(tiny_cfg("ZF"), model)
    assert "FINETUNE" not in now["model_config"]
    # as an index written before FINETUNE was ignored stores it
    cfg = tiny_cfg("ZF", ["MODEL.FINETUNE.STRATEGY", "ft2"])
    old_text = now["model_config"].replace("MODEL:\n", "MODEL:\n" + _finetune_dump(cfg) + "\n", 1)
    old = dict(now, model_config=old_text)
    assert "FINETUNE" in old["model_config"]
    with pytest.raises(IndexMismatchError):
        check_manifest_compatible(old, now)
    check_manifest_compatible(old, now, normalize=MANIFEST_NORMALIZERS)
    other = model_fingerprint(tiny_cfg("ZF", ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "5"]), model)
    with pytest.raises(IndexMismatchError, match="model_config"):
        check_manifest_compatible(old, other, normalize=MANIFEST_NORMALIZERS)


def _finetune_dump(cfg):
    # the MODEL.FINETUNE block indented as inside the MODEL: section of a fingerprint
    lines = cfg.MODEL.FINETUNE.dump().splitlines()
    return "\n".join(["  FINETUNE:"] + ["    " + line for line in lines])
