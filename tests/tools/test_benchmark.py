"""tools/benchmark.py: every subcommand's --quick run end to end, and the parts that compute.

Timings are not asserted (they depend on the machine and its load). What is checked: sizes, byte
counts, FLOPs and parameter counts worked out here from the configs, the architecture and the
--quick sizes; table cells recomputed from the raw measurements in the JSON; recall of the exact
index against a brute force (exactly 1.0) and of the approximate ones against bounds the data
justify; the rerank agreement check on hand-made rankings.
"""

import json

import numpy as np
import pytest
import torch

from retrieval_ext.retrieval.reranking import RerankResult
from tests.common import tiny_cfg, tiny_model
from tools.benchmarks import main
from tools.benchmarks import rerank as rerank_experiment
from tools.benchmarks import scale as scale_experiment

EFFICIENTNET_LITE0_CHANNELS = 1280  # last stage of EfficientNet-Lite0 (Tan & Le 2019): RPA dim


def _run(capsys, argv):
    main(argv)
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("machine: ") and "cores" in first and "torch" in first
    return out


def _table(out, first_header):
    """Rows of the printed GitHub table whose first column is ``first_header``, as dicts."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, [c.strip() for c in line.strip("|").split("|")])))
    return rows


def test_extraction_quick(capsys, tmp_path):
    out = _run(capsys, ["extraction", "--quick", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "extraction.json").read_text())["results"]
    assert [(r["backbone"], r["mode"]) for r in results] == [
        ("EfficientNet-Lite0", "without"),
        ("EfficientNet-Lite0", "with"),
    ]
    # --quick: shorter side min(600, 128) = 128, 3:4 images -> width round(128 * 4 / 3) = 171
    assert all(r["input_hw"] == [128, 171] for r in results)
    without, full = results
    # the tamed RPN proposes anchors, always more than the tiny config's NUM_PROPOSALS = 16
    cfg = tiny_cfg("EfficientNet-Lite0")
    assert full["num_proposals"] == cfg.MODEL.RETRIEVAL.NUM_PROPOSALS == 16
    # the worker built the tiny config's model: same parameter count as one built here
    rpn = ["MODEL.PROPOSAL_GENERATOR.NAME", "RPN"]  # the cost experiments measure the RPN
    params = sum(p.numel() for p in tiny_model("EfficientNet-Lite0", rpn).parameters())
    assert all(r["params_million"] == pytest.approx(params / 1e6) for r in results)
    assert all(r["pretrained_backbone"] is cfg.MODEL.EFFICIENTNET.PRETRAINED for r in results)
    for r in results:
        assert len(r["seconds"]) == 1 and r["seconds"][0] > 0  # --quick: 1 repeat
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
    assert set(full["parts_median_s"]) == {
        "backbone",
        "rpn",
        "roi_pool",
        "box_head",
        "box_predictor",
    }
    assert sum(full["parts_median_s"].values()) <= full["median_s"]
    # the table's cells, from each mode's own single timed pass
    (row,) = _table(out, "backbone")
    t_without, t_with = without["seconds"][0], full["seconds"][0]
    assert row["backbone"] == "EfficientNet-Lite0"
    assert row["img/s without regions"] == f"{1 / t_without:.3f}"
    assert row["img/s with regions"] == f"{1 / t_with:.3f}"
    assert row["with / without time"] == f"{t_with / t_without:.1f}"
    assert row["proposals"] == "16"


def test_rerank_quick(capsys, tmp_path):
    out = _run(capsys, ["rerank", "--quick", "--output-dir", str(tmp_path)])
    assert "rank agreement of the top 8: YES" in out
    data = json.loads((tmp_path / "rerank.json").read_text())
    s, per_query = data["summary"], data["per_query"]
    # --quick: 8 database images (caps N = 100), 2 instances x 1 query, the tiny config's sizes
    cfg = tiny_cfg("EfficientNet-Lite0")
    assert (s["num_db"], s["top_n"], s["num_queries"], len(per_query)) == (8, 8, 2, 2)
    assert s["num_proposals"] == cfg.MODEL.RETRIEVAL.NUM_PROPOSALS
    assert s["input_min_size"] == cfg.INPUT.MIN_SIZE_TEST
    assert s["all_agree"] is True and all(p["agree"] for p in per_query)
    # float16 stored vs float32 re-computed features: close, but not equal (a re-run side that
    # read the stored features would give exactly 0)
    assert 0 < s["max_abs_score_diff"] < 2e-3
    stored = float(np.median([p["stored_ms"] for p in per_query]))
    rerun = float(np.median([p["rerun_ms"] for p in per_query]))
    assert s["ratio_rerun_over_stored"] == pytest.approx(rerun / stored)
    # 8 forward passes per query against a read of 8 x 16 stored vectors
    assert s["ratio_rerun_over_stored"] > 10
    rows = {r["CA-SR of the top N"]: r for r in _table(out, "CA-SR of the top N")}
    assert rows["stored RPA read from the index (ours)"]["network passes per query"] == "0"
    assert rows["network re-run on the top N (authors')"]["network passes per query"] == "8"


def _stored(order, scores, best):
    order = np.array(order)
    return RerankResult(order, np.array(scores, np.float32), None, np.array(best), len(order))


def test_rerank_compare_hand_made_rankings():
    stored = _stored([3, 1, 2], [0.9, 0.8, 0.7], [0, 1, 2])

    def compare(order, scores, best, tol=2e-3):
        args = (np.array(order), np.array(scores), np.array(best), 3, 0.001, 1.0, tol)
        return rerank_experiment.compare(0, stored, *args)

    same = compare([3, 1, 2], [0.9, 0.8, 0.7], [0, 1, 2])
    assert same["agree"] and same["identical_order"] and same["same_best_proposal"]
    assert same["max_abs_score_diff"] == pytest.approx(0, abs=1e-7)
    assert (same["stored_ms"], same["rerun_ms"]) == (1.0, 1000.0)
    # image 1's score moved by 0.01 > tol: no agreement
    moved = compare([3, 1, 2], [0.9, 0.81, 0.7], [0, 1, 2])
    assert not moved["agree"] and moved["max_abs_score_diff"] == pytest.approx(0.01, abs=1e-6)
    # another image in the top N: no agreement
    assert not compare([3, 1, 4], [0.9, 0.8, 0.7], [0, 1, 2])["agree"]
    # a swap of two images whose scores differ by less than tol: agreement, not identical
    near = _stored([3, 1, 2], [0.9, 0.8995, 0.7], [0, 1, 2])
    swap = rerank_experiment.compare(
        0,
        near,
        np.array([1, 3, 2]),
        np.array([0.9001, 0.9, 0.7]),
        np.array([1, 0, 2]),
        3,
        0,
        0,
        2e-3,
    )
    assert swap["agree"] and not swap["identical_order"] and swap["same_best_proposal"]
    # the same images with another best proposal
    assert not compare([3, 1, 2], [0.9, 0.8, 0.7], [0, 0, 2])["same_best_proposal"]


def test_search_quick(capsys, tmp_path):
    out = _run(capsys, ["search", "--quick", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "search.json").read_text())
    assert [f["db_size"] for f in data["filtering"]] == [100, 1000]
    for f in data["filtering"]:
        assert f["db_mb"] == pytest.approx(f["db_size"] * 64 * 4 / 2**20)  # float32, C = 64
        assert len(f["full_rank_all_ms"]) == 3
        assert f["full_rank_ms"] == pytest.approx(float(np.median(f["full_rank_all_ms"])))
    ca = data["ca_sr"]
    # per image: 20 proposals x (64 float16 RPA + 4 float32 box + 2 float16 scores)
    # + 64 float32 IPA + one int64 offset
    per_image = 20 * (64 * 2 + 4 * 4 + 2 * 2) + 64 * 4 + 8
    assert ca["index_bytes_per_image"] == pytest.approx(per_image)
    assert ca["median_ms"] == pytest.approx(float(np.median(ca["all_ms"])))
    assert [b["drawn_from_images"] for b in ca["by_span"]] == [10, 40]
    rows = _table(out, "db images")
    assert [r["db images"] for r in rows] == ["100", "1,000"]
    for r, f in zip(rows, data["filtering"]):
        total = r["filtering + CA-SR (ms)"]
        assert total == f"{f['full_rank_ms'] + ca['median_ms']:.2f}"


def test_scale_quick(capsys, tmp_path):
    out = _run(capsys, ["scale", "--quick", "--output-dir", str(tmp_path)])
    assert "CA-SR N=10 x 20 proposals x 32 dims" in out
    data = json.loads((tmp_path / "scale.json").read_text())
    assert [(r["db"], r["dim"], r["storage"]) for r in data["latency"]] == [
        (1000, 32, "float32"),
        (3000, 32, "float32"),
    ]
    recall = {(r["db"], r["kind"]): r["recall@100"] for r in data["recall"]}
    assert set(recall) == {(n, k) for n in (1000, 3000) for k in ("ivfpq", "hnsw")}
    # clustered 32-d data (n / 100 centres): IVF-PQ codes 1 dimension per byte and visits 16 of
    # 25 / 76 cells, HNSW searches 128 candidates for 100: both all but exact (0.997 - 1.0
    # measured); BENCHMARKS.md reports 0.93-0.94 / 0.996-1.0 at 1280 dimensions
    for (n, kind), r in recall.items():
        assert r >= (0.93 if kind == "ivfpq" else 0.98), (n, kind, r)
    rr = data["rerank"]
    assert (rr["top_n"], rr["proposals"], rr["dim"]) == (10, 20, 32)
    assert rr["ca_sr_before_ms"] > 0 and rr["ca_sr_after_ms"] > 0 and rr["cs_sr_ms"] > 0
    assert list(rr["variants_ms"]) == [
        "float16, 1280 dims (vectorised)",
        "int8, 1280 dims",
        "PCA 256, float16",
        "PCA 128, int8",
    ]


def _brute_force_top100(db, queries):
    scores = queries.astype(np.float64) @ db.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :100]


def test_scale_recall_exact_is_one_and_approximate_near_the_documented():
    """The benchmark's recall measurement on its own clustered data, 3000 x 256 (the 1M row's
    dimension), against a float64 brute force. Default index parameters: IVF-PQ with 64 codes of
    4 dimensions, nprobe 16 of 76 cells, measured 0.966-0.982 over seeds 0-2 (BENCHMARKS.md:
    0.93-0.96 at 1280 dimensions); with nprobe 1 it falls to 0.45-0.58. Flat is exact: 1.0."""
    rng = np.random.default_rng(0)
    db, queries = scale_experiment.filtering_data(rng, 3000, 256, 10)
    assert np.allclose(np.linalg.norm(db, axis=1), 1, atol=1e-5)
    exact = _brute_force_top100(db, queries)
    kinds = ["flat", "hnsw", "ivfpq"]
    rows = scale_experiment.approx_recalls(db, queries, exact, kinds, nprobe=16)
    recall = {r["kind"]: r["recall@100"] for r in rows}
    assert recall["flat"] == 1.0
    assert recall["hnsw"] >= 0.98
    # lossy codes: not exact either (a recall taken against the approximate ids would be 1.0)
    assert 0.93 <= recall["ivfpq"] < 1.0
    # the setting the bound is about: min(4 sqrt(3000) = 219, 3000 // 39) cells, 64 codes
    ivfpq = next(r["params"] for r in rows if r["kind"] == "ivfpq")
    assert (ivfpq["nlist"], ivfpq["pq_m"], ivfpq["nprobe"]) == (76, 64, 16)


def test_compression_quick(capsys, tmp_path):
    out = _run(capsys, ["compression", "--quick", "--output-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "compression.json").read_text())["results"]
    assert [r["option"] for r in rows] == [
        "float32 (reference)",
        "int8",
        "4 proposals, PCA 8, int8",
    ]
    ref, int8, small = rows
    # one RPA field (max: the one reranking reads, RETRIEVAL.STORE) x 16 proposals (tiny
    # config) x dims x bytes per value
    props = tiny_cfg("EfficientNet-Lite0").MODEL.RETRIEVAL.NUM_PROPOSALS
    dim = EFFICIENTNET_LITE0_CHANNELS
    assert ref["rpa_bytes"] == props * dim * 4
    assert int8["rpa_bytes"] == props * dim * 1
    assert small["rpa_bytes"] == 4 * 8 * 1
    # region compression leaves the filtering vectors alone
    assert ref["filtering_mAP"] == int8["filtering_mAP"] == small["filtering_mAP"] > 0
    # int8 codes keep every cosine within about 1%: the CA-SR ranking of 8 images barely moves
    assert abs(int8["ca_sr_mAP"] - ref["ca_sr_mAP"]) <= 0.02
    table = {r["region features"]: r for r in _table(out, "region features")}
    ratio = ref["bytes_per_image"] / int8["bytes_per_image"]
    assert table["int8"]["smaller than float32"] == f"{ratio:.1f}x"


def _conv_flops(module, image):
    """2 x multiply-adds of every convolution, counted with forward hooks."""
    total = []

    def hook(conv, inputs, output):
        k = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
        total.append(2 * output.numel() * k)

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        module(image)
    for h in handles:
        h.remove()
    return sum(total)


def test_limits_quick(capsys, tmp_path):
    _run(capsys, ["limits", "--quick", "--output-dir", str(tmp_path)])
    res = json.loads((tmp_path / "limits.json").read_text())["results"]
    assert res["search_bytes"] == 2000 * 1280 * 4  # the --quick exact-search database
    assert res["image"] == [96, 128]  # --quick: 96 px, 3:4
    # fvcore's count of the backbone = its convolutions' multiply-adds (frozen BN and ReLU6 are
    # not counted), worked out here on the tiny model
    backbone = tiny_model("EfficientNet-Lite0").backbone
    flops = _conv_flops(backbone, torch.rand(1, 3, 96, 128) * 255)
    assert res["backbone_gflop_per_image"] == pytest.approx(flops / 1e9, rel=1e-3)
    assert res["sgemm_gflops"] > 0 and res["copy_gbs"] > 0 and res["sum_gbs"] > 0
