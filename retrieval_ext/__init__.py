"""retrieval_ext: instance search with Faster R-CNN features (Salvador et al., 2016) on Detectron2.

Importing the package registers its meta-architecture, ROI heads, backbones and datasets.
:class:`InstanceSearch` is the Python API: a loaded model and index answering (image, box) queries.
"""

from . import data as _data  # noqa: F401  registers datasets
from . import modeling as _modeling  # noqa: F401  registers models
from .config import add_retrieval_config
from .retrieval.api import InstanceSearch

__version__ = "0.1.0"
__all__ = ["InstanceSearch", "add_retrieval_config"]
