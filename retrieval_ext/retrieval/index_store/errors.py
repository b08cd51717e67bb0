"""The errors of the index store (every one an :class:`IndexStoreError`)."""

from typing import Sequence

__all__ = [
    "IndexStoreError",
    "IndexMismatchError",
    "IndexWriteError",
    "IndexIncompleteError",
    "IndexNotFinalizedError",
]


class IndexStoreError(Exception):
    """Base class of the errors raised by this module."""


class IndexMismatchError(IndexStoreError, ValueError):
    """A stored index was built with a different manifest (model, config, weights, ...).

    Attributes:
        keys (list[str]): the differing keys.
    """

    def __init__(self, message: str, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = list(keys)


class IndexWriteError(IndexStoreError, OSError):
    """Writing the index failed (unwritable root, disk full, ...). Complete data is untouched."""


class IndexIncompleteError(IndexStoreError):
    """``finalize`` found images of the list that are neither stored nor marked failed.

    Attributes:
        missing (list[str]): the missing image ids, in list order.
    """

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)


class IndexNotFinalizedError(IndexStoreError, FileNotFoundError):
    """The index root has no ``manifest.json`` (missing root, or ``finalize`` never ran)."""
