"""Pooling of convolutional activations into image-wise (IPA) and region-wise (RPA) vectors.

Pure tensor functions, free of detectron2, so that they can be checked against hand-worked
examples. Feature maps are ``(C, H, W)`` (or batched ``(N, C, H, W)``); boxes are XYXY in the
pixel frame of the network input unless a docstring says otherwise.
"""

import math
from typing import List, Sequence, Tuple

import torch

__all__ = [
    "sum_max_pool",
    "valid_cells",
    "box_to_cells",
    "pool_box_on_map",
    "combine_levels",
]


def sum_max_pool(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum- and max-pool the two trailing spatial dimensions.

    Args:
        x: ``(..., C, H, W)`` activations; ``H * W`` may be 0 only if the leading dims are empty.

    Returns:
        (sum, max): two ``(..., C)`` tensors. Sum pooling is the SPoC-like descriptor of the paper,
        max pooling the MAC-like one.
    """
    flat = x.flatten(-2)
    if flat.shape[-1] == 0:
        raise ValueError(f"cannot pool an empty spatial extent {tuple(x.shape)}")
    return flat.sum(dim=-1), flat.amax(dim=-1)


def valid_cells(image_size: Tuple[int, int], stride: int, map_size: Tuple[int, int]):
    """Number of feature-map cells covered by the real (unpadded) image.

    Batched images are padded to a common size; the cells beyond the image hold activations of
    the padding, which must not enter the image's descriptor.

    Args:
        image_size: (height, width) of the image in network-input pixels, before padding.
        stride: the feature map's stride w.r.t. the network input.
        map_size: (H, W) of the (padded) feature map.

    Returns:
        (h, w): cells ``[0:h, 0:w]`` see the image; both at least 1.
    """
    h = min(max(1, math.ceil(image_size[0] / stride)), map_size[0])
    w = min(max(1, math.ceil(image_size[1] / stride)), map_size[1])
    return h, w


def box_to_cells(box: Sequence[float], stride: int, valid: Tuple[int, int]):
    """Map a box onto the feature map, as the paper maps the query box onto the conv map.

    The box is scaled by ``1 / stride`` (the map size over the image size) and widened to whole
    cells: every cell the box touches is kept, and at least one cell is always kept, so a box
    smaller than a cell still pools the cell it lies in.

    Args:
        box: (x1, y1, x2, y2) in network-input pixels.
        stride: the feature map's stride.
        valid: (h, w) from :func:`valid_cells`; the result is clamped to it.

    Returns:
        (x0, y0, x1, y1): integer slice bounds, ``map[:, y0:y1, x0:x1]`` is the box's region.
    """
    h, w = valid
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {list(box)} has a non-finite coordinate")
    cx0 = min(max(int(math.floor(x1 / stride)), 0), w - 1)
    cy0 = min(max(int(math.floor(y1 / stride)), 0), h - 1)
    cx1 = min(max(int(math.ceil(x2 / stride)), cx0 + 1), w)
    cy1 = min(max(int(math.ceil(y2 / stride)), cy0 + 1), h)
    return cx0, cy0, cx1, cy1


def pool_box_on_map(fmap: torch.Tensor, cells: Tuple[int, int, int, int]):
    """Sum- and max-pool the activations of ``fmap`` (C, H, W) inside integer cell bounds.

    Returns:
        (sum, max): two ``(C,)`` tensors.
    """
    x0, y0, x1, y1 = cells
    return sum_max_pool(fmap[:, y0:y1, x0:x1])


def combine_levels(pooled: List[Tuple[torch.Tensor, torch.Tensor]]):
    """Combine (sum, max) descriptors of several feature levels (e.g. FPN p2-p5) into one.

    Sum-pooled vectors are added (sum pooling over the union of all levels' cells) and
    max-pooled vectors are maxed, so a single level is returned unchanged.

    Args:
        pooled: list of (sum, max) pairs of equal shape ``(..., C)``.
    """
    if not pooled:
        raise ValueError("no feature level to combine")
    s = torch.stack([p[0] for p in pooled]).sum(dim=0)
    m = torch.stack([p[1] for p in pooled]).amax(dim=0)
    return s, m
