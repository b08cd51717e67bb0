"""Validation / report views of a custom-format collection whose photos are grouped in folders.

A real-photo benchmark is tuned on one part of its database and reported on another (e.g. the
SMVS DVD photos of one camera for validation, the other two cameras for the report). A view
``OUT`` of a collection ``ROOT`` is a custom-format folder (see datasets/README.md) that copies
nothing:

- ``images/GROUP`` -> symlink to ``ROOT/images/GROUP`` for each of the view's groups (a view of
  every group links ``images`` itself);
- every other entry of ``ROOT`` (``queries/``, ``queries.json``, ...) -> symlink;
- ``relevance.json``: the root's (or another file with the same objects, e.g. one with database
  boxes written by ``tools/annotate_boxes.py``), with each object's ``positives``, ``junk`` and
  ``boxes`` restricted to the view's images (queries keep their entry, possibly without
  positives: the metrics leave such queries out).

Register a view with ``RETRIEVAL.CUSTOM_DATASETS "['NAME=OUT']" RETRIEVAL.DATASET NAME``.
"""

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

from .common import IMAGE_EXTENSIONS, read_json
from .custom import RELEVANCE_FORMAT

__all__ = [
    "IMAGES_DIR",
    "RELEVANCE",
    "filter_relevance",
    "image_groups",
    "make_view",
    "parse_views",
]

IMAGES_DIR = "images"
RELEVANCE = "relevance.json"


def _in_groups(path: str, groups: Sequence[str]) -> bool:
    parts = os.path.normpath(path).replace(os.sep, "/").split("/")
    return len(parts) >= 3 and parts[0] == IMAGES_DIR and parts[1] in groups


def image_groups(root: str) -> List[str]:
    """The sub-folders of ``ROOT/images`` (the groups a view can hold), sorted."""
    images = os.path.join(root, IMAGES_DIR)
    if not os.path.isdir(images):
        raise FileNotFoundError(f"{images} is missing: not a custom-format collection")
    return sorted(g for g in os.listdir(images) if os.path.isdir(os.path.join(images, g)))


def filter_relevance(relevance: Dict[str, dict], groups: Sequence[str]) -> Dict[str, dict]:
    """The judgements restricted to images under ``images/<group>/`` for the given groups.

    Args:
        relevance: ``{object: {"positives": [...], "junk": [...], "boxes": {path: [...]}}}``
            with paths relative to the collection root.
        groups: names of the kept sub-folders of ``images/``.

    Returns:
        the same structure with only the kept paths (other keys of an entry are kept as they are).
    """
    out = {}
    for obj, entry in relevance.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{RELEVANCE}, object {obj!r}: expected a dict, got {entry!r}")
        kept = dict(entry)
        for key in ("positives", "junk"):
            if key in entry:
                kept[key] = [p for p in entry[key] if _in_groups(p, groups)]
        if "boxes" in entry:
            kept["boxes"] = {p: b for p, b in entry["boxes"].items() if _in_groups(p, groups)}
        out[obj] = kept
    return out


def _read_relevance(path: str) -> Dict[str, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: a split needs relevance judgements")
    return read_json(path, dict, RELEVANCE_FORMAT)


def _check_groups(root: str, output: str, groups: Sequence[str]):
    if not groups:
        raise ValueError(f"view {output}: no image groups given")
    for g in groups:
        if "/" in g or g in ("", ".", ".."):
            raise ValueError(f"view {output}: {g!r} is not a sub-folder name of {IMAGES_DIR}/")
        if not os.path.isdir(os.path.join(root, IMAGES_DIR, g)):
            raise FileNotFoundError(
                f"view {output}: {os.path.join(root, IMAGES_DIR, g)} is missing"
            )


def make_view(
    root: str,
    output: str,
    groups: Optional[Sequence[str]],
    overwrite: bool = False,
    relevance: Optional[str] = None,
) -> dict:
    """Write one view folder (see the module docstring).

    Args:
        root: the collection (custom format with ``images/<group>/...`` and ``relevance.json``).
        output: the view folder to create.
        groups: sub-folders of ``ROOT/images`` the view's database holds; None = all of
            ``images/`` (the judgements are then kept whole).
        overwrite: replace an existing ``output`` (its symlinks are removed, never followed).
        relevance: judgements to use instead of ``ROOT/relevance.json`` (same layout).

    Returns:
        {"images": number of database images, "positives": number of (object, positive) pairs}
    """
    root = os.path.abspath(root)
    rel_path = os.path.abspath(relevance) if relevance else os.path.join(root, RELEVANCE)
    judgements = _read_relevance(rel_path)
    if groups is not None:
        _check_groups(root, output, groups)
    elif not os.path.isdir(os.path.join(root, IMAGES_DIR)):
        raise FileNotFoundError(f"{os.path.join(root, IMAGES_DIR)} is missing")
    if os.path.lexists(output):
        if not overwrite:
            raise FileExistsError(f"{output} exists (pass --overwrite to replace it)")
        shutil.rmtree(output)
    os.makedirs(output)
    if groups is None:
        os.symlink(os.path.join(root, IMAGES_DIR), os.path.join(output, IMAGES_DIR))
        kept, folders = judgements, [os.path.join(root, IMAGES_DIR)]
    else:
        os.makedirs(os.path.join(output, IMAGES_DIR))
        for g in groups:
            os.symlink(os.path.join(root, IMAGES_DIR, g), os.path.join(output, IMAGES_DIR, g))
        kept = filter_relevance(judgements, groups)
        folders = [os.path.join(root, IMAGES_DIR, g) for g in groups]
    for name in sorted(os.listdir(root)):
        if name not in (IMAGES_DIR, RELEVANCE):
            os.symlink(os.path.join(root, name), os.path.join(output, name))
    with open(os.path.join(output, RELEVANCE), "w") as f:
        json.dump(kept, f, indent=1)
    num_images = sum(
        os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        for folder in folders
        for _, _, files in os.walk(folder, followlinks=True)
        for f in files
    )
    return {
        "images": num_images,
        "positives": sum(len(e.get("positives", [])) for e in kept.values()),
    }


def parse_views(specs: List[str]) -> Dict[str, List[str]]:
    """``["NAME=g1,g2", ...]`` -> ``{NAME: [g1, g2]}``; a group may be in one view only."""
    views, seen = {}, {}
    for spec in specs:
        name, sep, groups = spec.partition("=")
        names = [g.strip() for g in groups.split(",") if g.strip()]
        if not sep or not name.strip() or not names:
            raise ValueError(f"--view {spec!r}: expected NAME=GROUP[,GROUP...]")
        for g in names:
            if g in seen:
                raise ValueError(f"--view {spec!r}: group {g!r} is already in view {seen[g]!r}")
            seen[g] = name.strip()
        views[name.strip()] = names
    return views
