"""RetrievalRCNN: one pass gives detections, IPA, proposals with RPA, and query descriptors.

Every expected value is recomputed here from the backbone map / pooler output with plain tensor
operations, independently of retrieval_ext.modeling.pooling.
"""

import math

import pytest
import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, Instances

from tests.common import random_image, tiny_model


@pytest.fixture(scope="module")
def c4():
    return tiny_model("R50-C4")


def _inputs():
    # image 0 was resized by 0.5 from a 256 x 340 original; image 1 is at its original size.
    return [
        {
            "image": random_image(128, 170, seed=1),
            "height": 256,
            "width": 340,
            "query_boxes": torch.tensor([[10.0, 20.0, 200.0, 220.0], [300.0, 230.0, 302.0, 233.0]]),
        },
        {"image": random_image(150, 128, seed=2), "height": 150, "width": 128},
    ]


def _reference(model, inputs):
    """Backbone features and proposals computed step by step, outside RetrievalRCNN.inference."""
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
    return images, features, proposals


@pytest.fixture(scope="module")
def c4_run(c4):
    inputs = _inputs()
    with torch.no_grad():
        outputs = c4(inputs)
    return inputs, outputs, _reference(c4, inputs)


def test_ipa_is_sum_and_max_of_backbone_map_over_the_image(c4_run):
    inputs, outputs, (images, features, _) = c4_run
    res4 = features["res4"]
    assert res4.shape[-2:] == (10, 11)  # batch padded to 150 x 170 -> ceil(/16)
    # image 0 is 128 x 170 in the batch: rows 0..7 (ceil(128/16) = 8), all 11 columns
    # image 1 is 150 x 128: rows 0..9 (ceil(150/16) = 10), columns 0..7 (128/16 = 8)
    for i, (rows, cols) in enumerate([(8, 11), (10, 8)]):
        cells = res4[i, :, :rows, :cols]
        torch.testing.assert_close(outputs[i]["ipa_sum"], cells.sum(dim=(1, 2)))
        torch.testing.assert_close(outputs[i]["ipa_max"], cells.amax(dim=(1, 2)))
        assert outputs[i]["ipa_sum"].shape == (1024,)


def test_rpa_is_pooled_roi_pooler_output_of_the_same_proposals(c4, c4_run):
    inputs, outputs, (images, features, proposals) = c4_run
    k = c4.roi_heads.num_retrieval_proposals
    for i in range(2):
        kept = proposals[i][:k]
        assert len(kept) == k == 16
        with torch.no_grad():
            pooled = c4.roi_heads.pooler([features["res4"][i : i + 1]], [kept.proposal_boxes])
        assert pooled.shape == (k, 1024, 14, 14)
        got = outputs[i]["proposals"]
        torch.testing.assert_close(got.rpa_sum, pooled.sum(dim=(2, 3)))
        torch.testing.assert_close(got.rpa_max, pooled.amax(dim=(2, 3)))
        torch.testing.assert_close(got.objectness_logits, kept.objectness_logits)
        # class probabilities: a distribution over 80 COCO classes + background
        assert got.scores.shape == (k, 81)
        torch.testing.assert_close(got.scores.sum(dim=1), torch.ones(k))
        assert got.class_boxes.shape == (k, 80, 4)


def test_rpa_after_res5_pools_the_res5_output():
    model = tiny_model("R50-C4", ["MODEL.RETRIEVAL.RPA_AFTER_RES5", True])
    inputs = _inputs()[1:]
    with torch.no_grad():
        out = model(inputs)[0]
        _, features, proposals = _reference(model, inputs)
        kept = proposals[0][:16]
        res5 = model.roi_heads.res5(
            model.roi_heads.pooler([features["res4"]], [kept.proposal_boxes])
        )
    assert res5.shape[1:] == (2048, 7, 7)
    torch.testing.assert_close(out["proposals"].rpa_max, res5.amax(dim=(2, 3)))
    torch.testing.assert_close(out["proposals"].rpa_sum, res5.sum(dim=(2, 3)))


def test_boxes_come_back_in_original_image_coordinates(c4_run):
    inputs, outputs, (images, _, proposals) = c4_run
    # image 0: network input 128 x 170 for a 256 x 340 original -> both axes x2
    got = outputs[0]["proposals"]
    assert got.image_size == (256, 340)
    expected = proposals[0][:16].proposal_boxes.tensor * 2.0
    torch.testing.assert_close(got.proposal_boxes.tensor, expected.clamp(min=0))
    assert float(got.proposal_boxes.tensor[:, 2].max()) <= 340
    assert float(got.proposal_boxes.tensor[:, 3].max()) <= 256
    assert float(got.class_boxes[..., 2].max()) <= 340
    # image 1 is not resized: boxes unchanged, inside 150 x 128
    torch.testing.assert_close(
        outputs[1]["proposals"].proposal_boxes.tensor, proposals[1][:16].proposal_boxes.tensor
    )
    assert outputs[0]["instances"].image_size == (256, 340)


def test_detections_come_back_in_original_image_coordinates():
    """Detections of the one retrieval pass equal detectron2's own inference path
    (GeneralizedRCNN.inference: roi_heads + detector_postprocess), and are the network-input
    boxes scaled x2. A zero box regressor (boxes = proposals = anchors, not degenerate) and a
    score threshold of 0 make the random model detect."""
    model = tiny_model("R50-C4", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    torch.nn.init.zeros_(model.roi_heads.box_predictor.bbox_pred.weight)
    torch.nn.init.zeros_(model.roi_heads.box_predictor.bbox_pred.bias)
    inputs = _inputs()
    with torch.no_grad():
        out = model(inputs)[0]["instances"]
        ref = GeneralizedRCNN.inference(model, inputs)[0]["instances"]
        images, features, proposals = _reference(model, inputs)
        in_frame, _ = model.roi_heads(images, features, proposals)
    assert len(out) == len(ref) == len(in_frame[0]) > 0
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor)
    torch.testing.assert_close(out.scores, ref.scores)
    assert torch.equal(out.pred_classes, ref.pred_classes)
    expected = in_frame[0].pred_boxes.tensor * 2.0
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 340)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 256)
    torch.testing.assert_close(out.pred_boxes.tensor, expected)


def test_query_crop_descriptor_is_a_manual_crop_and_pool(c4_run):
    inputs, outputs, (images, features, _) = c4_run
    q = outputs[0]["query"]
    res4 = features["res4"][0]
    # box 0: (10, 20, 200, 220) in the original -> x0.5 -> (5, 10, 100, 110) in the input;
    # stride 16: columns floor(5/16)=0 .. ceil(100/16)=7, rows floor(10/16)=0 .. ceil(110/16)=7
    crop = res4[:, 0:7, 0:7]
    torch.testing.assert_close(q.crop_sum[0], crop.sum(dim=(1, 2)))
    torch.testing.assert_close(q.crop_max[0], crop.amax(dim=(1, 2)))
    # box 1: (300, 230, 302, 233) -> (150, 115, 151, 116.5): smaller than a cell, so the one
    # cell it lies in: column floor(150/16)=9, row floor(115/16)=7
    torch.testing.assert_close(q.crop_sum[1], res4[:, 7, 9])
    torch.testing.assert_close(q.crop_max[1], res4[:, 7, 9])
    torch.testing.assert_close(q.boxes.tensor, inputs[0]["query_boxes"])
    assert "query" not in outputs[1]


def test_query_rpa_goes_through_the_same_roi_pooler(c4, c4_run):
    inputs, outputs, (images, features, _) = c4_run
    boxes_in = inputs[0]["query_boxes"] * 0.5
    with torch.no_grad():
        pooled = c4.roi_heads.pooler([features["res4"][:1]], [Boxes(boxes_in)])
    q = outputs[0]["query"]
    torch.testing.assert_close(q.rpa_sum, pooled.sum(dim=(2, 3)))
    torch.testing.assert_close(q.rpa_max, pooled.amax(dim=(2, 3)))


def test_batch_of_different_sizes(c4):
    # A is the largest image on both axes, so the batch adds no padding to it: its outputs in the
    # batch must equal its outputs alone. B is padded; its outputs must stay in its own frame.
    a = {"image": random_image(160, 170, seed=3), "height": 320, "width": 340}
    b = {"image": random_image(100, 120, seed=4), "height": 100, "width": 120}
    with torch.no_grad():
        batched = c4([a, b])
        alone = c4([a])[0]
    torch.testing.assert_close(batched[0]["ipa_sum"], alone["ipa_sum"])
    torch.testing.assert_close(batched[0]["proposals"].rpa_max, alone["proposals"].rpa_max)
    torch.testing.assert_close(
        batched[0]["proposals"].proposal_boxes.tensor, alone["proposals"].proposal_boxes.tensor
    )
    pb = batched[1]["proposals"]
    assert pb.image_size == (100, 120)
    assert float(pb.proposal_boxes.tensor[:, 2].max()) <= 120
    assert float(pb.proposal_boxes.tensor[:, 3].max()) <= 100


def test_no_proposal_gives_empty_region_outputs(c4, monkeypatch):
    def no_proposals(images, features, gt_instances=None):
        empty = []
        for size in images.image_sizes:
            inst = Instances(size)
            inst.proposal_boxes = Boxes(torch.zeros((0, 4)))
            inst.objectness_logits = torch.zeros((0,))
            empty.append(inst)
        return empty, {}

    monkeypatch.setattr(c4.proposal_generator, "forward", no_proposals)
    with torch.no_grad():
        out = c4(_inputs())
    for o in out:
        p = o["proposals"]
        assert len(p) == 0
        assert p.rpa_sum.shape == (0, 1024) and p.rpa_max.shape == (0, 1024)
        assert p.scores.shape == (0, 81) and p.class_boxes.shape == (0, 80, 4)
        assert len(o["instances"]) == 0
        assert torch.isfinite(o["ipa_sum"]).all()
    assert out[0]["query"].rpa_sum.shape == (2, 1024)


def test_backbone_runs_once_per_image(c4):
    seen = []
    handle = c4.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            c4(_inputs())
    finally:
        handle.remove()
    assert seen == [2]  # one batched call covering both images, nothing else


@pytest.mark.parametrize("name", ["R50-FPN", "VGG16", "ZF", "EfficientNet-Lite0"])
def test_other_backbones_give_all_outputs(name):
    model = tiny_model(name)
    inputs = _inputs()
    with torch.no_grad():
        out = model(inputs)
        images, features, proposals = _reference(model, inputs)
    ipa = model.ipa_features
    for i, o in enumerate(out):
        fmap = torch.stack([features[f][i] for f in ipa]).sum(dim=0) if len(ipa) == 1 else None
        stride = model.backbone.output_shape()[ipa[0]].stride
        h, w = images.image_sizes[i]
        rows, cols = min(math.ceil(h / stride), fmap.shape[1]), min(
            math.ceil(w / stride), fmap.shape[2]
        )
        # sums of ~1e3 large random activations: float32 summation order matters at 1e-5
        torch.testing.assert_close(
            o["ipa_sum"], fmap[:, :rows, :cols].sum(dim=(1, 2)), rtol=1e-4, atol=1e-3
        )
        torch.testing.assert_close(o["ipa_max"], fmap[:, :rows, :cols].amax(dim=(1, 2)))
        p = o["proposals"]
        k = min(16, len(proposals[i]))
        assert len(p) == k
        with torch.no_grad():
            pooled = model.roi_heads.box_pooler(
                [features[f][i : i + 1] for f in model.roi_heads.box_in_features],
                [proposals[i][:k].proposal_boxes],
            )
        # random-weight activations reach 1e3-1e5: compare relative to their scale
        scale = float(pooled.abs().max())
        torch.testing.assert_close(p.rpa_max, pooled.amax(dim=(2, 3)), rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(p.rpa_sum, pooled.sum(dim=(2, 3)), rtol=1e-5, atol=1e-5 * scale)
    assert out[0]["query"].crop_sum.shape[0] == 2


@pytest.mark.parametrize(
    "name,opts",
    [
        ("EfficientNet-Lite0", ()),
        ("ZF", ()),
        ("R50-FPN", ()),
        ("R50-C4", ()),
        ("R50-C4", ("MODEL.RETRIEVAL.RPA_AFTER_RES5", "True")),
    ],
)
def test_skipping_the_box_head_gives_bit_identical_region_features(name, opts, monkeypatch):
    """Without class outputs only the kept proposals are RoI-pooled and the box head never runs;
    the IPA, proposals and RPA are the full pass's, bit for bit."""
    model = tiny_model(name, opts)
    inputs = [
        {"image": random_image(128, 170, seed=s), "height": 256, "width": 340} for s in (1, 2)
    ]
    with torch.no_grad():
        full = model.inference(inputs)
        heads = model.roi_heads
        if not opts:  # C4 with RPA after res5 needs res5 for RPA; the predictor still never runs
            box_head = heads.box_head if hasattr(heads, "box_head") else heads.res5
            monkeypatch.setattr(box_head, "forward", _must_not_run)
        monkeypatch.setattr(heads.box_predictor, "forward", _must_not_run)
        bare = model.inference(inputs, class_outputs=False)
    for a, b in zip(full, bare):
        assert torch.equal(a["ipa_sum"], b["ipa_sum"]) and torch.equal(a["ipa_max"], b["ipa_max"])
        pa, pb = a["proposals"], b["proposals"]
        assert len(pb) > 0
        for f in ("rpa_sum", "rpa_max", "objectness_logits"):
            assert torch.equal(pa.get(f), pb.get(f)), f
        assert torch.equal(pa.proposal_boxes.tensor, pb.proposal_boxes.tensor)
        assert not pb.has("scores") and not pb.has("class_boxes")
        assert len(b["instances"]) == 0


def _must_not_run(*args, **kwargs):
    raise AssertionError("the box head ran")


@pytest.mark.parametrize("name", ["R50-C4", "ZF", "EfficientNet-Lite0"])
def test_query_inference_equals_the_query_part_of_inference(name):
    """query_inference skips proposals and the box head; the query's vectors are the same."""
    model = tiny_model(name)
    inputs = [_inputs()[0]]  # one image with two query boxes, batched alone as queries are
    with torch.no_grad():
        full = model(inputs)[0]
        fast = model.query_inference(inputs)[0]
    assert set(fast) == {"ipa_sum", "ipa_max", "query"}
    torch.testing.assert_close(fast["ipa_sum"], full["ipa_sum"])
    torch.testing.assert_close(fast["ipa_max"], full["ipa_max"])
    for field in ("boxes", "crop_sum", "crop_max", "rpa_sum", "rpa_max"):
        a, b = fast["query"].get(field), full["query"].get(field)
        a, b = (a.tensor, b.tensor) if field == "boxes" else (a, b)
        torch.testing.assert_close(a, b, msg=field)
    # the proposal generator never ran
    calls = []
    handle = model.proposal_generator.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            model.query_inference(inputs)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match="query_boxes"):
        model.query_inference([_inputs()[1]])
