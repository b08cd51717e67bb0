#!/usr/bin/env python
"""Validation / report views of a collection whose photos are grouped in folders.

    python tools/real_photo_splits.py --root ../shared/data/smvs_dvd --output OUT \
        [--relevance datasets/smvs_dvd_boxes.json] \
        --view smvs_val=droid --view smvs_report=canon,e63

Each view ``OUT/NAME`` is a custom-format folder of symlinks whose ``relevance.json`` keeps only
the view's photos (:mod:`retrieval_ext.data.datasets.splits`). ``tools/benchmark.py real`` makes
its views itself; this tool is for using a view elsewhere:
``RETRIEVAL.CUSTOM_DATASETS "['NAME=OUT/NAME']" RETRIEVAL.DATASET NAME``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from retrieval_ext.data.datasets.splits import make_view, parse_views  # noqa: E402

__all__ = ["main", "make_view", "parse_views"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the collection (custom format)")
    parser.add_argument("--output", required=True, help="folder that receives one folder a view")
    parser.add_argument(
        "--view", action="append", required=True, help="NAME=GROUP[,GROUP...] (repeatable)"
    )
    parser.add_argument(
        "--relevance", default=None, help="judgements instead of ROOT/relevance.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing views")
    args = parser.parse_args(argv)
    try:
        views = parse_views(args.view)
        for name, groups in views.items():
            out = os.path.join(args.output, name)
            s = make_view(args.root, out, groups, args.overwrite, args.relevance)
            print(
                f"{name}={os.path.abspath(out)}: {','.join(groups)}, {s['images']} images, "
                f"{s['positives']} positive pairs"
            )
    except (OSError, ValueError) as e:
        sys.exit(f"real_photo_splits: {e}")


if __name__ == "__main__":
    main()
