#!/usr/bin/env python
from setuptools import find_packages, setup

setup(
    name="retrieval_ext",
    version="0.1.0",
    description="Instance search with Faster R-CNN features: a Detectron2 extension",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs", "datasets")),
    # the browser UI's page, script and style sheet (tools/serve.py)
    package_data={"retrieval_ext.serving": ["static/*"]},
    python_requires=">=3.9",
    # torch, torchvision and detectron2 are installed by scripts/setup.sh (detectron2 is not on
    # PyPI); the rest is in requirements.txt.
    install_requires=[],
)
