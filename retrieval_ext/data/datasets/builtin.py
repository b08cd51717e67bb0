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
=================  =====================================  ===========
"""

import functools
import os

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
}


def register_all_retrieval(root: str) -> None:
    """(Re-)registers every built-in retrieval dataset under ``root``; reads nothing.

    Args:
        root: the datasets root (``$DETECTRON2_DATASETS``); each dataset lives in a subfolder.
    """
    for name, (folder, loader, protocol) in BUILTIN_RETRIEVAL_DATASETS.items():
        register_retrieval_dataset(name, loader, os.path.join(root, folder), protocol=protocol)


register_all_retrieval(get_datasets_root())
