"""DenseRegionProposals: the region geometry, its ranking and the registered proposal generator.

Expected boxes are worked out by hand below; counts, spacing and scores are checked against
brute-force re-implementations written here, not against the module's own helpers.
"""

import itertools
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from retrieval_ext.modeling.dense_regions import (
    DenseRegionProposals,
    dense_region_boxes,
    region_activation_scores,
)
from tests.common import random_image, tiny_cfg

DENSE = ["MODEL.PROPOSAL_GENERATOR.NAME", "DenseRegionProposals"]


def test_worked_example_square_regions_with_half_overlap():
    # 600 x 800 image, side 0.5 * 600 = 300 px, step at most 150 px:
    # x: room 500 -> ceil(500 / 150) + 1 = 5 starts 0, 125, 250, 375, 500
    # y: room 300 -> 300 / 150 + 1 = 3 starts 0, 150, 300 (an exact multiple: no extra row)
    boxes = dense_region_boxes(600, 800, [0.5], [1.0], 0.5)
    expected = [[x, y, x + 300, y + 300] for y in (0, 150, 300) for x in (0, 125, 250, 375, 500)]
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == expected


def test_worked_example_tall_regions_are_clipped_to_the_image():
    # aspect 4 (height / width): width 300 / 2 = 150, height 300 * 2 = 600 -> the full height.
    # x: room 650, step <= 75 -> ceil(8.67) + 1 = 10 starts, 650 / 9 apart; y: one row at 0.
    boxes = dense_region_boxes(600, 800, [0.5], [4.0], 0.5)
    assert boxes.shape == (10, 4)
    step = 650 / 9
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        assert x1 == pytest.approx(k * step, abs=1e-3)
        assert x2 == pytest.approx(k * step + 150, abs=1e-3)
        assert (y1, y2) == (0.0, 600.0)


def test_regions_larger_than_the_image_collapse_to_one_whole_image_box():
    # scale 2 on a 100 x 100 image: every aspect ratio clips to [0, 0, 100, 100]
    boxes = dense_region_boxes(100, 100, [2.0], [0.5, 1.0, 2.0], 0.5)
    assert boxes.tolist() == [[0.0, 0.0, 100.0, 100.0]]


def test_order_is_scales_then_aspect_ratios_then_rows_then_columns():
    # 100 x 200 image; scale 1 -> 100 x 100 squares at x = 0, 50, 100; scale 0.5 -> 50 x 50 at
    # x = 0, 25, ..., 150 and y = 0, 25, 50.
    boxes = dense_region_boxes(100, 200, [1.0, 0.5], [1.0], 0.5).tolist()
    first = [[0, 0, 100, 100], [50, 0, 150, 100], [100, 0, 200, 100]]
    assert boxes[:3] == first
    second = [[x, y, x + 50, y + 50] for y in (0, 25, 50) for x in range(0, 151, 25)]
    assert boxes[3:] == second


def _brute_force_count(height, width, scale, ratio, stride):
    w = min(scale * min(height, width) / math.sqrt(ratio), width)
    h = min(scale * min(height, width) * math.sqrt(ratio), height)

    def n(extent, size):
        k = 1
        while (extent - size) / k > stride * size + 1e-6:
            k += 1
        return k + 1 if extent - size > 1e-9 else 1

    return n(width, w) * n(height, h), w, h


@pytest.mark.parametrize(
    "height,width,scales,ratios,stride",
    [
        (600, 800, [0.3, 0.45, 0.65, 0.9], [0.5, 1.0, 2.0], 0.5),
        (333, 517, [0.25, 0.7], [0.75, 1.5], 0.4),
        (800, 450, [0.2, 1.0], [1.0], 1.0),
    ],
)
def test_boxes_lie_inside_the_image_with_the_configured_sizes_and_spacing(
    height, width, scales, ratios, stride
):
    boxes = dense_region_boxes(height, width, scales, ratios, stride)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
    start = 0
    for s, a in itertools.product(scales, ratios):
        count, w, h = _brute_force_count(height, width, s, a, stride)
        group = boxes[start : start + count]
        start += count
        assert torch.allclose(group[:, 2] - group[:, 0], torch.tensor(float(w)), atol=1e-3)
        assert torch.allclose(group[:, 3] - group[:, 1], torch.tensor(float(h)), atol=1e-3)
        xs, ys = sorted(set(group[:, 0].tolist())), sorted(set(group[:, 1].tolist()))
        assert xs[0] == 0 and xs[-1] == pytest.approx(width - w, abs=1e-3)
        assert ys[0] == 0 and ys[-1] == pytest.approx(height - h, abs=1e-3)
        for gaps, size in ((xs, w), (ys, h)):
            assert all(b - a <= stride * size + 1e-3 for a, b in zip(gaps, gaps[1:]))
    assert start == boxes.shape[0]  # no duplicates at these sizes, so every group is whole


def test_the_same_call_gives_the_same_boxes():
    a = dense_region_boxes(417, 601, [0.3, 0.8], [0.5, 2.0], 0.5)
    b = dense_region_boxes(417, 601, [0.3, 0.8], [0.5, 2.0], 0.5)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scales=[]), "scales"),
        (dict(scales=[0.0]), "scales"),
        (dict(aspect_ratios=[-1.0]), "aspect ratios"),
        (dict(stride=0.0), "stride"),
        (dict(stride=1.5), "stride"),
    ],
)
def test_bad_settings_are_refused_with_their_name(kwargs, match):
    args = dict(scales=[0.5], aspect_ratios=[1.0], stride=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dense_region_boxes(100, 100, **args)


def test_activation_score_is_the_mean_cell_norm_of_the_touched_cells():
    torch.manual_seed(0)
    fmap = torch.randn(5, 4, 6)  # stride 10: covers 60 x 40 pixels
    boxes = torch.tensor([[0, 0, 60, 40], [12, 3, 31, 19], [55, 35, 58, 39], [0, 0, 10, 10.0]])
    scores = region_activation_scores(fmap, boxes, 10)
    norms = [
        [math.sqrt(sum(float(fmap[c, y, x]) ** 2 for c in range(5))) for x in range(6)]
        for y in range(4)
    ]
    # cells touched, worked out by hand: all; x 1..3, y 0..1; x 5, y 3; x 0, y 0
    cells = [(range(0, 6), range(0, 4)), (range(1, 4), range(0, 2)), ([5], [3]), ([0], [0])]
    for score, (xs, ys) in zip(scores.tolist(), cells):
        expected = sum(norms[y][x] for y in ys for x in xs) / (len(xs) * len(ys))
        assert score == pytest.approx(expected, rel=1e-5)


def _generator(**kwargs):
    args = dict(
        in_feature="f",
        feature_stride=10,
        scales=[1.0, 0.5],
        aspect_ratios=[1.0],
        stride=0.5,
    )
    args.update(kwargs)
    return DenseRegionProposals(**args)


def _batch():
    # two images of different sizes, padded to 60 x 80 by ImageList (stride 10 map: 6 x 8)
    tensors = [torch.zeros(3, 40, 80), torch.zeros(3, 60, 50)]
    images = ImageList.from_tensors(tensors)
    fmap = torch.zeros(2, 3, 6, 8)
    fmap[0, :, 0, 0] = 5.0  # a strong top-left cell in image 0
    fmap[1, :, 5, 4] = 7.0  # a strong bottom-right cell in image 1
    return images, {"f": fmap}


def test_generator_returns_rpn_like_instances_ranked_by_activation():
    images, features = _batch()
    proposals, losses = _generator(max_proposals=0)(images, features)
    assert losses == {}
    assert len(proposals) == 2
    for p, (h, w) in zip(proposals, [(40, 80), (60, 50)]):
        assert isinstance(p, Instances) and p.image_size == (h, w)
        expected = dense_region_boxes(h, w, [1.0, 0.5], [1.0], 0.5)
        got = p.proposal_boxes.tensor
        assert got.shape == expected.shape
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
        logits = p.objectness_logits
        assert (logits[:-1] >= logits[1:]).all()
    # image 0 (40 x 80): the 20 x 20 box at the origin holds the strong cell in 2 x 2 cells,
    # the densest region of all
    assert proposals[0].proposal_boxes.tensor[0].tolist() == [0.0, 0.0, 20.0, 20.0]
    # image 1 (60 x 50): regions of side 25 at x 0, 12.5, 25 and y 0, 35/3, 70/3, 35; the one
    # touching cell (x 4, y 5) with the fewest cells is x 25..50, y 35..60 (3 x 3 cells)
    assert proposals[1].proposal_boxes.tensor[0].tolist() == [25.0, 35.0, 50.0, 60.0]


def test_fixed_order_and_max_proposals():
    images, features = _batch()
    proposals, _ = _generator(objectness="none", max_proposals=4)(images, features)
    expected = dense_region_boxes(40, 80, [1.0, 0.5], [1.0], 0.5)[:4]
    assert torch.equal(proposals[0].proposal_boxes.tensor, expected)
    assert proposals[0].objectness_logits.tolist() == [0.0, -1.0, -2.0, -3.0]


def test_nms_drops_overlapping_lower_ranked_regions():
    # 40 x 80 image, scale 1 squares at x = 0, 20, 40 (IoU of neighbours 20 * 40 / (60 * 40)
    # = 1/3, of the ends 0): NMS at 0.3 keeps x = 0 and x = 40 in the fixed order.
    images, features = _batch()
    gen = _generator(scales=[1.0], objectness="none", max_proposals=0, nms_thresh=0.3)
    proposals, _ = gen(images, features)
    assert proposals[0].proposal_boxes.tensor.tolist() == [[0, 0, 40, 40], [40, 0, 80, 40]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(objectness="edges"), "OBJECTNESS"),
        (dict(max_proposals=-1), "MAX_PROPOSALS"),
        (dict(nms_thresh=0.0), "NMS_THRESH"),
        (dict(stride=2.0), "stride"),
    ],
)
def test_generator_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _generator(**kwargs)


def test_config_builds_it_and_the_box_head_still_trains():
    cfg = tiny_cfg("EfficientNet-Lite0", DENSE + ["MODEL.DENSE_REGIONS.MAX_PROPOSALS", "40"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.proposal_generator, DenseRegionProposals)
    assert model.proposal_generator.in_feature == "conv_head"
    assert model.proposal_generator.feature_stride == 32
    assert list(model.proposal_generator.parameters()) == []
    model.train()
    inst = Instances((128, 160))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 90.0, 100.0]]))
    inst.gt_classes = torch.tensor([0])
    with EventStorage():
        losses = model([{"image": random_image(128, 160), "instances": inst}])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_head.fc1.weight.grad is not None

    model.eval()
    with torch.no_grad():
        out = model([{"image": random_image(128, 160, seed=3), "height": 256, "width": 320}])[0]
    props = out["proposals"]
    assert len(props) == cfg.MODEL.RETRIEVAL.NUM_PROPOSALS  # 16 of the 40 kept regions
    boxes = props.proposal_boxes.tensor  # original frame: twice the network input
    assert (boxes[:, 2] <= 320 + 1e-3).all() and (boxes[:, 3] <= 256 + 1e-3).all()


def test_unknown_in_feature_is_named():
    with pytest.raises(ValueError, match="IN_FEATURE 'p9'"):
        build_model(
            tiny_cfg("EfficientNet-Lite0", DENSE + ["MODEL.DENSE_REGIONS.IN_FEATURE", "p9"])
        )
