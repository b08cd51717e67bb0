"""Models: importing this package registers the meta-architecture, ROI heads, box heads,
backbones and the dense region proposal generator."""

from . import backbones as _backbones  # noqa: F401  registers VGG16, ZF, EfficientNet-Lite0
from . import dense_regions as _dense_regions  # noqa: F401  registers DenseRegionProposals
from .box_heads import RetrievalPooledBoxHead
from .meta_arch import RetrievalRCNN
from .roi_heads import RetrievalRes5ROIHeads, RetrievalROIHeadsMixin, RetrievalStandardROIHeads

__all__ = [
    "RetrievalPooledBoxHead",
    "RetrievalRCNN",
    "RetrievalRes5ROIHeads",
    "RetrievalROIHeadsMixin",
    "RetrievalStandardROIHeads",
]
