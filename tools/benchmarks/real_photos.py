"""The real-photo benchmark: every stage on a collection of camera photos, and issue 13's targets.

    benchmark.py real --data ../shared/data/smvs_dvd --boxes datasets/smvs_dvd_boxes.json \
        [--split val|report|all] [--config-file CFG] [--weights W] [--baseline JSON] [KEY VALUE ...]

The collection is in the custom format (datasets/README.md) with its photos grouped in folders
``images/<group>/`` (SMVS DVD: one folder per camera). Settings are chosen on the validation
groups (``--val-groups``, default ``droid``) and reported on the others (``--report-groups``,
default: every other group); ``all`` is the whole collection. The split's view (symlinks and the
judgements restricted to its photos, :mod:`retrieval_ext.data.datasets.splits`) is written under
``--output-dir/<split>/data``; ``--boxes`` gives judgements with database boxes (e.g. written by
``tools/annotate_boxes.py``) instead of the collection's own ``relevance.json``, so that every
stage's localisation is scored too.

Then the pipeline runs as ``tools/retrieve.py evaluate`` does (index once, queries, every stage
of ``RETRIEVAL.STAGES`` that applies: CS-SR only with a model fine-tuned on the collection's query
objects) with ``--config-file`` (default: the offline default, configs/Base-EfficientNet-Lite0.yaml)
and ``--weights``; trailing ``KEY VALUE`` pairs override the config. Written under
``--output-dir/<split>``: config.yaml, log.txt, index/, rankings.npz, retrieval_results.json,
real_photos.json (the table, the split, the data, the targets) and real_photos.md (the table).
The targets of issue 13 are printed as pass / fail lines; those that need a fine-tuned model (or,
for "the fine-tuned best stage beats the off-the-shelf one", ``--baseline``: the
real_photos.json of an off-the-shelf run on the same split) say n/a otherwise.
"""

import argparse
import json
import logging
import os
import time

import numpy as np

from .common import jsonable_args, print_table, write_json

__all__ = ["load_baseline", "register", "run", "targets"]

CONFIG = "configs/Base-EfficientNet-Lite0.yaml"
SPLITS = ("val", "report", "all")
STAGE_NAMES = {
    "filtering": "filtering",
    "filtering_qe": "filtering + QE",
    "ca_sr": "CA-SR",
    "ca_sr_qe": "CA-SR + QE",
    "cs_sr": "CS-SR",
    "cs_sr_qe": "CS-SR + QE",
}
# issue 13, "Targets, printed by the benchmark on the report split"
OFF_THE_SHELF_CA_SR_QE = 50.0
FINE_TUNED_CS_SR_QE = 75.0
CS_SR_IOU = 0.6

logger = logging.getLogger("retrieval_ext")


def register(subparsers):
    p = subparsers.add_parser("real", help="every stage on real photos (e.g. SMVS DVD)")
    p.add_argument("--data", required=True, help="the collection (custom format, grouped photos)")
    p.add_argument("--boxes", default="", help="judgements with database boxes (relevance.json)")
    p.add_argument("--split", choices=SPLITS, default="report")
    p.add_argument("--val-groups", default="droid", help="comma-separated folders of images/")
    p.add_argument("--report-groups", default="", help="default: every group not in validation")
    p.add_argument("--config-file", default=CONFIG)
    p.add_argument("--weights", default="", help="MODEL.WEIGHTS (default: the config's)")
    p.add_argument("--baseline", default="", help="real_photos.json of an off-the-shelf run")
    p.add_argument("--output-dir", default="output/benchmark/real")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    p.set_defaults(func=run)
    return p


def split_groups(root: str, split: str, val_groups: str, report_groups: str):
    """The image groups of ``split`` (None for ``all``).

    Raises:
        ValueError: a group that is not a folder of ``ROOT/images``, or an empty split.
    """
    from retrieval_ext.data.datasets.splits import image_groups

    if split == "all":
        return None
    available = image_groups(root)
    val = [g for g in val_groups.split(",") if g]
    report = [g for g in report_groups.split(",") if g] or [g for g in available if g not in val]
    groups = val if split == "val" else report
    unknown = [g for g in groups if g not in available]
    if unknown or not groups:
        raise ValueError(
            f"--split {split}: groups {groups} (unknown: {unknown}); {root}/images has {available}"
        )
    return groups


def _setup(args, name: str, view: str, out: str):
    """The frozen config of the run (tools' setup: config.yaml and log.txt in ``out``)."""
    from detectron2.config import get_cfg
    from detectron2.engine import default_argument_parser

    from retrieval_ext.config import add_retrieval_config
    from retrieval_ext.engine.defaults import setup_cfg

    opts = ["RETRIEVAL.CUSTOM_DATASETS", f"['{name}={view}']", "RETRIEVAL.DATASET", name]
    opts += ["OUTPUT_DIR", out] + (["MODEL.WEIGHTS", args.weights] if args.weights else [])
    probe = get_cfg()
    add_retrieval_config(probe)
    probe.merge_from_file(args.config_file)
    if probe.MODEL.FINETUNE.DATASET:  # a fine-tuned model: its query classes are this view's
        opts += ["MODEL.FINETUNE.DATASET", name]
    cli = default_argument_parser().parse_args(["--config-file", args.config_file])
    cli.opts = opts + list(args.opts)
    return setup_cfg(cli)


def _per_query_ap(run, dataset, stage):
    """Each query's AP (NaN without positives) of one stage of a ``pipeline.SearchRun``."""
    from retrieval_ext.data.datasets.catalog import get_dataset_dicts
    from retrieval_ext.evaluation import metrics
    from retrieval_ext.evaluation.evaluator import db_positions

    positions = db_positions(run.index, get_dataset_dicts(f"{dataset}_db"))
    rankings = [positions[r.order] for r in run.results[stage]]
    return np.asarray(metrics.oxford_paris_map(rankings, run.metadata.gnd)["aps"])


def targets(
    results: dict, baseline: dict = None, ca_sr_qe_drops: int = None, fine_tuned: bool = False
) -> list:
    """Issue 13's targets as ``{"target", "value", "passed"}`` rows (``passed`` None: n/a).

    Args:
        results: ``{stage: {"mAP": %, "mean_iou": ..., ...}}`` of this run (mAP in percent).
        baseline: the ``results`` of an off-the-shelf run on the same split, if any.
        ca_sr_qe_drops: queries whose CA-SR + QE AP is below their CA-SR AP.
        fine_tuned: the model was fine-tuned on the query objects (``MODEL.FINETUNE.STRATEGY``);
            the CS-SR targets are its (an off-the-shelf model's CS-SR uses the query-set
            classifier).
    """
    rows = []

    def m(stage, key="mAP"):
        return results.get(stage, {}).get(key)

    def row(target, value, passed, note=""):
        rows.append({"target": target, "value": value, "passed": passed, "note": note})

    value = m("ca_sr_qe")
    ok = None if fine_tuned or value is None else value >= OFF_THE_SHELF_CA_SR_QE
    row(
        f"off-the-shelf CA-SR + QE >= {OFF_THE_SHELF_CA_SR_QE:g} mAP",
        value,
        ok,
        "n/a: a fine-tuned model" if fine_tuned else "",
    )
    below = None if value is None or m("ca_sr") is None else value >= m("ca_sr")
    note = "" if ca_sr_qe_drops is None else f"queries with a lower AP: {ca_sr_qe_drops}"
    row("CA-SR + QE never below CA-SR (mAP)", value, below, note)
    value = m("cs_sr_qe")
    row(
        f"fine-tuned CS-SR + QE >= {FINE_TUNED_CS_SR_QE:g} mAP",
        value,
        None if value is None or not fine_tuned else value >= FINE_TUNED_CS_SR_QE,
        "" if fine_tuned else "n/a: not a model fine-tuned on the query objects",
    )
    value = m("cs_sr", "mean_iou")
    row(
        f"CS-SR localisation mean IoU >= {CS_SR_IOU:g} (true positives in the top 10)",
        value,
        None if value is None or not fine_tuned else value >= CS_SR_IOU,
        "" if fine_tuned else f"n/a: off the shelf, CA-SR's is {_fmt(m('ca_sr', 'mean_iou'), 3)}",
    )
    best = max((v["mAP"] for v in results.values() if v.get("mAP") is not None), default=None)
    base = None
    if baseline:
        base = max((v["mAP"] for v in baseline.values() if v.get("mAP") is not None), default=None)
    passed = None if not fine_tuned or best is None or base is None else best > base
    row(
        "fine-tuned best stage > off-the-shelf best stage (mAP)",
        best,
        passed,
        (
            f"off the shelf: {_fmt(base, 3)}"
            if base is not None
            else "n/a: needs a fine-tuned model and --baseline"
        ),
    )
    return rows


def load_baseline(path: str, split: str, groups) -> dict:
    """The ``results`` of an off-the-shelf run's real_photos.json, on this run's split.

    Raises:
        ValueError: ``path`` is not such a file, was measured on another split or other image
            groups, or is a fine-tuned run (it has CS-SR): "the fine-tuned best stage beats the
            off-the-shelf one" would compare the wrong numbers.
    """
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--baseline {path}: cannot read it as JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise ValueError(f"--baseline {path}: no 'results' (expected a real_photos.json)")
    theirs = (report.get("split"), report.get("groups"))
    if theirs != (split, groups):
        raise ValueError(
            f"--baseline {path}: measured on split {theirs[0]!r} (groups {theirs[1]}), "
            f"this run is split {split!r} (groups {groups})"
        )
    # reports written before "fine_tuned" was recorded: only fine-tuned runs had CS-SR
    if report.get("fine_tuned", "cs_sr" in report["results"]):
        raise ValueError(f"--baseline {path}: a fine-tuned run, not off the shelf")
    return report["results"]


def _percent(scores: dict) -> dict:
    """retrieval_results.json's fractions as the table's units: mAP in %, IoU as is."""
    out = {}
    for stage, s in scores.items():
        out[stage] = {
            "mAP": None if s.get("mAP") is None else 100.0 * s["mAP"],
            "mean_iou": s.get("mean_iou"),
            "frac_iou@0.5": s.get("frac_iou@0.5"),
            "queries_without_positives": s.get("queries_without_positives"),
        }
    return out


def _fmt(x, digits, scale=1.0, unit=""):
    return "-" if x is None else f"{scale * x:.{digits}f}{unit}"


def _save_rankings(path, run, k=100):
    ids = np.array(run.index.image_ids)
    k = min(k, run.index.num_images)
    arrays = {"query_ids": np.array([q["image_id"] for q in run.queries])}
    for stage, per_query in run.results.items():
        arrays[f"{stage}/image_ids"] = np.stack([ids[r.order[:k]] for r in per_query])
        arrays[f"{stage}/boxes"] = np.stack([r.boxes[:k] for r in per_query])
    np.savez_compressed(path, **arrays)


def run(args):
    from retrieval_ext.data.datasets.splits import make_view
    from retrieval_ext.evaluation.evaluator import score_run
    from retrieval_ext.retrieval import pipeline
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.paths import index_paths

    t0 = time.perf_counter()
    groups = split_groups(args.data, args.split, args.val_groups, args.report_groups)
    out = os.path.abspath(os.path.join(args.output_dir, args.split))
    name = f"real_{args.split}"
    view = os.path.join(out, "data", name)
    os.makedirs(os.path.dirname(view), exist_ok=True)
    counts = make_view(args.data, view, groups, overwrite=True, relevance=args.boxes or None)
    print(
        f"[real] split {args.split}: {groups or 'all groups'}, {counts['images']} photos, "
        f"{counts['positives']} positive pairs -> {view}",
        flush=True,
    )
    cfg = _setup(args, name, view, out)
    extractor = FeatureExtractor(cfg)
    print("[real] indexing, extracting the queries and searching (progress below)", flush=True)
    found = pipeline.search_dataset(cfg, extractor, name, index_paths(cfg))
    scores = score_run(found, cfg.RETRIEVAL.LOC_TOP_K)
    if scores is None:
        raise SystemExit(f"{args.data}: no relevance judgements, nothing to score")
    _save_rankings(os.path.join(out, "rankings.npz"), found)
    write_json(out, "retrieval_results", scores)
    results = _percent(scores)
    drops = None
    if "ca_sr" in found.results and "ca_sr_qe" in found.results:
        a, b = _per_query_ap(found, name, "ca_sr"), _per_query_ap(found, name, "ca_sr_qe")
        valid = np.isfinite(a) & np.isfinite(b)
        drops = int((b[valid] < a[valid] - 1e-12).sum())
    baseline = load_baseline(args.baseline, args.split, groups) if args.baseline else None
    fine_tuned = cfg.MODEL.FINETUNE.STRATEGY != "none"
    rows = targets(results, baseline, drops, fine_tuned)
    _report(args, out, results, rows, groups, counts, found, time.perf_counter() - t0, fine_tuned)
    return results


def _report(args, out, results, rows, groups, counts, search, seconds, fine_tuned):
    headers = ["stage", "mAP (%)", "mean IoU", "IoU >= 0.5"]
    table = [
        [
            STAGE_NAMES.get(s, s),
            _fmt(v["mAP"], 2),
            _fmt(v["mean_iou"], 3),
            _fmt(v["frac_iou@0.5"], 0, 100.0, "%"),
        ]
        for s, v in results.items()
    ]
    title = (
        f"real photos, split {args.split} ({','.join(groups) if groups else 'all'}): "
        f"{len(search.queries)} queries, {search.index.num_images} photos; "
        f"{os.path.basename(args.config_file)}"
        + (f", weights {args.weights}" if args.weights else "")
    )
    print_table(table, headers, title)
    print("\ntargets (issue 13; meant for the report split):")
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[r["passed"]]
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        print(f"  [{verdict}] {r['target']}: {value}" + (f" ({r['note']})" if r["note"] else ""))
    from tabulate import tabulate

    with open(os.path.join(out, "real_photos.md"), "w") as f:
        f.write(
            f"{title}\n\n{tabulate(table, headers, tablefmt='github', disable_numparse=True)}\n"
        )
    write_json(
        out,
        "real_photos",
        {
            "args": jsonable_args(args),
            "data": os.path.abspath(args.data),
            "boxes": os.path.abspath(args.boxes) if args.boxes else "",
            "split": args.split,
            "groups": groups,
            "fine_tuned": fine_tuned,
            "num_queries": len(search.queries),
            "num_images": search.index.num_images,
            "positive_pairs": counts["positives"],
            "results": results,
            "targets": rows,
            "seconds": seconds,
        },
    )
