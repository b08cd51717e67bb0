#!/usr/bin/env python
"""Cost of instance search with Faster R-CNN features: extraction, reranking, search.

    benchmark.py {extraction,rerank,search,scale,compression,limits,index-cost} [--quick] [options]
    benchmark.py real --data ROOT [--boxes FILE] [--split val|report|all] [options]

The experiments live in ``tools/benchmarks/`` (one module each, see its ``__init__``); this is
their command line. Everything a run writes goes under ``--output-dir`` (``output/benchmark``).
"""

import os  # noqa: E402  (before torch is imported: OpenMP reads it once)

# Spinning OpenMP threads make small CPU models 5-10x slower when another process competes for
# the cores; passive waiting costs nothing on an idle machine. Children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.benchmarks import main

if __name__ == "__main__":
    main()
