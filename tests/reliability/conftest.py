"""Shared fixtures of the reliability tests: a tiny ZF checkpoint, tiny collections, log capture.

Everything runs on CPU in seconds: ZF-tiny with a tamed RPN (tests.common), images of about
100 px, a handful of database images.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_ext.data.datasets import (
    register_config_datasets,
    register_custom_dataset,
    unregister_retrieval_dataset,
)
from retrieval_ext.retrieval.extractor import FeatureExtractor
from tests.common import CONFIGS, tiny_cfg, tiny_model

ZF_TINY = str(CONFIGS / "quick_schedules" / "ZF-tiny.yaml")


def pattern_image(h, w, seed):
    """A deterministic (h, w, 3) uint8 RGB picture with structure (gradients + blocks)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 64) * 4], -1
    ).astype(np.uint8)
    for _ in range(3):
        y0, x0 = rng.randint(0, max(h - 8, 1)), rng.randint(0, max(w - 8, 1))
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.randint(0, 256, 3)
    return img


def write_collection(root, db, queries, relevance=None):
    """Writes a custom-format collection (see datasets/README.md).

    Args:
        root: the folder.
        db: {relative path under images/: RGB array, PIL image or raw bytes}.
        queries: [(relative path from root, box, object)]; the image must exist (write it
            through ``db`` or ``extra``).
        relevance: optional relevance.json content.

    Returns:
        Path: root.
    """
    root = Path(root)
    for rel, content in db.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, Image.Image):
            content.save(path)
        else:
            Image.fromarray(content).save(path)
    entries = [{"image": im, "box": list(box), "object": obj} for im, box, obj in queries]
    (root / "queries.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    if relevance is not None:
        (root / "relevance.json").write_text(json.dumps(relevance), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def zf(tmp_path_factory):
    """A tamed ZF-tiny model, its checkpoint file and the matching config options."""
    folder = tmp_path_factory.mktemp("zf")
    model = tiny_model("ZF")
    path = folder / "zf.pth"
    torch.save({"model": model.state_dict()}, path)
    return {"model": model, "weights": str(path), "opts": ["MODEL.WEIGHTS", str(path)]}


def make_extractor(zf, opts=(), model=None):
    """A FeatureExtractor on the shared ZF weights (no checkpoint reload: the model is reused)."""
    cfg = tiny_cfg("ZF", list(zf["opts"]) + list(opts))
    return FeatureExtractor(cfg, model=model if model is not None else zf["model"])


@pytest.fixture
def registered():
    """Names appended here are unregistered after the test."""
    names = []
    yield names
    for n in names:
        unregister_retrieval_dataset(n)


def register(registered, name, root):
    register_custom_dataset(name, str(root))
    registered.append(name)
    return name


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logs():
    """Records logged under "retrieval_ext" (whatever its propagation), as a list of messages."""
    handler = _ListHandler()
    logger = logging.getLogger("retrieval_ext")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    class Logs:
        def warnings(self):
            return [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]

    yield Logs()
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture(scope="session")
def search_engine(zf, tmp_path_factory):
    """An InstanceSearch over an index of a tiny synthetic benchmark (6 images, 4 queries)."""
    from detectron2.data import DatasetCatalog

    from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark
    from retrieval_ext.retrieval.api import InstanceSearch
    from retrieval_ext.retrieval.indexing import build_index

    tmp = tmp_path_factory.mktemp("engine")
    generate_synthetic_benchmark(
        str(tmp / "bench"),
        num_instances=2,
        queries_per_instance=2,
        num_db=6,
        short_side=96,
        seed=3,
    )
    name = "rel_engine"
    opts = list(zf["opts"]) + [
        "RETRIEVAL.DATASET",
        name,
        "RETRIEVAL.CUSTOM_DATASETS",
        [f"{name}={tmp / 'bench'}"],
        "RETRIEVAL.TOP_N",
        3,
        "RETRIEVAL.QE_M",
        2,
        "RETRIEVAL.INDEX_DTYPE",
        "float32",
        "OUTPUT_DIR",
        str(tmp / "out"),
    ]
    cfg = tiny_cfg("ZF", opts)
    register_config_datasets(cfg)
    extractor = FeatureExtractor(cfg)
    build_index(
        extractor,
        name,
        str(tmp / "out" / "index"),
        shard_size=2,
        dtype="float32",
        show_progress=False,
    )
    engine = InstanceSearch(cfg)
    yield {"engine": engine, "queries": DatasetCatalog.get(f"{name}_query"), "cfg": cfg}
    unregister_retrieval_dataset(name)
