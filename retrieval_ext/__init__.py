"""retrieval_ext: instance search with Faster R-CNN features (Salvador et al., 2016) on Detectron2.

Importing the package registers its meta-architecture, ROI heads, backbones and datasets.
"""

from . import data as _data  # noqa: F401  registers datasets
from . import modeling as _modeling  # noqa: F401  registers models
from .config import add_retrieval_config

__version__ = "0.1.0"
__all__ = ["add_retrieval_config"]
