"""Looking up registered retrieval datasets: names, views, dataset dicts, metadata.

A retrieval dataset ``NAME`` is registered as three views, ``NAME_db``, ``NAME_query`` and
``NAME_finetune`` (see :mod:`.common`). These helpers go from any of those names to the dataset
and its data with errors that name what is registered, and register the custom-format
collections a config lists.
"""

import os
import re
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog

from .common import registered_retrieval_datasets
from .custom import register_custom_dataset

__all__ = [
    "UnknownDatasetError",
    "get_dataset_dicts",
    "get_retrieval_metadata",
    "register_config_datasets",
    "retrieval_dataset_name",
    "skipped_images",
]

_VIEW_SUFFIX = re.compile(r"_(db|query|finetune)$")


class UnknownDatasetError(KeyError):
    """A dataset name that is not registered; the message lists the registered ones.

    Attributes:
        name (str): the unknown name.
    """

    def __init__(self, name: str):
        self.name = name
        known = registered_retrieval_datasets()
        self.message = (
            f"Retrieval dataset {name!r} is not registered; registered retrieval datasets: "
            f"{', '.join(known) or '(none)'}. Register your own folder with "
            "RETRIEVAL.CUSTOM_DATASETS ['name=/path'] or register_custom_dataset (see "
            "datasets/README.md)"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return self.message


def retrieval_dataset_name(name: str) -> str:
    """The retrieval dataset ``NAME`` of ``NAME`` or of one of its views.

    Args:
        name: e.g. ``"oxford5k"``, ``"oxford5k_db"``, ``"oxford5k_query"`` or
            ``"oxford5k_finetune"``.

    Returns:
        str: ``"oxford5k"``.

    Raises:
        UnknownDatasetError (a KeyError): no such retrieval dataset is registered; it names the
            dataset (``"oxfrod5k"`` for ``"oxfrod5k_db"``) and lists the registered ones.
    """
    if f"{name}_query" in DatasetCatalog:
        return name
    base = _VIEW_SUFFIX.sub("", name)
    if f"{base}_query" in DatasetCatalog:
        return base
    raise UnknownDatasetError(base)


def get_dataset_dicts(name: str) -> List[dict]:
    """``DatasetCatalog.get(name)`` with clear errors.

    Args:
        name: a registered view, e.g. ``"oxford5k_db"``.

    Returns:
        list[dict]: the view's dataset dicts.

    Raises:
        UnknownDatasetError (a KeyError): ``name`` is not registered; the message lists the
            registered retrieval datasets.
        FileNotFoundError: the dataset's folder or ground-truth files are missing; the message
            names the path and quotes the expected layout (datasets/README.md).
    """
    if name not in DatasetCatalog:
        retrieval_dataset_name(name)  # names the dataset when the whole dataset is unknown
        raise UnknownDatasetError(name)
    return DatasetCatalog.get(name)


def get_retrieval_metadata(name: str):
    """Metadata of a retrieval dataset, with the ground truth loaded.

    Args:
        name: the dataset name (``"paris6k"``) or one of its views (``"paris6k_query"``).

    Returns:
        detectron2 Metadata of ``NAME_query``: ``evaluator_type``, ``protocol``,
        ``thing_classes``, ``db_dataset``, ``query_dataset``, ``gnd`` (None when the dataset has
        no judgements), ``dataset_root`` and protocol-specific keys.

    Raises:
        UnknownDatasetError (a KeyError): no such retrieval dataset is registered.
    """
    query_name = f"{retrieval_dataset_name(name)}_query"
    meta = MetadataCatalog.get(query_name)
    if not hasattr(meta, "gnd"):
        DatasetCatalog.get(query_name)
        # the loader may have rebuilt the entry (see common._set_metadata)
        meta = MetadataCatalog.get(query_name)
    return meta


def skipped_images(dataset: str) -> Dict[str, str]:
    """Database images the loader of ``dataset`` left out as missing or unreadable.

    Returns:
        {image name: reason}; empty when none were (or the loader does not report them).
    """
    return dict(getattr(MetadataCatalog.get(f"{dataset}_db"), "skipped_images", None) or {})


def register_config_datasets(cfg) -> List[str]:
    """Register the custom-format collections of ``cfg.RETRIEVAL.CUSTOM_DATASETS``.

    Returns:
        the registered names.
    """
    names = []
    for entry in cfg.RETRIEVAL.CUSTOM_DATASETS:
        name, sep, root = entry.partition("=")
        if not sep or not name or not root:
            raise ValueError(
                f"RETRIEVAL.CUSTOM_DATASETS entry {entry!r} must read name=/path/to/folder"
            )
        register_custom_dataset(name.strip(), os.path.expanduser(root.strip()))
        names.append(name.strip())
    return names
