"""TRECVid Instance Search 2013 (BBC EastEnders keyframes), scored per shot.

Layout under ``root`` (``$DETECTRON2_DATASETS/ins13``)::

    tv13.example.images/<topic>.<n>.src.png     query example images (topics 9069-9098, n = 1..4)
    tv13.example.images/<topic>.<n>.mask.png    binary mask of the object (non-zero = object)
    keyframes/**/shotA_B_<anything>.jpg          database keyframes; shotA_B is the shot
    ins.search.qrels.tv13                        judgements, lines "topic 0 shot relevance"

A query box is the bounding box of its mask in pixel-edge coordinates (a mask covering columns
c0..c1 gives x1 = c0, x2 = c1 + 1). A shot is relevant to a topic when its relevance is > 0.
With ``subset=True`` (the paper's INS 2013 subset) the database keeps only the keyframes whose
shot is relevant to at least one of the topics that have example images.
"""

import logging
import os
import re
from typing import Dict, List, Set, Tuple

import numpy as np
from PIL import Image

from .common import (
    IMAGE_EXTENSIONS,
    README_HINT,
    RetrievalData,
    index_images,
    make_finetune_dicts,
    require_dir,
    require_file,
)

__all__ = ["load_ins13", "mask_to_box", "read_qrels", "shot_of_keyframe"]

logger = logging.getLogger(__name__)

EXAMPLES_DIR = "tv13.example.images"
KEYFRAMES_DIR = "keyframes"
QRELS_FILE = "ins.search.qrels.tv13"
_EXAMPLE = re.compile(r"^(?P<topic>\d+)\.(?P<n>\d+)\.src\.png$", re.IGNORECASE)
_SHOT = re.compile(r"^(shot\d+_\d+)(?:_|$)")


def shot_of_keyframe(stem: str):
    """``shot12_34_RKF_2`` -> ``shot12_34``; None when the name does not start with a shot id."""
    m = _SHOT.match(stem)
    return m.group(1) if m else None


def mask_to_box(mask_path: str) -> Tuple[List[float], Tuple[int, int]]:
    """Bounding box of a binary mask image.

    Args:
        mask_path: PNG mask; pixels above half range (or any non-zero pixel of a 0/1 mask) are
            the object.

    Returns:
        (list[float], (int, int)): ``[x1, y1, x2, y2]`` XYXY_ABS in pixel-edge coordinates of the
        mask (= source image) and the mask's ``(height, width)``.
    """
    try:
        with Image.open(mask_path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise OSError(f"Cannot read the query mask {mask_path}: {e}") from e
    # masks saved as 0/255 and as 0/1 both occur; anti-aliased edges stay out of the box
    fg = arr > (0 if arr.max() <= 1 else 127)
    if not fg.any():
        raise ValueError(f"Query mask {mask_path} is empty: no object pixel, so no query box")
    ys, xs = np.nonzero(fg)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return box, arr.shape[:2]


def read_qrels(path: str) -> Dict[str, Set[str]]:
    """Reads TRECVid qrels (``topic 0 shot relevance`` per line).

    Args:
        path: the qrels file.

    Returns:
        dict: topic id (str) -> set of relevant shot ids (relevance > 0). Topics with only
        non-relevant judgements map to an empty set.
    """
    out: Dict[str, Set[str]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            try:
                if len(tokens) != 4 or not tokens[0].isdigit():
                    raise ValueError
                topic, shot, rel = tokens[0], tokens[2], int(tokens[3])
            except ValueError:
                raise ValueError(
                    f"{path}, line {lineno}: expected 'topic 0 shot relevance', "
                    f"got {line.strip()!r}"
                ) from None
            shots = out.setdefault(topic, set())
            if rel > 0:
                shots.add(shot)
    return out


def _read_examples(examples_dir: str):
    """The query dicts of the ``<topic>.<n>.src.png`` examples (box from their masks) and the
    classes (topic ids as strings, numerically sorted)."""
    examples = []
    for fn in os.listdir(examples_dir):
        m = _EXAMPLE.match(fn)
        if m:
            examples.append((int(m.group("topic")), int(m.group("n")), fn))
    if not examples:
        raise FileNotFoundError(
            f"No <topic>.<n>.src.png example images in {examples_dir} ({README_HINT})"
        )
    examples.sort()
    classes = [str(t) for t in sorted({t for t, _, _ in examples})]

    queries = []
    for topic, n, fn in examples:
        src = os.path.join(examples_dir, fn)
        mask = os.path.join(examples_dir, fn[: -len("src.png")] + "mask.png")
        if not os.path.isfile(mask):
            raise FileNotFoundError(f"Mask of query example {src} not found: {mask}")
        box, (mh, mw) = mask_to_box(mask)
        with Image.open(src) as im:
            w, h = im.size
        if (mh, mw) != (h, w):
            raise ValueError(f"Mask {mask} is {mw}x{mh} but its image {src} is {w}x{h}")
        queries.append(
            {
                "file_name": src,
                "image_id": fn[: -len(".src.png")],
                "query_index": len(queries),
                "query_box": box,
                "category_id": classes.index(str(topic)),
                "object_name": str(topic),
            }
        )
    return queries, classes


def _read_keyframes(keyframes_dir: str, keep_shots=None) -> list:
    """Database dicts (with ``"shot"``) of the keyframes, only those of ``keep_shots`` if given."""
    db, unnamed = [], []
    for stem, path in index_images(keyframes_dir, IMAGE_EXTENSIONS).items():
        shot = shot_of_keyframe(stem)
        if shot is None:
            unnamed.append(path)
            continue
        if keep_shots is not None and shot not in keep_shots:
            continue
        db.append({"file_name": path, "image_id": stem, "db_index": len(db), "shot": shot})
    if unnamed:
        logger.warning(
            f"ins13: skipped {len(unnamed)} images under {keyframes_dir} whose names do not start "
            f"with a shot id (shotA_B_...): " + ", ".join(unnamed)
        )
    if not db:
        raise FileNotFoundError(f"No keyframes found under {keyframes_dir} ({README_HINT})")
    return db


def load_ins13(root: str, subset: bool = False) -> RetrievalData:
    """Loads TRECVid INS 2013.

    Args:
        root: the dataset folder (``$DETECTRON2_DATASETS/ins13``).
        subset: keep only keyframes of shots relevant to at least one topic (the paper's
            23,614-keyframe subset).

    Returns:
        RetrievalData: db dicts carry ``"shot"``; one query per example image (category = topic,
        classes = topic ids as strings, numerically sorted); metadata with ``protocol="ins"``,
        ``gnd[i] = {"relevant_shots": sorted shot ids}`` and ``db_shots`` (shot per db image).
    """
    root = require_dir(root, "ins13 folder")
    examples_dir = require_dir(os.path.join(root, EXAMPLES_DIR), "ins13 example images")
    keyframes_dir = require_dir(os.path.join(root, KEYFRAMES_DIR), "ins13 keyframes")
    qrels_path = require_file(os.path.join(root, QRELS_FILE), "ins13 qrels")

    queries, classes = _read_examples(examples_dir)
    qrels = read_qrels(qrels_path)

    missing_topics = [t for t in classes if t not in qrels]
    if missing_topics:
        logger.warning(f"ins13: {qrels_path} judges no shot of topics {missing_topics}")
    relevant = {t: sorted(qrels.get(t, ())) for t in classes}
    relevant_any = {s for shots in relevant.values() for s in shots}

    db = _read_keyframes(keyframes_dir, relevant_any if subset else None)

    metadata = {
        "protocol": "ins",
        "thing_classes": classes,
        "gnd": [{"relevant_shots": relevant[q["object_name"]]} for q in queries],
        "db_shots": [d["shot"] for d in db],
        "has_ground_truth": True,
        "subset": subset,
    }
    return RetrievalData(db, queries, make_finetune_dicts(queries), metadata)
