"""tools/make_synthetic.py writes the benchmark and the generic set and prints their counts."""

import json
import os

from tests.common import load_tool


def test_cli_writes_benchmark_and_generic_set(tmp_path, capsys):
    cli = load_tool("make_synthetic")
    out = str(tmp_path / "syn")
    cli.main(
        ["--output", out, "--num-db", "6", "--num-instances", "3", "--queries-per-instance", "1",
         "--short-side", "96", "--generic", "--generic-train", "2", "--generic-val", "1",
         "--generic-short-side", "96"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert all(f"obj0{k}" in printed for k in range(3))
    assert len(os.listdir(os.path.join(out, "images"))) == 6
    assert len(os.listdir(os.path.join(out, "queries"))) == 3
    with open(os.path.join(out, "generic", "annotations.json")) as f:
        assert len(json.load(f)["images"]) == 3
