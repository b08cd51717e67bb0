"""Data: retrieval datasets (registered on import) and the dataset mapper."""

from . import datasets  # noqa: F401  registers the built-in retrieval datasets
from .datasets import get_retrieval_metadata, register_custom_dataset, register_retrieval_dataset
from .mapper import RetrievalDatasetMapper, UnreadableImageError

__all__ = [
    "RetrievalDatasetMapper",
    "UnreadableImageError",
    "get_retrieval_metadata",
    "register_custom_dataset",
    "register_retrieval_dataset",
]
