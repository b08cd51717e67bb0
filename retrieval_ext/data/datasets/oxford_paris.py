"""Oxford Buildings 5k and Paris 6k with their original protocol (good + ok positive, junk ignored).

Layout under ``root`` (``$DETECTRON2_DATASETS/oxford5k`` or ``.../paris6k``)::

    jpg/                  images, flat (Oxford) or in per-landmark subfolders (Paris as shipped)
    gnd_oxford5k.pkl      cnnimageretrieval ground truth (imlist, qimlist, gnd[i]={bbx, ok, junk})
    gt_files_170407/      OR the official text ground truth (Paris: paris_120310/):
                          <landmark>_<n>_{query,good,ok,junk}.txt

Both ground-truth forms give the same queries, boxes, classes and judgements. The pickle is
preferred when both exist, because its ``imlist`` fixes the database order that published
cnnimageretrieval results and features use (the text files do not define an order; the database
is then every image in ``jpg/``, sorted by name).

Database images that are missing or unreadable (Paris 6k ships 20 corrupt files that are HTML
pages) are detected by parsing each image header with PIL (cheap, no decoding) and skipped with
one warning listing them all; the judgements are remapped to the remaining images.
"""

import logging
import os
import pickle
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .common import (
    README_HINT,
    RetrievalData,
    check_images,
    index_images,
    make_finetune_dicts,
    parse_box,
    remap_names,
    require_dir,
)

__all__ = [
    "OXFORD_LANDMARKS",
    "PARIS_LANDMARKS",
    "PARIS_CORRUPT",
    "load_oxford_paris",
    "read_gt_pkl",
    "read_gt_txt",
]

logger = logging.getLogger(__name__)

OXFORD_LANDMARKS = (
    "all_souls",
    "ashmolean",
    "balliol",
    "bodleian",
    "christ_church",
    "cornmarket",
    "hertford",
    "keble",
    "magdalen",
    "pitt_rivers",
    "radcliffe_camera",
)
PARIS_LANDMARKS = (
    "defense",
    "eiffel",
    "invalides",
    "louvre",
    "moulinrouge",
    "museedorsay",
    "notredame",
    "pantheon",
    "pompidou",
    "sacrecoeur",
    "triomphe",
)
# The Paris 6k files that are not images (https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/
# corrupt.txt). Informative only: the loader finds unreadable files itself by their headers.
PARIS_CORRUPT = (
    "paris_louvre_000136",
    "paris_louvre_000146",
    "paris_moulinrouge_000422",
    "paris_museedorsay_001059",
    "paris_notredame_000188",
    "paris_pantheon_000284",
    "paris_pantheon_000960",
    "paris_pantheon_000974",
    "paris_pompidou_000195",
    "paris_pompidou_000196",
    "paris_pompidou_000201",
    "paris_pompidou_000467",
    "paris_pompidou_000640",
    "paris_sacrecoeur_000299",
    "paris_sacrecoeur_000330",
    "paris_sacrecoeur_000353",
    "paris_triomphe_000662",
    "paris_triomphe_000833",
    "paris_triomphe_000863",
    "paris_triomphe_000867",
)

# dataset -> (text ground-truth folder, pickle file, landmarks)
_LAYOUT = {
    "oxford5k": ("gt_files_170407", "gnd_oxford5k.pkl", OXFORD_LANDMARKS),
    "paris6k": ("paris_120310", "gnd_paris6k.pkl", PARIS_LANDMARKS),
}
_QUERY_FILE = re.compile(r"^(?P<landmark>.+)_(?P<n>\d+)_query\.txt$")
_QUERY_PREFIX = "oxc1_"  # Oxford query lines name their image "oxc1_<name>"

# One parsed ground truth: query names, boxes (XYXY_ABS), landmark per query, and per query a
# dict {"ok": names, "junk": names}; plus the ordered database names (None: use the jpg folder).
_Gt = Tuple[List[str], List[List[float]], List[str], List[Dict[str, List[str]]], Optional[list]]


def _read_names(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Ground-truth file not found: {path} ({README_HINT})")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def read_gt_txt(gt_dir: str) -> _Gt:
    """Reads the official text ground truth (``<landmark>_<n>_{query,good,ok,junk}.txt``).

    Args:
        gt_dir: folder holding the text files.

    Returns:
        tuple: ``(query_names, boxes, landmarks, judgements, None)``. Queries are ordered by
        (landmark, n). ``boxes[i]`` is XYXY_ABS in original image pixels; ``judgements[i]`` is
        ``{"ok": good + ok names, "junk": names}``. The ``oxc1_`` prefix of Oxford query lines
        is removed.
    """
    files = []
    for fn in os.listdir(gt_dir):
        m = _QUERY_FILE.match(fn)
        if m:
            files.append((m.group("landmark"), int(m.group("n")), fn))
    if not files:
        raise FileNotFoundError(f"No *_query.txt ground-truth files in {gt_dir} ({README_HINT})")
    files.sort()
    qnames, boxes, landmarks, judgements = [], [], [], []
    for landmark, n, fn in files:
        path = os.path.join(gt_dir, fn)
        with open(path) as f:
            lines = [(i + 1, line.split()) for i, line in enumerate(f) if line.strip()]
        if len(lines) != 1 or len(lines[0][1]) != 5:
            lineno = lines[0][0] if lines else 1
            raise ValueError(
                f"{path}, line {lineno}: a query file holds one line 'name x1 y1 x2 y2', got "
                f"{[' '.join(t) for _, t in lines]}"
            )
        lineno, tokens = lines[0]
        name = tokens[0]
        if name.startswith(_QUERY_PREFIX):
            name = name[len(_QUERY_PREFIX) :]
        boxes.append(parse_box(tokens[1:], f"{path}, line {lineno}"))
        qnames.append(name)
        landmarks.append(landmark)
        stem = os.path.join(gt_dir, f"{landmark}_{n}_")
        ok = _read_names(stem + "good.txt") + _read_names(stem + "ok.txt")
        judgements.append({"ok": ok, "junk": _read_names(stem + "junk.txt")})
    return qnames, boxes, landmarks, judgements, None


def load_gnd_pickle(path: str):
    """``(imlist, qimlist, gnd)`` of a cnnimageretrieval / revisitop ``gnd_*.pkl``: the database
    and query image names (lists) and the per-query ground truth, as stored.

    Raises:
        ValueError: the pickle is not a dict with these three keys (the message names the file).
    """
    with open(path, "rb") as f:
        gt = pickle.load(f)
    try:
        return list(gt["imlist"]), list(gt["qimlist"]), gt["gnd"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd ({e})") from None


def read_gt_pkl(path: str, landmarks: Sequence[str]) -> _Gt:
    """Reads a cnnimageretrieval ``gnd_*.pkl`` (imlist, qimlist, gnd[i] = {bbx, ok, junk}).

    Args:
        path: the pickle.
        landmarks: the landmark names, sorted. The pickles list the queries in the order of the
            sorted text files, 5 per landmark, so query ``i`` shows ``landmarks[i // 5]``.

    Returns:
        tuple: as :func:`read_gt_txt`, with the pickle's ``imlist`` as last element.
    """
    imlist, qimlist, gnd = load_gnd_pickle(path)
    per_landmark, rem = divmod(len(qimlist), len(landmarks))
    if rem or len(gnd) != len(qimlist):
        raise ValueError(
            f"{path}: {len(qimlist)} queries and {len(gnd)} gnd entries; expected the same "
            f"number, a multiple of the {len(landmarks)} landmarks"
        )
    boxes, judgements = [], []
    for i, g in enumerate(gnd):
        try:
            boxes.append(parse_box(g["bbx"], f"{path}, gnd[{i}]['bbx']"))
            judgements.append(
                {"ok": [imlist[j] for j in g["ok"]], "junk": [imlist[j] for j in g["junk"]]}
            )
        except (KeyError, IndexError) as e:
            raise ValueError(f"{path}, gnd[{i}]: needs bbx, ok, junk indexing imlist ({e})")
    qlandmarks = [landmarks[i // per_landmark] for i in range(len(qimlist))]
    return qimlist, boxes, qlandmarks, judgements, imlist


def _read_gt(dataset: str, gt_format: str, pkl_path: str, txt_dir: str, known_landmarks):
    """The ground truth in ``gt_format`` ("pkl" or "txt"), as :func:`read_gt_pkl` returns it."""
    if gt_format == "pkl":
        if not os.path.isfile(pkl_path):
            raise FileNotFoundError(f"{dataset} ground truth not found: {pkl_path} ({README_HINT})")
        return read_gt_pkl(pkl_path, known_landmarks)
    if gt_format == "txt":
        if not os.path.isdir(txt_dir):
            raise FileNotFoundError(
                f"{dataset} ground truth not found: neither {pkl_path} nor {txt_dir} "
                f"({README_HINT})"
            )
        return read_gt_txt(txt_dir)
    raise ValueError(f"gt_format must be 'auto', 'pkl' or 'txt', got {gt_format!r}")


def _warn_absent_judged(dataset: str, root: str, judgements, present: set):
    # Judged images absent from the image folder (not the skipped ones, already reported) mean an
    # incomplete extraction: their positives silently vanishing would lower mAP unnoticed.
    judged = {n for j in judgements for n in j["ok"] + j["junk"]}
    absent = sorted(judged - present)
    if absent:
        logger.warning(
            f"{dataset}: the ground truth judges {len(absent)} images that are not under "
            f"{root}/jpg; they are left out of the evaluation: " + ", ".join(absent)
        )


def load_oxford_paris(root: str, dataset: str = "oxford5k", gt_format: str = "auto"):
    """Loads Oxford 5k or Paris 6k (original protocol).

    Args:
        root: the dataset folder (``$DETECTRON2_DATASETS/oxford5k`` or ``.../paris6k``).
        dataset: "oxford5k" or "paris6k" (selects the ground-truth file names and landmarks).
        gt_format: "pkl", "txt" or "auto" (the pickle when present, else the text files).

    Returns:
        RetrievalData: 55 queries (query image also in the database), 11 classes (landmarks
        sorted by name), 110 fine-tuning dicts, metadata with ``protocol="oxford"`` and
        ``gnd[i] = {"ok": [db indices], "junk": [db indices]}``.
    """
    if dataset not in _LAYOUT:
        raise ValueError(f"dataset must be one of {sorted(_LAYOUT)}, got {dataset!r}")
    txt_dirname, pkl_name, known_landmarks = _LAYOUT[dataset]
    root = require_dir(root, f"{dataset} folder")
    pkl_path = os.path.join(root, pkl_name)
    txt_dir = os.path.join(root, txt_dirname)
    if gt_format == "auto":
        gt_format = "pkl" if os.path.isfile(pkl_path) else "txt"
    gt = _read_gt(dataset, gt_format, pkl_path, txt_dir, known_landmarks)
    qnames, boxes, qlandmarks, judgements, imlist = gt

    images = index_images(require_dir(os.path.join(root, "jpg"), f"{dataset} image folder"))
    names = imlist if imlist is not None else list(images)
    paths = [images.get(n) for n in names]
    kept = check_images(dataset, names, paths)
    db = [{"file_name": paths[i], "image_id": names[i], "db_index": k} for k, i in enumerate(kept)]
    name_to_index = {d["image_id"]: d["db_index"] for d in db}

    classes = sorted(set(qlandmarks))
    queries = []
    for i, (name, box, landmark) in enumerate(zip(qnames, boxes, qlandmarks)):
        if name not in name_to_index:
            path = images.get(name)
            raise FileNotFoundError(
                f"{dataset}: query image {name!r} is "
                + (f"unreadable: {path}" if path else f"not under {root}/jpg")
                + f" ({README_HINT})"
            )
        queries.append(
            {
                "file_name": db[name_to_index[name]]["file_name"],
                "image_id": name,
                "query_index": i,
                "query_box": box,
                "category_id": classes.index(landmark),
                "object_name": landmark,
            }
        )
    gnd = [
        {"ok": remap_names(j["ok"], name_to_index), "junk": remap_names(j["junk"], name_to_index)}
        for j in judgements
    ]
    _warn_absent_judged(dataset, root, judgements, set(name_to_index) | set(names))
    metadata = {
        "protocol": "oxford",
        "thing_classes": classes,
        "gnd": gnd,
        "has_ground_truth": True,
        "gt_format": gt_format,
    }
    return RetrievalData(db, queries, make_finetune_dicts(queries), metadata)
