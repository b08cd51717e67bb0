"""Which parameters learn when fine-tuning on the query objects: the paper's two strategies.

Salvador et al. fine-tune a Faster R-CNN on the query boxes (one class per query object) in two
ways. Here each is a rule on a *built* model (parameter names, module types), selected by
``MODEL.FINETUNE.STRATEGY`` and applied by the trainer's ``build_model`` before the optimizer is
built (detectron2's ``build_optimizer`` only takes parameters with ``requires_grad=True``):

``"ft1"`` (strategy #1): only the fully connected layers of the classification branch learn.
    The backbone and the RPN are frozen, so IPA, RPA and the proposals are exactly those of the
    starting model; only the class scores and class-specific boxes (hence CS-SR) change.

    - Standard heads (VGG16, ZF, EfficientNet-Lite0, R50-FPN): every ``nn.Linear`` of the box
      head (``roi_heads.box_head.fc1``, ``fc2``: VGG16/ZF's fc6/fc7) and the box predictor
      (``roi_heads.box_predictor.cls_score``, ``bbox_pred``). Conv layers of a conv+FC box head
      (``NUM_CONV > 0``) stay frozen: they are conv layers.
    - C4 heads (R50-C4): res5 is the per-region head but is convolutional, so only the predictor
      (``cls_score``, ``bbox_pred``, the FC layers on top of res5) learns. This also keeps the
      RPA vectors of ``MODEL.RETRIEVAL.RPA_AFTER_RES5`` unchanged.

    ``bbox_pred`` learns with ``cls_score``. In Faster R-CNN the "classification branch" is the
    Fast R-CNN detector on top of the RoI pooling (as opposed to the RPN branch): fc6, fc7 and its
    two sibling outputs. Besides, a predictor for the query classes has a new shape, so it starts
    from a fresh initialisation (see ``RetrievalCheckpointer``); a frozen, randomly initialised
    ``bbox_pred`` would make the class-specific boxes that CS-SR returns as locations random.

``"ft2"`` (strategy #2): every layer after the first two conv stages learns: the rest of the
    backbone, the RPN, the box head and the predictor. Frozen, by parameter name prefix:

    ==================  ==============================================================
    backbone            frozen (all other parameters learn)
    ==================  ==============================================================
    VGG16               ``backbone.conv1_*``, ``backbone.conv2_*``
    ZF                  ``backbone.conv1.*``, ``backbone.conv2.*``
    ResNet (C4)         ``backbone.stem.*``, ``backbone.res2.*`` (res3, res4, and res5 in
                        the ROI heads, learn)
    FPN over ResNet     ``backbone.bottom_up.stem.*``, ``backbone.bottom_up.res2.*`` (res3-res5
                        and every ``fpn_lateral*`` / ``fpn_output*`` learn)
    EfficientNet-Lite0  ``backbone.conv_stem.*``, ``backbone.bn1.*``, ``backbone.blocks.0.*``,
                        ``backbone.blocks.1.*`` (stem + stages 0-1, output stride 4, as
                        ResNet's stem + res2; blocks.2-6 and conv_head learn)
    ==================  ==============================================================

    The strategy decides alone: it overrides what ``MODEL.BACKBONE.FREEZE_AT`` froze at build
    time (with ``FREEZE_AT: 2``, the configs' value, the two agree on the backbone).

``"custom"``: exactly the parameters whose name matches one of ``MODEL.FINETUNE.TRAINABLE``
    (Python regular expressions applied with ``re.match``, i.e. anchored at the start of the
    name, e.g. ``"roi_heads\\.box_predictor\\."``). A pattern that matches nothing is an error.

``"none"``: ``requires_grad`` is left as the model was built (``FREEZE_AT`` only).

BatchNorm: a ``BatchNorm2d`` / ``SyncBatchNorm`` (or timm ``BatchNormAct2d``) whose parameters
are all frozen would still update its running statistics in training mode, so it is converted to
a frozen BatchNorm (detectron2's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``; same
state-dict keys). The configs' ResNets (``FrozenBN``) and EfficientNet-Lite0 (timm frozen BN)
need nothing.
"""

import logging
import re
from typing import List, Sequence, Tuple

import torch.nn as nn
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads
from timm.layers import BatchNormAct2d, freeze_batch_norm_2d

from ..modeling.backbones import VGG16, ZF, EfficientNetLite0

__all__ = ["STRATEGIES", "apply_freeze", "early_layer_prefixes", "trainable_parameter_names"]

logger = logging.getLogger("retrieval_ext")

STRATEGIES = ("none", "ft1", "ft2", "custom")


def _unwrap(model: nn.Module) -> nn.Module:
    # the wrappers prefix every name with "module."
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def early_layer_prefixes(backbone: nn.Module, prefix: str = "backbone.") -> Tuple[str, ...]:
    """Parameter-name prefixes of a backbone's stem and first two conv stages (frozen by ft2).

    Args:
        backbone: a built backbone (see the module docstring for the supported ones).
        prefix: the backbone's name inside the model.

    Returns:
        tuple of prefixes, each ending with "." or "_".

    Raises:
        ValueError: for a backbone whose stages are not known here (use ``"custom"``).
    """
    if isinstance(backbone, FPN):
        return early_layer_prefixes(backbone.bottom_up, prefix + "bottom_up.")
    if isinstance(backbone, VGG16):
        names = ("conv1_", "conv2_")
    elif isinstance(backbone, ZF):
        names = ("conv1.", "conv2.")
    elif isinstance(backbone, ResNet):
        names = ("stem.", "res2.")
    elif isinstance(backbone, EfficientNetLite0):
        names = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")
    else:
        raise ValueError(
            f"fine-tuning strategy ft2 does not know the stages of {type(backbone).__name__}; "
            "use MODEL.FINETUNE.STRATEGY custom with MODEL.FINETUNE.TRAINABLE patterns"
        )
    return tuple(prefix + n for n in names)


def _ft1_prefixes(roi_heads: nn.Module, prefix: str = "roi_heads.") -> Tuple[str, ...]:
    """Prefixes of the classification branch's FC layers (see the module docstring)."""
    if isinstance(roi_heads, Res5ROIHeads):
        return (prefix + "box_predictor.",)
    if isinstance(roi_heads, StandardROIHeads):
        fcs = tuple(
            f"{prefix}box_head.{name}."
            for name, module in roi_heads.box_head.named_modules()
            if isinstance(module, nn.Linear)
        )
        return fcs + (prefix + "box_predictor.",)
    raise ValueError(
        f"fine-tuning strategy ft1 does not know the ROI heads {type(roi_heads).__name__}; "
        "use MODEL.FINETUNE.STRATEGY custom with MODEL.FINETUNE.TRAINABLE patterns"
    )


def trainable_parameter_names(
    model: nn.Module, strategy: str, patterns: Sequence[str] = ()
) -> List[str]:
    """Names of the parameters that learn under a strategy (nothing is changed).

    Args:
        model: a built Faster R-CNN (``backbone``, ``proposal_generator``, ``roi_heads``),
            possibly wrapped in DistributedDataParallel.
        strategy: one of :data:`STRATEGIES` (see the module docstring).
        patterns: regular expressions (``re.match`` on the name), for ``"custom"`` only.

    Returns:
        list[str]: parameter names as in ``model.named_parameters()`` (of the unwrapped model),
        in that order. For ``"none"``: those that currently have ``requires_grad=True``.

    Raises:
        ValueError: an unknown strategy, an unsupported backbone/head, ``"custom"`` without
            patterns or with a pattern that matches no parameter.
    """
    model = _unwrap(model)
    named = list(model.named_parameters())
    if strategy == "none":
        return [n for n, p in named if p.requires_grad]
    if strategy == "ft1":
        keep = _ft1_prefixes(model.roi_heads)
        return [n for n, _ in named if n.startswith(keep)]
    if strategy == "ft2":
        frozen = early_layer_prefixes(model.backbone)
        return [n for n, _ in named if not n.startswith(frozen)]
    if strategy == "custom":
        if not patterns:
            raise ValueError(
                "MODEL.FINETUNE.STRATEGY custom needs MODEL.FINETUNE.TRAINABLE patterns"
            )
        compiled = [re.compile(p) for p in patterns]
        unused = [p.pattern for p in compiled if not any(p.match(n) for n, _ in named)]
        if unused:
            raise ValueError(f"MODEL.FINETUNE.TRAINABLE patterns {unused} match no parameter")
        return [n for n, _ in named if any(p.match(n) for p in compiled)]
    raise ValueError(f"unknown MODEL.FINETUNE.STRATEGY {strategy!r}; choose from {STRATEGIES}")


def _freeze_batchnorm(model: nn.Module) -> List[str]:
    """Convert every BatchNorm whose parameters are all frozen into a frozen BatchNorm.

    Returns:
        the names of the converted modules.
    """
    converted = []
    # list() first: modules are replaced while walking
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            continue
        params = list(module.parameters(recurse=False))
        if not params or any(p.requires_grad for p in params):
            continue
        if isinstance(module, BatchNormAct2d):
            # timm's version keeps the fused activation that detectron2's would drop
            frozen = freeze_batch_norm_2d(module)
        else:
            frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent.add_module(child, frozen)
        converted.append(name)
    return converted


def apply_freeze(model: nn.Module, strategy: str, patterns: Sequence[str] = ()) -> List[str]:
    """Set ``requires_grad`` by a strategy, freeze the BatchNorms left without trainable
    parameters, and log the exact list of trainable parameters.

    Args:
        model: see :func:`trainable_parameter_names`; modified in place.
        strategy: one of :data:`STRATEGIES`.
        patterns: regular expressions for ``"custom"``.

    Returns:
        list[str]: the trainable parameter names, in ``named_parameters()`` order.
    """
    model = _unwrap(model)
    names = trainable_parameter_names(model, strategy, patterns)
    if strategy != "none":
        selected = set(names)
        for name, param in model.named_parameters():
            param.requires_grad_(name in selected)
    converted = _freeze_batchnorm(model)
    if converted:
        logger.info(f"Frozen BatchNorm (no trainable parameters): {', '.join(converted)}")
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    count = sum(params[n].numel() for n in names)
    logger.info(
        f"Fine-tuning strategy {strategy!r}: {len(names)} of {len(params)} parameter tensors "
        f"({count:,} of {total:,} weights) are trainable:\n  " + "\n  ".join(names)
    )
    return names
