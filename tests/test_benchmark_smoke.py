"""Smoke test of tools/benchmark.py: every subcommand's --quick mode runs end to end.

Timings are not asserted (they depend on the machine and its load); what is checked is that each
run prints its machine line and table headers and writes JSON whose sizes follow from the
arguments and the tiny configs (worked out here from the YAML files and the --quick sizes).
"""

import importlib.util
import json

import pytest

from tests.common import REPO_ROOT, tiny_cfg


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO_ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(benchmark, capsys, argv):
    benchmark.main(argv)
    return capsys.readouterr().out


def _check_machine_line(out):
    assert out.startswith("machine: ")
    assert "cores" in out.splitlines()[0] and "torch" in out.splitlines()[0]


def test_extraction_quick(benchmark, capsys, tmp_path):
    out = _run(benchmark, capsys, ["extraction", "--quick", "--output-dir", str(tmp_path)])
    _check_machine_line(out)
    for header in ("img/s without regions", "img/s with regions", "peak RSS delta with (MB)"):
        assert header in out
    data = json.loads((tmp_path / "extraction.json").read_text())
    results = data["results"]
    assert [(r["backbone"], r["mode"]) for r in results] == [
        ("EfficientNet-Lite0", "without"),
        ("EfficientNet-Lite0", "with"),
    ]
    # --quick: shorter side min(600, 128) = 128, 3:4 images -> width round(128 * 4 / 3) = 171
    assert all(r["input_hw"] == [128, 171] for r in results)
    full = results[1]
    # the tiny config keeps 16 proposals and the tamed RPN (anchors) always has more than that
    assert full["num_proposals"] == tiny_cfg("EfficientNet-Lite0").MODEL.RETRIEVAL.NUM_PROPOSALS
    assert full["num_proposals"] == 16
    for r in results:
        assert len(r["seconds"]) == 1 and r["seconds"][0] > 0
        assert r["images_per_s"] == pytest.approx(1.0 / r["seconds"][0])
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
    assert set(full["parts_median_s"]) == {
        "backbone",
        "rpn",
        "roi_pool",
        "box_head",
        "box_predictor",
    }
    assert sum(full["parts_median_s"].values()) <= full["median_s"]


def test_rerank_quick(benchmark, capsys, tmp_path):
    out = _run(benchmark, capsys, ["rerank", "--quick", "--output-dir", str(tmp_path)])
    _check_machine_line(out)
    assert "stored RPA read from the index (ours)" in out
    assert "network re-run on the top N (authors')" in out
    assert "rank agreement of the top 8: YES" in out
    data = json.loads((tmp_path / "rerank.json").read_text())
    s = data["summary"]
    # --quick: 8 database images (caps N = 100), 2 instances x 1 query
    assert s["num_db"] == 8 and s["top_n"] == 8 and s["num_queries"] == 2
    assert s["all_agree"] is True
    # the same stored features (float16) and re-computed ones (float32): scores agree closely
    assert s["max_abs_score_diff"] < 2e-3
    assert s["ratio_rerun_over_stored"] == pytest.approx(
        s["rerun_ms_median"] / s["stored_ms_median"]
    )


def test_search_quick(benchmark, capsys, tmp_path):
    out = _run(benchmark, capsys, ["search", "--quick", "--output-dir", str(tmp_path)])
    _check_machine_line(out)
    for header in ("filtering, full ranking (ms)", "CA-SR N=10 (ms)", "filtering + CA-SR (ms)"):
        assert header in out
    data = json.loads((tmp_path / "search.json").read_text())
    assert [f["db_size"] for f in data["filtering"]] == [100, 1000]
    for f in data["filtering"]:
        assert f["db_mb"] == pytest.approx(f["db_size"] * 64 * 4 / 2**20)  # float32, C = 64
        assert len(f["full_rank_all_ms"]) == 3
    ca = data["ca_sr"]
    # per image: 20 proposals x (64 float16 RPA + 4 float32 box + 2 float16 scores)
    # + 64 float32 IPA + one int64 offset
    per_image = 20 * (64 * 2 + 4 * 4 + 2 * 2) + 64 * 4 + 8
    assert ca["index_bytes_per_image"] == pytest.approx(per_image)
    assert [b["drawn_from_images"] for b in ca["by_span"]] == [10, 40]


def test_scale_quick(benchmark, capsys, tmp_path):
    out = _run(benchmark, capsys, ["scale", "--quick", "--output-dir", str(tmp_path)])
    _check_machine_line(out)
    for header in ("exact faiss flat (ms)", "recall@100 vs exact", "CA-SR N=10 x 20 proposals"):
        assert header in out
    data = json.loads((tmp_path / "scale.json").read_text())
    assert [r["db"] for r in data["latency"]] == [1000, 3000]  # the --quick sizes
    assert {(r["db"], r["kind"]) for r in data["recall"]} == {
        (n, k) for n in (1000, 3000) for k in ("ivfpq", "hnsw")
    }
    assert all(0.0 <= r["recall@100"] <= 1.0 for r in data["recall"])


def test_compression_quick(benchmark, capsys, tmp_path):
    out = _run(benchmark, capsys, ["compression", "--quick", "--output-dir", str(tmp_path)])
    _check_machine_line(out)
    rows = json.loads((tmp_path / "compression.json").read_text())["results"]
    assert [r["option"] for r in rows][0] == "float32 (reference)"
    ref, int8 = rows[0], rows[1]
    # int8 codes: 1 byte per value instead of 4, for both RPA fields
    assert int8["rpa_bytes"] == pytest.approx(ref["rpa_bytes"] / 4)
    assert ref["ca_sr_delta"] == 0.0


def test_limits_quick(benchmark, capsys, tmp_path):
    out = _run(benchmark, capsys, ["limits", "--quick", "--output-dir", str(tmp_path)])
    _check_machine_line(out)
    res = json.loads((tmp_path / "limits.json").read_text())["results"]
    assert res["search_bytes"] == 2000 * 1280 * 4  # the --quick exact-search database
    assert res["sgemm_gflops"] > 0 and res["copy_gbs"] > 0 and res["backbone_gflop_per_image"] > 0
