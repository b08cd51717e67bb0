"""Smoke test of the main job (`make demo`) in its --quick variant: every step runs end to end.

The numbers of a 16-image benchmark trained for 3 iterations mean nothing; what is checked is
that each step produced its outputs and that the report is consistent with them.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.common import REPO_ROOT

STAGES = ["filtering", "filtering_qe", "ca_sr", "ca_sr_qe", "cs_sr", "cs_sr_qe"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--quick", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout


def test_every_model_is_evaluated_on_every_stage_that_applies(demo):
    out, _ = demo
    for model in ["off_the_shelf", "ft1", "ft2"]:
        results = json.loads((out / model / "retrieval_results.json").read_text())
        # CS-SR needs class scores for the query objects: only the fine-tuned models have them
        expected = STAGES if model != "off_the_shelf" else STAGES[:4]
        assert list(results) == expected, model
        assert (out / model / "visualization" / "index.html").is_file()
    assert (out / "generic_detector" / "model_final.pth").is_file()
    assert (out / "ft1_train" / "model_final.pth").is_file()
    assert (out / "ft2_train" / "model_final.pth").is_file()


def test_report_tables_match_the_per_model_results(demo):
    out, stdout = demo
    report = json.loads((out / "report.json").read_text())
    for model in ["off_the_shelf", "ft1", "ft2"]:
        results = json.loads((out / model / "retrieval_results.json").read_text())
        for stage in STAGES:
            assert report["mAP"][stage][model] == results.get(stage, {}).get("mAP")
    # ft1 freezes the backbone and the RPN: its image-wise and region features are the
    # off-the-shelf ones, so the stages that use only them give the same rankings
    for stage in ["filtering", "filtering_qe", "ca_sr", "ca_sr_qe"]:
        assert report["mAP"][stage]["ft1"] == pytest.approx(report["mAP"][stage]["off_the_shelf"])
    assert set(report["pooling_ablation"]) == {
        "filter sum / rerank max",
        "filter max / rerank max",
        "filter sum / rerank sum",
    }
    # the default pooling variant re-searches the off-the-shelf index: same numbers
    default = report["pooling_ablation"]["filter sum / rerank max"]
    assert default["filtering"] == report["mAP"]["filtering"]["off_the_shelf"]
    assert default["ca_sr"] == report["mAP"]["ca_sr"]["off_the_shelf"]
    html = (out / "report.html").read_text()
    for model in ["off_the_shelf", "ft1", "ft2"]:
        assert f"{model}/visualization/index.html" in html
    assert "| stage | off_the_shelf | ft1 | ft2 |" in stdout
