"""The Zeiler & Fergus (ZF) conv body of py-faster-rcnn's ZF model, as a detectron2 backbone.

Layers, as in py-faster-rcnn's ``models/pascal_voc/ZF`` prototxt (ReLU after every conv)::

    conv1 96 7x7 s2 p3 -> ReLU -> LRN -> max-pool 3x3 s2 p1      (conv1 stride 2)
    conv2 256 5x5 s2 p2 -> ReLU -> LRN -> max-pool 3x3 s2 p1     (conv2 stride 8)
    conv3 384 3x3 p1, conv4 384 3x3 p1, conv5 256 3x3 p1         (stride 16)

The LRN is Caffe's ``WITHIN_CHANNEL`` normalisation (local_size 3, alpha 5e-5, beta 0.75): each
activation is divided by ``(1 + alpha * mean of x**2 over its 3x3 spatial window)**beta``, the
mean counting zero padding at the borders as Caffe's average pooling does. It is not
``torch.nn.LocalResponseNorm``, which normalises across channels.

Output "conv5" (after ReLU) has 256 channels and stride 16: the paper's "last conv layer" for ZF.
Pooling uses PyTorch's floor rounding, so conv5 is exactly ``ceil(H / 16)`` by ``ceil(W / 16)``
for any input (Caffe's ceil rounding adds one row/column for some sizes).

Box head choice: the original ZF model RoI-pools conv5 to 256x6x6 before fc6/fc7 (4096, 4096);
here the box head is detectron2's ``FastRCNNConvFCHead`` (``NUM_FC=2``, ``FC_DIM=4096``) on 7x7
RoI pooling, the same pooler resolution as VGG16, so both backbones share one head config.
"""

import torch.nn as nn
import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .common import check_rgb_input, freeze_by_prefix

__all__ = ["ZF", "WithinChannelLRN", "build_zf_backbone", "ZF_LAYER_NAMES"]

ZF_LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")

# name: (out channels, kernel, stride, padding, followed by LRN + max-pool, output stride)
_ZF_LAYERS = {
    "conv1": (96, 7, 2, 3, True, 2),
    "conv2": (256, 5, 2, 2, True, 8),
    "conv3": (384, 3, 1, 1, False, 16),
    "conv4": (384, 3, 1, 1, False, 16),
    "conv5": (256, 3, 1, 1, False, 16),
}


class WithinChannelLRN(nn.Module):
    """Caffe's ``LRN`` layer with ``norm_region: WITHIN_CHANNEL``.

    ``y = x / (1 + alpha * avg_{k x k window}(x**2)) ** beta``, the average over a k x k window
    centred on each position, zero padded, always dividing by k*k.
    """

    def __init__(self, local_size=3, alpha=5e-5, beta=0.75):
        """
        Args:
            local_size (int): odd side of the square window.
            alpha (float): scale of the windowed mean of squares.
            beta (float): exponent.
        """
        super().__init__()
        if local_size % 2 != 1:
            raise ValueError(f"local_size must be odd, got {local_size}")
        self.local_size = local_size
        self.alpha = alpha
        self.beta = beta

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, C, H, W).

        Returns:
            Tensor: (N, C, H, W), normalised.
        """
        mean_sq = F.avg_pool2d(
            x * x,
            kernel_size=self.local_size,
            stride=1,
            padding=self.local_size // 2,
            count_include_pad=True,
        )
        return x / (1.0 + self.alpha * mean_sq).pow(self.beta)

    def extra_repr(self):
        return f"local_size={self.local_size}, alpha={self.alpha}, beta={self.beta}"


class ZF(Backbone):
    """The ZF conv body, up to the deepest requested output.

    Parameters are named ``conv1.weight`` ... ``conv5.bias``; stage k is ``convk`` (with its LRN
    and pool for k = 1, 2).
    """

    def __init__(self, out_features=("conv5",), freeze_at=0):
        """
        Args:
            out_features (list[str]): names of the layers to return, any of ``ZF_LAYER_NAMES``;
                each is the map after that conv's ReLU.
            freeze_at (int): 0 = nothing frozen; k in 1..5 = ``conv1`` ... ``convk`` get
                ``requires_grad=False``.
        """
        super().__init__()
        unknown = [name for name in out_features if name not in ZF_LAYER_NAMES]
        if unknown or not out_features:
            raise ValueError(f"ZF out_features must be among {ZF_LAYER_NAMES}, got {unknown}")
        self._out_features = list(out_features)
        last = max(ZF_LAYER_NAMES.index(name) for name in out_features)

        self._layers = []
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        in_channels = 3
        for name in ZF_LAYER_NAMES[: last + 1]:
            channels, kernel, stride, padding, norm_pool, out_stride = _ZF_LAYERS[name]
            conv = nn.Conv2d(in_channels, channels, kernel, stride=stride, padding=padding)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.add_module(name, conv)
            if norm_pool:
                self.add_module(name.replace("conv", "norm"), WithinChannelLRN(3, 5e-5, 0.75))
            self._layers.append((name, norm_pool))
            self._out_feature_strides[name] = out_stride
            self._out_feature_channels[name] = channels
            in_channels = channels
        self.freeze(freeze_at)

    def freeze(self, freeze_at=0):
        """Stop gradients for conv1..conv{freeze_at}.

        Args:
            freeze_at (int): number of leading conv layers to freeze (0..5).

        Returns:
            ZF: self.
        """
        if not 0 <= freeze_at <= len(ZF_LAYER_NAMES):
            raise ValueError(f"freeze_at must be in 0..{len(ZF_LAYER_NAMES)}, got {freeze_at}")
        frozen = tuple(f"{name}." for name in ZF_LAYER_NAMES[:freeze_at])
        return freeze_by_prefix(self, frozen)

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, 3, H, W) normalised images.

        Returns:
            dict[str, Tensor]: for each name in ``out_features``, its (N, C, ceil(H/s), ceil(W/s))
            map after ReLU, s being its stride.
        """
        outputs = {}
        for name, norm_pool in self._layers:
            x = F.relu(getattr(self, name)(x), inplace=True)
            if name in self._out_features:
                outputs[name] = x
            if norm_pool:
                x = getattr(self, name.replace("conv", "norm"))(x)
                x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return outputs

    @property
    def size_divisibility(self):
        return 16


@BACKBONE_REGISTRY.register()
def build_zf_backbone(cfg, input_shape):
    """Build the ZF conv body from ``MODEL.ZF.OUT_FEATURES`` and ``MODEL.BACKBONE.FREEZE_AT``.

    Args:
        cfg (CfgNode): a config with :func:`retrieval_ext.config.add_retrieval_config` keys.
        input_shape (ShapeSpec): must have 3 channels.

    Returns:
        ZF: the backbone.
    """
    check_rgb_input("ZF", input_shape)
    return ZF(out_features=cfg.MODEL.ZF.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
