"""Retrieval dataset loaders and their registration.

Oxford / Paris tests use the real ground truth of tests/fixtures with tiny stand-in images
(the photos are not available offline); revisited, INS 2013 and custom tests build fixtures.
Expected values are derived here from the raw files, independently of the loaders.
"""

import io
import json
import os
import pickle
import re
import shutil

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from retrieval_ext.data.datasets import (
    get_retrieval_metadata,
    load_custom,
    load_ins13,
    load_oxford_paris,
    load_revisited,
    register_custom_dataset,
    register_retrieval_dataset,
)
from retrieval_ext.data.datasets.builtin import BUILTIN_RETRIEVAL_DATASETS, register_all_retrieval
from retrieval_ext.data.datasets.common import get_datasets_root
from retrieval_ext.data.datasets.revisited import infer_query_landmarks
from tests.common import FIXTURES

DATA = str(FIXTURES)
PARIS_SRC = os.path.join(DATA, "paris6k")
OXFORD_SRC = os.path.join(DATA, "oxford5k")
# https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/corrupt.txt, typed from that list
CORRUPT = [
    "paris_louvre_000136", "paris_louvre_000146", "paris_moulinrouge_000422",
    "paris_museedorsay_001059", "paris_notredame_000188", "paris_pantheon_000284",
    "paris_pantheon_000960", "paris_pantheon_000974", "paris_pompidou_000195",
    "paris_pompidou_000196", "paris_pompidou_000201", "paris_pompidou_000467",
    "paris_pompidou_000640", "paris_sacrecoeur_000299", "paris_sacrecoeur_000330",
    "paris_sacrecoeur_000353", "paris_triomphe_000662", "paris_triomphe_000833",
    "paris_triomphe_000863", "paris_triomphe_000867",
]  # fmt: skip


def _tiny_jpeg(w=8, h=8, color=(120, 60, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG")
    return buf.getvalue()


def _write_image(path, w, h, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


# ----------------------------------------------------------------------------- Paris 6k (real gt)
def _paris_txt_gt():
    """Parses the official text files here: {(landmark, n): (query name, box, ok set, junk set)}."""
    gt_dir = os.path.join(PARIS_SRC, "paris_120310")
    out = {}
    for fn in os.listdir(gt_dir):
        m = re.match(r"(.+)_(\d)_query\.txt$", fn)
        if not m:
            continue
        stem = os.path.join(gt_dir, fn[: -len("query.txt")])
        name, *box = open(os.path.join(gt_dir, fn)).read().split()
        names = {
            k: {ln.split()[0] for ln in open(stem + k + ".txt") if ln.strip()}
            for k in ("good", "ok", "junk")
        }
        out[(m.group(1), int(m.group(2)))] = (
            name,
            [float(v) for v in box],
            names["good"] | names["ok"],
            names["junk"],
        )
    return out


@pytest.fixture(scope="module")
def paris_root(tmp_path_factory):
    """Paris 6k as distributed: jpg/<landmark>/paris_<landmark>_N.jpg, 20 of them HTML pages."""
    root = tmp_path_factory.mktemp("d2") / "paris6k"
    jpg = root / "jpg"
    os.makedirs(jpg)
    os.symlink(os.path.join(PARIS_SRC, "paris_120310"), root / "paris_120310")
    os.symlink(os.path.join(PARIS_SRC, "gnd_paris6k.pkl"), root / "gnd_paris6k.pkl")
    with open(os.path.join(PARIS_SRC, "gnd_paris6k.pkl"), "rb") as f:
        imlist = pickle.load(f)["imlist"]
    data = _tiny_jpeg()
    for name in list(imlist) + CORRUPT:
        folder = jpg / name.split("_")[1]
        folder.mkdir(exist_ok=True)
        with open(folder / f"{name}.jpg", "wb") as f:
            f.write(b"<html><body>302 Found</body></html>" if name in CORRUPT else data)
    return str(root)


def test_paris_txt_counts_and_corrupt_warning(paris_root, logs):
    data = load_oxford_paris(paris_root, "paris6k", gt_format="txt")
    gt = _paris_txt_gt()
    landmarks = sorted({lm for lm, _ in gt})
    assert len(landmarks) == 11 and len(gt) == 55
    assert data.metadata["thing_classes"] == landmarks
    assert len(data.query) == 55 and len(data.finetune) == 110
    # the database is the jpg folder (6,392 good + 20 corrupt files) minus the corrupt files
    assert len(data.db) == 6412 - 20
    assert [d["db_index"] for d in data.db] == list(range(len(data.db)))
    assert not {d["image_id"] for d in data.db} & set(CORRUPT)

    warnings = [m for m in logs.warnings() if "skipped" in m]
    assert len(warnings) == 1
    assert all(name in warnings[0] for name in CORRUPT)

    names = [d["image_id"] for d in data.db]
    for i, q in enumerate(data.query):
        name, box, ok, junk = gt[sorted(gt)[i]]
        assert q["image_id"] == name and q["query_box"] == box and q["query_index"] == i
        assert q["object_name"] == sorted(gt)[i][0]
        assert q["category_id"] == landmarks.index(q["object_name"])
        assert os.path.isfile(q["file_name"]) and os.path.isabs(q["file_name"])
        g = data.metadata["gnd"][i]
        assert {names[j] for j in g["ok"]} == ok
        assert {names[j] for j in g["junk"]} == junk


def test_paris_txt_and_pkl_agree(paris_root):
    txt = load_oxford_paris(paris_root, "paris6k", gt_format="txt")
    pkl = load_oxford_paris(paris_root, "paris6k", gt_format="pkl")
    auto = load_oxford_paris(paris_root, "paris6k")
    with open(os.path.join(PARIS_SRC, "gnd_paris6k.pkl"), "rb") as f:
        imlist = pickle.load(f)["imlist"]
    # the pickle (preferred by "auto") fixes the db order; the text files give name order
    assert [d["image_id"] for d in pkl.db] == list(imlist)
    assert [d["image_id"] for d in auto.db] == list(imlist)
    assert [d["image_id"] for d in txt.db] == sorted(imlist)

    def by_name(data):
        names = [d["image_id"] for d in data.db]
        files = {d["image_id"]: d["file_name"] for d in data.db}
        queries = [
            (q["image_id"], q["query_box"], q["category_id"], q["object_name"], q["file_name"])
            for q in data.query
        ]
        gnd = [{k: sorted(names[j] for j in v) for k, v in g.items()} for g in data.metadata["gnd"]]
        return files, queries, gnd, data.metadata["thing_classes"], data.finetune

    assert by_name(txt) == by_name(pkl)


def test_paris_finetune_dicts(paris_root):
    data = load_oxford_paris(paris_root, "paris6k", gt_format="pkl")
    ft = data.finetune
    assert [d["horizontal_flip"] for d in ft] == [False, True] * 55
    for k, q in enumerate(data.query):
        for d in ft[2 * k : 2 * k + 2]:
            assert d["file_name"] == q["file_name"]
            assert (d["height"], d["width"]) == (8, 8)  # the stand-in images are 8x8
            (ann,) = d["annotations"]
            # the flipped copy keeps the box in unflipped coordinates: the mapper flips it
            assert ann["bbox"] == q["query_box"]
            assert ann["bbox_mode"] == BoxMode.XYXY_ABS
            assert ann["category_id"] == q["category_id"]
    assert sorted({d["annotations"][0]["category_id"] for d in ft}) == list(range(11))


# ---------------------------------------------------------------------------- Oxford 5k (real gt)
OXFORD_LANDMARKS = sorted(
    "all_souls ashmolean balliol bodleian christ_church cornmarket hertford keble magdalen "
    "pitt_rivers radcliffe_camera".split()
)


@pytest.fixture(scope="module")
def oxford_root(tmp_path_factory):
    """Oxford 5k: flat jpg/, the real pickle, and text files written here from the pickle in the
    official format (``oxc1_`` prefix on query lines); the 10 real sample photos are used."""
    root = tmp_path_factory.mktemp("d2") / "oxford5k"
    os.makedirs(root / "jpg")
    with open(os.path.join(OXFORD_SRC, "gnd_oxford5k.pkl"), "rb") as f:
        gt = pickle.load(f)
    shutil.copy(os.path.join(OXFORD_SRC, "gnd_oxford5k.pkl"), root / "gnd_oxford5k.pkl")
    data = _tiny_jpeg()
    for name in gt["imlist"]:
        with open(root / "jpg" / f"{name}.jpg", "wb") as f:
            f.write(data)
    for fn in os.listdir(os.path.join(OXFORD_SRC, "sample_jpg")):
        shutil.copy(os.path.join(OXFORD_SRC, "sample_jpg", fn), root / "jpg" / fn)
    gt_dir = root / "gt_files_170407"
    os.makedirs(gt_dir)
    for i, (q, g) in enumerate(zip(gt["qimlist"], gt["gnd"])):
        stem = gt_dir / f"{OXFORD_LANDMARKS[i // 5]}_{i % 5 + 1}_"
        box = " ".join(f"{v:.1f}" for v in g["bbx"])
        (gt_dir / (stem.name + "query.txt")).write_text(f"oxc1_{q} {box}\n")
        (gt_dir / (stem.name + "good.txt")).write_text(
            "".join(gt["imlist"][j] + "\n" for j in g["ok"][::2])
        )
        (gt_dir / (stem.name + "ok.txt")).write_text(
            "".join(gt["imlist"][j] + "\n" for j in g["ok"][1::2])
        )
        (gt_dir / (stem.name + "junk.txt")).write_text(
            "".join(gt["imlist"][j] + "\n" for j in g["junk"])
        )
    return str(root), gt


def test_oxford_pkl_and_txt(oxford_root, logs):
    root, gt = oxford_root
    pkl = load_oxford_paris(root, "oxford5k", gt_format="pkl")
    txt = load_oxford_paris(root, "oxford5k", gt_format="txt")
    assert not logs.warnings()  # no corrupt or missing image in this fixture
    assert [d["image_id"] for d in pkl.db] == list(gt["imlist"])
    assert len(pkl.db) == 5063 and len(pkl.query) == 55 and len(pkl.finetune) == 110
    assert pkl.metadata["thing_classes"] == OXFORD_LANDMARKS
    assert pkl.metadata["gnd"] == [
        {"ok": sorted(g["ok"]), "junk": sorted(g["junk"])} for g in gt["gnd"]
    ]
    for i, q in enumerate(pkl.query):
        assert q["image_id"] == gt["qimlist"][i]
        assert q["query_box"] == pytest.approx(gt["gnd"][i]["bbx"])
        # a query named after a landmark shows it, except bodleian_000132 (Radcliffe Camera)
        named = [lm for lm in OXFORD_LANDMARKS if q["image_id"].startswith(lm + "_")]
        if named and q["image_id"] != "bodleian_000132":
            assert q["object_name"] == named[0]
    # the oxc1_ prefix of the text query lines is gone; both sources agree
    assert [q["image_id"] for q in txt.query] == [q["image_id"] for q in pkl.query]
    names = [d["image_id"] for d in txt.db]
    for a, b in zip(txt.metadata["gnd"], pkl.metadata["gnd"]):
        assert {names[j] for j in a["ok"]} == {gt["imlist"][j] for j in b["ok"]}
        assert {names[j] for j in a["junk"]} == {gt["imlist"][j] for j in b["junk"]}
    assert [q["category_id"] for q in txt.query] == [q["category_id"] for q in pkl.query]

    # fine-tuning sizes of the real sample photos come from their headers
    samples = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(OXFORD_SRC, "sample_jpg"))}
    checked = 0
    for d in pkl.finetune:
        if d["image_id"].replace("_hflip", "") in samples:
            h, w = cv2.imread(d["file_name"]).shape[:2]
            assert (d["height"], d["width"]) == (h, w)
            checked += 1
    assert checked == 2 * len(samples)


def test_query_landmark_majority_vote_on_real_gt():
    """The landmark voted by the positives' names is the text files' landmark (Paris) and the
    pickles' construction order, 5 queries per landmark in name order (Oxford)."""
    gt_txt = _paris_txt_gt()
    paris_truth = [lm for lm, _ in sorted(gt_txt)]
    oxford_truth = [OXFORD_LANDMARKS[i // 5] for i in range(55)]
    for pkl, truth in (
        ("paris6k/gnd_paris6k.pkl", paris_truth),
        ("oxford5k/gnd_oxford5k.pkl", oxford_truth),
    ):
        with open(os.path.join(DATA, pkl), "rb") as f:
            gt = pickle.load(f)
        positives = [[gt["imlist"][j] for j in g["ok"]] for g in gt["gnd"]]
        assert infer_query_landmarks(gt["qimlist"], positives, sorted(set(truth)), pkl) == truth


def test_oxford_missing_root_and_malformed_gt(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*datasets/README.md"):
        load_oxford_paris(str(tmp_path / "nowhere"), "oxford5k")
    root = tmp_path / "oxford5k"
    (root / "gt_files_170407").mkdir(parents=True)
    (root / "jpg").mkdir()
    with pytest.raises(FileNotFoundError, match="query.txt"):
        load_oxford_paris(str(root), "oxford5k")
    bad = root / "gt_files_170407" / "keble_1_query.txt"
    bad.write_text("\noxc1_keble_000001 1 2 three 4\n")
    for k in ("good", "ok", "junk"):
        (root / "gt_files_170407" / f"keble_1_{k}.txt").write_text("")
    with pytest.raises(ValueError, match=r"keble_1_query\.txt, line 2"):
        load_oxford_paris(str(root), "oxford5k")
    bad.write_text("oxc1_keble_000001 1 2 3\n")
    with pytest.raises(ValueError, match=r"keble_1_query\.txt, line 1"):
        load_oxford_paris(str(root), "oxford5k")
    # a well-formed query whose image is absent
    bad.write_text("oxc1_keble_000001 1 2 3 4\n")
    with pytest.raises(FileNotFoundError, match="keble_000001"):
        load_oxford_paris(str(root), "oxford5k")


# -------------------------------------------------------------------------------- revisited
def _revisited_fixture(tmp_path, missing=()):
    """A small roxford5k: 6 db images, 3 query images outside imlist."""
    root = tmp_path / "roxford5k"
    imlist = [
        "all_souls_000001",
        "oxford_000100",
        "radcliffe_camera_000001",
        "radcliffe_camera_000002",
        "keble_000001",
        "oxford_000200",
    ]
    qimlist = ["all_souls_000013", "oxford_002985", "bodleian_000132"]
    sizes = {"all_souls_000013": (60, 40), "oxford_002985": (50, 30), "bodleian_000132": (30, 50)}
    for k, name in enumerate(imlist + qimlist):
        if name not in missing:
            w, h = sizes.get(name, (20, 20))
            _write_image(str(root / "jpg" / f"{name}.jpg"), w, h, seed=k)
    gnd = [
        {"bbx": [1.5, 2, 30, 40], "easy": [0], "hard": [1], "junk": [5]},
        # generic name: the positives are mostly keble
        {"bbx": [0, 0, 10, 10], "easy": [4], "hard": [5], "junk": []},
        # named bodleian, but shows the Radcliffe Camera (as in the real Oxford 5k)
        {"bbx": [5, 5, 25, 20], "easy": [2, 3], "hard": [], "junk": [0, 1]},
    ]
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root, imlist, qimlist, gnd


def test_revisited_loader(tmp_path):
    root, imlist, qimlist, gnd = _revisited_fixture(tmp_path)
    data = load_revisited(str(root), "roxford5k")
    assert [d["image_id"] for d in data.db] == imlist  # queries are not database images
    assert data.metadata["protocol"] == "revisited"
    assert data.metadata["thing_classes"] == ["all_souls", "keble", "radcliffe_camera"]
    assert [q["object_name"] for q in data.query] == ["all_souls", "keble", "radcliffe_camera"]
    assert [q["category_id"] for q in data.query] == [0, 1, 2]
    assert all(q["crop_query"] for q in data.query)
    assert data.query[0]["query_box"] == [1.5, 2.0, 30.0, 40.0]
    assert data.metadata["gnd"] == [{k: g[k] for k in ("easy", "hard", "junk")} for g in gnd]
    assert len(data.finetune) == 6
    assert (data.finetune[0]["height"], data.finetune[0]["width"]) == (40, 60)


def test_revisited_missing_image_and_distractors(tmp_path, logs):
    root, imlist, qimlist, gnd = _revisited_fixture(tmp_path, missing=("oxford_000100",))
    dis = tmp_path / "revisitop1m"
    (dis / "jpg" / "a").mkdir(parents=True)
    (dis / "revisitop1m.txt").write_text("a/x1.jpg\n\na/x2\n")
    data = load_revisited(str(root), "roxford5k", with_distractors=True)
    # oxford_000100 (index 1) is skipped: later indices shift down by one
    kept = [n for n in imlist if n != "oxford_000100"]
    assert [d["image_id"] for d in data.db] == kept + ["a/x1", "a/x2"]
    assert data.db[-1]["file_name"] == str(dis / "jpg" / "a" / "x2.jpg")
    assert [d["db_index"] for d in data.db] == list(range(7))
    assert data.metadata["num_distractors"] == 2
    assert data.metadata["gnd"][0] == {"easy": [0], "hard": [], "junk": [4]}
    assert data.metadata["gnd"][1] == {"easy": [3], "hard": [4], "junk": []}
    assert data.metadata["gnd"][2] == {"easy": [1, 2], "hard": [], "junk": [0]}
    msgs = logs.warnings()
    assert len(msgs) == 1 and "oxford_000100" in msgs[0]
    with pytest.raises(FileNotFoundError, match="revisitop1m.txt"):
        load_revisited(str(root), "roxford5k", with_distractors=True, distractors_root=str(root))


# ------------------------------------------------------------------------------------ INS 2013
def _ins_fixture(tmp_path):
    root = tmp_path / "ins13"
    ex = root / "tv13.example.images"
    ex.mkdir(parents=True)
    boxes = {}
    for topic in (9070, 9069):
        for n in (1, 2):
            h, w = 30, 40
            _write_image(str(ex / f"{topic}.{n}.src.png"), w, h, seed=topic + n)
            mask = np.zeros((h, w), np.uint8)
            # object pixels: rows 5..14, columns 3+n..20 (inclusive)
            mask[5:15, 3 + n : 21] = 255
            Image.fromarray(mask).save(ex / f"{topic}.{n}.mask.png")
            boxes[(topic, n)] = [3.0 + n, 5.0, 21.0, 15.0]
    kf = root / "keyframes"
    frames = ["shot1_1_RKF_1", "shot1_1_RKF_2", "shot1_2_RKF_1", "shot2_7_NRKF_3", "shot3_1_RKF"]
    for k, name in enumerate(frames):
        _write_image(str(kf / name.split("_")[0] / f"{name}.jpg"), 16, 12, seed=k)
    (root / "ins.search.qrels.tv13").write_text(
        "9069 0 shot1_1 1\n9069 0 shot2_7 0\n9070 0 shot2_7 1\n9070 0 shot3_1 1\n9070 0 shot9_9 1\n"
    )
    return root, boxes, frames


def test_ins13_loader(tmp_path):
    root, boxes, frames = _ins_fixture(tmp_path)
    full = load_ins13(str(root))
    assert full.metadata["protocol"] == "ins"
    assert full.metadata["thing_classes"] == ["9069", "9070"]
    assert [q["image_id"] for q in full.query] == ["9069.1", "9069.2", "9070.1", "9070.2"]
    assert [q["category_id"] for q in full.query] == [0, 0, 1, 1]
    for q in full.query:
        topic, n = q["image_id"].split(".")
        assert q["query_box"] == boxes[(int(topic), int(n))]
    assert [d["image_id"] for d in full.db] == sorted(frames)
    assert full.metadata["db_shots"] == ["shot1_1", "shot1_1", "shot1_2", "shot2_7", "shot3_1"]
    assert (
        full.metadata["gnd"]
        == [{"relevant_shots": ["shot1_1"]}] * 2
        + [{"relevant_shots": ["shot2_7", "shot3_1", "shot9_9"]}] * 2
    )
    assert len(full.finetune) == 8
    assert (full.finetune[0]["height"], full.finetune[0]["width"]) == (30, 40)

    sub = load_ins13(str(root), subset=True)
    # shot1_2 is judged by no topic; shot2_7 is relevant to 9070 only, still kept
    assert [d["shot"] for d in sub.db] == ["shot1_1", "shot1_1", "shot2_7", "shot3_1"]
    assert [d["db_index"] for d in sub.db] == [0, 1, 2, 3]


def test_ins13_errors(tmp_path):
    root, _, _ = _ins_fixture(tmp_path)
    mask = root / "tv13.example.images" / "9070.2.mask.png"
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(mask)
    with pytest.raises(ValueError, match=r"9070\.2\.mask\.png is empty"):
        load_ins13(str(root))
    Image.fromarray(np.ones((30, 40), np.uint8)).save(mask)  # a 0/1 mask covering everything
    assert load_ins13(str(root)).query[3]["query_box"] == [0.0, 0.0, 40.0, 30.0]
    with open(root / "ins.search.qrels.tv13", "a") as f:
        f.write("9070 0 shot4_1\n")
    with pytest.raises(ValueError, match=r"ins\.search\.qrels\.tv13, line 6"):
        load_ins13(str(root))
    with pytest.raises(FileNotFoundError, match="keyframes"):
        shutil.rmtree(root / "keyframes")
        load_ins13(str(root))


# ---------------------------------------------------------------------------------- custom
def _custom_fixture(tmp_path, fmt="json", relevance=True):
    root = tmp_path / "coll"
    for k, rel in enumerate(["images/b.PNG", "images/a.jpg", "images/sub/c.jpeg"]):
        _write_image(str(root / rel), 24, 16, seed=k)
    _write_image(str(root / "queries" / "q1.jpg"), 30, 20, seed=9)
    entries = [
        {"image": "queries/q1.jpg", "box": [1, 2, 10, 12], "object": "mug"},
        {"image": "images/a.jpg", "box": [0, 0, 5.5, 6], "object": "cat"},
    ]
    if fmt == "json":
        (root / "queries.json").write_text(json.dumps(entries))
    else:
        rows = ["image,x1,y1,x2,y2,object"]
        rows += [",".join([e["image"], *map(str, e["box"]), e["object"]]) for e in entries]
        (root / "queries.csv").write_text("\n".join(rows) + "\n")
    if relevance:
        rel = {
            "mug": {
                "positives": ["images/sub/c.jpeg"],
                "boxes": {"images/sub/c.jpeg": [[1, 1, 5, 5]]},
            },
            "cat": {"positives": ["images/a.jpg", "images/b.PNG"], "junk": ["images/sub/c.jpeg"]},
        }
        (root / "relevance.json").write_text(json.dumps(rel))
    return root


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_custom_loader(tmp_path, fmt):
    root = _custom_fixture(tmp_path, fmt)
    data = load_custom(str(root))
    # sorted relative paths: images/a.jpg < images/b.PNG < images/sub/c.jpeg
    assert [d["image_id"] for d in data.db] == ["images/a", "images/b", "images/sub/c"]
    assert data.db[2]["file_name"] == str(root / "images" / "sub" / "c.jpeg")
    assert data.metadata["thing_classes"] == ["cat", "mug"]
    assert [q["category_id"] for q in data.query] == [1, 0]
    assert data.query[1]["query_box"] == [0.0, 0.0, 5.5, 6.0]
    assert data.query[1]["file_name"] == data.db[0]["file_name"]  # a query inside images/
    assert data.metadata["has_ground_truth"] is True
    assert data.metadata["gnd"] == [
        {"ok": [2], "junk": [], "boxes": {2: [[1.0, 1.0, 5.0, 5.0]]}},
        {"ok": [0, 1], "junk": [2]},
    ]
    assert len(data.finetune) == 4
    assert (data.finetune[0]["height"], data.finetune[0]["width"]) == (20, 30)


def test_custom_without_relevance_and_errors(tmp_path):
    root = _custom_fixture(tmp_path, relevance=False)
    data = load_custom(str(root))
    assert data.metadata["gnd"] is None and data.metadata["has_ground_truth"] is False
    assert data.metadata["protocol"] == "custom"

    qfile = root / "queries.json"
    bad_entries = [
        ({"image": "queries/nope.jpg", "box": [1, 2, 10, 12], "object": "mug"}, "does not exist"),
        ({"image": "queries/q1.jpg", "box": [1, 2, 10], "object": "mug"}, "4 numbers"),
        ({"image": "queries/q1.jpg", "box": [10, 2, 10, 12], "object": "mug"}, "x2 > x1"),
        ({"image": "queries/q1.jpg", "box": [1, 12, 10, 12], "object": "mug"}, "y2 > y1"),
    ]
    good = {"image": "queries/q1.jpg", "box": [1, 2, 10, 12], "object": "mug"}
    for entry, why in bad_entries:
        qfile.write_text(json.dumps([good, entry]))
        with pytest.raises(ValueError) as e:
            load_custom(str(root))
        msg = str(e.value)
        assert "queries.json" in msg and "entry 1" in msg and why in msg
        assert str(entry["box"][0]) in msg

    qfile.write_text(json.dumps([good]))
    (root / "relevance.json").write_text(json.dumps({"mug": {"positives": ["images/zz.jpg"]}}))
    with pytest.raises(ValueError, match=r"relevance\.json.*images/zz\.jpg"):
        load_custom(str(root))


def test_custom_relevance_typos_are_refused_by_name(tmp_path):
    """An object name or a key that matches nothing would leave a query without positives
    (and its AP undefined) silently: refused, naming the entry."""
    root = _custom_fixture(tmp_path)
    rel_file = root / "relevance.json"
    rel_file.write_text(json.dumps({"mugg": {"positives": ["images/sub/c.jpeg"]}}))
    with pytest.raises(ValueError, match=r"relevance\.json.*'mugg'.*did you mean 'mug'"):
        load_custom(str(root))
    rel_file.write_text(json.dumps({"zebra": {"positives": []}, "mug": {}}))
    with pytest.raises(ValueError, match=r"named by no query.*'zebra'") as e:
        load_custom(str(root))
    assert "did you mean" not in str(e.value)
    rel_file.write_text(json.dumps({"mug": {"positive": ["images/sub/c.jpeg"]}}))
    with pytest.raises(ValueError, match=r"object 'mug': unknown keys \['positive'\]"):
        load_custom(str(root))
    # an object listed with no positives is valid input: that query is reported, not refused
    rel_file.write_text(json.dumps({"mug": {"positives": []}}))
    gnd = load_custom(str(root)).metadata["gnd"]
    assert gnd == [{"ok": [], "junk": []}, {"ok": [], "junk": []}]


# ----------------------------------------------------------------------------- registration
def test_register_custom_is_lazy_and_sets_metadata(tmp_path, registered):
    root = tmp_path / "later"
    register_custom_dataset("test_custom_lazy", str(root))  # nothing exists yet: no error
    registered.append("test_custom_lazy")
    for view in ("db", "query", "finetune"):
        assert f"test_custom_lazy_{view}" in DatasetCatalog.list()
        meta = MetadataCatalog.get(f"test_custom_lazy_{view}")
        assert meta.evaluator_type == "retrieval" and meta.protocol == "custom"
        assert meta.db_dataset == "test_custom_lazy_db"
        assert meta.query_dataset == "test_custom_lazy_query"
        assert not hasattr(meta, "gnd")
    with pytest.raises(FileNotFoundError, match=r"later.*datasets/README.md"):
        DatasetCatalog.get("test_custom_lazy_db")

    shutil.copytree(_custom_fixture(tmp_path), root)
    meta = get_retrieval_metadata("test_custom_lazy")
    assert meta.thing_classes == ["cat", "mug"] and meta.gnd[1]["ok"] == [0, 1]
    assert meta.dataset_root == str(root)
    # every view carries the same metadata once any view was loaded
    assert MetadataCatalog.get("test_custom_lazy_finetune").gnd == meta.gnd
    assert len(DatasetCatalog.get("test_custom_lazy_finetune")) == 4
    assert get_retrieval_metadata("test_custom_lazy_db").gnd == meta.gnd

    # re-registration after the files changed replaces the metadata instead of asserting
    (root / "relevance.json").unlink()
    register_custom_dataset("test_custom_lazy", str(root))
    assert get_retrieval_metadata("test_custom_lazy").gnd is None
    assert MetadataCatalog.get("test_custom_lazy_db").has_ground_truth is False


def test_register_retrieval_dataset_with_own_loader(tmp_path, registered):
    calls = []

    def loader(root):
        calls.append(root)
        return load_custom(root)

    root = _custom_fixture(tmp_path)
    register_retrieval_dataset("test_own", loader, str(root))
    registered.append("test_own")
    assert calls == []
    db = DatasetCatalog.get("test_own_db")
    db[0]["image_id"] = "edited"  # callers get copies
    assert DatasetCatalog.get("test_own_db")[0]["image_id"] == "images/a"
    assert len(DatasetCatalog.get("test_own_query")) == 2
    assert calls == [str(root)]  # loaded once for all views
    with pytest.raises(KeyError, match="not registered"):
        get_retrieval_metadata("test_nonexistent")


def test_builtin_names_and_root(tmp_path):
    import retrieval_ext.data  # noqa: F401  registers on import

    names = [
        "oxford5k",
        "paris6k",
        "roxford5k",
        "rparis6k",
        "roxford5k_1m",
        "rparis6k_1m",
        "ins13",
        "ins13_subset",
        "synthetic",
        "synthetic_whiten",
    ]
    assert sorted(BUILTIN_RETRIEVAL_DATASETS) == sorted(names)
    for n in names:
        for view in ("db", "query", "finetune"):
            assert f"{n}_{view}" in DatasetCatalog.list()
    assert MetadataCatalog.get("ins13_subset_query").protocol == "ins"
    assert MetadataCatalog.get("synthetic_db").protocol == "custom"
    # the generic detection set: plain COCO-format detection datasets
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"synthetic_generic_{split}")
        assert meta.evaluator_type == "coco"
        assert meta.json_file.endswith(os.path.join("synthetic_generic", f"{split}.json"))
    try:
        register_all_retrieval(str(tmp_path))
        shutil.copytree(_custom_fixture(tmp_path), tmp_path / "synthetic")
        assert len(DatasetCatalog.get("synthetic_query")) == 2
        assert MetadataCatalog.get("synthetic_query").dataset_root == str(tmp_path / "synthetic")
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "paris6k")):
            DatasetCatalog.get("paris6k_db")
    finally:
        register_all_retrieval(get_datasets_root())
