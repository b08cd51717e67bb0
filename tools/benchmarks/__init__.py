"""Cost of instance search with Faster R-CNN features: extraction, reranking, search.

One module per experiment:

    benchmark.py extraction  [--backbones R50-C4 VGG16 ...] [--size 600] [--repeats 5]
    benchmark.py rerank      [--top-n 100] [--num-db 60] [--num-proposals 100] [--size 300]
    benchmark.py search      [--max-db 100000] [--index-images 2000]
    benchmark.py scale       [--max-db 1000000] [--max-hnsw 10000] [--approx-1m]
    benchmark.py compression [--num-db 100] [--pca-db 40]
    benchmark.py limits      [--gemm 2048] [--copy-mb 512] [--search-db 100000]
    benchmark.py index-cost  [--smvs PATH] [--pq 32 64 ...] [--default-pq 64] [--parts ...]
    benchmark.py real        --data ROOT [--boxes FILE] [--split val|report|all] [--config-file
                             CFG] [--weights W] [--baseline JSON] [KEY VALUE ...]

Each cost subcommand prints the machine, a table (GitHub markdown) and writes ``<name>.json``
under ``--output-dir`` (default ``output/benchmark``); ``--quick`` shrinks every size to a smoke
run. ``real`` measures quality instead: every stage's mAP and localisation on a real-photo
collection (:mod:`.real_photos`).
Each experiment module registers its own subcommand (``register(subparsers)``) and shares
machine probes, tables, JSON output, config / model building and synthetic data with
:mod:`.common`. Numbers are wall-clock medians; on a shared machine they are noisy, so compare
runs made together.
"""

import argparse

from . import compression, extraction, index_cost, limits, real_photos, rerank, scale, search

EXPERIMENTS = (extraction, rerank, search, scale, compression, limits, index_cost, real_photos)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for experiment in EXPERIMENTS:
        experiment.register(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)
