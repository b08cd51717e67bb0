"""Registers every built-in retrieval dataset on import (lazily: nothing is read from disk).

Names (each with ``_db``, ``_query`` and ``_finetune`` views), rooted at
``$DETECTRON2_DATASETS`` (default ``./datasets``); see datasets/README.md for the layouts:

=================  =====================================  ===========
name               folder                                 protocol
=================  =====================================  ===========
oxford5k           oxford5k/                              oxford
paris6k            paris6k/                               oxford
roxford5k          roxford5k/                             revisited
rparis6k           rparis6k/                              revisited
roxford5k_1m       roxford5k/ + revisitop1m/              revisited
rparis6k_1m        rparis6k/ + revisitop1m/               revisited
ins13              ins13/                                 ins
ins13_subset       ins13/ (relevant keyframes only)       ins
synthetic          synthetic/ (custom format)             custom
synthetic_whiten   synthetic_whiten/ (custom format)      custom
=================  =====================================  ===========

Also registered, as plain detectron2 detection datasets (COCO json, ``evaluator_type="coco"``):
``synthetic_generic_train`` / ``synthetic_generic_val`` from ``synthetic_generic/{train,val}.json``
and ``synthetic_generic/images``: the generic detection set (disjoint object categories) on which
the embedded default's RPN and box head are trained, the stand-in for COCO pre-training.
"""

import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .common import get_datasets_root, register_retrieval_dataset
from .custom import load_custom
from .ins13 import load_ins13
from .oxford_paris import load_oxford_paris
from .revisited import load_revisited

__all__ = ["BUILTIN_RETRIEVAL_DATASETS", "register_all_retrieval"]

# name -> (folder under the datasets root, loader(root), protocol)
BUILTIN_RETRIEVAL_DATASETS = {
    "oxford5k": ("oxford5k", functools.partial(load_oxford_paris, dataset="oxford5k"), "oxford"),
    "paris6k": ("paris6k", functools.partial(load_oxford_paris, dataset="paris6k"), "oxford"),
    "roxford5k": ("roxford5k", functools.partial(load_revisited, dataset="roxford5k"), "revisited"),
    "rparis6k": ("rparis6k", functools.partial(load_revisited, dataset="rparis6k"), "revisited"),
    "roxford5k_1m": (
        "roxford5k",
        functools.partial(load_revisited, dataset="roxford5k", with_distractors=True),
        "revisited",
    ),
    "rparis6k_1m": (
        "rparis6k",
        functools.partial(load_revisited, dataset="rparis6k", with_distractors=True),
        "revisited",
    ),
    "ins13": ("ins13", functools.partial(load_ins13, subset=False), "ins"),
    "ins13_subset": ("ins13", functools.partial(load_ins13, subset=True), "ins"),
    "synthetic": ("synthetic", functools.partial(load_custom, name="synthetic"), "custom"),
    # a second synthetic benchmark (other instances, other seed) that learns the whitening of the
    # first, as Paris 6k does for Oxford 5k in the paper
    "synthetic_whiten": (
        "synthetic_whiten",
        functools.partial(load_custom, name="synthetic_whiten"),
        "custom",
    ),
}

GENERIC_DETECTION_SPLITS = ("train", "val")


def register_all_retrieval(root: str) -> None:
    """(Re-)registers every built-in retrieval dataset under ``root``; reads nothing.

    Args:
        root: the datasets root (``$DETECTRON2_DATASETS``); each dataset lives in a subfolder.
    """
    for name, (folder, loader, protocol) in BUILTIN_RETRIEVAL_DATASETS.items():
        register_retrieval_dataset(name, loader, os.path.join(root, folder), protocol=protocol)
    generic = os.path.join(root, "synthetic_generic")
    for split in GENERIC_DETECTION_SPLITS:
        name = f"synthetic_generic_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(
            name, {}, os.path.join(generic, f"{split}.json"), os.path.join(generic, "images")
        )


register_all_retrieval(get_datasets_root())
