"""VGG16 conv body (conv1_1 ... conv5_3) as a detectron2 backbone, and torchvision weight loading.

This is the network of the paper's VGG16 Faster R-CNN: thirteen 3x3 convolutions with ReLU, a 2x2
max-pool after conv1_2, conv2_2, conv3_3 and conv4_3, and no pool5, so conv5_3 (the paper's
"last conv layer", 512 channels) has stride 16. The box head of that model (fc6, fc7: 4096, 4096
on 512x7x7 RoI-pooled features) is detectron2's ``FastRCNNConvFCHead`` with ``NUM_FC=2``,
``FC_DIM=4096``; its parameters are ``roi_heads.box_head.fc1.*`` / ``fc2.*``.

Parameters are named after the Caffe layers (``conv1_1.weight`` ... ``conv5_3.bias``) so that
fine-tuning strategies can freeze by name ("the first two conv stages" = ``conv1_*``, ``conv2_*``).

Pooling uses PyTorch's floor rounding (torchvision), not Caffe's ceil rounding: with inputs padded
to a multiple of 16 (``size_divisibility``) the two agree, and the output of every ``convX_Y`` is
exactly ``H / 2**(X-1)`` by ``W / 2**(X-1)``.
"""

import torch.nn as nn
import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .common import check_rgb_input, freeze_by_prefix

__all__ = ["VGG16", "build_vgg16_backbone", "convert_torchvision_vgg16", "VGG16_LAYER_NAMES"]

# (output channels, number of 3x3 convs) of each of the five conv stages.
_VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

# ("conv1_1", ...), in forward order.
VGG16_LAYER_NAMES = tuple(
    f"conv{stage}_{i}"
    for stage, (_, depth) in enumerate(_VGG16_STAGES, start=1)
    for i in range(1, depth + 1)
)


class VGG16(Backbone):
    """The conv layers of VGG16, up to the deepest requested output.

    Every ``convX_Y`` output is taken after its ReLU (as Caffe's in-place ReLU leaves it), has
    stride ``2**(X-1)`` with respect to the network input and the channel count of stage X.
    """

    def __init__(self, out_features=("conv5_3",), freeze_at=0):
        """
        Args:
            out_features (list[str]): names of the layers to return, any of ``VGG16_LAYER_NAMES``.
            freeze_at (int): 0 = nothing frozen; k in 1..5 = the parameters of conv stages 1..k
                (``conv1_*`` ... ``convk_*``) get ``requires_grad=False``.
        """
        super().__init__()
        unknown = [name for name in out_features if name not in VGG16_LAYER_NAMES]
        if unknown or not out_features:
            raise ValueError(f"VGG16 out_features must be among {VGG16_LAYER_NAMES}, got {unknown}")
        self._out_features = list(out_features)
        last = max(VGG16_LAYER_NAMES.index(name) for name in out_features)

        self._out_feature_strides = {}
        self._out_feature_channels = {}
        # (layer name, whether a 2x2 max-pool follows it)
        self._layers = []
        in_channels = 3
        for stage, (channels, depth) in enumerate(_VGG16_STAGES, start=1):
            for i in range(1, depth + 1):
                name = f"conv{stage}_{i}"
                if VGG16_LAYER_NAMES.index(name) > last:
                    break
                conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
                # torchvision's VGG initialisation, so a randomly initialised body trains the same
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                self.add_module(name, conv)
                pool_after = i == depth and stage < len(_VGG16_STAGES)
                self._layers.append((name, pool_after))
                self._out_feature_strides[name] = 2 ** (stage - 1)
                self._out_feature_channels[name] = channels
                in_channels = channels
        self.freeze(freeze_at)

    def freeze(self, freeze_at=0):
        """Stop gradients for conv stages 1..freeze_at.

        Args:
            freeze_at (int): number of leading conv stages to freeze (0..5).

        Returns:
            VGG16: self.
        """
        if not 0 <= freeze_at <= len(_VGG16_STAGES):
            raise ValueError(f"freeze_at must be in 0..{len(_VGG16_STAGES)}, got {freeze_at}")
        frozen = tuple(f"conv{stage}_" for stage in range(1, freeze_at + 1))
        return freeze_by_prefix(self, frozen)

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, 3, H, W) normalised images.

        Returns:
            dict[str, Tensor]: for each name in ``out_features``, the (N, C, H/s, W/s) map after
            ReLU, s being its stride (floor division when H, W are not multiples of s).
        """
        outputs = {}
        for name, pool_after in self._layers:
            x = F.relu(getattr(self, name)(x), inplace=True)
            if name in self._out_features:
                outputs[name] = x
            if pool_after:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        return outputs

    @property
    def size_divisibility(self):
        # padding inputs to the conv5 stride makes every pooled map exact
        return 16


@BACKBONE_REGISTRY.register()
def build_vgg16_backbone(cfg, input_shape):
    """Build the VGG16 conv body from ``MODEL.VGG.OUT_FEATURES`` and ``MODEL.BACKBONE.FREEZE_AT``.

    Args:
        cfg (CfgNode): a config with :func:`retrieval_ext.config.add_retrieval_config` keys.
        input_shape (ShapeSpec): must have 3 channels.

    Returns:
        VGG16: the backbone.
    """
    check_rgb_input("VGG16", input_shape)
    return VGG16(out_features=cfg.MODEL.VGG.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _torchvision_vgg16_conv_indices():
    """Index in torchvision's ``vgg16().features`` of each conv, keyed by our layer name."""
    indices = {}
    index = 0
    for stage, (_, depth) in enumerate(_VGG16_STAGES, start=1):
        for i in range(1, depth + 1):
            indices[f"conv{stage}_{i}"] = index
            index += 2  # conv, ReLU
        index += 1  # max-pool
    return indices


def convert_torchvision_vgg16(state_dict):
    """Rename a torchvision ``vgg16()`` state dict to a detectron2 VGG16 Faster R-CNN's names.

    ``features.{i}`` convs become ``backbone.convX_Y``; ``classifier.0`` (fc6) and
    ``classifier.3`` (fc7) become ``roi_heads.box_head.fc1`` / ``fc2`` (both take the flattened
    512x7x7 map in (C, H, W) order, as detectron2's box head flattens it); the 1000-way
    ``classifier.6`` is dropped.

    Args:
        state_dict (dict[str, Tensor]): torchvision VGG16 (without batch norm) parameters.

    Returns:
        dict[str, Tensor]: the same tensors under detectron2 names.

    Raises:
        ValueError: if a key is not one of torchvision's VGG16 keys (e.g. a ``vgg16_bn`` dict).
    """
    renames = {}
    for name, index in _torchvision_vgg16_conv_indices().items():
        for kind in ("weight", "bias"):
            renames[f"features.{index}.{kind}"] = f"backbone.{name}.{kind}"
    for index, fc in ((0, "fc1"), (3, "fc2")):
        for kind in ("weight", "bias"):
            renames[f"classifier.{index}.{kind}"] = f"roi_heads.box_head.{fc}.{kind}"
    dropped = {"classifier.6.weight", "classifier.6.bias"}
    unknown = sorted(k for k in state_dict if k not in renames and k not in dropped)
    if unknown:
        raise ValueError(f"Not a torchvision VGG16 state dict; unexpected keys: {unknown[:5]}")
    return {renames[k]: v for k, v in state_dict.items() if k in renames}
