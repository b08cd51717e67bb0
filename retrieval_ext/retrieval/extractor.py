"""Feature extraction: run RetrievalRCNN on database and query images.

Turns the model's outputs into the numpy records the index stores (database images, one pass
each) and the query records search uses (one pass each, or one per box size of
``RETRIEVAL.QUERY_SCALES``). All boxes in records are XYXY in original-image pixels.
"""

import hashlib
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..data.boxes import validate_box, warn_if_below_cell
from ..data.mapper import RetrievalDatasetMapper, UnreadableImageError
from ..modeling.checkpoint import RetrievalCheckpointer
from .normalization import l2_normalize
from .query_scales import combine_query_records, query_resize_factors, resized_shape

__all__ = [
    "FeatureExtractor",
    "outputs_to_record",
    "outputs_to_query",
    "model_fingerprint",
    "weights_hash",
]

logger = logging.getLogger("retrieval_ext")

# Config subtrees that change the stored features: an index built under other values is refused.
_FEATURE_CONFIG_KEYS = ("MODEL", "INPUT")
# not part of what the network computes: where it runs, the weights file (hashed as tensors
# instead) and the fine-tuning settings (what training did is in the weights)
_IGNORED_MODEL_KEYS = ("DEVICE", "WEIGHTS", "FINETUNE")


def comparable_model_config(text: str):
    """A stored ``model_config`` as the values to compare: parsed YAML without the ignored keys.

    Indexes written before a key joined ``_IGNORED_MODEL_KEYS`` (or before a fine-tuning option
    existed) hold it in their text; it must not make them look built by another model.
    """
    import yaml

    values = yaml.safe_load(text)
    if isinstance(values, dict) and isinstance(values.get("MODEL"), dict):
        for k in _IGNORED_MODEL_KEYS:
            values["MODEL"].pop(k, None)
    return values


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter and buffer of ``model`` (names, shapes and bytes), 16 hex digits.

    Hashing the loaded tensors rather than the weights file also covers weights set in code
    (e.g. the EfficientNet ImageNet initialisation) and is independent of the file's path.
    """
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(cfg, model: torch.nn.Module) -> Dict[str, str]:
    """What an index must agree on with the model that searches it.

    Returns:
        {"model_config": YAML text of the feature-relevant config, "weights_hash": ...}
    """
    parts = []
    for key in _FEATURE_CONFIG_KEYS:
        node = cfg[key].clone()
        node.defrost()
        if key == "MODEL":
            for k in _IGNORED_MODEL_KEYS:
                node.pop(k, None)
        parts.append(f"{key}:\n" + "\n".join("  " + line for line in node.dump().splitlines()))
    return {"model_config": "\n".join(parts), "weights_hash": weights_hash(model)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def outputs_to_record(output: dict, height: int, width: int, class_boxes: bool) -> dict:
    """One image's RetrievalRCNN output as an index record (numpy arrays).

    RPA vectors are stored L2-normalised: every use normalises them first, and raw sum-pooled
    activations can exceed the float16 range (65504) that compact indexes store them in. IPA
    vectors are kept raw (the index keeps them in float32).

    Returns:
        dict with ``ipa_sum``, ``ipa_max`` (C,), ``height``, ``width``, and per kept proposal
        ``boxes`` (K, 4), ``objectness`` (K,), ``rpa_sum``, ``rpa_max`` (K, C', L2-normalised),
        ``scores`` (K, num_classes + 1) and, if ``class_boxes``, ``class_boxes`` (K, B, 4).
    """
    p = output["proposals"]
    rec = {
        "ipa_sum": _np(output["ipa_sum"]),
        "ipa_max": _np(output["ipa_max"]),
        "height": np.int64(height),
        "width": np.int64(width),
        "boxes": _np(p.proposal_boxes.tensor),
        "objectness": _np(p.objectness_logits),
        "rpa_sum": l2_normalize(_np(p.rpa_sum)),
        "rpa_max": l2_normalize(_np(p.rpa_max)),
        "scores": _np(p.scores),
    }
    if class_boxes:
        rec["class_boxes"] = _np(p.class_boxes)
    return rec


def outputs_to_query(output: dict) -> dict:
    """One query's RetrievalRCNN output (with one query box) as a query record.

    Returns:
        dict with the whole image's ``ipa_sum``, ``ipa_max`` (C,), the box (4,) in original
        pixels, and its region vectors ``crop_sum``, ``crop_max`` (C,) and ``rpa_sum``,
        ``rpa_max`` (C').
    """
    q = output["query"]
    rec = {"ipa_sum": _np(output["ipa_sum"]), "ipa_max": _np(output["ipa_max"])}
    rec["box"] = _np(q.boxes.tensor[0])
    for name in ("crop_sum", "crop_max", "rpa_sum", "rpa_max"):
        rec[name] = _np(q.get(name)[0])
    return rec


class FeatureExtractor:
    """Builds the model from a config, loads its weights, and extracts records.

    Args:
        cfg: a frozen retrieval_ext config.
        model: an already built model to use instead of building one from ``cfg`` (e.g. the
            trainer's model during periodic evaluation).
    """

    def __init__(self, cfg, model: Optional[torch.nn.Module] = None):
        self.cfg = cfg
        if model is None:
            model = build_model(cfg)
            if cfg.MODEL.WEIGHTS:
                RetrievalCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        self.model = model
        self.mapper = RetrievalDatasetMapper(cfg, is_train=False)
        self.store_class_boxes = bool(cfg.RETRIEVAL.STORE_CLASS_BOXES)
        # box sizes (fractions of MIN_SIZE_TEST) of a multi-scale query; () = one pass
        self.query_scales = tuple(float(f) for f in cfg.RETRIEVAL.QUERY_SCALES)
        self._fingerprint = None

    @property
    def fingerprint(self) -> Dict[str, str]:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.cfg, self.model)
        return self._fingerprint

    def load_inputs(self, dataset_dicts: Sequence[dict]):
        """Map dataset dicts to model inputs, separating the unreadable ones.

        Returns:
            (inputs, failed): inputs as (dataset dict, model input) pairs; failed as
            (dataset dict, reason) pairs.
        """
        inputs, failed = [], []
        for d in dataset_dicts:
            try:
                inputs.append((d, self.mapper(dict(d))))
            except UnreadableImageError as e:
                failed.append((d, str(e)))
        return inputs, failed

    @torch.no_grad()
    def run(self, model_inputs: List[dict]) -> List[dict]:
        """Run the model in eval mode (restoring its mode afterwards)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(model_inputs)
        finally:
            self.model.train(was_training)

    def database_records(self, dataset_dicts: Sequence[dict]):
        """Records of database images.

        Returns:
            (records, failed): ``records`` a list of (image_id, record) pairs, ``failed`` a list
            of (image_id, reason) pairs for images that could not be read.
        """
        inputs, failed = self.load_inputs(dataset_dicts)
        records = []
        if inputs:
            outputs = self.run([x for _, x in inputs])
            for (d, x), out in zip(inputs, outputs):
                rec = outputs_to_record(out, x["height"], x["width"], self.store_class_boxes)
                records.append((d["image_id"], rec))
        return records, [(d["image_id"], reason) for d, reason in failed]

    @torch.no_grad()
    def run_queries(self, model_inputs: List[dict]) -> List[dict]:
        """The query outputs of inputs with ``query_boxes`` (the model's ``query_inference``: no
        proposals, no box head), in eval mode."""
        model = getattr(self.model, "module", self.model)
        was_training = model.training
        model.eval()
        try:
            return model.query_inference(model_inputs)
        finally:
            model.train(was_training)

    def _warn_small_query_box(self, x: dict, where: str):
        """Warns when the query box of model input ``x`` is smaller than one IPA-map cell."""
        strides = getattr(getattr(self.model, "module", self.model), "ipa_strides", None)
        if not strides:
            return
        _, in_h, in_w = x["image"].shape
        scale = (in_h / x["height"], in_w / x["width"])
        warn_if_below_cell(x["query_boxes"][0].tolist(), scale, min(strides), where)

    def query_record_from_image(self, image: np.ndarray, box, where: str = "query") -> dict:
        """The record of a query given as an image array.

        With ``RETRIEVAL.QUERY_SCALES`` the query is extracted at each box size and the vectors
        combined (:mod:`.query_scales`); without, in one pass at the test size.

        Args:
            image: (H, W, 3) uint8 array in ``cfg.INPUT.FORMAT`` channel order.
            box: (x1, y1, x2, y2) in the array's pixels; checked and clamped by
                :func:`~retrieval_ext.data.boxes.validate_box`.
            where: names the query in messages.

        Raises:
            InvalidBoxError (a ValueError): the box does not describe a region of the image.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"{where}: image must be an (H, W, 3) array, got {image.shape}")
        box = validate_box(box, image.shape[:2], where)
        if self.query_scales:
            return self._multi_scale_query(image, box, where)
        aug = T.AugInput(image)
        self.mapper.augmentations(aug)
        x = _query_input(aug.image, image.shape[:2], box)
        self._warn_small_query_box(x, where)
        return outputs_to_query(self.run_queries([x])[0])

    def _multi_scale_query(self, image: np.ndarray, box, where: str) -> dict:
        """The query at every size of ``query_scales`` (see :mod:`.query_scales`), one forward
        pass each, combined; the box stays in ``image``'s pixels."""
        size = image.shape[:2]
        strides = getattr(getattr(self.model, "module", self.model), "ipa_strides", None) or [32]
        factors = query_resize_factors(
            box,
            size,
            self.query_scales,
            self.cfg.INPUT.MIN_SIZE_TEST,
            self.cfg.INPUT.MAX_SIZE_TEST,
            min_side=max(strides),
        )
        largest = int(np.argmax(factors))
        records = []
        for i, s in enumerate(factors):
            new_h, new_w = resized_shape(size, s)
            resized = T.ResizeTransform(size[0], size[1], new_h, new_w).apply_image(image)
            x = _query_input(resized, size, box)
            if i == largest:  # warned when even the largest size leaves the box below a cell
                self._warn_small_query_box(x, where)
            records.append(outputs_to_query(self.run_queries([x])[0]))
        return combine_query_records(records)

    def query_record(self, dataset_dict: dict) -> dict:
        """The record of one query (a dataset dict with ``file_name`` and ``query_box``).

        Raises:
            UnreadableImageError: the query image cannot be read.
            InvalidBoxError (a ValueError): the query box does not fit its image.
        """
        where = f"query {dataset_dict.get('image_id', '')!r} ({dataset_dict['file_name']})"
        if self.query_scales:
            image, box = self.mapper.query_image(dataset_dict)
            return self._multi_scale_query(image, box, where)
        x = self.mapper(dict(dataset_dict))
        self._warn_small_query_box(x, where)
        return outputs_to_query(self.run_queries([x])[0])


def _query_input(image: np.ndarray, original_size, box) -> dict:
    """Model input of a query: ``image`` (the query resized) with ``box`` in the pixels of the
    original ``(height, width)`` (the model maps it onto the resized image)."""
    return {
        "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "height": int(original_size[0]),
        "width": int(original_size[1]),
        "query_boxes": torch.as_tensor([list(box)], dtype=torch.float32),
    }
