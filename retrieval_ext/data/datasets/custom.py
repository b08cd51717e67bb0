"""A user's own image collection (also the format the synthetic benchmark generator writes).

Layout under ``root``::

    images/...          database images, any depth; .jpg .jpeg .png .bmp .webp (any case).
                        The sorted relative paths define the database order.
    queries.json        [{"image": "queries/obj03_1.jpg", "box": [x1, y1, x2, y2],
                          "object": "obj03"}, ...]   (paths relative to root)
      or queries.csv    header "image,x1,y1,x2,y2,object"  (queries.json wins if both exist)
    relevance.json      optional: {"obj03": {"positives": ["images/a.jpg", ...],
                                             "junk": [...], "boxes": {"images/a.jpg":
                                             [[x1, y1, x2, y2], ...]}}}

A query image may lie inside ``images/`` (it is then a database image too). Image ids are the
paths relative to ``root`` without extension (``images/sub/a``), unique by construction.
Objects sorted by name give the class ids. Without ``relevance.json`` the metadata says
``has_ground_truth=False`` and ``gnd=None``: retrieval works, evaluation has nothing to score.
"""

import copy
import csv
import difflib
import os
from typing import Dict, List, Set

from .common import (
    IMAGE_EXTENSIONS,
    README_HINT,
    RetrievalData,
    check_images,
    index_images,
    make_finetune_dicts,
    parse_box,
    read_json,
    register_retrieval_dataset,
    require_dir,
)

__all__ = ["load_custom", "read_queries", "register_custom_dataset"]

# what relevance.json holds, for the error about a file that holds something else
RELEVANCE_FORMAT = "{object: {positives, junk, boxes}}"

IMAGES_DIR = "images"
CSV_HEADER = ["image", "x1", "y1", "x2", "y2", "object"]


def _posix_rel(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


def read_queries(root: str) -> List[dict]:
    """Reads and checks ``queries.json`` (preferred) or ``queries.csv``.

    Args:
        root: the collection folder.

    Returns:
        list[dict]: ``{"image": path relative to root (posix), "box": [x1, y1, x2, y2] XYXY_ABS
        in original image pixels, "object": str}`` per query, in file order.
    """
    json_path = os.path.join(root, "queries.json")
    csv_path = os.path.join(root, "queries.csv")
    if os.path.isfile(json_path):
        path = json_path
        entries = read_json(path, list, "a list of {image, box, object} entries")
        raw = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not {"image", "box", "object"} <= set(e):
                raise ValueError(f"{path}, entry {i}: needs keys image, box, object; got {e!r}")
            raw.append((i, e["image"], e["box"], e["object"]))
    elif os.path.isfile(csv_path):
        path = csv_path
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if header != CSV_HEADER:
                raise ValueError(f"{path}: header must be {','.join(CSV_HEADER)}, got {header}")
            reader.fieldnames = header
            raw = [
                (i, r["image"], [r["x1"], r["y1"], r["x2"], r["y2"]], r["object"])
                for i, r in enumerate(reader)
            ]
    else:
        raise FileNotFoundError(
            f"Neither {json_path} nor {csv_path} exists: a custom dataset needs its queries "
            f"({README_HINT})"
        )

    out = []
    for i, image, box, obj in raw:
        where = f"{path}, entry {i}"
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: 'image' must be a path relative to {root}, got {image!r}")
        box = parse_box(box, where)
        rel = _posix_rel(image.strip())
        if not os.path.isfile(os.path.join(root, rel)):
            raise ValueError(
                f"{where}: query image {os.path.join(root, rel)} does not exist (box {box})"
            )
        if obj is None or not str(obj).strip():
            raise ValueError(f"{where}: 'object' is empty (box {box})")
        out.append({"image": rel, "box": box, "object": str(obj).strip()})
    if not out:
        raise ValueError(f"{path}: no queries")
    return out


_RELEVANCE_KEYS = ("positives", "junk", "boxes")


def _check_relevance_keys(path: str, rel: dict, objects: List[str]):
    """Refuse judgements of objects no query names, and unknown keys: a typo there would leave
    a query without positives, silently."""
    unknown = sorted(set(rel) - set(objects))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, objects, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{path}: {len(unknown)} object(s) named by no query of queries.json/.csv: "
            + ", ".join(hints)
        )
    for obj, entry in rel.items():
        bad = sorted(set(entry) - set(_RELEVANCE_KEYS)) if isinstance(entry, dict) else []
        if bad:
            raise ValueError(
                f"{path}, object {obj!r}: unknown keys {bad}; allowed: {list(_RELEVANCE_KEYS)}"
            )


def _read_relevance(
    path: str, objects: List[str], rel_to_index: Dict[str, int], skipped: Set[str], root: str
) -> Dict[str, dict]:
    """Per object, ``{"ok", "junk"[, "boxes"]}`` in db indices (see :func:`load_custom`)."""
    rel = read_json(path, dict, RELEVANCE_FORMAT)
    _check_relevance_keys(path, rel, objects)

    def indices(obj, key, names):
        out = []
        for name in names:
            r = _posix_rel(name)
            if r not in rel_to_index:
                if r in skipped:
                    continue  # an unreadable database image, already reported
                raise ValueError(
                    f"{path}, object {obj!r}, {key}: {name!r} is not a database image "
                    f"(paths are relative to {root} and must lie under {IMAGES_DIR}/)"
                )
            out.append(rel_to_index[r])
        return sorted(set(out))

    per_object = {}
    for obj in objects:
        entry = rel.get(obj, {})
        if not isinstance(entry, dict):
            raise ValueError(f"{path}, object {obj!r}: expected a dict, got {entry!r}")
        g = {
            "ok": indices(obj, "positives", entry.get("positives", [])),
            "junk": indices(obj, "junk", entry.get("junk", [])),
        }
        if "boxes" in entry:
            boxes = {}
            for name, bxs in entry["boxes"].items():
                found = indices(obj, "boxes", [name])
                if not found:  # the image was skipped as unreadable
                    continue
                boxes[found[0]] = [
                    parse_box(b, f"{path}, object {obj!r}, boxes of {name!r}") for b in bxs
                ]
            g["boxes"] = boxes
        per_object[obj] = g
    return per_object


def load_custom(root: str, name: str = "custom") -> RetrievalData:
    """Loads a collection in the custom format (see module docstring).

    Args:
        root: the collection folder.
        name: dataset name, for messages.

    Returns:
        RetrievalData: metadata with ``protocol="custom"``, ``has_ground_truth`` and ``gnd``
        (per query ``{"ok", "junk"}`` plus ``"boxes": {db_index: [[x1, y1, x2, y2], ...]}`` when
        given; None without relevance.json).
    """
    root = require_dir(root, f"{name} folder")
    images_dir = require_dir(os.path.join(root, IMAGES_DIR), f"{name} image folder")
    found = index_images(images_dir, IMAGE_EXTENSIONS, key="relpath")
    rels = [f"{IMAGES_DIR}/{r}" for r in found]
    paths = list(found.values())
    kept = check_images(name, rels, paths)
    db = [
        {"file_name": paths[i], "image_id": os.path.splitext(rels[i])[0], "db_index": k}
        for k, i in enumerate(kept)
    ]
    ids = [d["image_id"] for d in db]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{name}: images differing only by extension: {dup} under {images_dir}")
    rel_to_index = {rels[i]: k for k, i in enumerate(kept)}

    entries = read_queries(root)
    classes = sorted({e["object"] for e in entries})
    queries = [
        {
            "file_name": os.path.normpath(os.path.join(root, e["image"])),
            "image_id": os.path.splitext(e["image"])[0],
            "query_index": i,
            "query_box": e["box"],
            "category_id": classes.index(e["object"]),
            "object_name": e["object"],
        }
        for i, e in enumerate(entries)
    ]

    rel_path = os.path.join(root, "relevance.json")
    if os.path.isfile(rel_path):
        skipped = set(rels) - set(rel_to_index)
        per_object = _read_relevance(rel_path, classes, rel_to_index, skipped, root)
        # one copy per query so that editing one query's judgements cannot alter another's
        gnd = [copy.deepcopy(per_object[q["object_name"]]) for q in queries]
    else:
        gnd = None
    metadata = {
        "protocol": "custom",
        "thing_classes": classes,
        "gnd": gnd,
        "has_ground_truth": gnd is not None,
    }
    return RetrievalData(db, queries, make_finetune_dicts(queries), metadata)


def register_custom_dataset(name: str, root: str) -> None:
    """Registers ``name_db``, ``name_query``, ``name_finetune`` for a custom-format folder.

    Args:
        name: dataset name.
        root: the collection folder (read lazily, when a view is first requested).
    """
    register_retrieval_dataset(name, lambda r: load_custom(r, name=name), root, protocol="custom")
