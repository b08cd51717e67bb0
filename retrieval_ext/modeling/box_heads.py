"""A box head that describes each region by one pooled vector, as the retrieval features do.

detectron2's FC box heads flatten the RoI-pooled map (7 x 7 x 1280 = 62,720 inputs for
EfficientNet-Lite0) into randomly initialised FC layers: many weights to learn from a few query
views, and a flattened map changes completely when the object turns. ``RetrievalPooledBoxHead``
max-pools each region's map over its cells (the region's RPA-max vector, what CA-SR compares),
L2-normalises it, then applies ``NUM_FC`` FC layers (0 = none: the predictor's classifier is
linear in the normalised region vector). With weight imprinting (``MODEL.FINETUNE.IMPRINT_VIEWS``)
the class scores then start as a softmax over the cosines between a region and each query object.
"""

from typing import List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY
from torch import nn

__all__ = ["RetrievalPooledBoxHead"]


@ROI_BOX_HEAD_REGISTRY.register()
class RetrievalPooledBoxHead(nn.Module):
    """(R, C, h, w) RoI features -> max over the cells -> L2 normalised -> FC layers + ReLU."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, fc_dims: List[int]):
        """
        Args:
            input_shape: the pooled RoI features' shape (channels used).
            fc_dims: output size of each FC layer (may be empty).
        """
        super().__init__()
        dim = input_shape.channels
        self.fcs = []
        for k, out in enumerate(fc_dims):
            fc = nn.Linear(dim, out)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.constant_(fc.bias, 0)
            self.add_module(f"fc{k + 1}", fc)
            self.fcs.append(fc)
            dim = out
        self._output_size = dim

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            "input_shape": input_shape,
            "fc_dims": [cfg.MODEL.ROI_BOX_HEAD.FC_DIM] * cfg.MODEL.ROI_BOX_HEAD.NUM_FC,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.flatten(2).amax(dim=2), dim=1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x

    @property
    @torch.jit.unused
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._output_size)
