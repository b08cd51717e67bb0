"""ROI heads that also return region-wise pooled activations (RPA) for retrieval.

Training and plain inference (``forward``) are those of detectron2's heads. The meta-architecture
calls :meth:`RetrievalROIHeadsMixin.forward_retrieval` instead at inference time, which runs the
box branch once over the proposals and, from the same RoI-pooled features, attaches to each
image's kept proposals their RPA vectors, class probabilities and class-specific boxes.

Which pooled map RPA comes from:
- ``RetrievalRes5ROIHeads`` (ResNet C4): the RoI-pooled res4 map (``POOLER_RESOLUTION`` squared
  cells, 1024 channels for R50), or, with ``MODEL.RETRIEVAL.RPA_AFTER_RES5``, the res5 output of
  each proposal (2048 channels).
- ``RetrievalStandardROIHeads`` (VGG16, ZF, EfficientNet-Lite0, FPN): the box pooler's output,
  i.e. what enters the box head (fc6 for VGG16/ZF). With FPN each proposal is pooled from the
  single level detectron2's ``ROIPooler`` assigns it by its size (canonical level 4 for a
  224 x 224 box), so every RPA vector has the FPN channel count.
"""

from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes, Instances

from .pooling import sum_max_pool

__all__ = ["RetrievalROIHeadsMixin", "RetrievalRes5ROIHeads", "RetrievalStandardROIHeads"]


class RetrievalROIHeadsMixin:
    """Shared retrieval inference of the two head families.

    Subclasses define ``_region_forward(features, boxes, run_head=True) -> (rpa_maps,
    head_features)``: pool the boxes once and, if ``run_head``, run the box branch on them;
    ``rpa_maps`` is ``(R, C, h, w)`` for the R boxes of all images concatenated, ``head_features``
    what the box predictor takes. All boxes here are in network-input pixels.
    """

    num_retrieval_proposals: int

    def region_descriptors(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]):
        """RPA vectors of arbitrary boxes (e.g. query boxes) through the same RoI pooler.

        Args:
            features: backbone features of the batch.
            boxes: one ``Boxes`` per image, network-input pixels.

        Returns:
            list with one (sum, max) pair of ``(R_i, C)`` tensors per image.
        """
        rpa_maps, _ = self._region_forward(features, boxes, run_head=False)
        sums, maxs = _pool_regions(rpa_maps)
        counts = [len(b) for b in boxes]
        return list(zip(sums.split(counts), maxs.split(counts)))

    def head_features(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """What the box predictor takes for arbitrary boxes (e.g. ground-truth boxes).

        Args:
            features: backbone features of the batch.
            boxes: one ``Boxes`` per image, network-input pixels.

        Returns:
            ``(R, D)`` for the R boxes of all images concatenated.
        """
        return self._region_forward(features, boxes)[1]

    def forward_retrieval(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        class_outputs: bool = True,
    ):
        """Detections plus retrieval fields for the kept proposals, from one pass of the box branch.

        Args:
            features: backbone features of the batch.
            proposals: RPN output per image (``proposal_boxes``, ``objectness_logits``), sorted by
                decreasing objectness as the RPN returns them.
            class_outputs: False = only the kept proposals are RoI-pooled and the box head does
                not run (an index that stores no class outputs): no detections, no ``scores`` /
                ``class_boxes``, and the same RPA vectors as the full pass (each box is pooled
                on its own).

        Returns:
            (detections, kept): two lists with one ``Instances`` per image (network-input frame).
            ``kept`` holds the first ``num_retrieval_proposals`` proposals with fields
            ``proposal_boxes`` (Boxes), ``objectness_logits`` (K,), ``rpa_sum`` and ``rpa_max``
            (K, C) and, with ``class_outputs``, ``scores`` (K, num_classes + 1; softmax,
            background last) and ``class_boxes`` (K, B, 4) with B = num_classes (1 for
            class-agnostic regression), clipped to the image. Without, ``detections`` are empty.
        """
        assert not self.training
        if not class_outputs:
            return self._regions_only(features, proposals)
        boxes = [p.proposal_boxes for p in proposals]
        rpa_maps, head_features = self._region_forward(features, boxes)
        predictions = self.box_predictor(head_features)
        detections, _ = self.box_predictor.inference(predictions, proposals)
        detections = self.forward_with_given_boxes(features, detections)

        probs = self.box_predictor.predict_probs(predictions, proposals)
        class_boxes = self.box_predictor.predict_boxes(predictions, proposals)
        counts = [len(p) for p in proposals]
        kept = []
        for p, maps, prob, cboxes in zip(proposals, rpa_maps.split(counts), probs, class_boxes):
            k = min(self.num_retrieval_proposals, len(p))
            out = p[:k]
            out.rpa_sum, out.rpa_max = _pool_regions(maps[:k])
            out.scores = prob[:k]
            cb = Boxes(cboxes[:k].reshape(-1, 4))
            cb.clip(p.image_size)
            out.class_boxes = cb.tensor.reshape(k, cboxes.shape[1] // 4, 4)
            kept.append(out)
        return detections, kept

    def _regions_only(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """:meth:`forward_retrieval` without the box head: RoI pooling of the kept proposals."""
        kept = [p[: min(self.num_retrieval_proposals, len(p))] for p in proposals]
        rpa_maps, _ = self._region_forward(features, [p.proposal_boxes for p in kept], False)
        for p, maps in zip(kept, rpa_maps.split([len(p) for p in kept])):
            p.rpa_sum, p.rpa_max = _pool_regions(maps)
        detections = []
        for p in proposals:
            d = Instances(p.image_size)
            d.pred_boxes = Boxes(p.proposal_boxes.tensor[:0])
            d.scores = p.objectness_logits[:0]
            d.pred_classes = torch.zeros(0, dtype=torch.int64, device=p.objectness_logits.device)
            detections.append(d)
        return detections, kept

    def region_feature_prefixes(self) -> Tuple[str, ...]:
        """Submodules (names under this head) whose weights shape the RPA vectors; the rest of
        the head (box head, predictor) only shapes class outputs."""
        return ()


def _pool_regions(maps: torch.Tensor):
    if maps.shape[0] == 0:
        empty = maps.new_zeros((0, maps.shape[1]))
        return empty, empty.clone()
    return sum_max_pool(maps)


@ROI_HEADS_REGISTRY.register()
class RetrievalRes5ROIHeads(RetrievalROIHeadsMixin, Res5ROIHeads):
    """C4 heads (RoI pooling on res4, res5 as the per-region head) with retrieval outputs."""

    @configurable
    def __init__(self, *, num_retrieval_proposals: int, rpa_after_res5: bool, **kwargs):
        """
        Args:
            num_retrieval_proposals: proposals kept per image with their RPA vectors.
            rpa_after_res5: pool RPA from the res5 output instead of the RoI-pooled res4 map.
            kwargs: see :class:`Res5ROIHeads`.
        """
        super().__init__(**kwargs)
        self.num_retrieval_proposals = num_retrieval_proposals
        self.rpa_after_res5 = rpa_after_res5

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["num_retrieval_proposals"] = cfg.MODEL.RETRIEVAL.NUM_PROPOSALS
        ret["rpa_after_res5"] = cfg.MODEL.RETRIEVAL.RPA_AFTER_RES5
        return ret

    def region_feature_prefixes(self) -> Tuple[str, ...]:
        return ("res5",) if self.rpa_after_res5 else ()

    def _region_forward(self, features, boxes, run_head=True):
        pooled = self.pooler([features[f] for f in self.in_features], boxes)
        if not run_head and not self.rpa_after_res5:
            return pooled, None
        res5 = self.res5(pooled)
        rpa_maps = res5 if self.rpa_after_res5 else pooled
        return rpa_maps, res5.mean(dim=[2, 3])


@ROI_HEADS_REGISTRY.register()
class RetrievalStandardROIHeads(RetrievalROIHeadsMixin, StandardROIHeads):
    """Box-pooler + box-head heads (VGG16/ZF fc6-fc7, FPN, EfficientNet) with retrieval outputs."""

    @configurable
    def __init__(self, *, num_retrieval_proposals: int, **kwargs):
        """
        Args:
            num_retrieval_proposals: proposals kept per image with their RPA vectors.
            kwargs: see :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        self.num_retrieval_proposals = num_retrieval_proposals

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["num_retrieval_proposals"] = cfg.MODEL.RETRIEVAL.NUM_PROPOSALS
        return ret

    def _region_forward(self, features, boxes, run_head=True):
        pooled = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        head = self.box_head(pooled) if run_head else None
        return pooled, head
