"""Extra backbones, registered in detectron2's ``BACKBONE_REGISTRY`` on import."""

from .efficientnet import (  # noqa: F401  (registers build_efficientnet_lite0_backbone)
    EFFICIENTNET_LITE0_INPUT_FORMAT,
    EFFICIENTNET_LITE0_PIXEL_MEAN,
    EFFICIENTNET_LITE0_PIXEL_STD,
    EfficientNetLite0,
    build_efficientnet_lite0_backbone,
    convert_lukemelas_efficientnet_lite0,
    efficientnet_lite0_imagenet_state_dict,
)
from .vgg import VGG16, build_vgg16_backbone, convert_torchvision_vgg16  # noqa: F401
from .zf import ZF, WithinChannelLRN, build_zf_backbone  # noqa: F401
