"""Revisited Oxford and Paris (Radenović et al., CVPR 2018), optionally with the 1M distractors.

Layout under ``root`` (``$DETECTRON2_DATASETS/roxford5k`` or ``.../rparis6k``)::

    gnd_roxford5k.pkl     imlist, qimlist, gnd[i] = {bbx, easy, hard, junk} (0-based into imlist)
    jpg/                  the images (flat or nested); when absent, the images of the original
                          dataset (``../oxford5k/jpg`` or ``../paris6k/jpg``) are used: they are
                          the same files.

Distractors (``with_distractors=True``) under ``distractors_root`` (default
``$DETECTRON2_DATASETS/revisitop1m``)::

    revisitop1m.txt       one image path per line, relative to jpg/ (".jpg" added if absent)
    jpg/...

Queries are not database images and are cropped to their box (``crop_query=True``). The pickles
do not name the landmark (class) of a query: it is the landmark most of the query's easy + hard
positives are named after (see :func:`infer_query_landmarks`).
"""

import collections
import logging
import os
import re
from typing import Dict, List, Optional, Sequence

from .common import (
    README_HINT,
    RetrievalData,
    check_images,
    index_images,
    make_finetune_dicts,
    parse_box,
    remap_names,
    require_dir,
    require_file,
)
from .oxford_paris import OXFORD_LANDMARKS, PARIS_LANDMARKS, load_gnd_pickle

__all__ = ["load_revisited", "landmark_of_name", "infer_query_landmarks"]

logger = logging.getLogger(__name__)

# dataset -> (pickle name, landmarks, folder of the original dataset holding the same images)
_LAYOUT = {
    "roxford5k": ("gnd_roxford5k.pkl", OXFORD_LANDMARKS, "oxford5k"),
    "rparis6k": ("gnd_rparis6k.pkl", PARIS_LANDMARKS, "paris6k"),
}
DISTRACTOR_LIST = "revisitop1m.txt"


def landmark_of_name(name: str, landmarks: Sequence[str]) -> Optional[str]:
    """The landmark an Oxford/Paris image name refers to, or None for generic names.

    ``all_souls_000013`` -> ``all_souls``; ``paris_louvre_000026`` -> ``louvre``;
    ``oxford_002985`` and ``paris_general_001840`` -> None.
    """
    if name.startswith("paris_"):
        name = name[len("paris_") :]
    m = re.match(r"^(.+)_\d+$", name)
    if m and m.group(1) in landmarks:
        return m.group(1)
    return None


def infer_query_landmarks(
    qimlist: Sequence[str], positives: Sequence[Sequence[str]], landmarks: Sequence[str], where: str
) -> List[str]:
    """Landmark of each query: the one most of its positives are named after.

    The query's own name is only a fallback: some query images are named after another
    landmark than the one they show (Oxford ``bodleian_000132`` is a Radcliffe Camera query,
    Paris ``paris_defense_000038`` an Arc de Triomphe one), while the majority of the positives'
    names gives the right landmark for all 110 Oxford 5k / Paris 6k queries.

    Args:
        qimlist: query image names.
        positives: per query, the names of its positive database images.
        landmarks: the landmark names.
        where: source description for the error message.

    Returns:
        list[str]: one landmark per query.
    """
    out = []
    for i, (q, pos) in enumerate(zip(qimlist, positives)):
        votes = collections.Counter(landmark_of_name(p, landmarks) for p in pos)
        votes.pop(None, None)
        if votes:
            # ties broken by landmark name so that the result is deterministic
            lm = min(votes, key=lambda k: (-votes[k], k))
        else:
            lm = landmark_of_name(q, landmarks)
        if lm is None:
            raise ValueError(
                f"{where}: cannot tell the landmark of query {i} ({q!r}): neither its "
                f"{len(pos)} positives' names nor its own name refer to one of {landmarks}"
            )
        out.append(lm)
    return out


def _read_distractors(distractors_root: str) -> Dict[str, str]:
    """image_id (relative path without extension) -> absolute path, in list order."""
    list_file = require_file(
        os.path.join(distractors_root, DISTRACTOR_LIST), "revisitop1m distractor list"
    )
    jpg = require_dir(os.path.join(distractors_root, "jpg"), "revisitop1m image folder")
    out: Dict[str, str] = {}
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            rel = line.strip()
            if not rel:
                continue
            if os.path.isabs(rel) or ".." in rel.split("/"):
                raise ValueError(f"{list_file}, line {lineno}: expected a path under jpg/: {rel!r}")
            image_id, ext = os.path.splitext(rel)
            if image_id in out:
                raise ValueError(f"{list_file}, line {lineno}: duplicate entry {rel!r}")
            # revisitop's own readers accept entries with or without the .jpg extension
            out[image_id] = os.path.join(jpg, rel if ext else rel + ".jpg")
    return out


def _read_gnd_pkl(pkl_path: str):
    """(imlist, qimlist, query boxes, judgements {"easy", "hard", "junk": image names}) of a
    revisitop ``gnd_*.pkl``."""
    imlist, qimlist, raw_gnd = load_gnd_pickle(pkl_path)
    if len(raw_gnd) != len(qimlist):
        raise ValueError(f"{pkl_path}: {len(qimlist)} queries but {len(raw_gnd)} gnd entries")
    judgements, boxes = [], []
    for i, g in enumerate(raw_gnd):
        try:
            boxes.append(parse_box(g["bbx"], f"{pkl_path}, gnd[{i}]['bbx']"))
            judgements.append({k: [imlist[j] for j in g[k]] for k in ("easy", "hard", "junk")})
        except (KeyError, IndexError) as e:
            raise ValueError(f"{pkl_path}, gnd[{i}]: needs bbx, easy, hard, junk ({e})") from None
    return imlist, qimlist, boxes, judgements


def _append_distractors(db: list, distractors_root: str, name_to_index: dict, dataset: str) -> int:
    """Append the revisitop1m distractors to ``db`` (after the dataset's images); their count."""
    count = 0
    for image_id, path in _read_distractors(distractors_root).items():
        if image_id in name_to_index:
            raise ValueError(f"Distractor {image_id!r} has the name of a {dataset} image")
        db.append({"file_name": path, "image_id": image_id, "db_index": len(db)})
        count += 1
    return count


def load_revisited(
    root: str,
    dataset: str = "roxford5k",
    with_distractors: bool = False,
    distractors_root: Optional[str] = None,
) -> RetrievalData:
    """Loads Revisited Oxford / Paris.

    Args:
        root: the dataset folder (``$DETECTRON2_DATASETS/roxford5k`` or ``.../rparis6k``).
        dataset: "roxford5k" or "rparis6k".
        with_distractors: append the revisitop1m distractors to the database, after imlist.
            Their files are not checked here (a million header reads); unreadable ones are
            reported by the mapper at indexing time.
        distractors_root: folder of the distractors; default ``<root>/../revisitop1m``.

    Returns:
        RetrievalData: queries with ``crop_query=True``, metadata with ``protocol="revisited"``
        and ``gnd[i] = {"easy", "hard", "junk"}`` (sorted 0-based db indices).
    """
    if dataset not in _LAYOUT:
        raise ValueError(f"dataset must be one of {sorted(_LAYOUT)}, got {dataset!r}")
    pkl_name, landmarks, original = _LAYOUT[dataset]
    root = require_dir(root, f"{dataset} folder")
    pkl_path = require_file(os.path.join(root, pkl_name), f"{dataset} ground truth")
    imlist, qimlist, boxes, judgements = _read_gnd_pkl(pkl_path)
    qlandmarks = infer_query_landmarks(
        qimlist, [j["easy"] + j["hard"] for j in judgements], landmarks, pkl_path
    )

    jpg = os.path.join(root, "jpg")
    if not os.path.isdir(jpg) and os.path.isdir(os.path.join(root, "..", original, "jpg")):
        jpg = os.path.join(root, "..", original, "jpg")
    images = index_images(require_dir(jpg, f"{dataset} image folder"))
    paths = [images.get(n) for n in imlist]
    kept = check_images(dataset, imlist, paths)
    db = [{"file_name": paths[i], "image_id": imlist[i], "db_index": k} for k, i in enumerate(kept)]
    name_to_index = {d["image_id"]: d["db_index"] for d in db}

    num_distractors = 0
    if with_distractors:
        if distractors_root is None:
            distractors_root = os.path.join(os.path.dirname(root), "revisitop1m")
        num_distractors = _append_distractors(db, distractors_root, name_to_index, dataset)

    classes = sorted(set(qlandmarks))
    queries = []
    for i, (name, box, lm) in enumerate(zip(qimlist, boxes, qlandmarks)):
        path = images.get(name)
        if path is None:
            raise FileNotFoundError(
                f"{dataset}: query image {name!r} not under {jpg} ({README_HINT})"
            )
        queries.append(
            {
                "file_name": path,
                "image_id": name,
                "query_index": i,
                "query_box": box,
                "category_id": classes.index(lm),
                "object_name": lm,
                "crop_query": True,
            }
        )
    gnd = [{k: remap_names(v, name_to_index) for k, v in j.items()} for j in judgements]
    metadata = {
        "protocol": "revisited",
        "thing_classes": classes,
        "gnd": gnd,
        "has_ground_truth": True,
        "num_distractors": num_distractors,
    }
    return RetrievalData(db, queries, make_finetune_dicts(queries), metadata)
