"""Distributed indexing: tools/retrieve.py index under detectron2's launch with 2 CPU processes
(gloo) gives the single-process index image for image, and a crashed rank's work resumes."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark
from retrieval_ext.retrieval.index_store import IndexReader
from tests.common import REPO_ROOT, tiny_model


def _index(tmp, out, num_gpus):
    cmd = [
        sys.executable,
        str(REPO_ROOT / "tools" / "retrieve.py"),
        "index",
        "--num-gpus",
        str(num_gpus),
        "--dist-url",
        "auto",
        "--config-file",
        str(REPO_ROOT / "configs/quick_schedules/ZF-tiny.yaml"),
        "MODEL.WEIGHTS",
        str(tmp / "zf.pth"),
        "RETRIEVAL.DATASET",
        "synthetic",
        "RETRIEVAL.SHARD_SIZE",
        "2",
        "RETRIEVAL.INDEX_DTYPE",
        "float32",
        "OUTPUT_DIR",
        str(out),
    ]
    # one thread per process: the 2 processes share the cores, and results do not depend on
    # how many threads split a reduction
    env = dict(
        os.environ, DETECTRON2_DATASETS=str(tmp), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr + proc.stdout


def _assert_same(a: IndexReader, b: IndexReader):
    assert a.image_ids == b.image_ids and a.schema == b.schema
    for f in [spec.name for spec in a.schema.image_fields]:
        assert np.array_equal(a.image_vectors(f), b.image_vectors(f)), f
    for i in range(a.num_images):
        ra, rb = a.regions(i), b.regions(i)
        for f in ra:
            assert np.array_equal(ra[f], rb[f]), (a.image_ids[i], f)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    generate_synthetic_benchmark(
        str(tmp / "synthetic"),
        num_instances=2,
        queries_per_instance=1,
        num_db=9,
        short_side=112,
        seed=1,
    )
    torch.save({"model": tiny_model("ZF").state_dict()}, tmp / "zf.pth")
    return tmp


def test_two_processes_equal_one_and_resume_a_crashed_rank(tmp):
    _index(tmp, tmp / "one", 1)
    log = _index(tmp, tmp / "two", 2)
    single, merged = IndexReader(tmp / "one" / "index"), IndexReader(tmp / "two" / "index")
    assert single.num_images == 9
    shards = sorted(p.name for p in (tmp / "two" / "index" / "shards").iterdir())
    assert {s[:7] for s in shards} == {"rank000", "rank001"}  # each rank wrote its own shards
    assert "[rank 1]" in log
    _assert_same(single, merged)

    # rank 1 crashed before the end: its shards are gone and nothing was finalized
    crashed = tmp / "crashed"
    shutil.copytree(tmp / "two", crashed)
    (crashed / "index" / "manifest.json").unlink()
    for s in (crashed / "index" / "shards").glob("rank001-*"):
        shutil.rmtree(s)
    log = _index(tmp, crashed, 2)
    assert "resuming" in log
    _assert_same(single, IndexReader(crashed / "index"))
