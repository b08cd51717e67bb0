"""tools/demo.py's bookkeeping: the benchmark seed, one output dir per benchmark, and the report
cells over training seeds (mean and sample standard deviation, worked out by hand)."""

import importlib.util
import json

import pytest

from tests.common import REPO_ROOT


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_seed_sets_only_the_benchmark(demo):
    params = demo.data_params("full", 1)
    assert params["synthetic"]["seed"] == 1
    assert params["synthetic_whiten"] == demo.DATA["full"]["synthetic_whiten"]
    assert demo.DATA["full"]["synthetic"]["seed"] == 0  # the table itself is not changed


def test_benchmark_seed_of_the_whitening_set_is_refused(demo):
    with pytest.raises(SystemExit, match="synthetic_whiten"):
        demo.data_params("full", demo.WHITEN_SEED)


def test_output_dir_of_another_benchmark_seed_is_refused(demo, tmp_path):
    demo.claim_output_dir(tmp_path, 1)
    demo.claim_output_dir(tmp_path, 1)  # the same seed again: fine
    with pytest.raises(SystemExit, match="benchmark seed 1, not 0"):
        demo.claim_output_dir(tmp_path, 0)


def test_run_dirs_keep_the_seed_0_names(demo):
    assert demo.run_dir("ft1", 0) == "ft1"
    assert demo.run_dir("ft2", 3) == "ft2_seed3"


def test_summarise_gives_mean_and_sample_std(demo):
    # 0.5, 0.6, 0.7: mean 0.6, squared deviations 0.01 + 0 + 0.01 over n - 1 = 2 -> std 0.1
    mean, std = demo.summarise([0.5, None, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert demo.summarise([0.4]) == (0.4, None)
    assert demo.summarise([None]) == (None, None)


def test_report_with_two_seeds(demo, tmp_path):
    def res(filtering, cs_sr=None):
        out = {"filtering": {"mAP": filtering}}
        if cs_sr is not None:
            out["cs_sr"] = {"mAP": cs_sr, "mean_iou": 0.5}
        return out

    table = {
        "off_the_shelf": {0: res(0.3)},
        "ft1": {0: res(0.3, 0.4), 1: res(0.3, 0.6)},
        "ft2": {0: res(0.2, 0.5), 1: res(0.4, 0.5)},
    }
    text = demo.write_report(tmp_path, table, {}, {}, 1.0, [0, 1], 0)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mAP"]["cs_sr"]["ft1"] == pytest.approx(0.5)
    # two values 0.4 and 0.6: deviations 0.1 each, sum of squares 0.02 over 1 -> std 0.1414
    assert report["mAP_std"]["cs_sr"]["ft1"] == pytest.approx(0.02**0.5)
    assert report["mAP_std"]["cs_sr"]["ft2"] == pytest.approx(0.0)
    assert report["mAP_std"]["filtering"]["off_the_shelf"] is None
    assert report["mAP_per_seed"]["filtering"]["ft2"] == {"0": 0.2, "1": 0.4}
    assert "| filtering | 30.0 | 30.0 +- 0.0 | 30.0 +- 14.1 |" in text
    assert "| cs_sr | - | 50.0 +- 14.1 | 50.0 +- 0.0 |" in text
    assert "NaN" not in (tmp_path / "report.json").read_text()
