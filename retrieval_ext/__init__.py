"""retrieval_ext: instance search with Faster R-CNN features (Salvador et al., 2016) on Detectron2.

Importing the package registers its meta-architecture, ROI heads, backbones and datasets.
"""
__version__ = "0.1.0"
