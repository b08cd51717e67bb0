"""``extraction``: images/s and peak memory of one forward pass per backbone.

*Without* region features (backbone + IPA pooling: what the filtering stage needs) and *with* them
(the whole RetrievalRCNN inference: RPN, RoI pooling of the proposals, box head, RPA). Every
(backbone, mode) runs in a fresh child process (the hidden ``_extraction-worker`` subcommand) so
that peak RSS values do not mix.
"""

import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

from .common import (
    ENTRY_POINT,
    REPO_ROOT,
    add_denormals_arg,
    add_experiment_parser,
    add_threads_arg,
    build_cfg,
    build_model,
    config_file,
    fmt,
    machine_info,
    print_machine,
    print_table,
    save_results,
    set_denormals,
)

BACKBONES = ("R50-C4", "R50-FPN", "VGG16", "ZF", "EfficientNet-Lite0")
WORKER = "_extraction-worker"
PARTS = ("backbone", "rpn", "roi_pool", "box_head")
HEADERS = [
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


# ----------------------------------------------------------------------------------------------
# Memory probes (Linux /proc; getrusage where it is missing)
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


# ----------------------------------------------------------------------------------------------
# The worker: one (backbone, mode) in this process
# ----------------------------------------------------------------------------------------------
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


def _filtering_only(model, inp):
    """Backbone + IPA pooling of one image: all that the filtering stage needs."""
    from retrieval_ext.modeling.pooling import combine_levels, sum_max_pool, valid_cells

    batch = model.preprocess_image([inp])
    features = model.backbone(batch.tensor)
    pooled = []
    for name, stride in zip(model.ipa_features, model.ipa_strides):
        fmap = features[name][0]
        v = valid_cells(batch.image_sizes[0], stride, fmap.shape[-2:])
        pooled.append(sum_max_pool(fmap[:, : v[0], : v[1]]))
    return combine_levels(pooled)


def _full(model, inp):
    """The whole RetrievalRCNN inference of one image: RPN, RoI pooling, box head, RPA."""
    return model.inference([inp])[0]


def _worker_inputs(size: int, count: int):
    """``count`` random uint8 CHW images of shorter side ``size`` (3:4), as the mapper gives."""
    import torch

    height, width = size, int(round(size * 4 / 3))
    gen = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
        for _ in range(count)
    ]
    return [{"image": im, "height": height, "width": width} for im in images]


def _time_passes(run, inputs, repeats, timer):
    """One warm-up pass, then ``repeats`` timed ones.

    Returns:
        (seconds per pass, per-part totals per pass (empty without a timer), warm-up output)
    """
    seconds, parts = [], []
    out = run(inputs[0])  # warm-up: allocator pools, lazy init, page-in of weights
    for r in range(repeats):
        if timer is not None:
            timer.reset()
        t = time.perf_counter()
        run(inputs[(r + 1) % len(inputs)])
        seconds.append(time.perf_counter() - t)
        if timer is not None:
            parts.append(dict(timer.totals))
    return seconds, parts, out


def extraction_worker(args) -> dict:
    """Time one (backbone, mode) in this process; the parent prints the returned dict as JSON.

    Returns:
        dict with per-repeat ``seconds``, their median, images/s, baseline RSS (model built and
        inputs made), peak RSS during warm-up + repeats, their difference, the number of
        proposals the full inference kept, and (mode "with") per-part medians.
    """
    import torch

    torch.set_num_threads(args.threads)
    flushed = set_denormals(args.denormals)
    path = config_file(args.backbone, args.quick)
    cfg = build_cfg(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    inputs = _worker_inputs(args.size, min(args.repeats + 1, 3))
    timer = _StageTimer(_region_modules(model)) if args.mode == "with" else None
    run = functools.partial(_full if args.mode == "with" else _filtering_only, model)
    num_params = sum(p.numel() for p in model.parameters())
    baseline_kb = _current_rss_kb()
    peak_reset = _reset_peak_rss()
    with torch.no_grad():
        seconds, parts, out = _time_passes(run, inputs, args.repeats, timer)
    peak_kb = _peak_rss_kb()
    median = float(np.median(seconds))
    result = {
        "backbone": args.backbone,
        "mode": args.mode,
        "config": str(path.relative_to(REPO_ROOT)),
        "input_hw": [inputs[0]["height"], inputs[0]["width"]],
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
        "num_proposals": len(out["proposals"]) if args.mode == "with" else None,
        "pretrained_backbone": bool(
            args.backbone == "EfficientNet-Lite0" and cfg.MODEL.EFFICIENTNET.PRETRAINED
        ),
    }
    if parts:
        result["parts_median_s"] = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    return result


# ----------------------------------------------------------------------------------------------
# The parent: one worker per (backbone, mode), then the table
# ----------------------------------------------------------------------------------------------
def _run_worker(backbone, mode, args) -> dict:
    cmd = [sys.executable, str(ENTRY_POINT), WORKER, "--backbone", backbone, "--mode", mode]
    cmd += ["--size", str(args.size), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads), "--denormals", args.denormals]
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
    if proc.returncode != 0:
        raise RuntimeError(
            f"extraction worker {backbone}/{mode} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_rows(results, backbones):
    """One table row per backbone from its "without" and "with" worker results."""
    by_key = {(r["backbone"], r["mode"]): r for r in results}
    rows = []
    for b in backbones:
        w, f = by_key[(b, "without")], by_key[(b, "with")]
        parts = f.get("parts_median_s", {})
        rows.append(
            [
                b + (" (ImageNet)" if f["pretrained_backbone"] else ""),
                fmt(w["images_per_s"], 3),
                fmt(f["images_per_s"], 3),
                fmt(f["median_s"] / w["median_s"], 1),
                fmt(w["peak_delta_mb"], 0),
                fmt(f["peak_delta_mb"], 0),
                fmt(f["peak_rss_mb"], 0),
                str(f["num_proposals"]),
                " / ".join(fmt(parts.get(k, float("nan")), 2) for k in PARTS),
            ]
        )
    return rows


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
    h, w = results[0]["input_hw"]
    title = (
        f"extraction, one {h}x{w} image per pass, {args.threads} threads, median of "
        f"{args.repeats} after 1 warm-up, denormals {args.denormals}; 'without' = backbone + IPA "
        "pooling, 'with' = full "
        "RetrievalRCNN inference (RPN, RoI pooling, box head, RPA)"
    )
    print_table(table_rows(results, backbones), HEADERS, title)
    return save_results(args, "extraction", info, results=results)


def register(subparsers):
    """The ``extraction`` subcommand and its hidden per-process worker."""
    p = add_experiment_parser(
        subparsers, "extraction", "images/s and peak memory per backbone", cmd_extraction
    )
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=BACKBONES,
        default=None,
        help="default: all (quick: EfficientNet-Lite0)",
    )
    p.add_argument("--size", type=int, default=600, help="shorter side; images are 3:4")
    p.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up")
    add_threads_arg(p)
    add_denormals_arg(p)

    p = subparsers.add_parser(WORKER)  # no help: left out of --help's list
    p.add_argument("--backbone", choices=BACKBONES, required=True)
    p.add_argument("--mode", choices=("with", "without"), required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    add_denormals_arg(p)
    p.set_defaults(func=lambda a: print(json.dumps(extraction_worker(a))))
