#!/usr/bin/env python
"""Cost of instance search with Faster R-CNN features: extraction, reranking, search.

    benchmark.py extraction [--backbones R50-C4 VGG16 ...] [--size 600] [--repeats 5]
    benchmark.py rerank     [--top-n 100] [--num-db 60] [--num-proposals 100] [--size 300]
    benchmark.py search     [--max-db 100000] [--index-images 2000]

Each subcommand prints the machine, a table (GitHub markdown) and writes ``<name>.json`` under
``--output-dir`` (default ``output/benchmark``); ``--quick`` shrinks every size to a smoke run.

- ``extraction``: images/s and peak memory of one forward pass per backbone, *without* region
  features (backbone + IPA pooling: what the filtering stage needs) and *with* them (the whole
  RetrievalRCNN inference: RPN, RoI pooling of the proposals, box head, RPA). Every
  (backbone, mode) runs in a fresh child process so that peak RSS values do not mix.
- ``rerank``: CA-SR from region features stored in the index vs the authors' released design,
  which re-ran the network on each of the top N images for every query; both rankings are checked
  to agree.
- ``search``: per-query latency of exact filtering against database size (random unit vectors)
  and of CA-SR of the top N from a memory-mapped index (independent of database size).

Numbers are wall-clock medians; on a shared machine they are noisy, so compare runs made together.
"""

import os  # noqa: E402  (before torch is imported: OpenMP reads it once)

# Spinning OpenMP threads make small CPU models 5-10x slower when another process competes for
# the cores; passive waiting costs nothing on an idle machine. Children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
BACKBONES = ("R50-C4", "R50-FPN", "VGG16", "ZF", "EfficientNet-Lite0")
WORKER = "_extraction-worker"
_MB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------------------------
# Machine and output helpers
# ----------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model, core counts, load and library versions of this machine."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_1_5_15min": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "numpy": np.__version__,
    }


def print_machine(info: dict):
    print(
        f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"load average {info['load_average_1_5_15min']}; python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} threads, OMP_WAIT_POLICY="
        f"{info['omp_wait_policy'] or 'unset'}), numpy {info['numpy']}"
    )


def print_table(rows, headers, title=None):
    from tabulate import tabulate

    if title:
        print(f"\n{title}")
    print(tabulate(rows, headers=headers, tablefmt="github", floatfmt="", disable_numparse=True))


def write_json(output_dir: str, name: str, data: dict) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"\nwrote {path}")
    return path


def _fmt(x, digits=2):
    return f"{x:.{digits}f}"


def _cfg(config_file: Path, opts=()):
    """A frozen retrieval_ext config: ``config_file`` merged with ``opts`` (flat key/value list)."""
    from detectron2.config import get_cfg

    from retrieval_ext.config import add_retrieval_config

    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list([str(x) for x in opts])
    cfg.freeze()
    return cfg


def _config_file(backbone: str, quick: bool) -> Path:
    if quick:
        return CONFIGS / "quick_schedules" / f"{backbone}-tiny.yaml"
    return CONFIGS / f"Base-{backbone}.yaml"


def _build_model(cfg, seed: int = 0):
    """Eval-mode model from ``cfg`` (random weights unless the backbone loads its own), tamed RPN.

    With random RPN weights the predicted box deltas throw proposals outside the image, so they
    are zeroed (as tests/common.py's ``tame_rpn`` does): proposals are then anchors and every
    image keeps its full NUM_PROPOSALS, which is the cost being measured.
    """
    import torch
    from detectron2.modeling import build_model

    import retrieval_ext  # noqa: F401  registers models and datasets

    torch.manual_seed(seed)
    model = build_model(cfg)
    head = model.proposal_generator.rpn_head
    torch.nn.init.zeros_(head.anchor_deltas.weight)
    torch.nn.init.zeros_(head.anchor_deltas.bias)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs`` 5); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int:
    import resource

    try:
        return _proc_status_kb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _current_rss_kb() -> int:
    try:
        return _proc_status_kb("VmRSS")
    except (OSError, KeyError):
        return _peak_rss_kb()


def _set_denormals(mode: str) -> bool:
    """Flush denormal floats to zero if ``mode == "flush"``; returns whether they are flushed.

    Random weights (and eval-mode BatchNorm with default statistics) can shrink activations into
    the denormal range, where x86 arithmetic is many times slower: a cost trained weights do not
    have. The default keeps them, as the pipeline runs; "flush" checks that a random-weight
    measurement is not inflated by them.
    """
    import torch

    return bool(torch.set_flush_denormal(mode == "flush"))


class _StageTimer:
    """Wall time spent in named submodules during one forward pass (forward hooks)."""

    def __init__(self, modules: dict):
        self.totals = {name: 0.0 for name in modules}
        self._start = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.totals[name] += time.perf_counter() - self._start.pop(name)

        return hook

    def reset(self):
        self.totals = {name: 0.0 for name in self.totals}


def _region_modules(model) -> dict:
    """The parts of the full inference, named as in the table (C4: res5 is the box head)."""
    heads = model.roi_heads
    parts = {"backbone": model.backbone, "rpn": model.proposal_generator}
    if hasattr(heads, "res5"):
        parts.update({"roi_pool": heads.pooler, "box_head": heads.res5})
    else:
        parts.update({"roi_pool": heads.box_pooler, "box_head": heads.box_head})
    parts["box_predictor"] = heads.box_predictor
    return parts


def extraction_worker(args) -> dict:
    """Time one (backbone, mode) in this process; the parent prints the returned dict as JSON.

    Returns:
        dict with per-repeat ``seconds``, their median, images/s, baseline RSS (model built and
        inputs made), peak RSS during warm-up + repeats, their difference, the number of
        proposals the full inference kept, and (mode "with") per-part medians.
    """
    import torch

    from retrieval_ext.modeling.pooling import combine_levels, sum_max_pool, valid_cells

    torch.set_num_threads(args.threads)
    flushed = _set_denormals(args.denormals)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    cfg = _cfg(_config_file(args.backbone, args.quick), opts)
    model = _build_model(cfg)
    height, width = args.size, int(round(args.size * 4 / 3))
    gen = torch.Generator().manual_seed(0)
    # uint8 CHW like the dataset mapper gives; the model normalises it (part of the timed cost)
    images = [
        torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
        for _ in range(min(args.repeats + 1, 3))
    ]
    inputs = [{"image": im, "height": height, "width": width} for im in images]
    timer = _StageTimer(_region_modules(model)) if args.mode == "with" else None

    def filtering_only(inp):
        batch = model.preprocess_image([inp])
        features = model.backbone(batch.tensor)
        pooled = []
        for name, stride in zip(model.ipa_features, model.ipa_strides):
            fmap = features[name][0]
            v = valid_cells(batch.image_sizes[0], stride, fmap.shape[-2:])
            pooled.append(sum_max_pool(fmap[:, : v[0], : v[1]]))
        return combine_levels(pooled)

    def full(inp):
        return model.inference([inp])[0]

    run = full if args.mode == "with" else filtering_only
    num_params = sum(p.numel() for p in model.parameters())
    baseline_kb = _current_rss_kb()
    peak_reset = _reset_peak_rss()
    seconds, parts = [], []
    num_proposals = None
    with torch.no_grad():
        out = run(inputs[0])  # warm-up: allocator pools, lazy init, page-in of weights
        if args.mode == "with":
            num_proposals = len(out["proposals"])
        for r in range(args.repeats):
            if timer is not None:
                timer.reset()
            t = time.perf_counter()
            run(inputs[(r + 1) % len(inputs)])
            seconds.append(time.perf_counter() - t)
            if timer is not None:
                parts.append(dict(timer.totals))
    peak_kb = _peak_rss_kb()
    median = float(np.median(seconds))
    result = {
        "backbone": args.backbone,
        "mode": args.mode,
        "config": str(_config_file(args.backbone, args.quick).relative_to(REPO_ROOT)),
        "input_hw": [height, width],
        "threads": torch.get_num_threads(),
        "params_million": num_params / 1e6,
        "seconds": seconds,
        "median_s": median,
        "images_per_s": 1.0 / median,
        "baseline_rss_mb": baseline_kb / 1024.0,
        "peak_rss_mb": peak_kb / 1024.0,
        "peak_delta_mb": (peak_kb - baseline_kb) / 1024.0,
        "peak_reset": peak_reset,
        "flush_denormal": flushed,
        "num_proposals": num_proposals,
        "pretrained_backbone": bool(
            args.backbone == "EfficientNet-Lite0" and cfg.MODEL.EFFICIENTNET.PRETRAINED
        ),
    }
    if parts:
        result["parts_median_s"] = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    return result


def _run_worker(backbone, mode, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        WORKER,
        "--backbone",
        backbone,
        "--mode",
        mode,
        "--size",
        str(args.size),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--denormals",
        args.denormals,
    ] + (["--quick"] if args.quick else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
    if proc.returncode != 0:
        raise RuntimeError(
            f"extraction worker {backbone}/{mode} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cmd_extraction(args) -> dict:
    if args.quick:
        args.size = min(args.size, 128)
        args.repeats = 1
        args.backbones = args.backbones or ["EfficientNet-Lite0"]
    backbones = args.backbones or list(BACKBONES)
    info = machine_info()
    info["torch_threads"] = args.threads
    print_machine(info)
    results = []
    for backbone in backbones:
        for mode in ("without", "with"):
            r = _run_worker(backbone, mode, args)
            print(
                f"  {backbone:<19} {mode:<7} regions: {r['images_per_s']:.3f} img/s "
                f"(median of {len(r['seconds'])}: {r['median_s']:.3f} s), "
                f"peak RSS +{r['peak_delta_mb']:.0f} MB",
                flush=True,
            )
            results.append(r)

    by_key = {(r["backbone"], r["mode"]): r for r in results}
    rows = []
    for b in backbones:
        w, f = by_key[(b, "without")], by_key[(b, "with")]
        parts = f.get("parts_median_s", {})
        rows.append(
            [
                b + (" (ImageNet)" if f["pretrained_backbone"] else ""),
                _fmt(w["images_per_s"], 3),
                _fmt(f["images_per_s"], 3),
                _fmt(f["median_s"] / w["median_s"], 1),
                _fmt(w["peak_delta_mb"], 0),
                _fmt(f["peak_delta_mb"], 0),
                _fmt(f["peak_rss_mb"], 0),
                str(f["num_proposals"]),
                " / ".join(
                    _fmt(parts.get(k, float("nan")), 2)
                    for k in ("backbone", "rpn", "roi_pool", "box_head")
                ),
            ]
        )
    h, w_ = results[0]["input_hw"]
    title = (
        f"extraction, one {h}x{w_} image per pass, {args.threads} threads, median of "
        f"{args.repeats} after 1 warm-up, denormals {args.denormals}; 'without' = backbone + IPA "
        "pooling, 'with' = full "
        "RetrievalRCNN inference (RPN, RoI pooling, box head, RPA)"
    )
    headers = [
        "backbone",
        "img/s without regions",
        "img/s with regions",
        "with / without time",
        "peak RSS delta without (MB)",
        "peak RSS delta with (MB)",
        "peak RSS with (MB)",
        "proposals",
        "with: backbone / RPN / RoI pool / box head (s)",
    ]
    print_table(rows, headers, title)
    data = {"machine": info, "args": _jsonable_args(args), "results": results}
    write_json(args.output_dir, "extraction", data)
    return data


# ----------------------------------------------------------------------------------------------
# rerank: stored region features vs re-running the network on the top N
# ----------------------------------------------------------------------------------------------
def _rerun_ca_sr(extractor, dicts_by_id, index, searcher, query, filtering, top_n):
    """CA-SR the authors' way: a forward pass on each of the top ``top_n`` filtered images.

    Returns:
        (order, scores, best): the top ``top_n`` database indices sorted by the best cosine
        similarity between the query region vector and the image's freshly computed RPA
        (stable: ties keep the filtering order), their scores and best-proposal indices.
    """
    from retrieval_ext.retrieval.normalization import l2_normalize

    region = searcher.query_region_vector(query)
    field = f"rpa_{searcher.rerank_pooling}"
    top = filtering.order[:top_n]
    scores = np.full(len(top), -np.inf, dtype=np.float32)
    best = np.full(len(top), -1, dtype=np.int64)
    for j, i in enumerate(top):
        d = dicts_by_id[index.image_ids[int(i)]]
        records, failed = extractor.database_records([d])
        if failed:
            raise RuntimeError(f"cannot read {failed}")
        rpa = records[0][1][field]
        if len(rpa):
            sims = l2_normalize(rpa) @ region
            best[j] = int(np.argmax(sims))
            scores[j] = sims[best[j]]
    perm = np.argsort(-scores, kind="stable")
    return top[perm], scores[perm], best[perm]


def cmd_rerank(args) -> dict:
    import torch

    from retrieval_ext.data import register_custom_dataset
    from retrieval_ext.data.datasets import unregister_retrieval_dataset
    from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark
    from retrieval_ext.retrieval import pipeline
    from retrieval_ext.retrieval.extractor import FeatureExtractor

    if args.quick:
        args.num_db, args.num_instances, args.queries_per_instance = 8, 2, 1
        args.short_side, args.repeats = 96, 1
    torch.set_num_threads(args.threads)
    _set_denormals(args.denormals)
    info = machine_info()
    print_machine(info)
    config = _config_file("EfficientNet-Lite0", args.quick)
    top_n = min(args.top_n, args.num_db)
    opts = ["MODEL.DEVICE", "cpu", "RETRIEVAL.INDEX_DTYPE", args.index_dtype]
    opts += ["RETRIEVAL.TOP_N", top_n]
    if not args.quick:
        opts += [
            "MODEL.RETRIEVAL.NUM_PROPOSALS",
            args.num_proposals,
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            args.num_proposals,
        ]
        if args.size:
            opts += ["INPUT.MIN_SIZE_TEST", args.size]
    cfg = _cfg(config, opts)
    name = f"benchmark_rerank_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="retrieval_bench_") as tmp:
        root = os.path.join(tmp, "synthetic")
        generate_synthetic_benchmark(
            root,
            num_instances=args.num_instances,
            queries_per_instance=args.queries_per_instance,
            num_db=args.num_db,
            short_side=args.short_side,
            seed=args.seed,
        )
        register_custom_dataset(name, root)
        try:
            extractor = FeatureExtractor(cfg, model=_build_model(cfg))
            t = time.perf_counter()
            index = pipeline.build_index(
                extractor,
                name,
                os.path.join(tmp, "index"),
                dtype=args.index_dtype,
                show_progress=False,
            )
            index_seconds = time.perf_counter() - t
            queries = pipeline.extract_queries(extractor, name)
            searcher = pipeline.build_searcher(cfg, index, None)
            dicts = {d["image_id"]: d for d in pipeline.get_dataset_dicts(f"{name}_db")}
            per_query = []
            for qi, q in enumerate(queries):
                stored_s, res = [], None
                for _ in range(args.repeats):
                    res = searcher.search(q, ["filtering", "ca_sr"])
                    stored_s.append(res["ca_sr"].seconds)
                t = time.perf_counter()
                order, scores, best = _rerun_ca_sr(
                    extractor, dicts, index, searcher, q, res["filtering"], top_n
                )
                rerun_s = time.perf_counter() - t
                per_query.append(
                    _compare(
                        qi,
                        res["ca_sr"],
                        order,
                        scores,
                        best,
                        top_n,
                        float(np.median(stored_s)),
                        rerun_s,
                        args.tolerance,
                    )
                )
                print(
                    f"  query {qi}: stored {per_query[-1]['stored_ms']:.2f} ms, "
                    f"re-run {rerun_s:.2f} s, agree: {per_query[-1]['agree']}",
                    flush=True,
                )
        finally:
            unregister_retrieval_dataset(name)

    stored = float(np.median([p["stored_ms"] for p in per_query]))
    rerun = float(np.median([p["rerun_ms"] for p in per_query]))
    all_agree = all(p["agree"] for p in per_query)
    identical = sum(p["identical_order"] for p in per_query)
    max_diff = max(p["max_abs_score_diff"] for p in per_query)
    summary = {
        "num_db": args.num_db,
        "num_queries": len(queries),
        "top_n": top_n,
        "num_proposals": int(cfg.MODEL.RETRIEVAL.NUM_PROPOSALS),
        "input_min_size": int(cfg.INPUT.MIN_SIZE_TEST),
        "index_dtype": args.index_dtype,
        "index_build_s": index_seconds,
        "index_images_per_s": index.num_images / index_seconds,
        "stored_ms_median": stored,
        "rerun_ms_median": rerun,
        "rerun_ms_per_image_median": rerun / top_n,
        "ratio_rerun_over_stored": rerun / stored,
        "queries_identical_order": identical,
        "max_abs_score_diff": max_diff,
        "all_agree": all_agree,
    }
    headers = [
        "CA-SR of the top N",
        "per-query latency (ms, median)",
        "per image (ms)",
        "network passes per query",
    ]
    rows = [
        ["stored RPA read from the index (ours)", _fmt(stored, 2), _fmt(stored / top_n, 3), "0"],
        [
            "network re-run on the top N (authors')",
            _fmt(rerun, 0),
            _fmt(rerun / top_n, 1),
            str(top_n),
        ],
    ]
    title = (
        f"rerank: {len(queries)} queries, {args.num_db} db images (short side {args.short_side}, "
        f"network input {summary['input_min_size']} px), N = {top_n}, "
        f"{summary['num_proposals']} proposals, EfficientNet-Lite0, index {args.index_dtype}"
    )
    print_table(rows, headers, title)
    print(f"re-run / stored: {rerun / stored:.0f}x (medians of the same run)")
    print(
        f"rank agreement of the top {top_n}: {'YES' if all_agree else 'NO'} "
        f"({identical}/{len(queries)} queries with identical order, the rest differ only "
        f"among scores within {args.tolerance:g}; max |stored - re-run score| = {max_diff:.2e})"
    )
    print(
        f"index build: {index.num_images} images in {index_seconds:.1f} s "
        f"({summary['index_images_per_s']:.2f} img/s, one pass each)"
    )
    data = {
        "machine": info,
        "args": _jsonable_args(args),
        "summary": summary,
        "per_query": per_query,
    }
    write_json(args.output_dir, "rerank", data)
    if not all_agree:
        raise SystemExit("stored and re-run CA-SR rankings disagree beyond float16 tolerance")
    return data


def _compare(qi, stored, order, scores, best, top_n, stored_s, rerun_s, tol) -> dict:
    """Agreement of stored-feature CA-SR with the re-run one on the top ``top_n``.

    Both score the same images from the same features (the stored ones rounded to the index
    dtype), so the rankings must be the same except for swaps among images whose scores differ
    by less than the rounding: checked as (1) the same set of images, (2) every image's two scores
    within ``tol``, (3) the stored order sorted by the re-run scores up to ``tol``.
    """
    s_order = stored.order[:top_n]
    s_scores = stored.scores[:top_n]
    rerun_by_image = dict(zip(order.tolist(), scores.tolist()))
    same_set = set(s_order.tolist()) == set(order.tolist())
    # images without proposals score -inf on both sides; count them as equal (difference 0)
    stored_f = np.nan_to_num(s_scores.astype(np.float64), neginf=-10.0)
    rerun_f = np.nan_to_num(
        np.array([rerun_by_image.get(int(i), np.nan) for i in s_order]), nan=np.inf, neginf=-10.0
    )
    diffs = np.abs(stored_f - rerun_f)
    finite = diffs[np.isfinite(diffs)]
    sorted_ok = bool(np.all(np.diff(rerun_f) <= tol))
    return {
        "query": qi,
        "stored_ms": stored_s * 1000.0,
        "rerun_ms": rerun_s * 1000.0,
        "identical_order": bool(np.array_equal(s_order, order)),
        "same_best_proposal": (
            bool(
                np.array_equal(
                    stored.best_proposal[:top_n][np.argsort(s_order)], best[np.argsort(order)]
                )
            )
            if same_set
            else False
        ),
        "max_abs_score_diff": float(finite.max()) if finite.size else 0.0,
        "agree": bool(same_set and diffs.max(initial=0.0) <= tol and sorted_ok),
    }


# ----------------------------------------------------------------------------------------------
# search: filtering vs database size, CA-SR from a memory-mapped index
# ----------------------------------------------------------------------------------------------
def _random_unit(rng, n, dim, block=65536):
    """(n, dim) float32 rows uniformly on the unit sphere, made block by block (bounded memory)."""
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + len(x)] = x
    return out


def _time_rank(rank, queries, db, top_k=None):
    """Wall time of ``rank(q, db, top_k)`` for each query, in seconds."""
    seconds = []
    for q in queries:
        t = time.perf_counter()
        rank(q, db, top_k=top_k)
        seconds.append(time.perf_counter() - t)
    return seconds


def _write_synthetic_index(root, rng, num_images, num_proposals, dim, dtype):
    """A finalized index of random records: ``ipa_sum`` and per-proposal ``boxes``, ``rpa_max``,
    ``scores``.

    Exactly the fields the searcher's filtering + CA-SR read; RPA rows are unit vectors (as the
    extractor stores them).
    """
    from retrieval_ext.retrieval.index_store import FieldSpec, IndexSchema, IndexWriter

    schema = IndexSchema(
        [
            FieldSpec("ipa_sum", "image", "exact", (dim,), "float32"),
            FieldSpec("boxes", "proposal", "exact", (4,), "float32"),
            FieldSpec("rpa_max", "proposal", "feature", (dim,)),
            FieldSpec("scores", "proposal", "feature", (2,)),
        ]
    )
    ids = [f"img{i:07d}" for i in range(num_images)]
    writer = IndexWriter(root, {"dataset": "random"}, shard_size=256, dtype=dtype, schema=schema)
    for image_id in ids:
        xy = rng.uniform(0, 500, (num_proposals, 2)).astype(np.float32)
        writer.add(
            image_id,
            {
                "ipa_sum": rng.standard_normal(dim, dtype=np.float32),
                "boxes": np.concatenate([xy, xy + 100], axis=1),
                "rpa_max": _random_unit(rng, num_proposals, dim),
                "scores": np.full((num_proposals, 2), 0.5, dtype=np.float32),
            },
        )
    writer.finalize(ids)


def cmd_search(args) -> dict:
    from retrieval_ext.retrieval.index_store import IndexReader
    from retrieval_ext.retrieval.ranking import rank
    from retrieval_ext.retrieval.reranking import class_agnostic_rerank
    from retrieval_ext.retrieval.search import InstanceSearcher

    if args.quick:
        args.dim, args.num_proposals, args.index_images, args.top_n = 64, 20, 40, 10
        sizes = [100, 1000]
        args.queries = 3
    else:
        sizes = [s for s in (1000, 10000, 100000, 1000000) if s <= args.max_db]
    info = machine_info()
    print_machine(info)
    rng = np.random.default_rng(args.seed)

    filtering = []
    for n in sizes:
        db = _random_unit(rng, n, args.dim)
        qs = list(_random_unit(rng, args.queries, args.dim))
        rank(qs[0], db)  # warm-up: page in the matrix, BLAS thread start
        full = _time_rank(rank, qs, db)
        top = _time_rank(rank, qs, db, args.top_n)
        filtering.append(
            {
                "db_size": n,
                "db_mb": db.nbytes / _MB,
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

    with tempfile.TemporaryDirectory(prefix="retrieval_bench_index_") as tmp:
        t = time.perf_counter()
        _write_synthetic_index(
            tmp, rng, args.index_images, args.num_proposals, args.dim, args.index_dtype
        )
        write_s = time.perf_counter() - t
        index = IndexReader(tmp, mmap=True)
        nbytes = index.nbytes_per_image()["total"]
        searcher = InstanceSearcher(index, top_n=args.top_n)
        queries = [
            {"ipa_sum": v, "crop_max": r}
            for v, r in zip(
                rng.standard_normal((args.queries, args.dim), dtype=np.float32),
                _random_unit(rng, args.queries, args.dim),
            )
        ]
        searcher.search(queries[0], ["ca_sr"])  # warm-up
        ca = [searcher.search(q, ["ca_sr"])["ca_sr"].seconds for q in queries]
        ca_ms = float(np.median(ca)) * 1000.0
        print(f"  CA-SR N={args.top_n} via InstanceSearcher: {ca_ms:.2f} ms", flush=True)
        # CA-SR only touches the top N images, wherever they sit in the index: the same N drawn
        # from ever larger parts of it cost the same.
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

    rows = [
        [
            f"{f['db_size']:,}",
            _fmt(f["db_mb"], 0),
            _fmt(f["full_rank_ms"], 2),
            _fmt(f["top_n_ms"], 2),
            _fmt(ca_ms, 2),
            _fmt(f["full_rank_ms"] + ca_ms, 2),
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
    print_table(
        rows,
        headers,
        (
            f"search: per-query latency, median of {args.queries} queries; filtering = exact "
            f"cosine (numpy, float32, C={args.dim}); CA-SR from a memory-mapped "
            f"{args.index_dtype} index of {args.index_images} images x {args.num_proposals} "
            f"proposals ({nbytes / _MB:.2f} MB/image), measured once (it does not depend on the "
            "db size)"
        ),
    )
    print_table(
        [[str(b["drawn_from_images"]), _fmt(b["ca_sr_ms"], 2)] for b in by_span],
        ["top N drawn at random from the first ... index images", f"CA-SR N={args.top_n} (ms)"],
        "CA-SR cost vs the part of the index the top N come from",
    )
    data = {
        "machine": info,
        "args": _jsonable_args(args),
        "filtering": filtering,
        "ca_sr": {
            "median_ms": ca_ms,
            "all_ms": [s * 1000.0 for s in ca],
            "index_images": args.index_images,
            "num_proposals": args.num_proposals,
            "index_bytes_per_image": nbytes,
            "index_write_s": write_s,
            "by_span": by_span,
        },
    }
    write_json(args.output_dir, "search", data)
    return data


# ---------------------------------------------------------------------------------------------
# scale: per-stage latency vs database size, exact vs approximate filtering, CA-SR before/after
# ---------------------------------------------------------------------------------------------
def _clustered_unit(rng, n, dim, clusters=1000, noise=0.5, block=65536):
    """(n, dim) float32 unit rows drawn around ``clusters`` random centres: image descriptors
    cluster (by scene, object), and approximate indexes are built for that; uniform random
    vectors in high dimension have no near neighbours and are a worst case."""
    centres = _random_unit(rng, clusters, dim)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        x = centres[rng.integers(0, clusters, m)] + noise * _random_unit(rng, m, dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def _ca_sr_per_image(q, order, acc, top_n):
    """CA-SR as the project ran it before the vectorised version: one float16 -> float32
    conversion, normalisation and product per image (kept here as the 'before' reference)."""
    from retrieval_ext.retrieval.normalization import l2_normalize

    best = np.full(top_n, -np.inf, np.float32)
    for j, i in enumerate(order[:top_n]):
        v = l2_normalize(acc(int(i)))
        best[j] = (v @ q).max()
    return best


def _median_ms(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(ts))


def cmd_scale(args) -> dict:
    from retrieval_ext.retrieval.faiss_search import FaissFilter, FaissParams, recall_at_k
    from retrieval_ext.retrieval.index_store import IndexReader
    from retrieval_ext.retrieval.query_expansion import average_query_expansion
    from retrieval_ext.retrieval.ranking import rank
    from retrieval_ext.retrieval.reranking import class_agnostic_rerank, class_specific_rerank

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
        dim = args.dim_1m if n >= 1000000 else args.dim
        t0 = time.perf_counter()
        db = _clustered_unit(rng, n, dim, clusters=max(10, n // 100))
        queries = db[rng.choice(n, args.queries, replace=False)] + 0.1 * _random_unit(
            rng, args.queries, dim
        )
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        # storage as the 1M row needs it (and as float16 indexes hold IPA when asked)
        stored = db.astype(np.float16) if n >= 1000000 else db
        row = {"db": n, "dim": dim, "storage": str(stored.dtype)}
        rank(queries[0], stored, top_k=100)  # warm-up: first-call allocations, page faults
        row["numpy_ms"] = float(np.median(_time_rank(rank, queries, stored, top_k=100)) * 1000)
        flat = FaissFilter(db, FaissParams("flat", use_gpu=False))
        exact_ids = np.stack([flat.search(q, 100)[0] for q in queries])
        row["faiss_flat_ms"] = float(
            np.median([_median_ms(lambda q=q: flat.search(q, 100), 1) for q in queries])
        )
        row["qe_ms"] = float(
            np.median(
                [
                    _median_ms(
                        lambda q=q: flat.search(
                            average_query_expansion(q, db, exact_ids[0], 5), 100
                        ),
                        1,
                    )
                    for q in queries
                ]
            )
        )
        # at 1M the approximate indexes take minutes to build (k-means, PQ, the HNSW graph)
        kinds = [] if n >= 1000000 and not (args.quick or args.approx_1m) else ["ivfpq"]
        if n <= args.max_hnsw:
            kinds.append("hnsw")
        for kind in kinds:
            t = time.perf_counter()
            approx = FaissFilter(db, FaissParams(kind, nprobe=args.nprobe, use_gpu=False))
            build_s = time.perf_counter() - t
            ids = np.stack([approx.search(q, 100)[0] for q in queries])
            ms = float(
                np.median([_median_ms(lambda q=q: approx.search(q, 100), 1) for q in queries])
            )
            rec = recall_at_k(ids, exact_ids, min(100, n))
            recalls.append(
                {
                    "db": n,
                    "kind": kind,
                    "recall@100": rec,
                    "ms": ms,
                    "build_s": build_s,
                    "params": approx.params.__dict__,
                }
            )
            row[f"{kind}_ms"] = ms
        row["gen_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  db {n}: done", flush=True)

    # reranking: independent of the database size, timed on an mmap index
    reps = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="retrieval_scale_") as tmp:
        _write_synthetic_index(tmp, rng, args.index_images, args.num_proposals, args.dim, "float16")
        index = IndexReader(tmp)
        acc, boxes = index.region_accessor("rpa_max"), index.region_accessor("boxes")
        cls = index.region_accessor("scores")
        q = _random_unit(rng, 1, args.dim)[0]
        before, after, cs = [], [], []
        for _ in range(args.queries):
            order = rng.permutation(args.index_images)
            sc = np.zeros(order.size, np.float32)
            for i in order[: args.top_n]:  # page the rows in: both sides then read warm pages
                np.asarray(acc(int(i))).sum()
            before.append(_median_ms(lambda: _ca_sr_per_image(q, order, acc, args.top_n), reps))
            after.append(
                _median_ms(
                    lambda: class_agnostic_rerank(q, order, sc, acc, boxes, args.top_n), reps
                )
            )
            cs.append(
                _median_ms(
                    lambda: class_specific_rerank(0, order, sc, cls, boxes, args.top_n), reps
                )
            )
            new = class_agnostic_rerank(q, order, sc, acc, boxes, args.top_n)
            old = _ca_sr_per_image(q, order, acc, args.top_n)
            agree = np.allclose(np.sort(new.scores[: args.top_n]), np.sort(old), atol=1e-5)
            if not agree:
                raise SystemExit("vectorised CA-SR disagrees with the per-image reference")
        # compressed region vectors (compression.py): same N x proposals, fewer bytes / dims;
        # in memory, as warm mmap pages are
        variants = {}
        k = args.num_proposals
        for label, dim, dtype, unit in (
            ("float16, 1280 dims (vectorised)", args.dim, "float16", False),
            ("int8, 1280 dims", args.dim, "int8", False),
            ("PCA 256, float16", min(256, args.dim), "float16", True),
            ("PCA 128, int8", min(128, args.dim), "int8", False),
        ):
            vecs = _random_unit(rng, args.top_n * k, dim)
            vecs = (vecs * 127).astype(np.int8) if dtype == "int8" else vecs.astype(np.float16)
            parts = [vecs[j * k : (j + 1) * k] for j in range(args.top_n)]
            qd = _random_unit(rng, 1, dim)[0]
            order = np.arange(args.top_n)
            sc = np.zeros(args.top_n, np.float32)
            variants[label] = float(
                np.median(
                    [
                        _median_ms(
                            lambda: class_agnostic_rerank(
                                qd, order, sc, parts, None, args.top_n, normalized=unit
                            ),
                            reps,
                        )
                        for _ in range(args.queries)
                    ]
                )
            )
    rerank = {
        "variants_ms": variants,
        "ca_sr_before_ms": float(np.median(before)),
        "ca_sr_after_ms": float(np.median(after)),
        "cs_sr_ms": float(np.median(cs)),
        "top_n": args.top_n,
        "proposals": args.num_proposals,
        "dim": args.dim,
    }
    table = [
        [
            f"{r['db']:,}",
            r["dim"],
            r["storage"],
            _fmt(r["numpy_ms"]),
            _fmt(r["faiss_flat_ms"]),
            _fmt(r.get("ivfpq_ms")) if "ivfpq_ms" in r else "-",
            _fmt(r.get("hnsw_ms")) if "hnsw_ms" in r else "-",
            _fmt(r["qe_ms"]),
            _fmt(rerank["ca_sr_after_ms"]),
            _fmt(rerank["cs_sr_ms"]),
        ]
        for r in rows
    ]
    print_table(
        table,
        [
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
        ],
        title="per-query latency of each stage (medians)",
    )
    print_table(
        [
            [
                f"{r['db']:,}",
                r["kind"],
                f"{r['recall@100']:.3f}",
                _fmt(r["ms"]),
                _fmt(r["build_s"], 1),
                json.dumps(
                    {k: r["params"][k] for k in ("nlist", "pq_m", "nprobe", "hnsw_m", "ef_search")}
                ),
            ]
            for r in recalls
        ],
        ["db images", "index", "recall@100 vs exact", "ms/query", "build (s)", "params"],
        title="approximate filtering vs exact",
    )
    ratio = rerank["ca_sr_before_ms"] / max(rerank["ca_sr_after_ms"], 1e-9)
    print(
        f"CA-SR N={args.top_n} x {args.num_proposals} proposals x {args.dim} dims (float16 mmap): "
        f"per-image loop {rerank['ca_sr_before_ms']:.2f} ms -> vectorised "
        f"{rerank['ca_sr_after_ms']:.2f} ms ({ratio:.2f}x)"
    )
    print_table(
        [[k, _fmt(v)] for k, v in variants.items()],
        [f"CA-SR N={args.top_n} x {args.num_proposals} proposals, in memory", "ms/query"],
        title="CA-SR cost per region-vector storage",
    )
    data = {
        "machine": info,
        "args": _jsonable_args(args),
        "latency": rows,
        "recall": recalls,
        "rerank": rerank,
    }
    write_json(args.output_dir, "scale", data)
    return data


# ---------------------------------------------------------------------------------------------
# compression: bytes per image and mAP of each region-feature compression option
# ---------------------------------------------------------------------------------------------
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


def cmd_compression(args) -> dict:
    import torch

    from retrieval_ext.data import register_custom_dataset
    from retrieval_ext.data.datasets import get_retrieval_metadata, unregister_retrieval_dataset
    from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark
    from retrieval_ext.evaluation.evaluator import db_positions, evaluate_stages
    from retrieval_ext.retrieval import pipeline
    from retrieval_ext.retrieval.compression import RegionCompression, compress_index
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.search import InstanceSearcher

    options = COMPRESSION_OPTIONS
    if args.quick:
        args.num_db, args.num_instances, args.queries_per_instance = 8, 2, 1
        args.short_side, args.pca_db = 96, 6
        options = [
            ("float32 (reference)", 0, 0, "float32"),
            ("int8", 0, 0, "int8"),
            ("4 proposals, PCA 8, int8", 4, 8, "int8"),
        ]
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)
    config = _config_file("EfficientNet-Lite0", args.quick)
    opts = ["MODEL.DEVICE", "cpu", "RETRIEVAL.INDEX_DTYPE", "float32"]
    if not args.quick and args.size:
        opts += ["INPUT.MIN_SIZE_TEST", args.size, "INPUT.MAX_SIZE_TEST", args.size * 2]
    cfg = _cfg(config, opts)
    name, other = f"bench_comp_{os.getpid()}", f"bench_comp_pca_{os.getpid()}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="retrieval_comp_") as tmp:
        for ds, n, seed in ((name, args.num_db, args.seed), (other, args.pca_db, args.seed + 101)):
            generate_synthetic_benchmark(
                os.path.join(tmp, ds),
                num_instances=args.num_instances,
                queries_per_instance=args.queries_per_instance,
                num_db=n,
                short_side=args.short_side,
                seed=seed,
            )
            register_custom_dataset(ds, os.path.join(tmp, ds))
        try:
            extractor = FeatureExtractor(cfg, model=_build_model(cfg))
            t = time.perf_counter()
            ref = pipeline.build_index(
                extractor, name, os.path.join(tmp, "index"), dtype="float32", show_progress=False
            )
            pca_index = pipeline.build_index(
                extractor,
                other,
                os.path.join(tmp, "index_pca"),
                dtype="float32",
                show_progress=False,
            )
            index_s = time.perf_counter() - t
            queries = pipeline.extract_queries(extractor, name)
            pca_vecs = np.concatenate(
                [
                    np.asarray(pca_index.regions(i)[f])
                    for i in range(pca_index.num_images)
                    for f in ("rpa_sum", "rpa_max")
                ]
            )
            meta = get_retrieval_metadata(name)
            positions = db_positions(ref, pipeline.get_dataset_dicts(f"{name}_db"))
            ref_map = None
            for label, props, dim, dtype in options:
                if dtype == "float32" and not props and not dim:
                    index = ref
                else:
                    comp = RegionCompression.learn(pca_vecs, props, dim, dtype)
                    index = compress_index(ref, os.path.join(tmp, f"c{len(rows)}"), comp)
                searcher = InstanceSearcher(index, top_n=min(100, ref.num_images))
                results = {"filtering": [], "ca_sr": []}
                for q in queries:
                    out = searcher.search(q, ["filtering", "ca_sr"])
                    for s in results:
                        results[s].append(out[s])
                scores = evaluate_stages(results, meta, positions)
                nb = index.nbytes_per_image()
                region = sum(v for k, v in nb.items() if k.startswith("rpa_"))
                row = {
                    "option": label,
                    "bytes_per_image": nb["total"],
                    "rpa_bytes": region,
                    "filtering_mAP": scores["filtering"]["mAP"],
                    "ca_sr_mAP": scores["ca_sr"]["mAP"],
                }
                ref_map = ref_map or row
                row["ca_sr_delta"] = row["ca_sr_mAP"] - ref_map["ca_sr_mAP"]
                rows.append(row)
                print(f"  {label}: ca_sr mAP {100 * row['ca_sr_mAP']:.2f}", flush=True)
        finally:
            for ds in (name, other):
                unregister_retrieval_dataset(ds)
    print_table(
        [
            [
                r["option"],
                f"{r['bytes_per_image']:,.0f}",
                f"{r['rpa_bytes']:,.0f}",
                f"{ref_map['bytes_per_image'] / r['bytes_per_image']:.1f}x",
                f"{100 * r['filtering_mAP']:.2f}",
                f"{100 * r['ca_sr_mAP']:.2f}",
                f"{100 * r['ca_sr_delta']:+.3f}",
            ]
            for r in rows
        ],
        [
            "region features",
            "index bytes/image",
            "RPA bytes/image",
            "smaller than float32",
            "filtering mAP (%)",
            "CA-SR mAP (%)",
            "CA-SR vs float32 (points)",
        ],
        title=f"compression on the synthetic benchmark ({args.num_db} db images, "
        f"{len(queries)} queries; PCA learned on {args.pca_db} other images)",
    )
    print(f"indexing: {index_s:.1f} s for {args.num_db + args.pca_db} images")
    data = {"machine": info, "args": _jsonable_args(args), "results": rows, "index_s": index_s}
    write_json(args.output_dir, "compression", data)
    return data


# ---------------------------------------------------------------------------------------------
# limits: the CPU's sgemm rate and memory bandwidth, and how close extraction / search come
# ---------------------------------------------------------------------------------------------
def cmd_limits(args) -> dict:
    import torch
    from fvcore.nn import FlopCountAnalysis

    from retrieval_ext.retrieval.faiss_search import FaissFilter, FaissParams

    if args.quick:
        args.gemm, args.copy_mb, args.search_db, args.size, args.repeats = 256, 16, 2000, 96, 1
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)
    n = args.gemm
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    gemm_s = _median_ms(lambda: a @ a, args.repeats + 2) / 1000
    gflops = 2 * n**3 / gemm_s / 1e9
    x = np.ones(args.copy_mb * (1 << 20) // 4, np.float32)
    y = np.empty_like(x)
    copy_s = _median_ms(lambda: np.copyto(y, x), args.repeats + 2) / 1000
    sum_s = _median_ms(lambda: x.sum(), args.repeats + 2) / 1000
    copy_gbs, sum_gbs = 2 * x.nbytes / copy_s / 1e9, x.nbytes / sum_s / 1e9
    x = y = None  # free 2 x copy_mb before the model is built

    cfg = _cfg(_config_file("EfficientNet-Lite0", args.quick), ["MODEL.DEVICE", "cpu"])
    model = _build_model(cfg)
    h, w = args.size, args.size * 4 // 3
    img = torch.rand(1, 3, h, w) * 255
    with torch.no_grad():
        flops = FlopCountAnalysis(model.backbone, (img,))
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        bb_flops = 2 * flops.total()  # fvcore counts one multiply-add as one flop
        model.backbone(img)
        bb_s = _median_ms(lambda: model.backbone(img), args.repeats) / 1000

    rng = np.random.default_rng(1)
    db = _random_unit(rng, args.search_db, 1280)
    flat = FaissFilter(db, FaissParams("flat", use_gpu=False))
    q = db[0]
    search_s = _median_ms(lambda: flat.search(q, 100), args.repeats + 4) / 1000
    scanned = db.nbytes
    res = {
        "sgemm_gflops": gflops,
        "copy_gbs": copy_gbs,
        "sum_gbs": sum_gbs,
        "backbone_gflop_per_image": bb_flops / 1e9,
        "backbone_s": bb_s,
        "backbone_gflops": bb_flops / bb_s / 1e9,
        "search_db": args.search_db,
        "search_bytes": scanned,
        "search_s": search_s,
        "search_gbs": scanned / search_s / 1e9,
        "image": [h, w],
    }
    print_table(
        [
            ["sgemm (numpy, %dx%d)" % (n, n), f"{gflops:.1f} GFLOP/s", "", ""],
            ["memory: copy (read + write)", f"{copy_gbs:.1f} GB/s", "", ""],
            ["memory: sum (read)", f"{sum_gbs:.1f} GB/s", "", ""],
            [
                f"EfficientNet-Lite0 backbone {h}x{w}",
                f"{res['backbone_gflops']:.1f} GFLOP/s",
                f"{bb_flops / 1e9:.2f} GFLOP in {1000 * bb_s:.0f} ms",
                f"{100 * res['backbone_gflops'] / gflops:.0f}% of sgemm",
            ],
            [
                f"exact search, {args.search_db:,} x 1280 float32",
                f"{res['search_gbs']:.1f} GB/s",
                f"{scanned / 1e6:.0f} MB in {1000 * search_s:.1f} ms",
                f"{100 * res['search_gbs'] / sum_gbs:.0f}% of sum bandwidth",
            ],
        ],
        ["what", "rate", "work", "vs the limit"],
        title="machine limits and how close the pipeline comes (medians, same run)",
    )
    data = {"machine": info, "args": _jsonable_args(args), "results": res}
    write_json(args.output_dir, "limits", data)
    return data


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _jsonable_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _denormals_arg(p):
    p.add_argument(
        "--denormals",
        choices=("flush", "keep"),
        default="keep",
        help="'flush': denormal floats to zero (random weights can make them); 'keep' (default): "
        "as the pipeline runs",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--output-dir", default="output/benchmark", help="where <name>.json goes")
        p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
        p.add_argument("--seed", type=int, default=0)
        return p

    p = common(sub.add_parser("extraction", help="images/s and peak memory per backbone"))
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=BACKBONES,
        default=None,
        help="default: all (quick: EfficientNet-Lite0)",
    )
    p.add_argument("--size", type=int, default=600, help="shorter side; images are 3:4")
    p.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up")
    p.add_argument("--threads", type=int, default=_default_threads(), help="torch threads")
    _denormals_arg(p)
    p.set_defaults(func=cmd_extraction)

    p = sub.add_parser(WORKER, help=argparse.SUPPRESS)
    p.add_argument("--backbone", choices=BACKBONES, required=True)
    p.add_argument("--mode", choices=("with", "without"), required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    _denormals_arg(p)
    p.set_defaults(func=lambda a: print(json.dumps(extraction_worker(a))))

    p = common(sub.add_parser("rerank", help="stored-feature CA-SR vs re-running the network"))
    p.add_argument("--top-n", type=int, default=100, help="N (capped by the database size)")
    # small enough that N x queries network passes (the authors' side) fit in minutes on 2 cores
    p.add_argument("--num-db", type=int, default=60, help="synthetic database images")
    p.add_argument("--num-instances", type=int, default=3)
    p.add_argument("--queries-per-instance", type=int, default=2)
    p.add_argument("--short-side", type=int, default=300, help="synthetic image shorter side")
    p.add_argument(
        "--size",
        type=int,
        default=300,
        help="network input shorter side (INPUT.MIN_SIZE_TEST); 0 = config's (600)",
    )
    p.add_argument(
        "--num-proposals",
        type=int,
        default=100,
        help="proposals kept per image (fewer than the paper's 300 keeps the "
        "re-run side short; the search subcommand times CA-SR with 300)",
    )
    p.add_argument("--index-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--repeats", type=int, default=5, help="stored-feature searches per query")
    p.add_argument(
        "--tolerance",
        type=float,
        default=2e-3,
        help="score difference allowed by the index dtype's rounding",
    )
    p.add_argument("--threads", type=int, default=_default_threads(), help="torch threads")
    _denormals_arg(p)
    p.set_defaults(func=cmd_rerank)

    p = common(sub.add_parser("search", help="filtering vs db size, CA-SR from an mmap index"))
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
    p.set_defaults(func=cmd_search)

    p = common(sub.add_parser("scale", help="stage latency vs db size; faiss exact vs approx"))
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
    p.set_defaults(func=cmd_scale)

    p = common(sub.add_parser("compression", help="index bytes/image and mAP per compression"))
    p.add_argument("--num-db", type=int, default=100)
    p.add_argument("--pca-db", type=int, default=40, help="images of the PCA-learning dataset")
    p.add_argument("--num-instances", type=int, default=5)
    p.add_argument("--queries-per-instance", type=int, default=3)
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--size", type=int, default=256, help="network input shorter side")
    p.add_argument("--threads", type=int, default=_default_threads(), help="torch threads")
    p.set_defaults(func=cmd_compression)

    p = common(sub.add_parser("limits", help="sgemm GFLOP/s, memory GB/s, and how close we come"))
    p.add_argument("--gemm", type=int, default=2048, help="square sgemm size")
    p.add_argument("--copy-mb", type=int, default=512, help="array size of the bandwidth test")
    p.add_argument("--search-db", type=int, default=100000, help="exact-search database rows")
    p.add_argument("--size", type=int, default=600, help="backbone input shorter side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=_default_threads(), help="torch threads")
    p.set_defaults(func=cmd_limits)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
