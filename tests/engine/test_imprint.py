"""Weight imprinting: the math against a hand-derived property, and the hook on a tiny model
(before any training step, the imprinted classifier names the class of each ground-truth box)."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.env import seed_all_rng

from retrieval_ext.engine import RetrievalTrainer, setup_finetune_cfg
from retrieval_ext.engine.imprint import ImprintClassifier, imprinted_weights
from retrieval_ext.engine.trainer import imprint_inputs
from tests.engine.test_trainer import NAME, NUM_INSTANCES, _cfg, bench  # noqa: F401  (fixture)


def test_imprinted_weights_score_each_mean_highest_for_its_class():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(5, 7)) + 3.0  # all-positive-ish, like ReLU features
    background = rng.normal(size=7) + 3.0
    weight, bias = imprinted_weights(means, background, logit=6.0)
    assert weight.shape == (6, 7) and bias.shape == (6,)
    everything = np.vstack([means, background])
    mu = everything.mean(axis=0)
    norms = np.linalg.norm(everything - mu, axis=1)
    logits = everything @ weight.T + bias  # row i: the logits of mean i
    # logit_k(m_k) = s |m_k - mu| with s = 6 / mean |m_j - mu| (worked out from the definition)
    np.testing.assert_allclose(np.diag(logits), 6.0 * norms / norms.mean(), rtol=1e-5)
    # Cauchy-Schwarz: u_j . (m_k - mu) < |m_k - mu| for j != k, so each mean wins its own class
    assert (logits.argmax(axis=1) == np.arange(6)).all()
    np.testing.assert_allclose(np.diag(logits).mean(), 6.0, rtol=1e-5)


def test_unseen_classes_get_no_weight_and_a_low_bias():
    means = np.array([[1.0, 0.0], [np.nan, np.nan], [0.0, 1.0]])
    weight, bias = imprinted_weights(means, np.array([0.5, 0.5]), logit=4.0)
    assert (weight[1] == 0).all() and bias[1] == -4.0
    assert np.isfinite(weight).all() and np.isfinite(bias).all()


def test_hook_imprints_a_classifier_that_names_the_ground_truth(bench, tmp_path):  # noqa: F811
    cfg = _cfg(
        "ZF",
        [
            "MODEL.FINETUNE.STRATEGY",
            "ft1",
            "MODEL.FINETUNE.IMPRINT_VIEWS",
            "1",
            "SOLVER.MAX_ITER",
            "1",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
    )
    setup_finetune_cfg(cfg)
    cfg.DATASETS.TEST = ()
    cfg.freeze()
    seed_all_rng(0)
    trainer = RetrievalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    hooks = [h for h in trainer._hooks if isinstance(h, ImprintClassifier)]
    assert len(hooks) == 1
    model = trainer.model
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    trainer.start_iter = 0
    hooks[0].before_train()
    after = model.roi_heads.box_predictor.cls_score.weight.detach()
    assert not torch.equal(before, after)
    # the classifier now names the class of the ground-truth boxes it was imprinted from
    model.eval()
    right, total = 0, 0
    with torch.no_grad():
        for inputs in imprint_inputs(cfg, 1):
            images = model.preprocess_image([inputs])
            feats = model.backbone(images.tensor)
            f = model.roi_heads.head_features(feats, [inputs["instances"].gt_boxes])
            logits = model.roi_heads.box_predictor.cls_score(f.flatten(1))
            right += int((logits.argmax(1) == inputs["instances"].gt_classes).sum())
            total += len(inputs["instances"])
    assert total == len(DatasetCatalog.get(f"{NAME}_finetune"))
    # random weights would name one of NUM_INSTANCES + 1 outputs by chance
    assert right >= 0.7 * total, (right, total)


def test_imprinting_is_off_by_default(bench, tmp_path):  # noqa: F811
    cfg = _cfg("ZF", ["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "1"])
    setup_finetune_cfg(cfg)
    cfg.DATASETS.TEST = ()
    cfg.freeze()
    trainer = RetrievalTrainer(cfg)
    assert not any(isinstance(h, ImprintClassifier) for h in trainer._hooks)
    assert cfg.MODEL.FINETUNE.IMPRINT_VIEWS == 0 and NUM_INSTANCES > 1
    with pytest.raises(ValueError):
        imprinted_weights(np.full((2, 3), np.nan), np.full(3, np.nan))
