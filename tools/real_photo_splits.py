#!/usr/bin/env python
"""Validation / report views of a custom-format collection whose photos are grouped in folders.

    python tools/real_photo_splits.py --root ../shared/data/smvs_dvd --output OUT \
        --view smvs_val=droid --view smvs_report=canon,e63

A real-photo benchmark is tuned on one part of its database and reported on another (e.g. the
SMVS DVD photos of one camera for validation, the other two cameras for the report). Each view
``OUT/NAME`` is a custom-format folder (see datasets/README.md) that copies nothing:

- ``images/GROUP`` -> symlink to ``ROOT/images/GROUP`` for each of the view's groups;
- every other entry of ``ROOT`` (``queries/``, ``queries.json``, ...) -> symlink;
- ``relevance.json``: the root's, with each object's ``positives``, ``junk`` and ``boxes``
  restricted to the view's images (queries keep their entry, possibly without positives: the
  metrics leave such queries out).

Register a view with ``RETRIEVAL.CUSTOM_DATASETS "['NAME=OUT/NAME']" RETRIEVAL.DATASET NAME``.
"""

import argparse
import json
import os
import shutil
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from retrieval_ext.data.datasets.common import IMAGE_EXTENSIONS  # noqa: E402

IMAGES_DIR = "images"
RELEVANCE = "relevance.json"


def _in_groups(path: str, groups: Sequence[str]) -> bool:
    parts = os.path.normpath(path).replace(os.sep, "/").split("/")
    return len(parts) >= 3 and parts[0] == IMAGES_DIR and parts[1] in groups


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


def make_view(root: str, output: str, groups: Sequence[str], overwrite: bool = False) -> dict:
    """Write one view folder (see the module docstring).

    Args:
        root: the collection (custom format with ``images/<group>/...`` and ``relevance.json``).
        output: the view folder to create.
        groups: sub-folders of ``ROOT/images`` the view's database holds.
        overwrite: replace an existing ``output`` (its symlinks are removed, never followed).

    Returns:
        {"images": number of database images, "positives": number of (object, positive) pairs}
    """
    root = os.path.abspath(root)
    rel_path = os.path.join(root, RELEVANCE)
    if not os.path.isfile(rel_path):
        raise FileNotFoundError(f"{rel_path} does not exist: a split needs relevance judgements")
    if not groups:
        raise ValueError(f"view {output}: no image groups given")
    for g in groups:
        if "/" in g or g in ("", ".", ".."):
            raise ValueError(f"view {output}: {g!r} is not a sub-folder name of {IMAGES_DIR}/")
        if not os.path.isdir(os.path.join(root, IMAGES_DIR, g)):
            raise FileNotFoundError(
                f"view {output}: {os.path.join(root, IMAGES_DIR, g)} is missing"
            )
    if os.path.lexists(output):
        if not overwrite:
            raise FileExistsError(f"{output} exists (pass --overwrite to replace it)")
        shutil.rmtree(output)
    os.makedirs(os.path.join(output, IMAGES_DIR))
    for g in groups:
        os.symlink(os.path.join(root, IMAGES_DIR, g), os.path.join(output, IMAGES_DIR, g))
    for name in sorted(os.listdir(root)):
        if name not in (IMAGES_DIR, RELEVANCE):
            os.symlink(os.path.join(root, name), os.path.join(output, name))
    with open(rel_path) as f:
        try:
            relevance = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{rel_path}: not valid JSON ({e})") from None
    if not isinstance(relevance, dict):
        raise ValueError(f"{rel_path}: expected {{object: {{positives, junk, boxes}}}}")
    kept = filter_relevance(relevance, groups)
    with open(os.path.join(output, RELEVANCE), "w") as f:
        json.dump(kept, f, indent=1)
    num_images = sum(
        os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        for g in groups
        for _, _, files in os.walk(os.path.join(root, IMAGES_DIR, g), followlinks=True)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the collection (custom format)")
    parser.add_argument("--output", required=True, help="folder that receives one folder a view")
    parser.add_argument(
        "--view", action="append", required=True, help="NAME=GROUP[,GROUP...] (repeatable)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing views")
    args = parser.parse_args(argv)
    try:
        views = parse_views(args.view)
        for name, groups in views.items():
            out = os.path.join(args.output, name)
            s = make_view(args.root, out, groups, overwrite=args.overwrite)
            print(
                f"{name}={os.path.abspath(out)}: {','.join(groups)}, {s['images']} images, "
                f"{s['positives']} positive pairs"
            )
    except (OSError, ValueError) as e:
        sys.exit(f"real_photo_splits: {e}")


if __name__ == "__main__":
    main()
