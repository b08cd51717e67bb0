"""A tiny synthetic index that the browser UI's tests serve.

The embedded default backbone (EfficientNet-Lite0 with its real ImageNet weights) on 12 database
images of 192 px: index built in ~10 s on CPU, and good enough that an instance's own images come
first, which the end-to-end browser test relies on. The RPN and box head are random (seeded) and
saved once, so the in-process service and the ``tools/serve.py`` subprocess load the same weights.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
import torch
from detectron2.modeling import build_model

from retrieval_ext.data.datasets import register_config_datasets, unregister_retrieval_dataset
from retrieval_ext.retrieval.extractor import FeatureExtractor
from retrieval_ext.retrieval.paths import index_paths
from retrieval_ext.retrieval.pipeline import prepare_index
from tests.common import CONFIGS, make_cfg, save_checkpoint, write_benchmark

DATASET = "ui_synth"
WHITEN = "ui_whiten"
SHORT_SIDE = 192


@dataclass
class UIIndex:
    root: Path  # the synthetic collection (images/, queries/, queries.json, relevance.json)
    opts: List[str]  # KEY VALUE options of tools/retrieve.py / tools/serve.py
    config_file: str
    cfg: object  # the frozen config those give
    queries: list  # queries.json
    relevance: dict  # relevance.json: {object: {"positives", "junk", "boxes"}}


@pytest.fixture(scope="session")
def ui_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui_index")
    root = tmp / DATASET
    common = dict(short_side=SHORT_SIDE, difficulty=0.3)
    write_benchmark(root, num_instances=3, queries_per_instance=2, num_db=12, seed=3, **common)
    write_benchmark(
        tmp / WHITEN, num_instances=2, queries_per_instance=1, num_db=8, seed=7, **common
    )
    config_file = str(CONFIGS / "synthetic" / "EfficientNet-Lite0.yaml")
    opts = [
        "RETRIEVAL.DATASET",
        DATASET,
        "RETRIEVAL.CUSTOM_DATASETS",
        f"['{DATASET}={root}', '{WHITEN}={tmp / WHITEN}']",
        "RETRIEVAL.WHITENING_DATASET",
        WHITEN,
        "RETRIEVAL.TOP_N",
        "6",
        "RETRIEVAL.QE_M",
        "2",
        "RETRIEVAL.INDEX_DIR",
        str(tmp / "index"),
        "INPUT.MIN_SIZE_TEST",
        str(SHORT_SIDE),
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "50",
        "MODEL.RETRIEVAL.NUM_PROPOSALS",
        "50",
        "OUTPUT_DIR",
        str(tmp / "out"),
        # CS-SR from stored class scores, which this model does not have: the UI offers the
        # class-agnostic stages only (tests/serving/test_api.py checks the query-set classifier)
        "RETRIEVAL.CS_SR_CLASSIFIER",
        "model",
    ]
    torch.manual_seed(0)
    model = build_model(make_cfg(config_file, opts + ["MODEL.WEIGHTS", ""]))
    opts += ["MODEL.WEIGHTS", save_checkpoint(model, tmp / "model.pth")]
    cfg = make_cfg(config_file, opts)
    register_config_datasets(cfg)
    prepare_index(cfg, FeatureExtractor(cfg), DATASET, index_paths(cfg))
    yield UIIndex(
        root=root,
        opts=opts,
        config_file=config_file,
        cfg=cfg,
        queries=json.loads((root / "queries.json").read_text()),
        relevance=json.loads((root / "relevance.json").read_text()),
    )
    for name in (DATASET, WHITEN):
        unregister_retrieval_dataset(name)
