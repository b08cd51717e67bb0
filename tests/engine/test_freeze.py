"""The fine-tuning strategies train exactly the parameters the paper's description names.

The expected sets are written out here by hand from the architectures (layer names and how many
weight tensors each block has), not computed by the code under test.
"""

import logging

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from retrieval_ext.engine.freeze import STRATEGIES, apply_freeze, trainable_parameter_names
from tests.common import tiny_cfg

RPN = [
    f"proposal_generator.rpn_head.{layer}.{kind}"
    for layer in ("conv", "objectness_logits", "anchor_deltas")
    for kind in ("weight", "bias")
]
PREDICTOR = [
    f"roi_heads.box_predictor.{layer}.{kind}"
    for layer in ("cls_score", "bbox_pred")
    for kind in ("weight", "bias")
]
BOX_HEAD_FC = [
    f"roi_heads.box_head.{fc}.{kind}" for fc in ("fc1", "fc2") for kind in ("weight", "bias")
]


def _conv_params(layers):
    return [f"backbone.{name}.{kind}" for name in layers for kind in ("weight", "bias")]


VGG_LATE = ["conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3"]
VGG_LATE += ["conv5_1", "conv5_2", "conv5_3"]

# Exact trainable lists for the backbones whose parameters are few enough to write out.
EXACT = {
    ("ZF", "ft1"): BOX_HEAD_FC + PREDICTOR,
    ("ZF", "ft2"): _conv_params(["conv3", "conv4", "conv5"]) + RPN + BOX_HEAD_FC + PREDICTOR,
    ("VGG16", "ft1"): BOX_HEAD_FC + PREDICTOR,
    ("VGG16", "ft2"): _conv_params(VGG_LATE) + RPN + BOX_HEAD_FC + PREDICTOR,
    ("R50-C4", "ft1"): PREDICTOR,
    ("R50-FPN", "ft1"): BOX_HEAD_FC + PREDICTOR,
    ("EfficientNet-Lite0", "ft1"): BOX_HEAD_FC + PREDICTOR,
}

# ResNet / EfficientNet ft2: (trainable prefixes, frozen prefixes, number of trainable tensors).
# R50 convs carry no bias (FrozenBN follows them) and FrozenBN has only buffers: a bottleneck
# block has 3 conv weights, the first block of a stage one more (the shortcut). res3 has 4
# blocks (13 tensors), res4 6 (19), res5 3 (10).
# EfficientNet-Lite0: BN is frozen (buffers), no SE; an MBConv block has 3 conv weights
# (expand, depthwise, project): blocks.2 (2 blocks) 6, blocks.3 (3) 9, blocks.4 (3) 9,
# blocks.5 (4) 12, blocks.6 (1) 3, conv_head 1 = 40. Its proposals are the dense regions of the
# base config, which have no parameters: no proposal_generator entry (with PROPOSAL_GENERATOR
# "RPN", as configs/synthetic, the RPN's 6 tensors learn too).
FPN_LAYERS = [
    f"backbone.fpn_{kind}{level}." for kind in ("lateral", "output") for level in (2, 3, 4, 5)
]
PREFIXES = {
    ("R50-C4", "ft2"): (
        ["backbone.res3.", "backbone.res4.", "proposal_generator.", "roi_heads.res5."]
        + ["roi_heads.box_predictor."],
        ["backbone.stem.", "backbone.res2."],
        13 + 19 + 6 + 10 + 4,
    ),
    ("R50-FPN", "ft2"): (
        ["backbone.bottom_up.res3.", "backbone.bottom_up.res4.", "backbone.bottom_up.res5."]
        + FPN_LAYERS
        + ["proposal_generator.", "roi_heads.box_head.", "roi_heads.box_predictor."],
        ["backbone.bottom_up.stem.", "backbone.bottom_up.res2."],
        13 + 19 + 10 + 16 + 6 + 4 + 4,
    ),
    ("EfficientNet-Lite0", "ft2"): (
        [f"backbone.blocks.{i}." for i in range(2, 7)]
        + ["backbone.conv_head.", "roi_heads.box_head.", "roi_heads.box_predictor."],
        ["backbone.conv_stem.", "backbone.blocks.0.", "backbone.blocks.1."],
        40 + 4 + 4,
    ),
    ("EfficientNet-Lite0-RPN", "ft2"): (
        [f"backbone.blocks.{i}." for i in range(2, 7)]
        + ["backbone.conv_head.", "proposal_generator.", "roi_heads.box_head."]
        + ["roi_heads.box_predictor."],
        ["backbone.conv_stem.", "backbone.blocks.0.", "backbone.blocks.1."],
        40 + 6 + 4 + 4,
    ),
}


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            if name.endswith("-RPN"):  # the tiny config with the RPN instead of dense regions
                cfg = tiny_cfg(name[: -len("-RPN")], ["MODEL.PROPOSAL_GENERATOR.NAME", "RPN"])
            else:
                cfg = tiny_cfg(name)
            built[name] = build_model(cfg)
        return built[name]

    return get


@pytest.mark.parametrize("backbone, strategy", sorted(EXACT), ids=lambda x: str(x))
def test_exact_trainable_lists(models, backbone, strategy):
    names = trainable_parameter_names(models(backbone), strategy)
    assert sorted(names) == sorted(EXACT[(backbone, strategy)])


@pytest.mark.parametrize("backbone, strategy", sorted(PREFIXES), ids=lambda x: str(x))
def test_ft2_trains_everything_after_the_first_two_stages(models, backbone, strategy):
    trainable, frozen, count = PREFIXES[(backbone, strategy)]
    model = models(backbone)
    names = trainable_parameter_names(model, strategy)
    assert len(names) == count
    all_names = [n for n, _ in model.named_parameters()]
    for n in all_names:
        # every parameter is accounted for by exactly one of the hand-written prefix lists
        in_trainable = n.startswith(tuple(trainable))
        in_frozen = n.startswith(tuple(frozen))
        assert in_trainable != in_frozen, n
        assert (n in names) == in_trainable, n
    # and every hand-written prefix names at least one parameter
    for prefix in trainable + frozen:
        assert any(n.startswith(prefix) for n in all_names), prefix


def test_custom_patterns_are_anchored_regexes(models):
    model = models("ZF")
    names = trainable_parameter_names(model, "custom", [r"roi_heads\.box_predictor\.cls_score\."])
    assert names == [
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
    ]
    # re.match: "fc1" alone does not match "roi_heads.box_head.fc1.weight"
    with pytest.raises(ValueError, match="match no parameter"):
        trainable_parameter_names(model, "custom", ["fc1"])
    with pytest.raises(ValueError, match="needs MODEL.FINETUNE.TRAINABLE"):
        trainable_parameter_names(model, "custom", [])
    with pytest.raises(ValueError, match="unknown MODEL.FINETUNE.STRATEGY"):
        trainable_parameter_names(model, "ft3")
    assert set(STRATEGIES) == {"none", "ft1", "ft2", "custom"}


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_apply_freeze_sets_requires_grad_and_logs_the_list():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("ZF"))
    # FREEZE_AT 2 froze conv1/conv2 at build time: "none" keeps exactly that
    assert apply_freeze(model, "none") == [
        n
        for n, _ in model.named_parameters()
        if not n.startswith(("backbone.conv1.", "backbone.conv2."))
    ]
    handler = _ListHandler()
    logger = logging.getLogger("retrieval_ext")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        names = apply_freeze(model, "ft1")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert sorted(names) == sorted(BOX_HEAD_FC + PREDICTOR)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(names)
    log = "\n".join(handler.messages)
    assert "'ft1'" in log and all(n in log for n in names)
    assert "backbone.conv3.weight" not in log
    # a later ft2 re-enables conv3..conv5 and the RPN
    apply_freeze(model, "ft2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(EXACT[("ZF", "ft2")])


def test_batchnorm_without_trainable_parameters_is_frozen():
    """With plain BN (RESNETS.NORM "BN"), a BN whose parameters ft1/ft2 freeze becomes a frozen
    BN: its statistics stay put in training mode; BN in trainable stages keeps learning."""
    torch.manual_seed(0)
    cfg = tiny_cfg("R50-C4", ["MODEL.RESNETS.NORM", "BN"])
    model = build_model(cfg)
    keys_before = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    apply_freeze(model, "ft2")
    bn = {n for n, m in model.named_modules() if type(m) is torch.nn.BatchNorm2d}
    assert bn and all(
        n.startswith(("backbone.res3.", "backbone.res4.", "roi_heads.res5.")) for n in bn
    )
    apply_freeze(model, "ft1")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # checkpoints keep loading: the same tensors under the same names
    assert {k for k in model.state_dict() if not k.endswith("num_batches_tracked")} == keys_before

    buffers = {k: v.clone() for k, v in model.backbone.named_buffers()}
    model.train()
    with torch.no_grad():
        model.backbone(torch.randn(2, 3, 64, 64))
    for k, v in model.backbone.named_buffers():
        assert torch.equal(v, buffers[k]), k
