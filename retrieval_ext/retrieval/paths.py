"""Where a run keeps its index, what is learned for it, and its query cache.

One :func:`index_paths` for every caller (``tools/retrieve.py``, ``tools/serve.py``, the Python
API, the trainer's evaluator), so that the API finds the whitening that indexing learned.
"""

import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["IndexPaths", "index_paths"]


@dataclass(frozen=True)
class IndexPaths:
    """The folders of one run.

    Attributes:
        index_dir: the searched dataset's index.
        work_dir: ``index_dir``'s parent (absolute): the learned transforms (whitening, region
            PCA) and the indexes of the datasets they are learned on (``index-<dataset>``), so
            that runs sharing an index share what was learned for it.
        cache_dir: the run's output folder, where the query records are cached.
    """

    index_dir: str
    work_dir: str
    cache_dir: str


def index_paths(cfg, output_dir: Optional[str] = None) -> IndexPaths:
    """The folders of a run of ``cfg``.

    Args:
        cfg: a retrieval_ext config.
        output_dir: the run's folder; None = ``cfg.OUTPUT_DIR``, whose index is
            ``RETRIEVAL.INDEX_DIR`` or ``OUTPUT_DIR/index``. A folder given here (the trainer's
            per-evaluation folder) holds its own index, ``output_dir/index``:
            ``RETRIEVAL.INDEX_DIR`` names an index built with other weights.

    Returns:
        IndexPaths
    """
    if output_dir is None:
        output_dir = cfg.OUTPUT_DIR
        index_dir = cfg.RETRIEVAL.INDEX_DIR or os.path.join(output_dir, "index")
    else:
        index_dir = os.path.join(output_dir, "index")
    return IndexPaths(index_dir, os.path.dirname(os.path.abspath(index_dir)), output_dir)
