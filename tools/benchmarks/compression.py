"""``compression``: index bytes per image and mAP of each region-feature compression option
(fewer proposals, PCA learned on another synthetic set, float16 / int8 codes) on the synthetic
benchmark."""

import os
import tempfile
import time

import numpy as np

from .common import (
    add_experiment_parser,
    add_threads_arg,
    build_cfg,
    build_model,
    config_file,
    machine_info,
    print_machine,
    print_table,
    save_results,
    synthetic_datasets,
)

COMPRESSION_OPTIONS = [
    # (name, num_proposals, pca_dim, dtype)
    ("float32 (reference)", 0, 0, "float32"),
    ("float16", 0, 0, "float16"),
    ("int8", 0, 0, "int8"),
    ("200 proposals, int8", 200, 0, "int8"),
    ("100 proposals, float16", 100, 0, "float16"),
    ("PCA 256, float16", 0, 256, "float16"),
    ("PCA 256, int8", 0, 256, "int8"),
    ("PCA 128, int8", 0, 128, "int8"),
    ("100 proposals, PCA 128, int8", 100, 128, "int8"),
]
QUICK_OPTIONS = [
    ("float32 (reference)", 0, 0, "float32"),
    ("int8", 0, 0, "int8"),
    ("4 proposals, PCA 8, int8", 4, 8, "int8"),
]
HEADERS = [
    "region features",
    "index bytes/image",
    "RPA bytes/image",
    "smaller than float32",
    "filtering mAP (%)",
    "CA-SR mAP (%)",
    "CA-SR vs float32 (points)",
]


def _compression_cfg(args):
    opts = ["MODEL.DEVICE", "cpu", "RETRIEVAL.INDEX_DTYPE", "float32"]
    if not args.quick and args.size:
        opts += ["INPUT.MIN_SIZE_TEST", args.size, "INPUT.MAX_SIZE_TEST", args.size * 2]
    return build_cfg(config_file("EfficientNet-Lite0", args.quick), opts)


def _build_indexes(cfg, name, other, tmp):
    """float32 index of ``name``, the query records, and the region vectors of ``other`` (the
    PCA-learning set).

    Returns:
        (reference index, queries, PCA-learning region vectors, indexing seconds)
    """
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.indexing import build_index
    from retrieval_ext.retrieval.queries import extract_queries

    extractor = FeatureExtractor(cfg, model=build_model(cfg))
    t = time.perf_counter()
    ref = build_index(
        extractor, name, os.path.join(tmp, "index"), dtype="float32", show_progress=False
    )
    pca_index = build_index(
        extractor, other, os.path.join(tmp, "index_pca"), dtype="float32", show_progress=False
    )
    index_s = time.perf_counter() - t
    queries = extract_queries(extractor, name)
    # the region poolings the index stores (RETRIEVAL.STORE: the one reranking reads)
    pca_vecs = np.concatenate(
        [
            np.asarray(v)
            for i in range(pca_index.num_images)
            for f, v in pca_index.regions(i).items()
            if f in ("rpa_sum", "rpa_max")
        ]
    )
    return ref, queries, pca_vecs, index_s


def _measure_options(options, name, tmp, ref, queries, pca_vecs):
    """Compress ``ref`` with each option, search every query, score filtering and CA-SR."""
    from retrieval_ext.data.datasets import get_retrieval_metadata
    from retrieval_ext.data.datasets.catalog import get_dataset_dicts
    from retrieval_ext.evaluation.evaluator import db_positions, evaluate_stages
    from retrieval_ext.retrieval.compression import RegionCompression, compress_index
    from retrieval_ext.retrieval.search import IndexSearcher

    meta = get_retrieval_metadata(name)
    positions = db_positions(ref, get_dataset_dicts(f"{name}_db"))
    rows = []
    for label, props, dim, dtype in options:
        if dtype == "float32" and not props and not dim:
            index = ref
        else:
            comp = RegionCompression.learn(pca_vecs, props, dim, dtype)
            index = compress_index(ref, os.path.join(tmp, f"c{len(rows)}"), comp)
        searcher = IndexSearcher(index, top_n=min(100, ref.num_images))
        results = {"filtering": [], "ca_sr": []}
        for q in queries:
            out = searcher.search(q, ["filtering", "ca_sr"])
            for s in results:
                results[s].append(out[s])
        scores = evaluate_stages(results, meta, positions)
        nb = index.nbytes_per_image()
        row = {
            "option": label,
            "bytes_per_image": nb["total"],
            "rpa_bytes": sum(v for k, v in nb.items() if k.startswith("rpa_")),
            "filtering_mAP": scores["filtering"]["mAP"],
            "ca_sr_mAP": scores["ca_sr"]["mAP"],
        }
        row["ca_sr_delta"] = row["ca_sr_mAP"] - (rows[0] if rows else row)["ca_sr_mAP"]
        rows.append(row)
        print(f"  {label}: ca_sr mAP {100 * row['ca_sr_mAP']:.2f}", flush=True)
    return rows


def _report(args, rows, num_queries, index_s):
    ref = rows[0]
    table = [
        [
            r["option"],
            f"{r['bytes_per_image']:,.0f}",
            f"{r['rpa_bytes']:,.0f}",
            f"{ref['bytes_per_image'] / r['bytes_per_image']:.1f}x",
            f"{100 * r['filtering_mAP']:.2f}",
            f"{100 * r['ca_sr_mAP']:.2f}",
            f"{100 * r['ca_sr_delta']:+.3f}",
        ]
        for r in rows
    ]
    title = (
        f"compression on the synthetic benchmark ({args.num_db} db images, {num_queries} "
        f"queries; PCA learned on {args.pca_db} other images)"
    )
    print_table(table, HEADERS, title=title)
    print(f"indexing: {index_s:.1f} s for {args.num_db + args.pca_db} images")


def cmd_compression(args) -> dict:
    import torch

    options = COMPRESSION_OPTIONS
    if args.quick:
        args.num_db, args.num_instances, args.queries_per_instance = 8, 2, 1
        args.short_side, args.pca_db = 96, 6
        options = QUICK_OPTIONS
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)
    cfg = _compression_cfg(args)
    name, other = f"bench_comp_{os.getpid()}", f"bench_comp_pca_{os.getpid()}"
    specs = [(name, args.num_db, args.seed), (other, args.pca_db, args.seed + 101)]
    with tempfile.TemporaryDirectory(prefix="retrieval_comp_") as tmp:
        with synthetic_datasets(
            tmp, specs, args.num_instances, args.queries_per_instance, args.short_side
        ):
            ref, queries, pca_vecs, index_s = _build_indexes(cfg, name, other, tmp)
            rows = _measure_options(options, name, tmp, ref, queries, pca_vecs)
    _report(args, rows, len(queries), index_s)
    return save_results(args, "compression", info, results=rows, index_s=index_s)


def register(subparsers):
    p = add_experiment_parser(
        subparsers, "compression", "index bytes/image and mAP per compression", cmd_compression
    )
    p.add_argument("--num-db", type=int, default=100)
    p.add_argument("--pca-db", type=int, default=40, help="images of the PCA-learning dataset")
    p.add_argument("--num-instances", type=int, default=5)
    p.add_argument("--queries-per-instance", type=int, default=3)
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--size", type=int, default=256, help="network input shorter side")
    add_threads_arg(p)
