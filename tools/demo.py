#!/usr/bin/env python
"""The main job: the paper's experiment in miniature, offline, on the embedded default.

    python tools/demo.py [--quick] [--output-dir output/demo] [--benchmark-seed 0]
                         [--generic-detector DIR] [--seeds 0 [1 ...]]

1. writes the synthetic benchmark (`synthetic`, seed --benchmark-seed), a second one with other
   instances that learns the whitening (`synthetic_whiten`, seed 1000, as Paris does for Oxford),
   and the generic detection set (`synthetic_generic`, object categories disjoint from the
   benchmark's), once;
2. trains the EfficientNet-Lite0 Faster R-CNN's RPN and box head on the generic set, once, cached
   in --generic-detector (the stand-in for the paper's VOC/COCO pre-training; the ImageNet
   backbone stays frozen), and reports its detection AP on held-out generic images;
3. off-the-shelf: indexes the benchmark and evaluates every stage, plus the pooling ablation
   (sum vs max for filtering and for reranking) on the same index;
4. fine-tunes on the query boxes with strategies #1 (ft1) and #2 (ft2), once per training seed
   (--seeds; the schedules are the configs' configs/synthetic/EfficientNet-Lite0_ft{1,2}.yaml),
   re-indexes and evaluates every stage (CS-SR included) for each;
5. writes the report: the paper's table (rows: stage; columns: off-the-shelf, ft1, ft2; a
   fine-tuned cell is the mean over the seeds, with their standard deviation when there are
   several) printed and saved as report.json and report.html next to the ranked-results galleries.

Validation: the fine-tuning settings were chosen on another benchmark seed (other instances,
other queries, other database images), run into its own output dir with the same generic
detector (trained on the disjoint generic set), e.g.

    python tools/demo.py --benchmark-seed 1 --output-dir output/demo-val \
        --generic-detector output/demo/generic_detector

Output dirs of a fine-tuned model: STRATEGY_train (training) and STRATEGY (its index, results and
gallery) for seed 0, STRATEGY_seedS_train and STRATEGY_seedS for seed S.

Every step runs the project's own tools (tools/train_net.py, tools/retrieve.py) in a subprocess,
as a user would, with their progress shown; a step whose outputs exist is skipped, so an
interrupted run resumes.
"""

import os  # noqa: E402  (before torch is imported: OpenMP reads it once)

# Spinning OpenMP threads make small CPU models 5-10x slower when another process competes for
# the cores; passive waiting costs nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import html
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval_ext.data.datasets.synthetic import (  # noqa: E402
    generate_generic_detection_set,
    generate_synthetic_benchmark,
)

STAGES = ["filtering", "filtering_qe", "ca_sr", "ca_sr_qe", "cs_sr", "cs_sr_qe"]
MODELS = ["off_the_shelf", "ft1", "ft2"]

# (full, quick) sizes; quick is a smoke test of the whole job, not a result.
DATA = {
    "full": dict(
        synthetic=dict(
            num_instances=11, queries_per_instance=5, num_db=300, short_side=300, seed=0
        ),
        synthetic_whiten=dict(
            num_instances=11, queries_per_instance=1, num_db=100, short_side=300, seed=1000
        ),
        synthetic_generic=dict(num_train=400, num_val=50, short_side=320, seed=0),
    ),
    "quick": dict(
        synthetic=dict(num_instances=3, queries_per_instance=2, num_db=16, short_side=160, seed=0),
        synthetic_whiten=dict(
            num_instances=2, queries_per_instance=1, num_db=10, short_side=160, seed=1000
        ),
        synthetic_generic=dict(num_train=8, num_val=4, short_side=160, seed=0),
    ),
}
# Generic pre-training iterations: sized for a ~20 minute run on 2 CPU cores (measured: ~1.2 s
# per generic iteration of 4 images). The fine-tuning schedules are the configs' (chosen on the
# validation benchmark, see their comments); --quick overrides them with 3 iterations.
GENERIC_ITERS = {"full": 150, "quick": 4}
QUICK_FT_ITERS = 3
WHITEN_SEED = DATA["full"]["synthetic_whiten"]["seed"]
QUICK_OPTS = [
    "INPUT.MIN_SIZE_TEST",
    "160",
    "INPUT.MAX_SIZE_TEST",
    "320",
    "INPUT.MIN_SIZE_TRAIN",
    "(160,)",
    "INPUT.MAX_SIZE_TRAIN",
    "320",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "30",
    "MODEL.RETRIEVAL.NUM_PROPOSALS",
    "30",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "RETRIEVAL.TOP_N",
    "8",
    "RETRIEVAL.QE_M",
    "2",
    "RETRIEVAL.VIS_TOP_K",
    "4",
]
CONFIG = REPO / "configs" / "synthetic"


def log(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, env):
    log("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")


def data_params(size: str, benchmark_seed: int) -> dict:
    """The generator's parameters of each dataset, the benchmark's seed set to ``benchmark_seed``.

    Raises:
        SystemExit: when ``benchmark_seed`` is the whitening set's seed (the whitening would be
            learned on the benchmark's own instances).
    """
    if benchmark_seed == WHITEN_SEED:
        raise SystemExit(
            f"--benchmark-seed {benchmark_seed} is the seed of synthetic_whiten, whose instances "
            "must differ from the benchmark's: choose another seed"
        )
    params = {name: dict(p) for name, p in DATA[size].items()}
    params["synthetic"]["seed"] = benchmark_seed
    return params


def prepare_data(data_dir: Path, params: dict, names):
    """Writes the datasets ``names`` under ``data_dir`` unless written with the same parameters."""
    for name in names:
        params_ = params[name]
        root = data_dir / name
        stamp = root / "demo_params.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == params_:
            continue
        log(f"writing {name} under {root}")
        if name == "synthetic_generic":
            generate_generic_detection_set(str(root), **params_)
        else:
            generate_synthetic_benchmark(str(root), **params_)
        stamp.write_text(json.dumps(params_))


def claim_output_dir(out: Path, benchmark_seed: int) -> None:
    """Records the benchmark seed of ``out``; refuses a dir whose results come from another."""
    stamp = out / "demo_benchmark.json"
    if stamp.is_file():
        previous = json.loads(stamp.read_text())["benchmark_seed"]
        if previous != benchmark_seed:
            raise SystemExit(
                f"{out} holds results on benchmark seed {previous}, not {benchmark_seed}: "
                "use another --output-dir"
            )
    stamp.write_text(json.dumps({"benchmark_seed": benchmark_seed}))


def pretrain_detector(out: Path, env, size: str, extra) -> Path:
    """Train RPN + box head on the generic set (backbone frozen); cached by its output dir."""
    final = out / "model_final.pth"
    if not final.is_file():
        run(
            [
                sys.executable,
                REPO / "tools" / "train_net.py",
                "--config-file",
                CONFIG / "EfficientNet-Lite0_generic.yaml",
                "OUTPUT_DIR",
                out,
                "SOLVER.MAX_ITER",
                GENERIC_ITERS[size],
            ]
            + extra,
            env,
        )
    return final


def generic_detection_ap(train_dir: Path):
    """COCO box AP of the generic detector on its held-out images (evaluated after training)."""
    path = train_dir / "metrics.json"
    if not path.is_file():
        return None
    ap = None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "bbox/AP" in rec:
            ap = {k.split("/", 1)[1]: rec[k] for k in ("bbox/AP", "bbox/AP50", "bbox/AP75")}
    return ap


def evaluate(cfg_file, out: Path, weights, env, extra, stages=STAGES):
    results = out / "retrieval_results.json"
    if not results.is_file():
        run(
            [
                sys.executable,
                REPO / "tools" / "retrieve.py",
                "all",
                "--config-file",
                cfg_file,
                "OUTPUT_DIR",
                out,
                "MODEL.WEIGHTS",
                weights,
                "RETRIEVAL.STAGES",
                "[" + ",".join(f"'{s}'" for s in stages) + "]",
            ]
            + extra,
            env,
        )
    return json.loads(results.read_text())


# the off-the-shelf index also stores the poolings the ablation searches (an index stores only
# what its own stages read: RETRIEVAL.STORE)
ABLATION_STORE = [
    "RETRIEVAL.STORE.IPA_POOLINGS",
    "['sum', 'max']",
    "RETRIEVAL.STORE.REGION_POOLINGS",
    "['sum', 'max']",
]


def pooling_ablation(out: Path, weights, env, extra):
    """Sum vs max pooling for filtering and for reranking, on the off-the-shelf index."""
    rows = {}
    for filt, rerank in [("sum", "max"), ("max", "max"), ("sum", "sum")]:
        d = out / f"pooling_{filt}_{rerank}"
        res = evaluate(
            CONFIG / "EfficientNet-Lite0.yaml",
            d,
            weights,
            env,
            extra
            + ABLATION_STORE
            + [
                "RETRIEVAL.INDEX_DIR",
                out / "off_the_shelf" / "index",
                "RETRIEVAL.FILTER_POOLING",
                filt,
                "RETRIEVAL.RERANK_POOLING",
                rerank,
                "RETRIEVAL.VIS_TOP_K",
                "0",
            ],
            stages=["filtering", "ca_sr"],
        )
        rows[f"filter {filt} / rerank {rerank}"] = {s: res[s]["mAP"] for s in res}
    return rows


def run_dir(strategy: str, seed: int) -> str:
    """Name of a fine-tuned model's output dir: ``ft1`` for seed 0 (as before seeds existed),
    ``ft1_seed2`` for seed 2."""
    return strategy if seed == 0 else f"{strategy}_seed{seed}"


def finetune(strategy, seed, out: Path, detector, env, size: str, num_classes, extra, opts=()):
    """Fine-tunes the generic detector with ``strategy`` and training seed ``seed``, then indexes
    and evaluates the benchmark with it; both steps are skipped when their outputs exist.

    Args:
        strategy: "ft1" or "ft2" (configs/synthetic/EfficientNet-Lite0_<strategy>.yaml).
        seed: cfg.SEED of the training run (sampler order, augmentation draws, initial weights).
        out: the demo's output dir; the run writes ``out/<name>_train`` and ``out/<name>``
            (``<name>`` from :func:`run_dir`).
        opts: further config overrides for the training run (KEY VALUE ...), after the demo's.

    Returns:
        The evaluation's results ({stage: {"mAP": ..., ...}}).
    """
    name = run_dir(strategy, seed)
    train_dir = out / f"{name}_train"
    weights = train_dir / "model_final.pth"
    schedule = []
    if size == "quick":
        # the configs' step: the last sixth of the schedule at a tenth of the lr
        schedule = ["SOLVER.MAX_ITER", QUICK_FT_ITERS, "SOLVER.STEPS", f"({QUICK_FT_ITERS - 1},)"]
    if not weights.is_file():
        # retrieval is evaluated below (with the gallery), not a second time by the trainer
        cmd = [sys.executable, REPO / "tools" / "train_net.py", "--config-file"]
        cmd += [CONFIG / f"EfficientNet-Lite0_{strategy}.yaml", "OUTPUT_DIR", train_dir]
        cmd += ["MODEL.WEIGHTS", detector, "MODEL.FINETUNE.DATASET", ""]
        cmd += ["DATASETS.TRAIN", "('synthetic_finetune',)", "DATASETS.TEST", "()"]
        cmd += ["MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "SEED", seed]
        run(cmd + schedule + list(extra) + list(opts), env)
    # the training run's saved config.yaml is the fine-tuned model's config
    return evaluate(train_dir / "config.yaml", out / name, weights, env, extra)


def summarise(runs):
    """Mean and spread of one cell over training seeds.

    Args:
        runs: the cell's values, one per seed (None where the stage does not apply).

    Returns:
        (mean, std): the mean of the values and their sample standard deviation (ddof 1; None
        for a single value); (None, None) when no value is given.
    """
    values = [v for v in runs if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def fmt(v, spread=None):
    """A fraction as a percentage with one decimal, "-" for None, "+- spread" when given."""
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if spread is None else f"{100 * v:.1f} +- {100 * spread:.1f}"


def report_cells(table, key, stages):
    """Per stage and model: the per-seed values of ``key``, their mean and their spread."""
    cells = {}
    for s in stages:
        cells[s] = {}
        for m in MODELS:
            if m not in table:
                continue
            per_seed = {seed: res.get(s, {}).get(key) for seed, res in table[m].items()}
            mean, std = summarise(per_seed.values())
            cells[s][m] = dict(mean=mean, std=std, per_seed=per_seed)
    return cells


def markdown_table(cells):
    lines = ["| stage | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for s, row in cells.items():
        values = [fmt(row[m]["mean"], row[m]["std"]) if m in row else "-" for m in MODELS]
        lines.append(f"| {s} | " + " | ".join(values) + " |")
    return lines


def write_report(out: Path, table, ablation, detector_ap, seconds, seeds, benchmark_seed):
    """Writes report.{json,md,html} under ``out`` and returns the markdown text.

    Args:
        table: {model: {training seed: evaluation results}} (off_the_shelf under seed 0).
    """
    mAP = report_cells(table, "mAP", STAGES)
    iou = report_cells(table, "mean_iou", [s for s in STAGES if s.endswith(("sr", "sr_qe"))])
    report = {
        "mAP": {s: {m: c["mean"] for m, c in row.items()} for s, row in mAP.items()},
        "mAP_std": {s: {m: c["std"] for m, c in row.items()} for s, row in mAP.items()},
        "mAP_per_seed": {s: {m: c["per_seed"] for m, c in row.items()} for s, row in mAP.items()},
        "localisation": {s: {m: c["mean"] for m, c in row.items()} for s, row in iou.items()},
        "training_seeds": list(seeds),
        "benchmark_seed": benchmark_seed,
        "pooling_ablation": ablation,
        "generic_detector_AP": detector_ap,
        "seconds": seconds,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))

    lines = [f"benchmark seed {benchmark_seed}; fine-tuned: mean over training seeds {list(seeds)}"]
    if len(seeds) > 1:
        lines[0] += " +- their standard deviation"
    lines += [""] + markdown_table(mAP)
    lines += ["", "mean IoU of the located boxes (true positives in the top 10):", ""]
    lines += markdown_table(iou)
    lines += [
        "",
        "pooling (off-the-shelf, mAP):",
        "",
        "| variant | filtering | ca_sr |",
        "|---|---|---|",
    ]
    for k, v in ablation.items():
        lines.append(f"| {k} | {fmt(v.get('filtering'))} | {fmt(v.get('ca_sr'))} |")
    if detector_ap:
        lines += [
            "",
            "off-the-shelf detector (generic categories, held-out images), COCO box AP (%): "
            + ", ".join(f"{k} {v:.1f}" for k, v in detector_ap.items()),
        ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    (out / "report.html").write_text(report_html(out, mAP, text, detector_ap))
    return text


def report_html(out: Path, mAP, text, detector_ap) -> str:
    links = "".join(
        f'<li><a href="{m}/visualization/index.html">{m}: ranked results</a></li>'
        for m in MODELS
        if (out / m / "visualization" / "index.html").is_file()
    )
    rows = "".join(
        f"<tr><td>{s}</td>"
        + "".join(
            f"<td>{fmt(row[m]['mean'], row[m]['std']) if m in row else '-'}</td>" for m in MODELS
        )
        + "</tr>"
        for s, row in mAP.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>retrieval_ext demo</title></head>"
        "<body style='font-family:sans-serif'><h1>Faster R-CNN features for instance search: "
        "synthetic benchmark, EfficientNet-Lite0</h1><h2>mAP (%)</h2>"
        "<table border=1 cellpadding=4><tr><th>stage</th>"
        + "".join(f"<th>{m}</th>" for m in MODELS)
        + "</tr>"
        + rows
        + "</table>"
        f"<pre>{html.escape(text)}</pre>"
        f"<p>generic detector, COCO box AP (%) on held-out generic images: "
        f"{html.escape(str(detector_ap))}</p>"
        f"<ul>{links}</ul></body></html>"
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--data-dir", default="", help="default: OUTPUT_DIR/datasets")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--benchmark-seed",
        type=int,
        default=0,
        help="seed of the synthetic benchmark (0: the reported one; 1: the validation one)",
    )
    parser.add_argument(
        "--generic-detector",
        default="",
        help="dir of the generic detector, trained there unless it holds model_final.pth "
        "(default: OUTPUT_DIR/generic_detector)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds of the fine-tuning: one model per strategy and seed, the report "
        "gives their mean and spread",
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    size = "quick" if args.quick else "full"
    out = Path(args.output_dir).resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else out / "datasets"
    generic_dir = (
        Path(args.generic_detector).resolve() if args.generic_detector else out / "generic_detector"
    )
    params = data_params(size, args.benchmark_seed)
    out.mkdir(parents=True, exist_ok=True)
    claim_output_dir(out, args.benchmark_seed)
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_dir), PYTHONWARNINGS="ignore")
    extra = QUICK_OPTS if args.quick else []
    start = time.time()

    names = ["synthetic", "synthetic_whiten"]
    if not (generic_dir / "model_final.pth").is_file():
        names.append("synthetic_generic")  # only to train the detector
    prepare_data(data_dir, params, names)
    detector = pretrain_detector(generic_dir, env, size, extra)
    detector_ap = generic_detection_ap(generic_dir)

    table = {
        "off_the_shelf": {
            0: evaluate(
                CONFIG / "EfficientNet-Lite0.yaml",
                out / "off_the_shelf",
                detector,
                env,
                extra + ABLATION_STORE,
            )
        }
    }
    ablation = pooling_ablation(out, detector, env, extra)
    num_classes = params["synthetic"]["num_instances"]
    for strategy in ["ft1", "ft2"]:
        table[strategy] = {
            seed: finetune(strategy, seed, out, detector, env, size, num_classes, extra)
            for seed in args.seeds
        }
    seconds = time.time() - start
    text = write_report(out, table, ablation, detector_ap, seconds, args.seeds, args.benchmark_seed)
    log(f"done in {seconds:.0f} s; report: {out / 'report.html'}\n\nmAP (%):\n{text}")


if __name__ == "__main__":
    main()
