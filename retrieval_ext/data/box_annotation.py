"""Database boxes of a custom-format collection, derived from its reference images.

The collection-level steps of ``tools/annotate_boxes.py``: read the queries (each query image,
cropped to its box, is the *reference* of its object) and the raw ``relevance.json``; match every
reference of an object against each of its positives (:mod:`.reference_boxes`), pass after pass
until one accepts; apply manual corrections from a review file; write the boxes into a copy of
``relevance.json`` in the custom format (``{"object": {"positives", "junk", "boxes":
{"images/a.jpg": [[x1, y1, x2, y2]]}}}``, see :mod:`.datasets.custom`).

Boxes are XYXY_ABS in the pixels of the photo as read (EXIF orientation applied), the frame in
which the custom loader and the evaluator use them.

Review file (JSON), both lists optional; every entry needs a ``reason``::

    {"references": [{"query": "queries/a.jpg", "box": [x1, y1, x2, y2], "reason": "..."}],
     "photos": [{"object": "obj", "image": "images/b.jpg", "box": [x1, y1, x2, y2] or null,
                 "reason": "..."}]}

A reference entry replaces the box of that query image before matching (e.g. a cover scan whose
white margin cannot be told from the cover's own white edge); a photo entry replaces the box
found in that photo (null: no box).
"""

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .boxes import as_box, validate_box
from .datasets.custom import read_queries
from .mapper import read_image
from .reference_boxes import MatchParams, detect_and_describe, locate_reference, trim_uniform_border

__all__ = [
    "STATUS_AUTO",
    "STATUS_SECOND",
    "STATUS_REVIEW",
    "STATUS_REVIEW_NONE",
    "STATUS_NONE",
    "STATUS_GIVEN",
    "Review",
    "References",
    "load_collection",
    "load_review",
    "annotate",
    "annotate_photo",
    "apply_photo_review",
    "annotated_relevance",
    "summarise",
]

# Status of a (object, photo) record.
STATUS_AUTO = "accepted"  # accepted in the first pass
STATUS_SECOND = "accepted_second_pass"  # accepted in a later pass
STATUS_REVIEW = "review_box"  # box from the review file
STATUS_REVIEW_NONE = "review_no_box"  # the review file says: no box
STATUS_NONE = "no_box"  # no pass accepted a match
STATUS_GIVEN = "given"  # the input relevance.json already had boxes for it: kept

# A pass: (status it gives, thresholds, factor the photo is upscaled by before detection).
Pass = Tuple[str, MatchParams, float]


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_collection(root: str) -> Tuple[Dict[str, List[dict]], dict]:
    """The queries grouped by object and the raw relevance.json of a custom-format collection.

    Args:
        root: the collection folder (``queries.json`` or ``queries.csv``, ``relevance.json``).

    Returns:
        (queries, relevance): ``{object: [query dicts of read_queries]}`` in file order and the
        relevance.json content as read.

    Raises:
        FileNotFoundError / ValueError: naming the file, object or image at fault.
    """
    queries: Dict[str, List[dict]] = OrderedDict()
    for q in read_queries(root):
        queries.setdefault(q["object"], []).append(q)
    rel_path = os.path.join(root, "relevance.json")
    relevance = _load_json(rel_path, "relevance file")
    if not isinstance(relevance, dict):
        raise ValueError(f"{rel_path}: expected {{object: {{positives, junk, boxes}}}}")
    for obj, entry in relevance.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("positives", []), list):
            raise ValueError(f"{rel_path}, object {obj!r}: expected {{'positives': [...], ...}}")
        if not isinstance(entry.get("boxes", {}), dict):
            raise ValueError(f"{rel_path}, object {obj!r}: 'boxes' must be {{image: [[box]]}}")
        for name in entry.get("positives", []):
            if not isinstance(name, str) or not os.path.isfile(os.path.join(root, name)):
                raise FileNotFoundError(
                    f"{rel_path}, object {obj!r}: positive {name!r} does not exist under {root}"
                )
    return queries, relevance


@dataclass
class Review:
    """Manual corrections (see the module docstring).

    Attributes:
        references (dict): ``{query image: (box, reason)}``.
        photos (list[dict]): ``{"object", "image", "box" (list or None), "reason", "where"}``.
    """

    references: Dict[str, Tuple[List[float], str]] = field(default_factory=dict)
    photos: List[dict] = field(default_factory=list)


def _reason(entry: dict, where: str) -> str:
    reason = str(entry.get("reason") or "").strip()
    if not reason:
        raise ValueError(f"{where}: 'reason' is empty (say why the box was corrected)")
    return reason


def load_review(path: str) -> Review:
    """Reads and checks a review file (boxes against their images: see :func:`apply_review`).

    Raises:
        FileNotFoundError / ValueError: naming the file and the entry at fault.
    """
    data = _load_json(path, "review file")
    if not isinstance(data, dict) or not set(data) <= {"references", "photos"}:
        raise ValueError(f"{path}: expected {{'references': [...], 'photos': [...]}}")
    review = Review()
    for i, e in enumerate(data.get("references", [])):
        where = f"{path}, references[{i}]"
        if not isinstance(e, dict) or not {"query", "box"} <= set(e):
            raise ValueError(f"{where}: needs keys query, box, reason; got {e!r}")
        review.references[str(e["query"])] = (as_box(e["box"], where), _reason(e, where))
    for i, e in enumerate(data.get("photos", [])):
        where = f"{path}, photos[{i}]"
        if not isinstance(e, dict) or not {"object", "image", "box"} <= set(e):
            raise ValueError(f"{where}: needs keys object, image, box, reason; got {e!r}")
        box = None if e["box"] is None else as_box(e["box"], where)
        review.photos.append(
            {"object": e["object"], "image": e["image"], "box": box, "reason": _reason(e, where)}
        )
        review.photos[-1]["where"] = where
    return review


def _inside(box: Sequence[float], size: Tuple[int, int], where: str) -> List[float]:
    """The box, which must lie inside the image (a reviewed box is never clamped silently)."""
    h, w = size
    if validate_box(box, (h, w), where) != list(box):
        raise ValueError(f"{where}: box {list(box)} reaches outside the {w} x {h} image")
    return list(box)


class References:
    """Features of every query image cropped to its (trimmed or reviewed) box, computed once.

    Args:
        root: the collection folder.
        trim_colour: BGR colour of margins to cut from the query boxes (None: keep the boxes).
        review: reference boxes that replace the query boxes (never trimmed).
    """

    def __init__(
        self,
        root: str,
        trim_colour: Optional[Tuple[int, int, int]] = None,
        review: Optional[Review] = None,
    ):
        self.root, self.trim_colour = root, trim_colour
        self.overrides = review.references if review is not None else {}
        self._cache: Dict[str, dict] = OrderedDict()

    def check_overrides(self, queries: Dict[str, List[dict]], review_path: str) -> None:
        """Every reviewed reference must be a query image of the collection."""
        known = {q["image"] for qs in queries.values() for q in qs}
        for name in self.overrides:
            if name not in known:
                raise ValueError(f"{review_path}: reference {name!r} is not a query image")

    def all(self) -> List[dict]:
        """Every reference computed so far, in the order they were first needed."""
        return list(self._cache.values())

    def get(self, query: dict) -> dict:
        """``{"object", "image", "query_box", "box", "local_box", "crop", "features",
        "review"}`` of a query: ``box`` in the query image's frame, ``local_box`` in the crop's;
        ``review`` the reason of a reviewed box ("" otherwise)."""
        key = f"{query['image']} {query['box']}"
        if key in self._cache:
            return self._cache[key]
        image = read_image(os.path.join(self.root, query["image"]), "BGR")
        where = f"query {query['image']} of object {query['object']!r}"
        box = validate_box(query["box"], image.shape[:2], where)
        review = ""
        if query["image"] in self.overrides:
            box, review = self.overrides[query["image"]]
            box = _inside(box, image.shape[:2], f"reviewed reference {query['image']}")
        elif self.trim_colour is not None:
            box = trim_uniform_border(image, box, self.trim_colour)
        x1, y1 = int(np.floor(box[0])), int(np.floor(box[1]))
        x2, y2 = int(np.ceil(box[2])), int(np.ceil(box[3]))
        crop = image[y1:y2, x1:x2]
        self._cache[key] = {
            "object": query["object"],
            "image": query["image"],
            "query_box": [float(v) for v in query["box"]],
            "box": [float(v) for v in box],
            # the crop's frame: the box relative to the crop's whole-pixel corner
            "local_box": [box[0] - x1, box[1] - y1, box[2] - x1, box[3] - y1],
            "crop": crop,
            "features": detect_and_describe(crop),
            "review": review,
        }
        return self._cache[key]

    def find(self, image: Optional[str]) -> Optional[dict]:
        """The reference computed for a query image (None if none was)."""
        return next((r for r in self._cache.values() if r["image"] == image), None)


def annotate_photo(path: str, refs: List[dict], passes: Sequence[Pass]):
    """Matches every reference of an object against one photo, pass after pass.

    Args:
        path: the photo.
        refs: the object's references (:meth:`References.get`).
        passes: tried in order until one accepts a match.

    Returns:
        (status, reference, Localisation): the first pass with an accepted match and its
        reference with most inliers; without any, ``STATUS_NONE`` and the attempt with most
        inliers over all passes.
    """
    best = (STATUS_NONE, None, None)
    image, features = None, {}
    for status, params, upscale in passes:
        if upscale not in features:
            image = read_image(path, "BGR") if image is None else image
            features[upscale] = detect_and_describe(image, upscale=upscale)
        tries = [
            (locate_reference(r["features"], r["local_box"], features[upscale], params), r)
            for r in refs
        ]
        accepted = [t for t in tries if t[0].accepted]
        if accepted:
            loc, ref = max(accepted, key=lambda t: t[0].num_inliers)
            return status, ref, loc
        loc, ref = max(tries, key=lambda t: t[0].num_inliers)
        if best[2] is None or loc.num_inliers > best[2].num_inliers:
            best = (STATUS_NONE, ref, loc)
    return best


def _record(obj: str, name: str, status: str, ref: Optional[dict], loc) -> dict:
    rec = OrderedDict(object=obj, image=name, status=status)
    if ref is not None:
        rec["query"], rec["reference_box"] = ref["image"], [round(v, 2) for v in ref["box"]]
        if ref["review"]:
            rec["reference_review"] = ref["review"]
    if loc is not None:
        rec["num_matches"], rec["num_inliers"] = loc.num_matches, loc.num_inliers
        rec["spread"] = round(loc.spread, 4)
        rec["extent"] = [round(v, 4) for v in loc.extent]
        rec["reason"] = loc.reason
        if loc.quad is not None and np.all(np.isfinite(loc.quad)):
            rec["quad"] = [[round(float(v), 2) for v in p] for p in loc.quad]
        if loc.box is not None and loc.accepted:
            rec["box"] = [round(v, 2) for v in loc.box]
    return rec


def annotate(
    root: str,
    queries: Dict[str, List[dict]],
    relevance: dict,
    passes: Sequence[Pass],
    refs: References,
    progress: bool = True,
) -> List[dict]:
    """One record per (object, positive) of relevance.json, in file order.

    A record holds ``object``, ``image``, ``status`` and, where a match was tried, ``query``,
    ``reference_box``, ``num_matches``, ``num_inliers``, ``spread``, ``extent``, ``reason`` (why not
    accepted, "" if accepted), ``quad`` (4 x [x, y], photo pixels) and ``box`` (accepted only).
    Positives that already have boxes in the input keep them (``given``, ``boxes``).
    """
    tasks = [(o, n) for o, e in relevance.items() for n in e.get("positives", [])]
    records = []
    for obj, name in tqdm(tasks, desc="photos", unit="photo", disable=not progress):
        given = relevance[obj].get("boxes", {})
        if name in given:
            records.append(
                OrderedDict(object=obj, image=name, status=STATUS_GIVEN, boxes=given[name])
            )
        elif obj not in queries:
            rec = _record(obj, name, STATUS_NONE, None, None)
            rec["reason"] = "no query (reference image) of this object in the queries file"
            records.append(rec)
        else:
            ref_list = [refs.get(q) for q in queries[obj]]
            status, ref, loc = annotate_photo(os.path.join(root, name), ref_list, passes)
            records.append(_record(obj, name, status, ref, loc))
    return records


def apply_photo_review(review: Review, root: str, records: List[dict]) -> int:
    """Applies the review file's photo corrections to the records, in place.

    Returns:
        int: the number of corrections.

    Raises:
        ValueError: an entry naming an unknown (object, positive) pair, or a box reaching
            outside its photo (the message names the entry).
    """
    by_key = {(r["object"], r["image"]): r for r in records}
    for e in review.photos:
        rec = by_key.get((e["object"], e["image"]))
        if rec is None:
            raise ValueError(f"{e['where']}: {e['image']!r} is not a positive of {e['object']!r}")
        rec.pop("boxes", None)
        rec["review_reason"] = e["reason"]
        if e["box"] is None:
            rec["status"] = STATUS_REVIEW_NONE
            rec.pop("box", None)
            continue
        size = read_image(os.path.join(root, e["image"]), "BGR").shape[:2]
        rec["status"], rec["box"] = STATUS_REVIEW, _inside(e["box"], size, e["where"])
    return len(review.photos)


def annotated_relevance(relevance: dict, records: List[dict]) -> dict:
    """A copy of relevance.json where every object's ``boxes`` holds its records' boxes."""
    out = json.loads(json.dumps(relevance))
    for entry in out.values():
        entry["boxes"] = OrderedDict()
    for rec in records:
        boxes = out[rec["object"]]["boxes"]
        if rec["status"] == STATUS_GIVEN:
            boxes[rec["image"]] = rec["boxes"]
        elif "box" in rec:
            boxes[rec["image"]] = [rec["box"]]
    return out


def summarise(records: List[dict]) -> dict:
    """Counts of records: per status, per folder, and ``reference_reviewed``: boxes found
    automatically with a reference box from the review file."""
    summary = OrderedDict(
        total=len(records), by_status=OrderedDict(), reference_reviewed=0, by_folder=OrderedDict()
    )
    for rec in records:
        parts = rec["image"].split("/")
        folder = parts[1] if len(parts) > 2 else parts[0]
        summary["by_status"][rec["status"]] = summary["by_status"].get(rec["status"], 0) + 1
        automatic = rec["status"] in (STATUS_AUTO, STATUS_SECOND)
        summary["reference_reviewed"] += int(automatic and "reference_review" in rec)
        per = summary["by_folder"].setdefault(folder, OrderedDict())
        per[rec["status"]] = per.get(rec["status"], 0) + 1
    return summary
