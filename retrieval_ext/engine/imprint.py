"""Start the classifier of the query classes from the query objects themselves ("weight
imprinting", Qi et al., CVPR 2018), instead of from random weights.

Fine-tuning a fresh 100-class predictor on one view per class needs many iterations before it
predicts any class: with background three quarters of the RoIs, it first learns to say
"background" everywhere (on the SMVS covers, 300 iterations of 2 images left the foreground
accuracy at 0). Imprinting sets each class's row of ``cls_score`` from the box-head features of
that class's ground-truth boxes in a few training images, so the classifier is a nearest-class-
mean classifier from iteration 0 and fine-tuning refines it. ``MODEL.FINETUNE.IMPRINT_VIEWS``
turns it on; :class:`ImprintClassifier` is the trainer hook, :func:`imprinted_weights` the math.
"""

import logging
from typing import Iterable, Tuple

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["ImprintClassifier", "collect_class_features", "imprinted_weights"]

logger = logging.getLogger("retrieval_ext")


def imprinted_weights(
    class_means: np.ndarray, background_mean: np.ndarray, logit: float = 8.0
) -> Tuple[np.ndarray, np.ndarray]:
    """Weights and biases of a linear classifier that scores a feature by its centred cosine to
    each class's mean feature.

    With ``mu`` the mean of the K + 1 means and ``u_k = (m_k - mu) / |m_k - mu|``, row k is
    ``w_k = s u_k`` with bias ``-w_k . mu``, so that ``logit_k(x) = s u_k . (x - mu)``; ``s`` makes
    the logit of a class's own mean ``logit`` on average over the classes.

    Args:
        class_means: (K, D) mean feature per class (rows of a class never seen: NaN; they get
            zero weights and a bias of ``-logit``).
        background_mean: (D,) mean feature of background boxes (the last, K-th, output).
        logit: the average logit of a class's own mean.

    Returns:
        (weight (K + 1, D), bias (K + 1,)) float32, background last (detectron2's layout).

    Raises:
        ValueError: no class has a mean, or the background has none.
    """
    means = np.vstack([class_means, background_mean[None]]).astype(np.float64)
    seen = ~np.isnan(means).any(axis=1)
    if not seen[:-1].any() or not seen[-1]:
        raise ValueError("imprinting needs the features of at least one class and of background")
    mu = means[seen].mean(axis=0)
    centred = means - mu
    norms = np.linalg.norm(centred, axis=1)
    scale = logit / max(float(norms[seen].mean()), 1e-12)
    weight = np.zeros_like(means)
    weight[seen] = scale * centred[seen] / np.maximum(norms[seen, None], 1e-12)
    bias = -weight @ mu
    bias[~seen] = -logit
    return weight.astype(np.float32), bias.astype(np.float32)


@torch.no_grad()
def collect_class_features(model, batches: Iterable[dict], num_classes: int, negatives: int = 8):
    """Mean box-head feature of each class's ground-truth boxes, and of background boxes.

    Args:
        model: a ``RetrievalRCNN`` whose ROI heads have ``head_features``.
        batches: training inputs (the mapper's output: ``image``, ``instances`` with
            ``gt_boxes`` / ``gt_classes`` in the image's frame).
        num_classes: K.
        negatives: random boxes per image, overlapping no ground-truth box by IoU >= 0.3, taken as
            background.

    Returns:
        (class_means (K, D) with NaN rows for unseen classes, background_mean (D,)) numpy.
    """
    sums, counts, background = None, np.zeros(num_classes), []
    generator = torch.Generator().manual_seed(0)
    for inputs in batches:
        images = model.preprocess_image([inputs])
        features = model.backbone(images.tensor)
        gt = inputs["instances"].to(images.tensor.device)
        h, w = inputs["image"].shape[1:]
        xy = torch.rand(negatives, 2, generator=generator) * torch.tensor([w, h]) * 0.7
        wh = (torch.rand(negatives, 2, generator=generator) * 0.5 + 0.2) * torch.tensor([w, h])
        random = Boxes(torch.cat([xy, xy + wh], dim=1).to(images.tensor.device))
        random = random[(pairwise_iou(random, gt.gt_boxes).max(dim=1).values < 0.3)]
        boxes = Boxes.cat([gt.gt_boxes, random])
        feats = model.roi_heads.head_features(features, [boxes]).flatten(1).cpu().double().numpy()
        if sums is None:
            sums = np.zeros((num_classes, feats.shape[1]))
        for c, f in zip(gt.gt_classes.tolist(), feats[: len(gt)]):
            sums[c] += f
            counts[c] += 1
        background.extend(feats[len(gt) :])
    with np.errstate(invalid="ignore", divide="ignore"):
        class_means = sums / counts[:, None]
    if not background:
        raise ValueError("no background box could be drawn for imprinting")
    return class_means, np.mean(background, axis=0)


class ImprintClassifier(HookBase):
    """Before the first iteration (not when resuming), set ``cls_score`` by imprinting.

    Args:
        batches_fn: returns the training inputs to average (called once).
        num_classes: K.
    """

    def __init__(self, batches_fn, num_classes: int):
        self._batches_fn = batches_fn
        self._num_classes = num_classes

    def before_train(self):
        if self.trainer.start_iter > 0:
            return
        model = self.trainer.model
        model = model.module if hasattr(model, "module") else model
        was_training = model.training
        model.eval()
        class_means, background = collect_class_features(
            model, self._batches_fn(), self._num_classes
        )
        model.train(was_training)
        weight, bias = imprinted_weights(class_means, background)
        cls_score = model.roi_heads.box_predictor.cls_score
        cls_score.weight.data.copy_(torch.from_numpy(weight))
        cls_score.bias.data.copy_(torch.from_numpy(bias))
        seen = int((~np.isnan(class_means).any(axis=1)).sum())
        logger.info(
            f"imprinted cls_score from the features of {seen} of {self._num_classes} classes"
        )
