"""Distributed indexing: tools/retrieve.py index under detectron2's launch with 2 CPU processes
(gloo) gives the single-process index image for image, and a crashed rank's work resumes."""

import os
import shutil

import pytest

from retrieval_ext.retrieval.index_store import IndexReader
from tests.common import ZF_TINY, assert_same_index, run_tool, write_benchmark


def _index(tmp, weights, out, num_gpus):
    args = [
        "index",
        "--num-gpus",
        str(num_gpus),
        "--dist-url",
        "auto",
        "--config-file",
        ZF_TINY,
        "MODEL.WEIGHTS",
        weights,
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
    proc = run_tool("retrieve", args, env, tmp, timeout=300)
    return proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    write_benchmark(
        tmp / "synthetic", num_instances=2, queries_per_instance=1, num_db=9, short_side=112, seed=1
    )
    return tmp


def test_two_processes_equal_one_and_resume_a_crashed_rank(tmp, zf):
    _index(tmp, zf["weights"], tmp / "one", 1)
    log = _index(tmp, zf["weights"], tmp / "two", 2)
    single, merged = IndexReader(tmp / "one" / "index"), IndexReader(tmp / "two" / "index")
    assert single.num_images == 9
    shards = sorted(p.name for p in (tmp / "two" / "index" / "shards").iterdir())
    assert {s[:7] for s in shards} == {"rank000", "rank001"}  # each rank wrote its own shards
    assert "[rank 1]" in log
    assert single.schema == merged.schema
    assert_same_index(single, merged)  # byte for byte

    # rank 1 crashed before the end: its shards are gone and nothing was finalized
    crashed = tmp / "crashed"
    shutil.copytree(tmp / "two", crashed)
    (crashed / "index" / "manifest.json").unlink()
    for s in (crashed / "index" / "shards").glob("rank001-*"):
        shutil.rmtree(s)
    log = _index(tmp, zf["weights"], crashed, 2)
    assert "resuming" in log
    resumed = IndexReader(crashed / "index")
    assert single.schema == resumed.schema
    assert_same_index(single, resumed)
