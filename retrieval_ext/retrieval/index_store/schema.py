"""What one index record holds: its fields, each per image or per proposal, with shape and dtype."""

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np

__all__ = ["FieldSpec", "IndexSchema", "default_schema"]


@dataclass(frozen=True)
class FieldSpec:
    """One stored field.

    Args:
        name: file-safe field name (``[A-Za-z0-9_]+``).
        scope: ``"image"`` (one value per image, stacked to (N, *shape)) or ``"proposal"`` (K_i
            values per image, concatenated to (sum K_i, *shape)).
        kind: ``"feature"`` (stored in the index dtype, float16 or float32) or ``"exact"``
            (stored in ``dtype``).
        shape: trailing shape after the leading image/proposal axis; ``None`` entries are
            inferred from the first record and then fixed (e.g. the channel count C).
        dtype: storage dtype of an ``"exact"`` field (ignored for features).
    """

    name: str
    scope: str
    kind: str
    shape: Tuple[Optional[int], ...] = ()
    dtype: Optional[str] = None

    def __post_init__(self):
        if not re.match(r"^[A-Za-z0-9_]+$", self.name) or self.name in ("ids", "offsets", "meta"):
            raise ValueError(f"invalid field name {self.name!r}")
        if self.scope not in ("image", "proposal"):
            raise ValueError(f"field {self.name}: scope must be 'image' or 'proposal'")
        if self.kind not in ("feature", "exact"):
            raise ValueError(f"field {self.name}: kind must be 'feature' or 'exact'")
        if self.kind == "exact" and self.dtype is None:
            raise ValueError(f"field {self.name}: an exact field needs a dtype")
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "scope": self.scope,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    @classmethod
    def from_json(cls, d: dict) -> "FieldSpec":
        return cls(d["name"], d["scope"], d["kind"], tuple(d["shape"]), d.get("dtype"))


class IndexSchema:
    """Ordered set of :class:`FieldSpec` describing one index record.

    Args:
        fields: the field specs; names must be unique.
    """

    def __init__(self, fields: Iterable[FieldSpec]):
        self.fields: Tuple[FieldSpec, ...] = tuple(fields)
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in schema: {names}")
        self._by_name = {f.name: f for f in self.fields}

    def __getitem__(self, name: str) -> FieldSpec:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.fields]

    @property
    def image_fields(self) -> List[FieldSpec]:
        return [f for f in self.fields if f.scope == "image"]

    @property
    def proposal_fields(self) -> List[FieldSpec]:
        return [f for f in self.fields if f.scope == "proposal"]

    def to_json(self) -> list:
        return [f.to_json() for f in self.fields]

    @classmethod
    def from_json(cls, d: list) -> "IndexSchema":
        return cls(FieldSpec.from_json(x) for x in d)

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexSchema) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"IndexSchema({', '.join(f'{f.name}:{f.scope}' for f in self.fields)})"


def default_schema(class_boxes: bool = False) -> IndexSchema:
    """Schema of one Faster R-CNN forward pass (IPA, RPA, proposals, detections).

    Args:
        class_boxes: also store class-specific regressed boxes (K_i, num_classes, 4).

    Returns:
        IndexSchema with per-image ``ipa_sum``, ``ipa_max`` (C,), ``height``, ``width`` (int64)
        and per-proposal ``boxes`` (4,) float32 XYXY original-image pixels, ``objectness`` ()
        float32, ``rpa_sum``, ``rpa_max`` (C,), ``scores`` (num_classes + 1,) and optionally
        ``class_boxes`` (num_classes, 4) float32.
    """
    fields = [
        FieldSpec("ipa_sum", "image", "feature", (None,)),
        FieldSpec("ipa_max", "image", "feature", (None,)),
        FieldSpec("height", "image", "exact", (), "int64"),
        FieldSpec("width", "image", "exact", (), "int64"),
        FieldSpec("boxes", "proposal", "exact", (4,), "float32"),
        FieldSpec("objectness", "proposal", "exact", (), "float32"),
        FieldSpec("rpa_sum", "proposal", "feature", (None,)),
        FieldSpec("rpa_max", "proposal", "feature", (None,)),
        FieldSpec("scores", "proposal", "feature", (None,)),
    ]
    if class_boxes:
        fields.append(FieldSpec("class_boxes", "proposal", "exact", (None, 4), "float32"))
    return IndexSchema(fields)
