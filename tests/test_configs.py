"""Every YAML under configs/ merges into a retrieval_ext config and builds a model on the device
this machine has."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from retrieval_ext.config import DeviceUnavailableError, add_retrieval_config, check_device
from retrieval_ext.modeling import RetrievalRCNN
from tests.common import CONFIGS, REPO_ROOT, ZF_TINY, make_cfg, write_benchmark

ALL_YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml"))


def test_there_are_configs_for_every_backbone():
    names = {p.name for p in ALL_YAMLS}
    for backbone in ["R50-C4", "R50-FPN", "VGG16", "ZF", "EfficientNet-Lite0"]:
        assert f"Base-{backbone}.yaml" in names
        assert f"{backbone}-tiny.yaml" in names


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_merges_and_builds(path):
    """...with no device override: a config that names no device runs where it is loaded."""
    cfg = make_cfg(path, freeze=False)
    assert check_device(cfg) in ("cpu", "cuda")
    assert cfg.MODEL.DEVICE == "cpu" or torch.cuda.is_available()
    if cfg.MODEL.META_ARCHITECTURE != "RetrievalRCNN":
        pytest.fail(f"{path} does not use RetrievalRCNN")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, RetrievalRCNN)
    shapes = model.backbone.output_shape()
    assert set(cfg.MODEL.RETRIEVAL.IPA_FEATURES) <= set(shapes)


def test_unknown_key_is_rejected():
    cfg = get_cfg()
    add_retrieval_config(cfg)
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.RETRIEVAL.NUM_PROPOSAL"):
        cfg.merge_from_list(["MODEL.RETRIEVAL.NUM_PROPOSAL", 10])


def test_config_key_typo_is_detectron2s_error(tmp_path):
    # yacs' own messages, naming the key (command-line opts: an AssertionError)
    with pytest.raises(AssertionError, match="Non-existent key: RETRIEVAL.TOPN"):
        make_cfg(ZF_TINY, ["RETRIEVAL.TOPN", "5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{ZF_TINY}"\nRETRIEVAL:\n  SHARDSIZE: 2\n')
    with pytest.raises(KeyError, match="Non-existent config key: RETRIEVAL.SHARDSIZE"):
        make_cfg(bad)


# ----------------------------------------------------------------------------------------------
# MODEL.DEVICE: picked when not given, refused in one line when CUDA is asked for without it
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda", [False, True])
def test_device_defaults_to_what_the_machine_has(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "Base-EfficientNet-Lite0.yaml"))
    assert cfg.MODEL.DEVICE == ("cuda" if cuda else "cpu")


def test_cuda_asked_without_cuda_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(DeviceUnavailableError, match=r"MODEL\.DEVICE.*MODEL\.DEVICE cpu") as e:
        check_device(cfg)
    assert "\n" not in str(e.value)
    cfg.MODEL.DEVICE = "cpu"
    assert check_device(cfg) == "cpu"


def test_api_refuses_cuda_without_cuda_before_loading(monkeypatch, tmp_path):
    from retrieval_ext.retrieval.api import InstanceSearch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # no index exists under OUTPUT_DIR: the device is checked first
    with pytest.raises(DeviceUnavailableError, match="MODEL.DEVICE"):
        InstanceSearch.from_config_file(
            str(CONFIGS / "Base-EfficientNet-Lite0.yaml"),
            ["MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(tmp_path)],
        )


def test_tool_runs_a_shipped_config_without_device_override(tmp_path):
    """tools/retrieve.py with configs/Base-EfficientNet-Lite0.yaml on a machine without CUDA
    (CUDA hidden): indexes on the CPU; asking for cuda stops with one line, no traceback."""
    write_benchmark(tmp_path / "synthetic", num_instances=2, queries_per_instance=1, num_db=3)
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(tmp_path),
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="ignore",
    )
    base = [
        sys.executable, str(REPO_ROOT / "tools" / "retrieve.py"), "index",
        "--config-file", str(CONFIGS / "Base-EfficientNet-Lite0.yaml"),
        "RETRIEVAL.DATASET", "synthetic", "INPUT.MIN_SIZE_TEST", "96",
        "MODEL.RETRIEVAL.NUM_PROPOSALS", "10", "MODEL.RPN.POST_NMS_TOPK_TEST", "10",
    ]  # fmt: skip
    ok = subprocess.run(
        base + ["OUTPUT_DIR", str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out" / "index" / "manifest.json").is_file()
    assert "running on MODEL.DEVICE cpu" in (tmp_path / "out" / "log.txt").read_text()
    bad = subprocess.run(
        base + ["OUTPUT_DIR", str(tmp_path / "bad"), "MODEL.DEVICE", "cuda"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "MODEL.DEVICE" in lines[0] and "MODEL.DEVICE cpu" in lines[0]
