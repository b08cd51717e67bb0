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
from .contents import IndexContents, contents_from_config
from .normalization import l2_normalize
from .query_scales import combine_query_records, query_resize_factors, resized_shape

__all__ = [
    "FeatureExtractor",
    "outputs_to_record",
    "outputs_to_query",
    "feature_state_dict",
    "model_fingerprint",
    "weights_hash",
    "WEIGHTS_SCOPES",
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


# What a stored index depends on: "regions" = the weights that shape its IPA, proposals and region
# vectors (backbone, proposal generator, and the head's layers feeding RPA, e.g. C4's res5 with
# RPA_AFTER_RES5); "all" = the whole model, for an index that also stores class outputs. Indexes
# written before the scope was recorded hashed the whole model ("all").
WEIGHTS_SCOPES = ("regions", "all")


def _in_scope(name: str, scope: str, head_prefixes) -> bool:
    if scope == "all" or not name.startswith("roi_heads."):
        return True
    rest = name[len("roi_heads.") :]
    return any(rest == p or rest.startswith(p + ".") for p in head_prefixes)


def feature_state_dict(model: torch.nn.Module, scope: str = "all") -> Dict[str, torch.Tensor]:
    """The parameters and buffers of ``model`` in a weights scope (see ``WEIGHTS_SCOPES``).

    Returns:
        {name: tensor}, names as in ``model.state_dict()``.
    """
    if scope not in WEIGHTS_SCOPES:
        raise ValueError(f"weights scope must be one of {WEIGHTS_SCOPES}, got {scope!r}")
    model = getattr(model, "module", model)
    heads = getattr(model, "roi_heads", None)
    prefixes = heads.region_feature_prefixes() if hasattr(heads, "region_feature_prefixes") else ()
    return {k: v for k, v in model.state_dict().items() if _in_scope(k, scope, tuple(prefixes))}


def weights_hash(model: torch.nn.Module, scope: str = "all") -> str:
    """SHA-1 of the parameters and buffers of ``model`` in ``scope`` (names, shapes and bytes),
    16 hex digits.

    Hashing the loaded tensors rather than the weights file also covers weights set in code
    (e.g. the EfficientNet ImageNet initialisation) and is independent of the file's path.
    """
    h = hashlib.sha1()
    for name, tensor in sorted(feature_state_dict(model, scope).items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(cfg, model: torch.nn.Module, scope: str = "all") -> Dict[str, str]:
    """What an index must agree on with the model that searches it.

    Returns:
        {"model_config": YAML text of the feature-relevant config, "weights_hash": the weights
        of ``scope``, "weights_scope": ``scope``}
    """
    parts = []
    for key in _FEATURE_CONFIG_KEYS:
        node = cfg[key].clone()
        node.defrost()
        if key == "MODEL":
            for k in _IGNORED_MODEL_KEYS:
                node.pop(k, None)
        parts.append(f"{key}:\n" + "\n".join("  " + line for line in node.dump().splitlines()))
    return {
        "model_config": "\n".join(parts),
        "weights_hash": weights_hash(model, scope),
        "weights_scope": scope,
    }


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def outputs_to_record(output: dict, height: int, width: int, contents: IndexContents) -> dict:
    """One image's RetrievalRCNN output as an index record (numpy arrays) of ``contents``.

    Vectors are stored L2-normalised: every use normalises them first, and raw sum-pooled
    activations can exceed the float16 range (65504) that compact indexes store them in.

    Returns:
        dict with ``height``, ``width``, the stored IPA poolings ``ipa_sum`` / ``ipa_max`` (C,),
        and per kept proposal ``boxes`` (K, 4) (original pixels), the stored region poolings
        ``rpa_sum`` / ``rpa_max`` (K, C'), and as ``contents`` says ``objectness`` (K,),
        ``scores`` (K, num_classes + 1) or top-k ``class_ids`` / ``scores`` (K, k), and
        ``class_boxes`` (K, B, 4) or (K, k, 4).
    """
    p = output["proposals"]
    rec = {"height": np.int64(height), "width": np.int64(width)}
    for pooling in contents.ipa_poolings:
        v = _np(output[f"ipa_{pooling}"])
        rec[f"ipa_{pooling}"] = l2_normalize(v) if contents.ipa_normalized else v
    rec["boxes"] = _np(p.proposal_boxes.tensor)
    if contents.objectness:
        rec["objectness"] = _np(p.objectness_logits)
    for pooling in contents.region_poolings:
        rec[f"rpa_{pooling}"] = l2_normalize(_np(p.get(f"rpa_{pooling}")))
    if contents.class_outputs:
        rec.update(_class_record(p, contents))
    return rec


def _class_record(p, contents: IndexContents) -> dict:
    """Class probabilities (and boxes) of the kept proposals: all classes, or the top k."""
    scores = _np(p.scores)
    boxes = _np(p.class_boxes) if contents.class_boxes else None
    k = int(contents.class_top_k)
    if not k:
        return {"scores": scores} if boxes is None else {"scores": scores, "class_boxes": boxes}
    # the k most probable object classes (background, the last column, left out); ties: lower id
    ids = np.argsort(-scores[:, :-1], axis=1, kind="stable")[:, :k]
    out = {
        "class_ids": ids.astype(np.int16),
        "scores": np.take_along_axis(scores, ids, axis=1),
    }
    if boxes is not None:
        if boxes.shape[1] == 1:  # class-agnostic regression: one box for every class
            out["class_boxes"] = np.repeat(boxes, k, axis=1)
        else:
            out["class_boxes"] = np.take_along_axis(boxes, ids[:, :, None], axis=1)
    return out


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
        contents: what the database records hold; default from ``cfg.RETRIEVAL.STORE``
            (:func:`~.contents.contents_from_config`).
    """

    def __init__(
        self,
        cfg,
        model: Optional[torch.nn.Module] = None,
        contents: Optional[IndexContents] = None,
    ):
        self.cfg = cfg
        # the file the weights came from, when one identifies them (see index_weights.py)
        self.weights_file = ""
        # a model handed in (the trainer's) holds weights no config names
        self.model_given = model is not None
        if model is None:
            model = build_model(cfg)
            if cfg.MODEL.WEIGHTS:
                RetrievalCheckpointer(model).load(cfg.MODEL.WEIGHTS)
                self.weights_file = cfg.MODEL.WEIGHTS
        self.model = model
        self.mapper = RetrievalDatasetMapper(cfg, is_train=False)
        self.contents = contents if contents is not None else contents_from_config(cfg)
        # box sizes (fractions of MIN_SIZE_TEST) of a multi-scale query; () = one pass
        self.query_scales = tuple(float(f) for f in cfg.RETRIEVAL.QUERY_SCALES)
        self._fingerprints: Dict[str, Dict[str, str]] = {}

    @property
    def weights_scope(self) -> str:
        """The weights the index this extractor writes depends on (``WEIGHTS_SCOPES``)."""
        return "all" if self.contents.class_outputs else "regions"

    @property
    def fingerprint(self) -> Dict[str, str]:
        """:func:`model_fingerprint` in this extractor's :attr:`weights_scope`."""
        return self.fingerprint_for(self.weights_scope)

    def fingerprint_for(self, scope: str) -> Dict[str, str]:
        """:func:`model_fingerprint` of the model's weights in ``scope`` (cached)."""
        if scope not in self._fingerprints:
            self._fingerprints[scope] = model_fingerprint(self.cfg, self.model, scope)
        return self._fingerprints[scope]

    def load_weights(self, state_dict: Dict[str, torch.Tensor]):
        """Load ``state_dict`` (a :func:`feature_state_dict`) into the model, every key of it.

        Raises:
            ValueError: a key the model lacks, or a tensor of another shape (names them).
        """
        own = self.model.state_dict()
        bad = [k for k, v in state_dict.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"weights {bad[:5]} do not fit the model built from the config")
        self.model.load_state_dict(state_dict, strict=False)
        self._fingerprints.clear()

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
    def run(self, model_inputs: List[dict], class_outputs: bool = True) -> List[dict]:
        """Run the model in eval mode (restoring its mode afterwards); ``class_outputs=False``
        skips the box head (see ``RetrievalRCNN.inference``)."""
        was_training = self.model.training
        self.model.eval()
        try:
            if class_outputs:
                return self.model(model_inputs)
            return getattr(self.model, "module", self.model).inference(
                model_inputs, class_outputs=False
            )
        finally:
            self.model.train(was_training)

    def database_records(self, dataset_dicts: Sequence[dict], batch_size: int = 0):
        """Records of database images.

        Images are batched only with images of the same network-input size, at most
        ``batch_size`` at a time (0 = all of them together): a batch pads its images to the
        largest, and padding changes the features near the edges (a deep network's receptive
        field spans the whole image), so records do not depend on which images share a batch.

        Returns:
            (records, failed): ``records`` a list of (image_id, record) pairs in input order,
            ``failed`` a list of (image_id, reason) pairs for images that could not be read.
        """
        inputs, failed = self.load_inputs(dataset_dicts)
        groups: Dict[tuple, List[int]] = {}
        for j, (_, x) in enumerate(inputs):
            groups.setdefault(tuple(x["image"].shape), []).append(j)
        step = int(batch_size) or max(len(inputs), 1)
        records = [None] * len(inputs)
        for members in groups.values():
            for start in range(0, len(members), step):
                part = members[start : start + step]
                outputs = self.run([inputs[j][1] for j in part], self.contents.class_outputs)
                for j, out in zip(part, outputs):
                    d, x = inputs[j]
                    rec = outputs_to_record(out, x["height"], x["width"], self.contents)
                    records[j] = (d["image_id"], rec)
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
