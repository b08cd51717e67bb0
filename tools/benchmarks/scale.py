"""``scale``: per-stage latency vs database size, exact vs approximate filtering (faiss), and
CA-SR before / after vectorisation and per region-vector storage."""

import json
import tempfile
import time

import numpy as np

from .common import (
    add_experiment_parser,
    fmt,
    machine_info,
    median_ms,
    print_machine,
    print_table,
    random_unit,
    save_results,
    time_rank,
    write_synthetic_index,
)

LATENCY_HEADERS = [
    "db images",
    "dim",
    "storage",
    "exact numpy top100 (ms)",
    "exact faiss flat (ms)",
    "IVF-PQ (ms)",
    "HNSW (ms)",
    "QE + refilter (ms)",
    "CA-SR N (ms)",
    "CS-SR N (ms)",
]
RECALL_HEADERS = ["db images", "index", "recall@100 vs exact", "ms/query", "build (s)", "params"]
PARAM_KEYS = ("nlist", "pq_m", "nprobe", "hnsw_m", "ef_search")


# ----------------------------------------------------------------------------------------------
# Filtering: exact and approximate, against database size
# ----------------------------------------------------------------------------------------------
def clustered_unit(rng, n, dim, clusters=1000, noise=0.5, block=65536):
    """(n, dim) float32 unit rows drawn around ``clusters`` random centres: image descriptors
    cluster (by scene, object), and approximate indexes are built for that; uniform random
    vectors in high dimension have no near neighbours and are a worst case."""
    centres = random_unit(rng, clusters, dim)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        x = centres[rng.integers(0, clusters, m)] + noise * random_unit(rng, m, dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def filtering_data(rng, n, dim, num_queries):
    """The benchmark's filtering data: ``n`` unit vectors around n / 100 centres (at least 10),
    and ``num_queries`` unit queries, each a database vector perturbed by 0.1 x a random unit
    vector."""
    db = clustered_unit(rng, n, dim, clusters=max(10, n // 100))
    queries = db[rng.choice(n, num_queries, replace=False)] + 0.1 * random_unit(
        rng, num_queries, dim
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return db, queries


def approx_recalls(db, queries, exact_ids, kinds, nprobe):
    """Build each faiss index kind on ``db`` and measure it against the exact top 100.

    Args:
        db: float32 (N, D) unit database vectors.
        queries: float32 (Q, D) unit queries.
        exact_ids: int (Q, >= min(100, N)) exact top-100 database indices per query.
        kinds: faiss kinds to build ("flat", "ivfpq", "hnsw").
        nprobe: IVF cells visited per query.

    Returns:
        one dict per kind: db, kind, recall@100, ms (median per query), build_s, params.
    """
    from retrieval_ext.retrieval.faiss_search import FaissFilter, FaissParams, recall_at_k

    n = len(db)
    out = []
    for kind in kinds:
        t = time.perf_counter()
        approx = FaissFilter(db, FaissParams(kind, nprobe=nprobe, use_gpu=False))
        build_s = time.perf_counter() - t
        ids = np.stack([approx.search(q, 100)[0] for q in queries])
        ms = float(np.median([median_ms(lambda q=q: approx.search(q, 100), 1) for q in queries]))
        out.append(
            {
                "db": n,
                "kind": kind,
                "recall@100": recall_at_k(ids, exact_ids, min(100, n)),
                "ms": ms,
                "build_s": build_s,
                "params": approx.params.__dict__,
            }
        )
    return out


def _exact_row(db, queries, stored):
    """Latency of exact filtering (numpy on ``stored``, faiss flat) and of QE + refilter.

    Returns:
        (row fields, exact top-100 ids per query from faiss flat)
    """
    from retrieval_ext.retrieval.faiss_search import FaissFilter, FaissParams
    from retrieval_ext.retrieval.query_expansion import average_query_expansion
    from retrieval_ext.retrieval.ranking import rank

    row = {}
    rank(queries[0], stored, top_k=100)  # warm-up: first-call allocations, page faults
    row["numpy_ms"] = float(np.median(time_rank(rank, queries, stored, top_k=100)) * 1000)
    flat = FaissFilter(db, FaissParams("flat", use_gpu=False))
    exact_ids = np.stack([flat.search(q, 100)[0] for q in queries])
    row["faiss_flat_ms"] = float(
        np.median([median_ms(lambda q=q: flat.search(q, 100), 1) for q in queries])
    )

    def expand_and_refilter(q):
        return flat.search(average_query_expansion(q, db, exact_ids[0], 5), 100)

    row["qe_ms"] = float(
        np.median([median_ms(lambda q=q: expand_and_refilter(q), 1) for q in queries])
    )
    return row, exact_ids


def _latency_row(rng, n, args):
    """One database size: exact latencies, then each approximate index's latency and recall."""
    dim = args.dim_1m if n >= 1000000 else args.dim
    t0 = time.perf_counter()
    db, queries = filtering_data(rng, n, dim, args.queries)
    # storage as the 1M row needs it (and as float16 indexes hold IPA when asked)
    stored = db.astype(np.float16) if n >= 1000000 else db
    row = {"db": n, "dim": dim, "storage": str(stored.dtype)}
    exact, exact_ids = _exact_row(db, queries, stored)
    row.update(exact)
    # at 1M the approximate indexes take minutes to build (k-means, PQ, the HNSW graph)
    kinds = [] if n >= 1000000 and not (args.quick or args.approx_1m) else ["ivfpq"]
    if n <= args.max_hnsw:
        kinds.append("hnsw")
    recalls = approx_recalls(db, queries, exact_ids, kinds, args.nprobe)
    for r in recalls:
        row[f"{r['kind']}_ms"] = r["ms"]
    row["gen_s"] = time.perf_counter() - t0
    return row, recalls


# ----------------------------------------------------------------------------------------------
# Reranking: independent of the database size, timed on an mmap index
# ----------------------------------------------------------------------------------------------
def per_image_loop(q, order, acc, top_n):
    """CA-SR scores as the project computed them before the vectorised version: one float16 ->
    float32 conversion, normalisation and product per image. Timed as the 'before' of the
    speed-up (calling the vectorised function one image at a time would not be the old cost);
    the correctness of ``class_agnostic_rerank`` is tested against an independent brute force in
    tests/retrieval/test_reranking.py."""
    from retrieval_ext.retrieval.normalization import l2_normalize

    best = np.full(top_n, -np.inf, np.float32)
    for j, i in enumerate(order[:top_n]):
        best[j] = (l2_normalize(acc(int(i))) @ q).max()
    return best


def _time_rerank(rng, args, reps):
    """Per-image loop vs vectorised CA-SR, and CS-SR, on a float16 mmap index (warm pages).

    Returns:
        (before ms, after ms, CS-SR ms) lists, one entry per query.
    """
    from retrieval_ext.retrieval.index_store import IndexReader
    from retrieval_ext.retrieval.reranking import class_agnostic_rerank, class_specific_rerank

    n, top_n = args.index_images, args.top_n
    with tempfile.TemporaryDirectory(prefix="retrieval_scale_") as tmp:
        write_synthetic_index(tmp, rng, n, args.num_proposals, args.dim, "float16")
        index = IndexReader(tmp)
        acc, boxes = index.region_accessor("rpa_max"), index.region_accessor("boxes")
        cls = index.region_accessor("scores")
        q = random_unit(rng, 1, args.dim)[0]
        before, after, cs = [], [], []
        for _ in range(args.queries):
            order = rng.permutation(n)
            sc = np.zeros(order.size, np.float32)
            for i in order[:top_n]:  # page the rows in: both sides then read warm pages
                np.asarray(acc(int(i))).sum()
            before.append(median_ms(lambda: per_image_loop(q, order, acc, top_n), reps))
            after.append(
                median_ms(lambda: class_agnostic_rerank(q, order, sc, acc, boxes, top_n), reps)
            )
            cs.append(
                median_ms(lambda: class_specific_rerank(0, order, sc, cls, boxes, top_n), reps)
            )
            new = class_agnostic_rerank(q, order, sc, acc, boxes, top_n)
            old = per_image_loop(q, order, acc, top_n)
            # the two timed paths must compute the same scores for the comparison to mean much
            if not np.allclose(np.sort(new.scores[:top_n]), np.sort(old), atol=1e-5):
                raise SystemExit("vectorised CA-SR disagrees with the per-image loop")
    return before, after, cs


def _storage_variants(rng, args, reps) -> dict:
    """CA-SR ms per compressed region-vector storage (compression.py): same N x proposals, fewer
    bytes / dims; in memory, as warm mmap pages are."""
    from retrieval_ext.retrieval.reranking import class_agnostic_rerank

    variants = {}
    k, top_n = args.num_proposals, args.top_n
    for label, dim, dtype, unit in (
        ("float16, 1280 dims (vectorised)", args.dim, "float16", False),
        ("int8, 1280 dims", args.dim, "int8", False),
        ("PCA 256, float16", min(256, args.dim), "float16", True),
        ("PCA 128, int8", min(128, args.dim), "int8", False),
    ):
        vecs = random_unit(rng, top_n * k, dim)
        vecs = (vecs * 127).astype(np.int8) if dtype == "int8" else vecs.astype(np.float16)
        parts = [vecs[j * k : (j + 1) * k] for j in range(top_n)]
        qd = random_unit(rng, 1, dim)[0]
        order = np.arange(top_n)
        sc = np.zeros(top_n, np.float32)

        def rerank():
            return class_agnostic_rerank(qd, order, sc, parts, None, top_n, normalized=unit)

        variants[label] = float(np.median([median_ms(rerank, reps) for _ in range(args.queries)]))
    return variants


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _latency_table(rows, rerank):
    def opt(r, key):
        return fmt(r[key]) if key in r else "-"

    return [
        [
            f"{r['db']:,}",
            r["dim"],
            r["storage"],
            fmt(r["numpy_ms"]),
            fmt(r["faiss_flat_ms"]),
            opt(r, "ivfpq_ms"),
            opt(r, "hnsw_ms"),
            fmt(r["qe_ms"]),
            fmt(rerank["ca_sr_after_ms"]),
            fmt(rerank["cs_sr_ms"]),
        ]
        for r in rows
    ]


def _report(args, rows, recalls, rerank):
    print_table(
        _latency_table(rows, rerank), LATENCY_HEADERS, "per-query latency of each stage (medians)"
    )
    recall_rows = [
        [
            f"{r['db']:,}",
            r["kind"],
            f"{r['recall@100']:.3f}",
            fmt(r["ms"]),
            fmt(r["build_s"], 1),
            json.dumps({k: r["params"][k] for k in PARAM_KEYS}),
        ]
        for r in recalls
    ]
    print_table(recall_rows, RECALL_HEADERS, title="approximate filtering vs exact")
    ratio = rerank["ca_sr_before_ms"] / max(rerank["ca_sr_after_ms"], 1e-9)
    print(
        f"CA-SR N={args.top_n} x {args.num_proposals} proposals x {args.dim} dims (float16 mmap): "
        f"per-image loop {rerank['ca_sr_before_ms']:.2f} ms -> vectorised "
        f"{rerank['ca_sr_after_ms']:.2f} ms ({ratio:.2f}x)"
    )
    print_table(
        [[k, fmt(v)] for k, v in rerank["variants_ms"].items()],
        [f"CA-SR N={args.top_n} x {args.num_proposals} proposals, in memory", "ms/query"],
        title="CA-SR cost per region-vector storage",
    )


def cmd_scale(args) -> dict:
    if args.quick:
        sizes, args.dim, args.dim_1m, args.queries = [1000, 3000], 32, 16, 3
        args.num_proposals, args.index_images, args.top_n = 20, 40, 10
    else:
        sizes = [s for s in (1000, 10000, 100000, 1000000) if s <= args.max_db]
    info = machine_info()
    print_machine(info)
    rng = np.random.default_rng(args.seed)
    rows, recalls = [], []
    for n in sizes:
        row, rec = _latency_row(rng, n, args)
        rows.append(row)
        recalls += rec
        print(f"  db {n}: done", flush=True)
    reps = 1 if args.quick else 3
    before, after, cs = _time_rerank(rng, args, reps)
    rerank = {
        "variants_ms": _storage_variants(rng, args, reps),
        "ca_sr_before_ms": float(np.median(before)),
        "ca_sr_after_ms": float(np.median(after)),
        "cs_sr_ms": float(np.median(cs)),
        "top_n": args.top_n,
        "proposals": args.num_proposals,
        "dim": args.dim,
    }
    _report(args, rows, recalls, rerank)
    return save_results(args, "scale", info, latency=rows, recall=recalls, rerank=rerank)


def register(subparsers):
    p = add_experiment_parser(
        subparsers, "scale", "stage latency vs db size; faiss exact vs approx", cmd_scale
    )
    p.add_argument("--max-db", type=int, default=1000000, help="largest database size")
    p.add_argument("--dim", type=int, default=1280, help="vector dimension up to 100k")
    p.add_argument("--dim-1m", type=int, default=256, help="dimension of the 1M row (memory)")
    p.add_argument("--max-hnsw", type=int, default=10000, help="largest db given an HNSW index")
    p.add_argument(
        "--approx-1m", action="store_true", help="also build IVF-PQ (and HNSW) for the 1M row"
    )
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells visited per query")
    p.add_argument("--top-n", type=int, default=100, help="N reranked")
    p.add_argument("--num-proposals", type=int, default=300)
    p.add_argument("--index-images", type=int, default=300, help="images in the rerank index")
    p.add_argument("--queries", type=int, default=10)
