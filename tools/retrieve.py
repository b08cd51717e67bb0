#!/usr/bin/env python
"""Instance search with Faster R-CNN features: index, search, evaluate, visualize.

    retrieve.py index     --config-file CFG [KEY VALUE ...]   extract and store the database once
    retrieve.py evaluate  --config-file CFG [KEY VALUE ...]   every stage's metrics -> table + JSON
    retrieve.py visualize --config-file CFG [--stage S]       ranked results with located boxes
    retrieve.py search    --config-file CFG --query-image F --query-box X1 Y1 X2 Y2
    retrieve.py all       --config-file CFG                   index + evaluate + visualize

Everything is written under OUTPUT_DIR: config.yaml, log.txt, index/ (unless RETRIEVAL.INDEX_DIR),
retrieval_results.json, latency.json, visualization/index.html, search_results.json.
"""

import os  # noqa: E402  (before torch is imported: OpenMP reads it once)

# Spinning OpenMP threads make small CPU models 5-10x slower when another process competes for
# the cores; passive waiting costs nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import errno
import logging
import sys

import numpy as np
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import retrieval_ext  # noqa: E402,F401  registers models and datasets
from retrieval_ext.data.datasets.catalog import get_dataset_dicts  # noqa: E402
from retrieval_ext.engine.defaults import setup_cfg  # noqa: E402
from retrieval_ext.evaluation.evaluator import db_positions, format_table, score_run  # noqa: E402
from retrieval_ext.evaluation.relevance import relevance_labels  # noqa: E402
from retrieval_ext.retrieval import pipeline  # noqa: E402
from retrieval_ext.retrieval.api import InstanceSearch  # noqa: E402
from retrieval_ext.retrieval.extractor import FeatureExtractor  # noqa: E402
from retrieval_ext.retrieval.paths import index_paths  # noqa: E402
from retrieval_ext.retrieval.stages import STAGES  # noqa: E402
from retrieval_ext.utils.io import atomic_dir, atomic_write, atomic_write_json  # noqa: E402
from retrieval_ext.utils.visualization import result_strip, write_gallery  # noqa: E402

COMMANDS = ("index", "evaluate", "visualize", "search", "all")
logger = logging.getLogger("retrieval_ext")


def get_parser():
    parser = default_argument_parser(__doc__)
    parser.usage = "retrieve.py {" + ",".join(COMMANDS) + "} [options] [KEY VALUE ...]"
    parser.add_argument("--stage", default="", help="stage drawn by visualize / ranked by search")
    parser.add_argument("--query-image", default="", help="search: the query image file")
    parser.add_argument("--query-box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"))
    parser.add_argument("--top-k", type=int, default=10, help="search: results printed")
    return parser


def parse_args(argv=None):
    """``COMMAND [detectron2 arguments] [KEY VALUE ...]``: the command comes first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.error(f"the first argument must be a command: one of {', '.join(COMMANDS)}")
    args = parser.parse_args(argv[1:])
    args.command = argv[0]
    unknown = [s for s in args.stage.split(",") if s and s not in STAGES]
    if unknown:
        parser.error(f"unknown --stage {unknown}; choose from {list(STAGES)}")
    return args


def setup(args):
    return setup_cfg(args)


def run_index(cfg, extractor):
    return pipeline.prepare_index(cfg, extractor, cfg.RETRIEVAL.DATASET, index_paths(cfg))


def run_search_all(cfg, extractor):
    """Index (once), extract queries, search every query with every applicable stage.

    Returns:
        the :class:`pipeline.SearchRun` on the main process, None on other ranks.
    """
    run = pipeline.search_dataset(cfg, extractor, cfg.RETRIEVAL.DATASET, index_paths(cfg))
    if run is not None:
        save_rankings(cfg, run.index, run.queries, run.results)
    return run


def save_rankings(cfg, index, queries, results):
    """Each stage's top SAVE_TOP_K per query (image ids, scores, located boxes) in rankings.npz."""
    k = min(cfg.RETRIEVAL.SAVE_TOP_K, index.num_images)
    if k <= 0 or not comm.is_main_process():
        return
    arrays = {"query_ids": np.array([q["image_id"] for q in queries])}
    ids = np.array(index.image_ids)
    for stage, per_query in results.items():
        arrays[f"{stage}/image_ids"] = np.stack([ids[r.order[:k]] for r in per_query])
        arrays[f"{stage}/scores"] = np.stack([r.scores[:k] for r in per_query])
        arrays[f"{stage}/boxes"] = np.stack([r.boxes[:k] for r in per_query])
    atomic_write(
        os.path.join(cfg.OUTPUT_DIR, "rankings.npz"), lambda p: np.savez_compressed(p, **arrays)
    )


def latency_table(results):
    """Median and mean per-query wall time of each stage, in milliseconds."""
    out = {}
    for stage, per_query in results.items():
        t = np.array([r.seconds for r in per_query]) * 1000.0
        out[stage] = {"median_ms": float(np.median(t)), "mean_ms": float(t.mean())}
    return out


def run_evaluate(cfg, run):
    scores = score_run(run, cfg.RETRIEVAL.LOC_TOP_K)
    latency = latency_table(run.results)
    atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "latency.json"), latency)
    lines = [f"{s}: median {v['median_ms']:.2f} ms / query" for s, v in latency.items()]
    logger.info("per-query latency of each stage (stored features only):\n" + "\n".join(lines))
    if scores is not None:
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "retrieval_results.json"), scores)
        n_q, n_db = len(run.queries), run.index.num_images
        title = f"{cfg.RETRIEVAL.DATASET}: {n_q} queries, {n_db} images"
        logger.info("results (%):\n" + format_table(scores, title))
    return scores


def _relevance(meta, query_index, ranking):
    """Per ranked image (dataset db_index): True relevant, False not, None junk or unjudged."""
    gnd = getattr(meta, "gnd", None)
    if gnd is None:
        return [None] * len(ranking)
    labels = relevance_labels(meta, gnd[query_index], ranking)
    return [None if label < 0 else bool(label) for label in labels]


def run_visualize(cfg, run, stage):
    index, queries, results, meta = run.index, run.queries, run.results, run.metadata
    stage = stage or list(results)[-1]
    if stage not in results:
        raise ValueError(f"stage {stage!r} was not run; available: {list(results)}")
    db = get_dataset_dicts(f"{cfg.RETRIEVAL.DATASET}_db")
    positions = db_positions(index, db)
    files = {d["db_index"]: d["file_name"] for d in db}
    k = cfg.RETRIEVAL.VIS_TOP_K
    entries = []
    for qi, (q, r) in enumerate(zip(queries, results[stage])):
        top = positions[r.order[:k]]
        rel = _relevance(meta, qi, top)
        strip = result_strip(
            q["file_name"],
            q["box"],
            [files[int(i)] for i in top],
            [b if np.all(np.isfinite(b)) else None for b in r.boxes[:k]],
            r.scores[:k],
            rel,
        )
        hits = sum(1 for x in rel if x)
        name = f"{qi:03d}_{q['image_id'].replace('/', '_')}"
        entries.append({"name": name, "strip": strip, "caption": f"{hits}/{k} relevant ({stage})"})
    vis_dir = os.path.join(cfg.OUTPUT_DIR, "visualization")
    with atomic_dir(vis_dir) as tmp:  # the old gallery stays whole until the new one is
        write_gallery(tmp, f"{cfg.RETRIEVAL.DATASET}: {stage}", entries)
        unwritten = [e["name"] for e in entries if not os.path.isfile(f"{tmp}/{e['name']}.jpg")]
        if unwritten:  # cv2.imwrite reports failure by its return value only
            raise OSError(errno.EIO, f"could not write the result strips {unwritten}")
    path = os.path.join(vis_dir, "index.html")
    logger.info(f"wrote {len(entries)} result strips, see {path}")
    return path


def run_single_search(cfg, args):
    if not args.query_image or args.query_box is None:
        raise SystemExit("search needs --query-image FILE and --query-box X1 Y1 X2 Y2")
    engine = InstanceSearch(cfg)
    stage = args.stage or "ca_sr_qe"
    hits = engine.query(args.query_image, args.query_box, stage=stage, top_k=args.top_k)
    rows = [h.__dict__ for h in hits]
    atomic_write_json(
        os.path.join(cfg.OUTPUT_DIR, "search_results.json"),
        {"query": args.query_image, "box": args.query_box, "stage": stage, "hits": rows},
    )
    for h in hits:
        score = "unscored" if h.score is None else f"{h.score:8.4f}"
        print(f"{h.rank:3d}  {score}  {h.image_id}  box={h.box}")
    return hits


def main(args):
    cfg = setup(args)
    if args.command == "search":
        return run_single_search(cfg, args)
    extractor = FeatureExtractor(cfg)
    if args.command == "index":
        run_index(cfg, extractor)
        return None
    run = run_search_all(cfg, extractor)
    if run is None:  # not the main process: its share of the indexing is done
        return None
    if args.command in ("evaluate", "all"):
        run_evaluate(cfg, run)
    if args.command in ("visualize", "all"):
        run_visualize(cfg, run, args.stage)
    return None


if __name__ == "__main__":
    args = parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
