"""Every YAML under configs/ merges into a retrieval_ext config and builds a model."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from retrieval_ext.config import add_retrieval_config
from retrieval_ext.modeling import RetrievalRCNN
from tests.common import CONFIGS

ALL_YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml"))


def _load(path):
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_there_are_configs_for_every_backbone():
    names = {p.name for p in ALL_YAMLS}
    for backbone in ["R50-C4", "R50-FPN", "VGG16", "ZF", "EfficientNet-Lite0"]:
        assert f"Base-{backbone}.yaml" in names
        assert f"{backbone}-tiny.yaml" in names


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_merges_and_builds(path):
    cfg = _load(path)
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
