"""RetrievalPooledBoxHead: the region's max-pooled, L2-normalised vector, then its FC layers."""

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_box_head

from retrieval_ext.config import add_retrieval_config
from retrieval_ext.modeling import RetrievalPooledBoxHead


def _head(num_fc, fc_dim=6, channels=5):
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.NAME = "RetrievalPooledBoxHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = num_fc
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = fc_dim
    return build_box_head(cfg, ShapeSpec(channels=channels, height=3, width=3))


def test_without_fc_the_output_is_the_normalised_max_over_cells():
    head = _head(0)
    assert isinstance(head, RetrievalPooledBoxHead) and head.output_shape.channels == 5
    x = torch.zeros(2, 5, 3, 3)
    x[0, :, 1, 2] = torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0])  # the max cell of each channel
    x[0, 1, 0, 0] = -1.0  # below the zero cells: max stays 0
    x[1, 4] = 2.0
    out = head(x)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.0, 0.8, 0.0, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))


def test_fc_layers_follow_the_pooled_vector():
    head = _head(2, fc_dim=4)
    assert [n for n, _ in head.named_parameters()] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    x = torch.rand(3, 5, 3, 3)
    v = x.flatten(2).max(dim=2).values
    v = v / v.norm(dim=1, keepdim=True)
    expected = torch.relu(head.fc2(torch.relu(head.fc1(v))))
    torch.testing.assert_close(head(x), expected)
    assert head.output_shape.channels == 4
