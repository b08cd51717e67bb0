"""Retrieval datasets registered in detectron2's catalogs (see :mod:`.builtin` for the names)."""

from . import builtin as _builtin  # noqa: F401  registers the built-in datasets
from .catalog import (
    UnknownDatasetError,
    get_dataset_dicts,
    get_retrieval_metadata,
    register_config_datasets,
    retrieval_dataset_name,
)
from .common import (
    RetrievalData,
    clear_retrieval_cache,
    get_datasets_root,
    register_retrieval_dataset,
    unregister_retrieval_dataset,
)
from .custom import load_custom, register_custom_dataset
from .ins13 import load_ins13
from .oxford_paris import load_oxford_paris
from .revisited import load_revisited

__all__ = [
    "RetrievalData",
    "UnknownDatasetError",
    "clear_retrieval_cache",
    "get_dataset_dicts",
    "get_datasets_root",
    "get_retrieval_metadata",
    "load_custom",
    "load_ins13",
    "load_oxford_paris",
    "load_revisited",
    "register_config_datasets",
    "register_custom_dataset",
    "register_retrieval_dataset",
    "retrieval_dataset_name",
    "unregister_retrieval_dataset",
]
