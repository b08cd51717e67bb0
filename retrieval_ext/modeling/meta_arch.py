"""``RetrievalRCNN``: one forward pass gives detections, IPA, proposals with RPA, query regions."""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from .pooling import box_to_cells, combine_levels, pool_box_on_map, sum_max_pool, valid_cells
from .roi_heads import RetrievalROIHeadsMixin

__all__ = ["RetrievalRCNN"]


@META_ARCH_REGISTRY.register()
class RetrievalRCNN(GeneralizedRCNN):
    """Faster R-CNN whose inference also returns everything instance search needs.

    Training is :class:`GeneralizedRCNN`'s. At inference, for each input dict (detectron2's
    format, plus an optional ``"query_boxes"``: ``(Q, 4)`` XYXY boxes in *original* image pixels,
    i.e. the frame of ``"height"`` / ``"width"``) the output dict holds, all boxes in original
    image pixels:

    - ``"instances"``: the usual detections (``pred_boxes``, ``scores``, ``pred_classes``);
    - ``"ipa_sum"``, ``"ipa_max"``: ``(C,)`` image-wise pooled activations of the
      ``MODEL.RETRIEVAL.IPA_FEATURES`` map(s), over the cells that see the image (not padding);
    - ``"proposals"``: ``Instances`` of the first ``MODEL.RETRIEVAL.NUM_PROPOSALS`` RPN proposals
      with ``proposal_boxes``, ``objectness_logits``, ``rpa_sum`` / ``rpa_max`` ``(K, C')``,
      ``scores`` ``(K, num_classes + 1)`` and ``class_boxes`` ``(K, B, 4)``;
    - ``"query"`` (only when query boxes were given): ``Instances`` with ``boxes`` (as given),
      ``crop_sum`` / ``crop_max`` ``(Q, C)``: the paper's query descriptor, the box scaled onto the
      IPA map and the cells inside it pooled; and ``rpa_sum`` / ``rpa_max`` ``(Q, C')``: the box
      through the same RoI pooler as the proposals.

    The backbone runs once per batch (so once per image) for all of it.
    """

    @configurable
    def __init__(self, *, ipa_features: List[str], **kwargs):
        """
        Args:
            ipa_features: backbone outputs pooled into IPA and query crop descriptors.
            kwargs: see :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        shapes = self.backbone.output_shape()
        missing = [f for f in ipa_features if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.RETRIEVAL.IPA_FEATURES {missing} are not backbone outputs "
                f"(available: {sorted(shapes)})"
            )
        channels = {shapes[f].channels for f in ipa_features}
        if len(channels) != 1:
            raise ValueError(
                f"MODEL.RETRIEVAL.IPA_FEATURES {ipa_features} have different channel counts "
                f"{sorted(channels)}; levels can only be combined when they are equal"
            )
        if not isinstance(self.roi_heads, RetrievalROIHeadsMixin):
            raise ValueError(
                f"RetrievalRCNN needs retrieval ROI heads (RetrievalRes5ROIHeads or "
                f"RetrievalStandardROIHeads), got {type(self.roi_heads).__name__}"
            )
        self.ipa_features = list(ipa_features)
        self.ipa_strides = [shapes[f].stride for f in ipa_features]

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["ipa_features"] = cfg.MODEL.RETRIEVAL.IPA_FEATURES
        return ret

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
        class_outputs: bool = True,
    ):
        """Run inference; see the class docstring for the outputs.

        With ``detected_instances`` or ``do_postprocess=False`` this is exactly
        :meth:`GeneralizedRCNN.inference` (detections only). ``class_outputs=False`` skips the
        box head (see :meth:`RetrievalROIHeadsMixin.forward_retrieval`): no detections, and the
        proposals carry no ``scores`` / ``class_boxes``; everything else is unchanged.
        """
        assert not self.training
        if detected_instances is not None or not do_postprocess:
            return super().inference(batched_inputs, detected_instances, do_postprocess)

        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        detections, kept = self.roi_heads.forward_retrieval(features, proposals, class_outputs)

        query_boxes = [
            self._query_boxes_to_input(x, s) for x, s in zip(batched_inputs, images.image_sizes)
        ]
        has_query = [len(q) > 0 for q in query_boxes]
        query_rpa = (
            self.roi_heads.region_descriptors(features, query_boxes) if any(has_query) else None
        )

        results = []
        for i, (inp, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = inp.get("height", image_size[0])
            width = inp.get("width", image_size[1])
            ipa_sum, ipa_max = self._pool_image(features, i, image_size)
            out = {
                "instances": detector_postprocess(detections[i], height, width),
                "ipa_sum": ipa_sum,
                "ipa_max": ipa_max,
                "proposals": _rescale_proposals(kept[i], height, width),
            }
            if has_query[i]:
                out["query"] = self._query_output(
                    features,
                    i,
                    image_size,
                    inp["query_boxes"],
                    query_boxes[i],
                    query_rpa[i],
                    (height, width),
                )
            results.append(out)
        return results

    def query_inference(self, batched_inputs: List[Dict[str, torch.Tensor]]) -> List[dict]:
        """The query side of :meth:`inference` alone: no proposals, no box head.

        A query needs the image's IPA and its box's region vectors only; the proposals and the box
        head (most of the cost with hundreds of regions) are skipped. Each input must carry
        ``"query_boxes"``.

        Returns:
            one dict per input with ``"ipa_sum"``, ``"ipa_max"`` and ``"query"``, equal to those of
            :meth:`inference`.
        """
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        query_boxes = [
            self._query_boxes_to_input(x, s) for x, s in zip(batched_inputs, images.image_sizes)
        ]
        if not all(len(q) for q in query_boxes):
            raise ValueError("query_inference: every input needs 'query_boxes'")
        query_rpa = self.roi_heads.region_descriptors(features, query_boxes)
        results = []
        for i, (inp, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            orig = (inp.get("height", image_size[0]), inp.get("width", image_size[1]))
            ipa_sum, ipa_max = self._pool_image(features, i, image_size)
            query = self._query_output(
                features, i, image_size, inp["query_boxes"], query_boxes[i], query_rpa[i], orig
            )
            results.append({"ipa_sum": ipa_sum, "ipa_max": ipa_max, "query": query})
        return results

    def _ipa_maps(self, features, i: int, image_size) -> List[Tuple[torch.Tensor, int, tuple]]:
        maps = []
        for name, stride in zip(self.ipa_features, self.ipa_strides):
            fmap = features[name][i]
            maps.append((fmap, stride, valid_cells(image_size, stride, fmap.shape[-2:])))
        return maps

    def _pool_image(self, features, i: int, image_size):
        pooled = [
            sum_max_pool(f[:, : v[0], : v[1]])
            for f, _, v in self._ipa_maps(features, i, image_size)
        ]
        return combine_levels(pooled)

    def _query_boxes_to_input(self, inp, image_size) -> Boxes:
        """The input's ``query_boxes`` (original pixels) in network-input pixels."""
        q = inp.get("query_boxes")
        if q is None:
            return Boxes(torch.zeros((0, 4), device=self.device))
        b = torch.as_tensor(q, dtype=torch.float32, device=self.device).reshape(-1, 4).clone()
        height = inp.get("height", image_size[0])
        width = inp.get("width", image_size[1])
        b[:, 0::2] *= image_size[1] / width
        b[:, 1::2] *= image_size[0] / height
        return Boxes(b)

    def _query_output(self, features, i, image_size, boxes_orig, boxes_input, rpa, orig_size):
        crops = []
        for box in boxes_input.tensor.tolist():
            per_level = [
                pool_box_on_map(f, box_to_cells(box, stride, v))
                for f, stride, v in self._ipa_maps(features, i, image_size)
            ]
            crops.append(combine_levels(per_level))
        q = Instances(orig_size)
        q.boxes = Boxes(torch.as_tensor(boxes_orig, dtype=torch.float32).reshape(-1, 4))
        q.crop_sum = torch.stack([c[0] for c in crops])
        q.crop_max = torch.stack([c[1] for c in crops])
        q.rpa_sum, q.rpa_max = rpa
        return q


def _rescale_proposals(proposals: Instances, height: int, width: int) -> Instances:
    """Kept proposals from network-input to original pixels, keeping every row (no filtering)."""
    in_h, in_w = proposals.image_size
    sx, sy = width / in_w, height / in_h
    out = Instances((height, width))
    for name, value in proposals.get_fields().items():
        out.set(name, value)
    boxes = Boxes(proposals.proposal_boxes.tensor.clone())
    boxes.scale(sx, sy)
    boxes.clip((height, width))
    out.proposal_boxes = boxes
    if proposals.has("class_boxes"):
        cb = Boxes(proposals.class_boxes.reshape(-1, 4).clone())  # (K * B, 4)
        cb.scale(sx, sy)
        cb.clip((height, width))
        out.class_boxes = cb.tensor.reshape(proposals.class_boxes.shape)
    return out
