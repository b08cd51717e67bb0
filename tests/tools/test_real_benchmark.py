"""tools/benchmark.py real: the real-photo benchmark on a tiny generated collection whose photos
are grouped in two "camera" folders; its mAP recomputed here from the saved rankings and the
judgements of the split's photos, its targets checked against its own numbers."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.common import REPO_ROOT, ZF_TINY, load_strict_json, write_benchmark, written_out_ap
from tools.benchmarks.real_photos import load_baseline, split_groups, targets

TOP_N, QE_M = 4, 2


def _regroup(root):
    """Move db_XXXXX.jpg into images/camA (even numbers) and images/camB (odd ones); judgements
    follow. Returns the judgements (with boxes); the collection's own relevance.json loses its
    boxes (they come from --boxes, as SMVS's from datasets/smvs_dvd_boxes.json)."""
    moved = {}
    for name in sorted(os.listdir(root / "images")):
        group = "camA" if int(name[3:8]) % 2 == 0 else "camB"
        os.makedirs(root / "images" / group, exist_ok=True)
        shutil.move(root / "images" / name, root / "images" / group / name)
        moved[f"images/{name}"] = f"images/{group}/{name}"
    relevance = json.loads((root / "relevance.json").read_text())
    for entry in relevance.values():
        for key in ("positives", "junk"):
            entry[key] = [moved[p] for p in entry.get(key, [])]
        entry["boxes"] = {moved[p]: b for p, b in entry.get("boxes", {}).items()}
    plain = {o: {k: v for k, v in e.items() if k != "boxes"} for o, e in relevance.items()}
    (root / "relevance.json").write_text(json.dumps(plain))
    return relevance


@pytest.fixture(scope="module")
def bench(tmp_path_factory, zf):
    tmp = tmp_path_factory.mktemp("real")
    root = tmp / "photos"
    write_benchmark(root, num_instances=2, queries_per_instance=2, num_db=12, seed=3)
    relevance = _regroup(root)
    (tmp / "boxes.json").write_text(json.dumps(relevance))
    out = tmp / "out"
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "benchmark.py"), "real", "--data", root]
    cmd += ["--boxes", tmp / "boxes.json", "--split", "val", "--val-groups", "camA"]
    cmd += ["--config-file", ZF_TINY]
    cmd += ["--weights", zf["weights"], "--output-dir", out]
    cmd += ["RETRIEVAL.TOP_N", TOP_N, "RETRIEVAL.QE_M", QE_M]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [str(c) for c in cmd], env=env, cwd=tmp, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        "root": root,
        "relevance": relevance,
        "out": out / "val",
        "log": proc.stdout,
        "progress": proc.stderr,
    }


def test_outputs_and_split(bench):
    out = bench["out"]
    for name in ("config.yaml", "log.txt", "rankings.npz", "real_photos.md", "index/manifest.json"):
        assert (out / name).is_file(), name
    report = load_strict_json(out / "real_photos.json")
    assert (report["split"], report["groups"]) == ("val", ["camA"])
    assert report["num_images"] == 6  # db 0, 2, ..., 10
    assert report["num_queries"] == 4
    # the view's judgements: only camA photos, with the boxes of --boxes
    view = json.loads((out / "data" / "real_val" / "relevance.json").read_text())
    for obj, entry in view.items():
        expected = [p for p in bench["relevance"][obj]["positives"] if "/camA/" in p]
        assert entry["positives"] == expected
        assert set(entry["boxes"]) <= set(expected)
    # progress shown: the indexing, query and search bars
    for bar in ("indexing real_val_db", "queries real_val", "searching"):
        assert bar in bench["progress"], bar


def test_table_is_the_map_of_the_split_recomputed(bench):
    import numpy as np

    out = bench["out"]
    report = load_strict_json(out / "real_photos.json")
    raw = load_strict_json(out / "retrieval_results.json")
    rk = np.load(out / "rankings.npz")
    queries = json.loads((bench["root"] / "queries.json").read_text())
    stages = {"filtering", "filtering_qe", "ca_sr", "ca_sr_qe", "cs_sr", "cs_sr_qe"}
    assert set(report["results"]) == stages  # CS-SR off the shelf: the query-set classifier
    for stage, row in report["results"].items():
        aps = []
        for qi, qd in enumerate(queries):
            entry = bench["relevance"][qd["object"]]
            pos = {os.path.splitext(p)[0] for p in entry["positives"] if "/camA/" in p}
            junk = {os.path.splitext(p)[0] for p in entry.get("junk", []) if "/camA/" in p}
            aps.append(written_out_ap(list(rk[f"{stage}/image_ids"][qi]), pos, junk))
        assert row["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-7), stage
        assert row["mAP"] == pytest.approx(100 * raw[stage]["mAP"])
        if "sr" in stage:  # the reranking stages locate the object
            assert row["mean_iou"] == pytest.approx(raw[stage]["mean_iou"])
            assert 0 <= row["frac_iou@0.5"] <= 1
        else:
            assert row["mean_iou"] is None
    # the printed table and target lines
    log = bench["log"]
    ca = report["results"]["ca_sr"]["mAP"]
    assert "| CA-SR " in log and f"{ca:.2f}" in log
    lines = {r["target"]: r for r in report["targets"]}
    never_below = lines["CA-SR + QE never below CA-SR (mAP)"]
    assert never_below["passed"] == (report["results"]["ca_sr_qe"]["mAP"] >= ca)
    verdict = "PASS" if never_below["passed"] else "FAIL"
    assert f"[{verdict}] CA-SR + QE never below CA-SR (mAP)" in log
    assert lines["fine-tuned CS-SR + QE >= 75 mAP"]["passed"] is None  # off the shelf: n/a


def test_split_groups_and_bad_requests(bench):
    root = str(bench["root"])
    assert split_groups(root, "val", "camA", "") == ["camA"]
    assert split_groups(root, "report", "camA", "") == ["camB"]  # every other group
    assert split_groups(root, "all", "camA", "") is None
    with pytest.raises(ValueError, match=r"unknown: \['droid'\].*\['camA', 'camB'\]"):
        split_groups(root, "val", "droid", "")


def test_targets_worked_out():
    off = {
        "filtering": {"mAP": 25.0},
        "ca_sr": {"mAP": 44.0, "mean_iou": 0.64},
        "ca_sr_qe": {"mAP": 45.4, "mean_iou": 0.63},
    }
    rows = {r["target"]: r["passed"] for r in targets(off, ca_sr_qe_drops=3)}
    # an off-the-shelf run's CS-SR (the query-set classifier) is not judged by the targets
    with_cs = dict(off, cs_sr={"mAP": 80.0, "mean_iou": 0.7}, cs_sr_qe={"mAP": 80.0})
    off_cs = {r["target"]: r["passed"] for r in targets(with_cs, fine_tuned=False)}
    assert off_cs["fine-tuned CS-SR + QE >= 75 mAP"] is None
    assert off_cs["CS-SR localisation mean IoU >= 0.6 (true positives in the top 10)"] is None
    assert off_cs["off-the-shelf CA-SR + QE >= 50 mAP"] is False
    assert rows["off-the-shelf CA-SR + QE >= 50 mAP"] is False
    assert rows["CA-SR + QE never below CA-SR (mAP)"] is True
    assert rows["fine-tuned CS-SR + QE >= 75 mAP"] is None
    assert rows["fine-tuned best stage > off-the-shelf best stage (mAP)"] is None
    ft = dict(off, cs_sr={"mAP": 66.0, "mean_iou": 0.62}, cs_sr_qe={"mAP": 76.0})
    ft["ca_sr_qe"] = {"mAP": 40.0}
    lines = {r["target"]: r for r in targets(ft, baseline=off, fine_tuned=True)}
    rows = {t: r["passed"] for t, r in lines.items()}
    best = lines["fine-tuned best stage > off-the-shelf best stage (mAP)"]
    assert best["note"] == "off the shelf: 45.400"  # its best stage, CA-SR + QE, 3 decimals
    assert rows["off-the-shelf CA-SR + QE >= 50 mAP"] is None  # a fine-tuned model
    assert rows["CA-SR + QE never below CA-SR (mAP)"] is False
    assert rows["fine-tuned CS-SR + QE >= 75 mAP"] is True
    assert rows["CS-SR localisation mean IoU >= 0.6 (true positives in the top 10)"] is True
    assert rows["fine-tuned best stage > off-the-shelf best stage (mAP)"] is True  # 76 > 45.4


def test_baseline_must_be_an_off_the_shelf_run_on_the_same_split(tmp_path):
    off = {"filtering": {"mAP": 25.0}, "ca_sr": {"mAP": 44.0}}

    def write(name, **report):
        (tmp_path / name).write_text(json.dumps(report))
        return str(tmp_path / name)

    good = write("good.json", split="report", groups=["canon", "e63"], results=off)
    assert load_baseline(good, "report", ["canon", "e63"]) == off
    # the validation run's numbers must not judge a report run (nor other cameras)
    with pytest.raises(ValueError, match=r"val\.json: measured on split 'val'"):
        load_baseline(write("val.json", split="val", groups=["droid"], results=off), "report", [])
    with pytest.raises(ValueError, match="groups"):
        load_baseline(good, "report", ["canon"])
    tuned = dict(off, cs_sr={"mAP": 60.0})
    ft = write("ft.json", split="report", groups=["canon", "e63"], results=tuned)
    with pytest.raises(ValueError, match=r"ft\.json: a fine-tuned run"):
        load_baseline(ft, "report", ["canon", "e63"])  # written before "fine_tuned" was
    ft = write("ft2.json", split="report", groups=["canon", "e63"], results=off, fine_tuned=True)
    with pytest.raises(ValueError, match=r"ft2\.json: a fine-tuned run"):
        load_baseline(ft, "report", ["canon", "e63"])
    # an off-the-shelf run with CS-SR from the query-set classifier is a baseline
    off_cs = write(
        "off_cs.json", split="report", groups=["canon", "e63"], results=tuned, fine_tuned=False
    )
    assert load_baseline(off_cs, "report", ["canon", "e63"]) == tuned
    with pytest.raises(ValueError, match=r"bad\.json: no 'results'"):
        load_baseline(write("bad.json", split="report"), "report", ["canon", "e63"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: cannot read"):
        load_baseline(str(tmp_path / "broken.json"), "report", ["canon", "e63"])
    with pytest.raises(ValueError, match="missing.json"):
        load_baseline(str(tmp_path / "missing.json"), "report", ["canon", "e63"])
