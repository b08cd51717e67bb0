#!/usr/bin/env python
"""Write the synthetic instance-search benchmark (and optionally the generic detection set).

    python tools/make_synthetic.py --output datasets/synthetic --generic

writes the benchmark in the custom format under ``--output`` and, with ``--generic``, the
COCO-format generic detection set under ``--generic-output`` (default ``OUTPUT/generic``).
See ``retrieval_ext/data/datasets/synthetic/`` for the layouts and BENCHMARKS.md (section 7) for
what simple global descriptors score on the default benchmark.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from retrieval_ext.data.datasets.synthetic import (  # noqa: E402
    generate_generic_detection_set,
    generate_synthetic_benchmark,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="benchmark root folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-db", type=int, default=300, help="database images")
    parser.add_argument("--num-instances", type=int, default=11, help="query objects K")
    parser.add_argument("--queries-per-instance", type=int, default=5)
    parser.add_argument("--short-side", type=int, default=300, help="shorter image side, px")
    parser.add_argument("--difficulty", type=float, default=1.0, help="1.0 = measured default")
    parser.add_argument("--generic", action="store_true", help="also write the generic set")
    parser.add_argument("--generic-output", default=None, help="default: OUTPUT/generic")
    parser.add_argument("--generic-train", type=int, default=400, help="generic train images")
    parser.add_argument("--generic-val", type=int, default=50, help="generic val images")
    parser.add_argument("--generic-short-side", type=int, default=320)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    summary = generate_synthetic_benchmark(
        args.output,
        num_instances=args.num_instances,
        queries_per_instance=args.queries_per_instance,
        num_db=args.num_db,
        short_side=args.short_side,
        seed=args.seed,
        difficulty=args.difficulty,
    )
    pos, junk = summary["positives"], summary["junk"]
    print(f"benchmark: {args.output} ({time.perf_counter() - start:.1f} s)")
    print(f"  {summary['num_db']} database images, {summary['num_queries']} queries")
    print(f"  db images by number of instances: {summary['db_instance_histogram']}")
    print(f"  {'object':<10} {'positives':>9} {'junk':>5}")
    for name in summary["objects"]:
        print(f"  {name:<10} {pos[name]:>9} {junk[name]:>5}")
    if args.generic:
        out = args.generic_output or os.path.join(args.output, "generic")
        start = time.perf_counter()
        gen = generate_generic_detection_set(
            out,
            num_train=args.generic_train,
            num_val=args.generic_val,
            short_side=args.generic_short_side,
            seed=args.seed,
        )
        print(f"generic detection set: {out} ({time.perf_counter() - start:.1f} s)")
        print(f"  {gen['num_images']} images, {gen['num_annotations']} boxes")
        for name, count in gen["per_category"].items():
            print(f"  {name:<20} {count:>5}")


if __name__ == "__main__":
    main()
