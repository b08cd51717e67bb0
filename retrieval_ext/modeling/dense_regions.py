"""Training-free proposals: a multi-scale dense set of regions over the image.

An RPN without detection training data proposes boxes near random anchors. For instance search
off the shelf, a fixed set of regions that tiles the image at several sizes and shapes (as R-MAC's
regions do, Tolias et al. ICLR 2016) covers an object of any position and size with some region,
and costs no network at all. :class:`DenseRegionProposals` is a registered detectron2 proposal
generator (``MODEL.PROPOSAL_GENERATOR.NAME: "DenseRegionProposals"``) that returns such regions
like the RPN returns its proposals (``proposal_boxes`` and ``objectness_logits``, best first) and
no losses, so the ROI box head can still be fine-tuned on top of it.

The region geometry (:func:`dense_region_boxes`) and the cheap ranking
(:func:`region_activation_scores`) are pure tensor functions; boxes are XYXY in network-input
pixels.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, nms
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

__all__ = ["DenseRegionProposals", "dense_region_boxes", "region_activation_scores"]

OBJECTNESS_MODES = ("activation", "none")


def _positions(extent: float, size: float, stride: float) -> torch.Tensor:
    """Start coordinates of regions of ``size`` along an axis of ``extent`` pixels.

    The first region starts at 0, the last ends at ``extent``, and consecutive starts are spaced
    evenly by at most ``stride * size``.
    """
    room = extent - size
    # rounding absorbs float noise, so that an exact multiple of the step gives no extra region
    n = math.ceil(round(room / (stride * size), 6)) + 1 if room > 0 else 1
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(0.0, room, n, dtype=torch.float64)


def dense_region_boxes(
    height: int,
    width: int,
    scales: Sequence[float],
    aspect_ratios: Sequence[float],
    stride: float,
) -> torch.Tensor:
    """Every region of the dense set of one image, in a fixed order.

    A region of scale ``s`` and aspect ratio ``a`` (height / width, detectron2's anchor
    convention) has the area of a square of side ``s * min(height, width)``: width
    ``s * min / sqrt(a)``, height ``s * min * sqrt(a)``, each clipped to the image. Its copies tile
    the image: along each axis the first touches the top / left edge, the last the bottom / right
    edge, and neighbours are evenly spaced by at most ``stride`` times the region's size along that
    axis (stride 0.5: each region overlaps its neighbour by at least half).

    Order: scales as given, then aspect ratios as given, then rows top to bottom and, in a row,
    left to right. Exact duplicates (regions clipped to the same box) keep their first occurrence.

    Args:
        height, width: image size in pixels (> 0).
        scales: region sizes as fractions of the image's shorter side, each in (0, inf); sizes
            beyond the image are clipped to it.
        aspect_ratios: region height / width, each > 0.
        stride: spacing of neighbouring regions as a fraction of the region's size, in (0, 1].

    Returns:
        float32 ``(R, 4)`` XYXY boxes inside ``[0, width] x [0, height]``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"dense region scales must be positive and finite, got {list(scales)}")
    if not aspect_ratios or any(not (a > 0 and math.isfinite(a)) for a in aspect_ratios):
        raise ValueError(f"dense region aspect ratios must be positive, got {list(aspect_ratios)}")
    if not 0 < stride <= 1:
        raise ValueError(f"dense region stride must be in (0, 1], got {stride}")
    side = min(height, width)
    parts = []
    for s in scales:
        for a in aspect_ratios:
            w = min(s * side / math.sqrt(a), width)
            h = min(s * side * math.sqrt(a), height)
            xs = _positions(width, w, stride)
            ys = _positions(height, h, stride)
            y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
            x0, y0 = x0.reshape(-1), y0.reshape(-1)
            parts.append(torch.stack([x0, y0, x0 + w, y0 + h], dim=1))
    boxes = torch.cat(parts).to(torch.float64)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return _unique_in_order(boxes).to(torch.float32)


def _unique_in_order(boxes: torch.Tensor) -> torch.Tensor:
    """Rows of ``boxes`` without repeats (to 1e-3 px), each kept at its first position."""
    keys = torch.round(boxes * 1000).to(torch.int64)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), boxes.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(boxes.shape[0]), reduce="amin")
    return boxes[torch.sort(first).values]


def region_activation_scores(fmap: torch.Tensor, boxes: torch.Tensor, stride: int) -> torch.Tensor:
    """Mean activation strength inside each box: a cheap, training-free objectness.

    The strength of a cell is the L2 norm of its ``C`` activations (deep features respond
    strongly on objects and weakly on flat background, as in CroW's spatial weights, Kalantidis
    et al. 2016). A box covers the cells it touches, as the paper maps the query box onto the conv
    map (:func:`~retrieval_ext.modeling.pooling.box_to_cells`), at least one cell.

    Args:
        fmap: ``(C, H, W)`` feature map of one image (the cells that see the image).
        boxes: ``(R, 4)`` XYXY boxes in network-input pixels.
        stride: the map's stride w.r.t. the network input.

    Returns:
        float32 ``(R,)`` mean cell strength per box.
    """
    energy = fmap.float().pow(2).sum(dim=0).sqrt()  # (H, W)
    h, w = energy.shape
    integral = torch.zeros((h + 1, w + 1), dtype=torch.float64, device=fmap.device)
    integral[1:, 1:] = energy.double().cumsum(0).cumsum(1)
    b = boxes.to(fmap.device, torch.float64) / stride
    x0 = b[:, 0].floor().clamp(0, w - 1).long()
    y0 = b[:, 1].floor().clamp(0, h - 1).long()
    x1 = torch.maximum(b[:, 2].ceil().long(), x0 + 1).clamp(max=w)
    y1 = torch.maximum(b[:, 3].ceil().long(), y0 + 1).clamp(max=h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (total / ((x1 - x0) * (y1 - y0))).to(torch.float32)


@PROPOSAL_GENERATOR_REGISTRY.register()
class DenseRegionProposals(nn.Module):
    """Proposal generator with no parameters: the dense region set of each image.

    Returns, like :class:`detectron2.modeling.proposal_generator.RPN`, one ``Instances`` per image
    (network-input frame) with ``proposal_boxes`` and ``objectness_logits``, sorted by decreasing
    objectness (a stable sort, so equal scores keep the order of :func:`dense_region_boxes`), and
    an empty loss dict, in training as at inference.
    """

    @configurable
    def __init__(
        self,
        *,
        in_feature: str,
        feature_stride: int,
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        stride: float,
        objectness: str = "activation",
        max_proposals: int = 300,
        nms_thresh: float = 1.0,
    ):
        """
        Args:
            in_feature: backbone output whose activations rank the regions (``objectness``
                "activation").
            feature_stride: that output's stride.
            scales, aspect_ratios, stride: the region set, see :func:`dense_region_boxes`.
            objectness: "activation" (:func:`region_activation_scores`) or "none" (the fixed
                order of :func:`dense_region_boxes`; logits ``-0, -1, -2, ...``).
            max_proposals: regions kept per image after ranking; 0 = all.
            nms_thresh: IoU above which a lower-ranked region is dropped; 1.0 = no NMS.
        """
        super().__init__()
        if objectness not in OBJECTNESS_MODES:
            raise ValueError(
                f"MODEL.DENSE_REGIONS.OBJECTNESS must be one of {OBJECTNESS_MODES}, "
                f"got {objectness!r}"
            )
        if max_proposals < 0:
            raise ValueError(f"MODEL.DENSE_REGIONS.MAX_PROPOSALS must be >= 0, got {max_proposals}")
        if not 0 < nms_thresh <= 1:
            raise ValueError(f"MODEL.DENSE_REGIONS.NMS_THRESH must be in (0, 1], got {nms_thresh}")
        # checked once here rather than on the first image
        dense_region_boxes(1, 1, scales, aspect_ratios, stride)
        self.in_feature = in_feature
        self.feature_stride = int(feature_stride)
        self.scales = [float(s) for s in scales]
        self.aspect_ratios = [float(a) for a in aspect_ratios]
        self.stride = float(stride)
        self.objectness = objectness
        self.max_proposals = int(max_proposals)
        self.nms_thresh = float(nms_thresh)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        d = cfg.MODEL.DENSE_REGIONS
        in_feature = d.IN_FEATURE or cfg.MODEL.RPN.IN_FEATURES[0]
        if in_feature not in input_shape:
            raise ValueError(
                f"MODEL.DENSE_REGIONS.IN_FEATURE {in_feature!r} is not a backbone output "
                f"(available: {sorted(input_shape)})"
            )
        return {
            "in_feature": in_feature,
            "feature_stride": input_shape[in_feature].stride,
            "scales": list(d.SCALES),
            "aspect_ratios": list(d.ASPECT_RATIOS),
            "stride": d.STRIDE,
            "objectness": d.OBJECTNESS,
            "max_proposals": d.MAX_PROPOSALS,
            "nms_thresh": d.NMS_THRESH,
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """
        Args:
            images: the batch; ``images.image_sizes`` are the unpadded (h, w).
            features: backbone outputs; only ``in_feature`` is read.
            gt_instances: unused (nothing is learned).

        Returns:
            (proposals, {}): one ``Instances`` per image, boxes in network-input pixels.
        """
        fmap = features[self.in_feature]
        proposals = []
        for i, (h, w) in enumerate(images.image_sizes):
            boxes = dense_region_boxes(h, w, self.scales, self.aspect_ratios, self.stride)
            boxes = boxes.to(fmap.device)
            logits = self._objectness(fmap[i], boxes)
            proposals.append(self._select((h, w), boxes, logits))
        return proposals, {}

    def _objectness(self, fmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if self.objectness == "none":
            return -torch.arange(boxes.shape[0], dtype=torch.float32, device=boxes.device)
        with torch.no_grad():
            return region_activation_scores(fmap.detach(), boxes, self.feature_stride)

    def _select(self, image_size, boxes: torch.Tensor, logits: torch.Tensor) -> Instances:
        order = torch.sort(logits, descending=True, stable=True).indices
        if self.nms_thresh < 1.0:
            # nms sorts by score itself; ties are broken by the stable order of `order`
            rank = torch.arange(order.numel(), dtype=torch.float32, device=boxes.device)
            order = order[nms(boxes[order], -rank, self.nms_thresh)]
        if self.max_proposals:
            order = order[: self.max_proposals]
        out = Instances(image_size)
        out.proposal_boxes = Boxes(boxes[order])
        out.objectness_logits = logits[order]
        return out
