"""What an index stores: the fields its configured stages read, and nothing else.

An index of an off-the-shelf model needs, per image, one IPA vector (filtering) and, per kept
proposal, its box and one region vector (CA-SR). Class scores and class-specific boxes are read
by CS-SR only, which needs a model whose classes are the query objects (fine-tuned); a second
pooling of the region vectors is read only when ``RERANK_POOLING`` asks for it.
:class:`IndexContents` says which fields an index holds; it is recorded in the index manifest
(``contents``), so that a stage needing a field the index lacks is refused with the key to set
(:meth:`IndexContents.missing`).

Indexes written before the contents were recorded (every field stored) are described by
:meth:`IndexContents.from_schema`.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .index_store import FieldSpec, IndexSchema

__all__ = [
    "IndexContents",
    "MissingFieldError",
    "STAGE_FIELDS",
    "class_accessors",
    "class_outputs_wanted",
    "contents_from_config",
]

_POOLINGS = ("sum", "max")
_FLOAT_DTYPES = ("float16", "float32")
_CLASS_OUTPUTS = ("auto", "yes", "no")


@dataclass(frozen=True)
class IndexContents:
    """The fields of one index.

    Attributes:
        ipa_poolings: image-wise vectors stored (``ipa_sum`` / ``ipa_max``).
        ipa_dtype: their storage; new indexes store them L2-normalised (raw sums overflow
            float16), indexes written before stored raw float32 sums (``ipa_normalized`` False).
        region_poolings: region vectors stored (``rpa_sum`` / ``rpa_max``).
        class_outputs: per-proposal class probabilities (``scores``) are stored.
        class_boxes: and class-specific regressed boxes (``class_boxes``).
        class_top_k: 0 = every class's probability (``scores`` (K, C + 1), background last);
            k > 0 = the k most probable object classes of each proposal (``class_ids`` (K, k)
            int16, ``scores`` (K, k) and ``class_boxes`` (K, k, 4)).
        num_classes: object classes of the model's predictor (without background).
        box_dtype: storage of proposal and class boxes (XYXY, original-image pixels).
        objectness: the proposals' objectness logits are stored (no stage reads them; the
            proposals are stored best first).
        ipa_normalized: IPA vectors are stored L2-normalised.
    """

    ipa_poolings: Tuple[str, ...] = ("sum",)
    ipa_dtype: str = "float16"
    region_poolings: Tuple[str, ...] = ("max",)
    class_outputs: bool = False
    class_boxes: bool = False
    class_top_k: int = 0
    num_classes: int = 0
    box_dtype: str = "float16"
    objectness: bool = False
    ipa_normalized: bool = True

    def __post_init__(self):
        for name in ("ipa_poolings", "region_poolings"):
            value = tuple(sorted(set(getattr(self, name)), key=_POOLINGS.index))
            bad = [p for p in value if p not in _POOLINGS]
            if bad:
                raise ValueError(f"{name}: unknown poolings {bad}; choose from {_POOLINGS}")
            object.__setattr__(self, name, value)
        if not self.ipa_poolings:
            raise ValueError("an index stores at least one IPA pooling (filtering reads it)")
        for name in ("ipa_dtype", "box_dtype"):
            if getattr(self, name) not in _FLOAT_DTYPES:
                raise ValueError(f"{name} must be one of {_FLOAT_DTYPES}")
        if int(self.class_top_k) < 0:
            raise ValueError(f"class_top_k must be >= 0, got {self.class_top_k}")
        if self.class_boxes and not self.class_outputs:
            object.__setattr__(self, "class_boxes", False)

    # -- the schema ----------------------------------------------------------------------------
    def schema(self) -> IndexSchema:
        """The stored fields. Region vectors are ``"feature"`` fields (the index dtype, or what a
        region compression makes of them); everything else has its dtype here."""
        fields = [
            FieldSpec(f"ipa_{p}", "image", "exact", (None,), self.ipa_dtype)
            for p in self.ipa_poolings
        ]
        fields += [
            FieldSpec("height", "image", "exact", (), "int64"),
            FieldSpec("width", "image", "exact", (), "int64"),
            FieldSpec("boxes", "proposal", "exact", (4,), self.box_dtype),
        ]
        if self.objectness:
            fields.append(FieldSpec("objectness", "proposal", "exact", (), "float32"))
        fields += [
            FieldSpec(f"rpa_{p}", "proposal", "feature", (None,)) for p in self.region_poolings
        ]
        if self.class_outputs:
            k = int(self.class_top_k)
            if k:
                fields.append(FieldSpec("class_ids", "proposal", "exact", (k,), "int16"))
                fields.append(FieldSpec("scores", "proposal", "exact", (k,), "float16"))
            else:
                fields.append(FieldSpec("scores", "proposal", "feature", (None,)))
            if self.class_boxes:
                fields.append(
                    FieldSpec("class_boxes", "proposal", "exact", (k or None, 4), self.box_dtype)
                )
        return IndexSchema(fields)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ipa_poolings"] = list(self.ipa_poolings)
        d["region_poolings"] = list(self.region_poolings)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "IndexContents":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_schema(cls, schema: IndexSchema, num_classes: int = 0) -> "IndexContents":
        """The contents of an index written before they were recorded (what its schema holds:
        raw float32 IPA, float32 boxes, every class's score)."""
        names = set(schema.names)
        box = schema["boxes"].dtype if "boxes" in names else "float32"
        return cls(
            ipa_poolings=tuple(p for p in _POOLINGS if f"ipa_{p}" in names),
            ipa_dtype="float32",
            region_poolings=tuple(p for p in _POOLINGS if f"rpa_{p}" in names),
            class_outputs="scores" in names,
            class_boxes="class_boxes" in names,
            class_top_k=int(schema["class_ids"].shape[0]) if "class_ids" in names else 0,
            num_classes=int(num_classes),
            box_dtype=box if box in _FLOAT_DTYPES else "float32",
            objectness="objectness" in names,
            ipa_normalized=False,
        )

    # -- what a stage needs ----------------------------------------------------------------------
    def missing(self, stage: str, filter_pooling: str, rerank_pooling: str) -> Optional[str]:
        """Why ``stage`` cannot run on this index, naming the key to set; None if it can."""
        need = STAGE_FIELDS[stage]
        if "ipa" in need and filter_pooling not in self.ipa_poolings:
            return (
                f"stage {stage} reads ipa_{filter_pooling} (RETRIEVAL.FILTER_POOLING "
                f"{filter_pooling}), which this index does not store (it stores "
                f"{['ipa_' + p for p in self.ipa_poolings]}): set RETRIEVAL.FILTER_POOLING to a "
                f"stored pooling, or add {filter_pooling!r} to RETRIEVAL.STORE.IPA_POOLINGS and "
                "index again"
            )
        if "rpa" in need and rerank_pooling not in self.region_poolings:
            return (
                f"stage {stage} reads rpa_{rerank_pooling} (RETRIEVAL.RERANK_POOLING "
                f"{rerank_pooling}), which this index does not store (it stores "
                f"{['rpa_' + p for p in self.region_poolings]}): set RETRIEVAL.RERANK_POOLING to "
                f"a stored pooling, or add {rerank_pooling!r} to RETRIEVAL.STORE.REGION_POOLINGS "
                "and index again"
            )
        if "scores" in need and not self.class_outputs:
            return (
                f"stage {stage} reads class scores, which this index does not store (an "
                "off-the-shelf model's classes are not the query objects): index again with a "
                "model fine-tuned on the query objects, or RETRIEVAL.STORE.CLASS_OUTPUTS 'yes'"
            )
        return None

    @classmethod
    def of_index(cls, index) -> "IndexContents":
        """What an :class:`~.index_store.IndexReader` holds: its manifest's ``contents``, or for
        an index written before they were recorded, what its schema says."""
        recorded = index.manifest.get("contents")
        if recorded is not None:
            return cls.from_json(recorded)
        dims = index.feature_dims.get("scores")
        return cls.from_schema(index.schema, num_classes=int(dims[0]) - 1 if dims else 0)


class MissingFieldError(ValueError):
    """A stage needs a field the index does not store; the message names the key to set."""


# The stored data each stage reads ("ipa": the filtering pooling, "rpa": the rerank pooling).
STAGE_FIELDS: Dict[str, Tuple[str, ...]] = {
    "filtering": ("ipa",),
    "filtering_qe": ("ipa",),
    "ca_sr": ("ipa", "rpa"),
    "ca_sr_qe": ("ipa", "rpa"),
    "cs_sr": ("ipa", "scores"),
    "cs_sr_qe": ("ipa", "scores"),
}


def class_accessors(index, contents: IndexContents):
    """Per-image accessors of the stored class outputs in the layout CS-SR reads.

    Returns:
        (scores, class_boxes): ``scores(i)`` (K, C + 1) probabilities, background last, and
        ``class_boxes(i)`` (K, B, 4) or None when the index stores no class boxes. With top-k
        storage the classes not stored have probability 0 and NaN boxes.
    """
    scores = index.region_accessor("scores")
    boxes = index.region_accessor("class_boxes") if contents.class_boxes else None
    if not contents.class_top_k:
        return scores, boxes
    ids = index.region_accessor("class_ids")
    c = int(contents.num_classes)

    def dense_scores(i):
        k_ids = np.asarray(ids(i), dtype=np.int64)
        out = np.zeros((k_ids.shape[0], c + 1), dtype=np.float32)
        np.put_along_axis(out, k_ids, np.asarray(scores(i), dtype=np.float32), axis=1)
        return out

    def dense_boxes(i):
        k_ids = np.asarray(ids(i), dtype=np.int64)
        out = np.full((k_ids.shape[0], c, 4), np.nan, dtype=np.float32)
        np.put_along_axis(out, k_ids[:, :, None], np.asarray(boxes(i), np.float32), axis=1)
        return out

    return dense_scores, dense_boxes if boxes is not None else None


def class_outputs_wanted(
    setting: str, finetune_dataset: str, num_classes: int, query_classes, classifier: str = "model"
):
    """Whether an index stores class outputs under ``RETRIEVAL.STORE.CLASS_OUTPUTS``.

    Args:
        setting: "yes", "no" or "auto": CS-SR reads the model's class scores (``classifier``
            "model", ``RETRIEVAL.CS_SR_CLASSIFIER``; the "queries" classifier scores the stored
            region vectors) and the model's classes are the query objects, i.e. a fine-tuning
            config (``finetune_dataset`` set) or ``num_classes`` equal to the number of query
            objects (``query_classes``; None when the dataset is not known).
    """
    if setting not in _CLASS_OUTPUTS:
        raise ValueError(
            f"RETRIEVAL.STORE.CLASS_OUTPUTS must be one of {_CLASS_OUTPUTS}, got {setting!r}"
        )
    if setting != "auto":
        return setting == "yes"
    if classifier != "model":
        return False
    return bool(finetune_dataset) or (query_classes is not None and num_classes == query_classes)


def contents_from_config(cfg) -> IndexContents:
    """The contents of an index built under ``cfg`` (``RETRIEVAL.STORE.*``, see config.py).

    IPA: ``FILTER_POOLING`` (+ sum when ``WHITENING_DATASET`` learns a whitening on it); region
    vectors: ``RERANK_POOLING``; class outputs: see :func:`class_outputs_wanted`.
    """
    r, store = cfg.RETRIEVAL, cfg.RETRIEVAL.STORE
    ipa = tuple(store.IPA_POOLINGS) or (r.FILTER_POOLING,) + (
        ("sum",) if r.WHITENING_DATASET else ()
    )
    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    class_outputs = class_outputs_wanted(
        store.CLASS_OUTPUTS,
        cfg.MODEL.FINETUNE.DATASET,
        num_classes,
        _query_classes(r.DATASET),
        r.CS_SR_CLASSIFIER,
    )
    return IndexContents(
        ipa_poolings=ipa,
        ipa_dtype=store.IPA_DTYPE,
        region_poolings=tuple(store.REGION_POOLINGS) or (r.RERANK_POOLING,),
        class_outputs=class_outputs,
        class_boxes=class_outputs and bool(r.STORE_CLASS_BOXES),
        class_top_k=min(int(store.CLASS_TOP_K), num_classes) if class_outputs else 0,
        num_classes=num_classes,
        box_dtype=store.BOX_DTYPE,
        objectness=bool(store.OBJECTNESS),
    )


def _query_classes(dataset: str) -> Optional[int]:
    """Number of query objects of a registered retrieval dataset; None if it is not registered."""
    from detectron2.data import MetadataCatalog

    from ..data.datasets.catalog import get_retrieval_metadata

    classes = MetadataCatalog.get(f"{dataset}_query").get("thing_classes", None)
    if classes is None:
        try:
            classes = getattr(get_retrieval_metadata(dataset), "thing_classes", None)
        except (KeyError, ValueError, OSError):  # not registered, or its files are not there
            return None
    return len(classes) if classes else None
