"""``search``: per-query latency of exact filtering against database size (random unit vectors)
and of CA-SR of the top N from a memory-mapped index (independent of database size)."""

import tempfile
import time

import numpy as np

from .common import (
    MB,
    add_experiment_parser,
    fmt,
    machine_info,
    print_machine,
    print_table,
    random_unit,
    save_results,
    time_rank,
    write_synthetic_index,
)


def _time_filtering(rng, sizes, args):
    """Exact cosine ranking (``ranking.rank``), full and top N, per database size."""
    from retrieval_ext.retrieval.ranking import rank

    filtering = []
    for n in sizes:
        db = random_unit(rng, n, args.dim)
        qs = list(random_unit(rng, args.queries, args.dim))
        rank(qs[0], db)  # warm-up: page in the matrix, BLAS thread start
        full = time_rank(rank, qs, db)
        top = time_rank(rank, qs, db, args.top_n)
        filtering.append(
            {
                "db_size": n,
                "db_mb": db.nbytes / MB,
                "full_rank_ms": float(np.median(full)) * 1000.0,
                "top_n_ms": float(np.median(top)) * 1000.0,
                "full_rank_all_ms": [s * 1000.0 for s in full],
            }
        )
        print(
            f"  filtering {n}: full {filtering[-1]['full_rank_ms']:.2f} ms, "
            f"top-{args.top_n} {filtering[-1]['top_n_ms']:.2f} ms",
            flush=True,
        )
        del db
    return filtering


def _ca_sr_by_span(rng, index, queries, args):
    """CA-SR of N images drawn from ever larger parts of the index.

    CA-SR only touches the top N images, wherever they sit in the index: the same N drawn from
    ever larger parts of it cost the same.
    """
    from retrieval_ext.retrieval.reranking import class_agnostic_rerank

    rpa, boxes = index.region_accessor("rpa_max"), index.region_accessor("boxes")
    spans = sorted(
        {min(m, args.index_images) for m in (args.top_n, 10 * args.top_n, args.index_images)}
    )
    by_span = []
    for m in spans:
        times = []
        for q in queries:
            order = rng.permutation(m)[: args.top_n].astype(np.int64)
            scores = np.zeros(len(order), dtype=np.float32)
            t = time.perf_counter()
            class_agnostic_rerank(q["crop_max"], order, scores, rpa, boxes, args.top_n)
            times.append(time.perf_counter() - t)
        by_span.append({"drawn_from_images": m, "ca_sr_ms": float(np.median(times)) * 1000.0})
    return by_span


def _time_ca_sr(rng, args) -> dict:
    """CA-SR of the top N through ``IndexSearcher`` on a memory-mapped synthetic index."""
    from retrieval_ext.retrieval.index_store import IndexReader
    from retrieval_ext.retrieval.search import IndexSearcher

    with tempfile.TemporaryDirectory(prefix="retrieval_bench_index_") as tmp:
        t = time.perf_counter()
        write_synthetic_index(
            tmp, rng, args.index_images, args.num_proposals, args.dim, args.index_dtype
        )
        write_s = time.perf_counter() - t
        index = IndexReader(tmp, mmap=True)
        nbytes = index.nbytes_per_image()["total"]
        searcher = IndexSearcher(index, top_n=args.top_n)
        queries = [
            {"ipa_sum": v, "crop_max": r}
            for v, r in zip(
                rng.standard_normal((args.queries, args.dim), dtype=np.float32),
                random_unit(rng, args.queries, args.dim),
            )
        ]
        searcher.search(queries[0], ["ca_sr"])  # warm-up
        ca = [searcher.search(q, ["ca_sr"])["ca_sr"].seconds for q in queries]
        ca_ms = float(np.median(ca)) * 1000.0
        print(f"  CA-SR N={args.top_n} via IndexSearcher: {ca_ms:.2f} ms", flush=True)
        by_span = _ca_sr_by_span(rng, index, queries, args)
    return {
        "median_ms": ca_ms,
        "all_ms": [s * 1000.0 for s in ca],
        "index_images": args.index_images,
        "num_proposals": args.num_proposals,
        "index_bytes_per_image": nbytes,
        "index_write_s": write_s,
        "by_span": by_span,
    }


def _report(args, filtering, ca):
    ca_ms = ca["median_ms"]
    rows = [
        [
            f"{f['db_size']:,}",
            fmt(f["db_mb"], 0),
            fmt(f["full_rank_ms"], 2),
            fmt(f["top_n_ms"], 2),
            fmt(ca_ms, 2),
            fmt(f["full_rank_ms"] + ca_ms, 2),
        ]
        for f in filtering
    ]
    headers = [
        "db images",
        "IPA matrix (MB)",
        "filtering, full ranking (ms)",
        f"filtering, top {args.top_n} only (ms)",
        f"CA-SR N={args.top_n} (ms)",
        "filtering + CA-SR (ms)",
    ]
    title = (
        f"search: per-query latency, median of {args.queries} queries; filtering = exact "
        f"cosine (numpy, float32, C={args.dim}); CA-SR from a memory-mapped "
        f"{args.index_dtype} index of {args.index_images} images x {args.num_proposals} "
        f"proposals ({ca['index_bytes_per_image'] / MB:.2f} MB/image), measured once (it does "
        "not depend on the db size)"
    )
    print_table(rows, headers, title)
    print_table(
        [[str(b["drawn_from_images"]), fmt(b["ca_sr_ms"], 2)] for b in ca["by_span"]],
        ["top N drawn at random from the first ... index images", f"CA-SR N={args.top_n} (ms)"],
        "CA-SR cost vs the part of the index the top N come from",
    )


def cmd_search(args) -> dict:
    if args.quick:
        args.dim, args.num_proposals, args.index_images, args.top_n = 64, 20, 40, 10
        sizes = [100, 1000]
        args.queries = 3
    else:
        sizes = [s for s in (1000, 10000, 100000, 1000000) if s <= args.max_db]
    info = machine_info()
    print_machine(info)
    rng = np.random.default_rng(args.seed)
    filtering = _time_filtering(rng, sizes, args)
    ca = _time_ca_sr(rng, args)
    _report(args, filtering, ca)
    return save_results(args, "search", info, filtering=filtering, ca_sr=ca)


def register(subparsers):
    p = add_experiment_parser(
        subparsers, "search", "filtering vs db size, CA-SR from an mmap index", cmd_search
    )
    p.add_argument(
        "--max-db",
        type=int,
        default=100000,
        help="largest filtering database (1000000 adds the 1M row: ~5 GB)",
    )
    p.add_argument("--dim", type=int, default=1280, help="IPA / RPA dimension")
    p.add_argument("--top-n", type=int, default=100, help="N reranked by CA-SR")
    p.add_argument("--num-proposals", type=int, default=300, help="proposals per indexed image")
    p.add_argument("--index-images", type=int, default=2000, help="images in the mmap index")
    p.add_argument("--index-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--queries", type=int, default=20, help="timed queries per measurement")
