#!/usr/bin/env python
"""The main job: the paper's experiment in miniature, offline, on the embedded default.

    python tools/demo.py [--quick] [--output-dir output/demo]

1. writes the synthetic benchmark (`synthetic`), a second one with other instances that learns
   the whitening (`synthetic_whiten`, as Paris does for Oxford), and the generic detection set
   (`synthetic_generic`, object categories disjoint from the benchmark's), once;
2. trains the EfficientNet-Lite0 Faster R-CNN's RPN and box head on the generic set, once, cached
   (the stand-in for the paper's VOC/COCO pre-training; the ImageNet backbone stays frozen), and
   reports its detection AP on held-out generic images;
3. off-the-shelf: indexes the benchmark and evaluates every stage, plus the pooling ablation
   (sum vs max for filtering and for reranking) on the same index;
4. fine-tunes on the query boxes with strategies #1 (ft1) and #2 (ft2), re-indexes and evaluates
   every stage (CS-SR included) for each;
5. writes the report: the paper's table (rows: stage; columns: off-the-shelf, ft1, ft2) printed
   and saved as report.json and report.html next to the ranked-results galleries.

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
SCHEDULE = {
    # generic pre-training, ft1, ft2 iterations
    # sized for a ~20 minute run on 2 CPU cores (measured: ~1.2 s per generic iteration of
    # 4 images, ~0.25 s per ft1 and ~1 s per ft2 iteration of 2 images); the fine-tuning
    # schedules are the configs' (ft1: CS-SR 29.6 mAP at 300 iterations, 50.3 at 900)
    "full": dict(generic=150, ft1=900, ft2=450),
    "quick": dict(generic=4, ft1=3, ft2=3),
}
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


def prepare_data(data_dir: Path, size: str):
    for name, params in DATA[size].items():
        root = data_dir / name
        stamp = root / "demo_params.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == params:
            continue
        log(f"writing {name} under {root}")
        if name == "synthetic_generic":
            generate_generic_detection_set(str(root), **params)
        else:
            generate_synthetic_benchmark(str(root), **params)
        stamp.write_text(json.dumps(params))


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
                SCHEDULE[size]["generic"],
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


def write_report(out: Path, table, ablation, detector_ap, seconds):
    report = {
        "mAP": {
            s: {m: table[m].get(s, {}).get("mAP") for m in MODELS if m in table} for s in STAGES
        },
        "localisation": {
            s: {m: table[m].get(s, {}).get("mean_iou") for m in MODELS if m in table}
            for s in STAGES
            if s.endswith(("sr", "sr_qe"))
        },
        "pooling_ablation": ablation,
        "generic_detector_AP": detector_ap,
        "seconds": seconds,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))

    def fmt(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| stage | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for s in STAGES:
        lines.append(f"| {s} | " + " | ".join(fmt(report["mAP"][s].get(m)) for m in MODELS) + " |")
    lines += [
        "",
        "mean IoU of the located boxes (true positives in the top 10):",
        "",
        "| stage | " + " | ".join(MODELS) + " |",
        "|---|" + "---|" * len(MODELS),
    ]
    for s, row in report["localisation"].items():
        lines.append(f"| {s} | " + " | ".join(fmt(row.get(m)) for m in MODELS) + " |")
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

    links = "".join(
        f'<li><a href="{m}/visualization/index.html">{m}: ranked results</a></li>'
        for m in MODELS
        if (out / m / "visualization" / "index.html").is_file()
    )
    rows = "".join(
        f"<tr><td>{s}</td>"
        + "".join(f"<td>{fmt(report['mAP'][s].get(m))}</td>" for m in MODELS)
        + "</tr>"
        for s in STAGES
    )
    page = (
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
    (out / "report.html").write_text(page)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--data-dir", default="", help="default: OUTPUT_DIR/datasets")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    out = Path(args.output_dir).resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else out / "datasets"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_dir), PYTHONWARNINGS="ignore")
    extra = QUICK_OPTS if args.quick else []
    start = time.time()

    prepare_data(data_dir, size)
    detector = pretrain_detector(out / "generic_detector", env, size, extra)
    detector_ap = generic_detection_ap(out / "generic_detector")

    table = {
        "off_the_shelf": evaluate(
            CONFIG / "EfficientNet-Lite0.yaml",
            out / "off_the_shelf",
            detector,
            env,
            extra + ABLATION_STORE,
        )
    }
    ablation = pooling_ablation(out, detector, env, extra)
    num_classes = DATA[size]["synthetic"]["num_instances"]
    for strategy in ["ft1", "ft2"]:
        train_dir = out / f"{strategy}_train"
        weights = train_dir / "model_final.pth"
        if not weights.is_file():
            # retrieval is evaluated below (with the gallery), not a second time by the trainer
            run(
                [
                    sys.executable,
                    REPO / "tools" / "train_net.py",
                    "--config-file",
                    CONFIG / f"EfficientNet-Lite0_{strategy}.yaml",
                    "OUTPUT_DIR",
                    train_dir,
                    "MODEL.WEIGHTS",
                    detector,
                    "MODEL.FINETUNE.DATASET",
                    "",
                    "DATASETS.TRAIN",
                    "('synthetic_finetune',)",
                    "DATASETS.TEST",
                    "()",
                    "MODEL.ROI_HEADS.NUM_CLASSES",
                    num_classes,
                    "SOLVER.MAX_ITER",
                    SCHEDULE[size][strategy],
                    # the configs' step: the last sixth of the schedule at a tenth of the lr
                    "SOLVER.STEPS",
                    f"({SCHEDULE[size][strategy] - max(1, SCHEDULE[size][strategy] // 6)},)",
                ]
                + extra,
                env,
            )
        # the training run's saved config.yaml is the fine-tuned model's config
        table[strategy] = evaluate(train_dir / "config.yaml", out / strategy, weights, env, extra)
    text = write_report(out, table, ablation, detector_ap, time.time() - start)
    log(f"done in {time.time() - start:.0f} s; report: {out / 'report.html'}\n\nmAP (%):\n{text}")


if __name__ == "__main__":
    main()
