"""RetrievalCheckpointer: torchvision VGG16 state dicts, class-count mismatches, model-zoo .pkl."""

import logging
import pickle

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from retrieval_ext.config import add_retrieval_config
from retrieval_ext.modeling.backbones import convert_torchvision_vgg16
from retrieval_ext.modeling.checkpoint import RetrievalCheckpointer

# torchvision's vgg16().features: conv indices written out from its layer list
# (conv, ReLU pairs; a max-pool after each stage shifts the next stage by one).
TORCHVISION_CONV_INDEX = {
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv4_1": 17,
    "conv4_2": 19,
    "conv4_3": 21,
    "conv5_1": 24,
    "conv5_2": 26,
    "conv5_3": 28,
}


def vgg16_rcnn_cfg(fc_dim=4096, num_classes=80):
    """The paper's VGG16 Faster R-CNN, in torchvision's RGB ImageNet normalisation."""
    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.BACKBONE.NAME = "build_vgg16_backbone"
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["conv5_3"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RPN.IN_FEATURES = ["conv5_3"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = fc_dim
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    return cfg


@pytest.fixture
def log_records():
    """Records of the retrieval_ext and fvcore checkpoint loggers, whatever their propagation."""
    records = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("retrieval_ext.modeling.checkpoint", "fvcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_torchvision_vgg16_loads_exactly(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.vgg16(weights=None).eval()
    tv_state = tv.state_dict()
    path = tmp_path / "vgg16_tv.pth"
    torch.save(tv_state, path)

    model = build_model(vgg16_rcnn_cfg()).eval()
    RetrievalCheckpointer(model).load(str(path))

    state = model.state_dict()
    for name, index in TORCHVISION_CONV_INDEX.items():
        for kind in ("weight", "bias"):
            assert torch.equal(
                state[f"backbone.{name}.{kind}"], tv_state[f"features.{index}.{kind}"]
            )
    for fc, index in (("fc1", 0), ("fc2", 3)):
        for kind in ("weight", "bias"):
            assert torch.equal(
                state[f"roi_heads.box_head.{fc}.{kind}"], tv_state[f"classifier.{index}.{kind}"]
            )

    # conv5_3 + ReLU is torchvision's features[:30] (features[30] is pool5)
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.backbone(image)["conv5_3"]
        theirs = tv.features[:30](image)
    assert ours.shape == (1, 512, 4, 6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the 512x7x7 RoI-pooled map flattens into fc6 in torchvision's (C, H, W) order
    pooled = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            model.roi_heads.box_head(pooled),
            torch.relu(tv.classifier[3](torch.relu(tv.classifier[0](pooled.flatten(1))))),
        )


def test_wrapped_vgg16_state_dict_and_foreign_keys(tmp_path):
    """{"state_dict": sd} is unwrapped; a vgg16_bn-like dict is refused, not silently skipped."""
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    fc_dim = 16
    tv_like = {f"features.{k}": v for k, v in features.items()}
    tv_like.update(
        {
            "classifier.0.weight": torch.randn(fc_dim, 512 * 7 * 7),
            "classifier.0.bias": torch.randn(fc_dim),
            "classifier.3.weight": torch.randn(fc_dim, fc_dim),
            "classifier.3.bias": torch.randn(fc_dim),
            "classifier.6.weight": torch.randn(1000, fc_dim),
            "classifier.6.bias": torch.randn(1000),
        }
    )
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": tv_like}, path)
    model = build_model(vgg16_rcnn_cfg(fc_dim=fc_dim))
    RetrievalCheckpointer(model).load(str(path))
    state = model.state_dict()
    assert torch.equal(state["backbone.conv4_2.weight"], tv_like["features.19.weight"])
    assert torch.equal(state["roi_heads.box_head.fc2.bias"], tv_like["classifier.3.bias"])

    with pytest.raises(ValueError):
        convert_torchvision_vgg16({**tv_like, "features.1.running_mean": torch.zeros(64)})


def _assert_class_mismatch_load(model, saved, fresh, records):
    """Everything but the predictor equals `saved`; the predictor equals `fresh`."""
    state = model.state_dict()
    predictor = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.")
    checked = 0
    for key, value in state.items():
        if key.startswith(predictor):
            assert torch.equal(value, fresh[key]), key
        elif key in saved:
            assert torch.equal(value, torch.as_tensor(saved[key])), key
            checked += 1
    assert any(k.startswith("backbone.") for k in saved) and checked > 0
    assert any(k.startswith("proposal_generator.") for k in saved)
    # 11 classes + background; class-specific boxes: 4 per foreground class
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 12
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 44
    summary = [r.getMessage() for r in records if r.name == "retrieval_ext.modeling.checkpoint"]
    summary = [m for m in summary if "Shape mismatch" in m]
    assert len(summary) == 1
    for key in (
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
    ):
        assert key in summary[0]


def test_coco_checkpoint_into_fewer_classes_pth(tmp_path, log_records):
    torch.manual_seed(0)
    coco = build_model(vgg16_rcnn_cfg(fc_dim=32, num_classes=80))
    saved = {k: v.clone() for k, v in coco.state_dict().items()}
    assert saved["roi_heads.box_predictor.cls_score.weight"].shape[0] == 81
    path = tmp_path / "coco.pth"
    torch.save({"model": saved}, path)

    torch.manual_seed(1)
    model = build_model(vgg16_rcnn_cfg(fc_dim=32, num_classes=11))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    RetrievalCheckpointer(model).load(str(path))
    _assert_class_mismatch_load(model, saved, fresh, log_records)


def test_model_zoo_pkl_r50_c4(tmp_path, log_records):
    """A detectron2 model-zoo style .pkl (numpy arrays, matching heuristics) of an R50-C4 model."""

    def r50_c4(num_classes):
        cfg = get_cfg()  # detectron2's defaults are R50-C4 Faster R-CNN
        add_retrieval_config(cfg)
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        return build_model(cfg)

    torch.manual_seed(0)
    coco = r50_c4(80)
    saved = {k: v.numpy().copy() for k, v in coco.state_dict().items()}
    del coco
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": saved, "__author__": "test", "matching_heuristics": True}, f)

    torch.manual_seed(1)
    model = r50_c4(11)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    RetrievalCheckpointer(model).load(str(path))
    assert any(k.startswith("roi_heads.res5.") for k in saved)
    _assert_class_mismatch_load(model, saved, fresh, log_records)
