"""What every benchmark experiment shares: machine probes, tables, JSON, configs, models, data.

Nothing here measures anything by itself; the experiments (one module each) call these helpers so
that every subcommand prints the same ``machine:`` line, GitHub-markdown tables and a
``<name>.json`` under ``--output-dir``.
"""

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
ENTRY_POINT = REPO_ROOT / "tools" / "benchmark.py"
MB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------------------------
# Machine and output
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_threads() -> int:
    """Cores this process may run on (its affinity mask), the default ``--threads``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU model, core counts, load and library versions of this machine."""
    import torch

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": default_threads(),
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
    """A GitHub-markdown table of strings (numbers are formatted by the caller)."""
    from tabulate import tabulate

    if title:
        print(f"\n{title}")
    print(tabulate(rows, headers=headers, tablefmt="github", floatfmt="", disable_numparse=True))


def write_json(output_dir: str, name: str, data: dict) -> str:
    """Write ``data`` to ``<output_dir>/<name>.json`` (strict JSON: NaN / Infinity refused)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}.json")
    text = json.dumps(data, indent=2, allow_nan=False)
    with open(path, "w") as f:
        f.write(text)
    print(f"\nwrote {path}")
    return path


def save_results(args, name: str, machine: dict, **results) -> dict:
    """Write an experiment's ``<args.output_dir>/<name>.json``: the machine it ran on, its
    arguments, then ``results`` (keys in the order given); returns what was written."""
    data = {"machine": machine, "args": jsonable_args(args), **results}
    write_json(args.output_dir, name, data)
    return data


def fmt(x, digits=2) -> str:
    return f"{x:.{digits}f}"


def jsonable_args(args) -> dict:
    """The parsed arguments as written to every JSON (without the dispatch function)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def median_ms(fn, reps) -> float:
    """Median wall time of ``reps`` calls of ``fn()``, in milliseconds."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(ts))


def time_rank(rank, queries, db, top_k=None):
    """Wall time of ``rank(q, db, top_k)`` for each query, in seconds."""
    seconds = []
    for q in queries:
        t = time.perf_counter()
        rank(q, db, top_k=top_k)
        seconds.append(time.perf_counter() - t)
    return seconds


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_experiment_parser(subparsers, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand with the options every experiment has (--output-dir, --quick, --seed)."""
    p = subparsers.add_parser(name, help=help)
    p.add_argument("--output-dir", default="output/benchmark", help="where <name>.json goes")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=func)
    return p


def add_threads_arg(p):
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads")


def add_denormals_arg(p):
    p.add_argument(
        "--denormals",
        choices=("flush", "keep"),
        default="keep",
        help="'flush': denormal floats to zero (random weights can make them); 'keep' (default): "
        "as the pipeline runs",
    )


def set_denormals(mode: str) -> bool:
    """Flush denormal floats to zero if ``mode == "flush"``; returns whether they are flushed.

    Random weights (and eval-mode BatchNorm with default statistics) can shrink activations into
    the denormal range, where x86 arithmetic is many times slower: a cost trained weights do not
    have. The default keeps them, as the pipeline runs; "flush" checks that a random-weight
    measurement is not inflated by them.
    """
    import torch

    return bool(torch.set_flush_denormal(mode == "flush"))


# ----------------------------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------------------------
def config_file(backbone: str, quick: bool) -> Path:
    """The backbone's base config, or its tiny CPU config under ``--quick``."""
    if quick:
        return CONFIGS / "quick_schedules" / f"{backbone}-tiny.yaml"
    return CONFIGS / f"Base-{backbone}.yaml"


# The cost experiments measure K proposals of the (tamed, random) RPN per image and queries
# extracted at one size, as BENCHMARKS.md reports them; the offline default's dense regions and
# multi-size queries are measured on real photos by ``benchmark.py real``.
COST_PIPELINE_OPTS = ("MODEL.PROPOSAL_GENERATOR.NAME", "RPN", "RETRIEVAL.QUERY_SCALES", "[]")


def build_cfg(path: Path, opts=(), cost_pipeline: bool = True):
    """A frozen retrieval_ext config: ``path`` merged with :data:`COST_PIPELINE_OPTS` (unless
    ``cost_pipeline`` is False: the config's own proposals and query sizes), then with ``opts``
    (flat key/value list)."""
    from detectron2.config import get_cfg

    from retrieval_ext.config import add_retrieval_config

    cfg = get_cfg()
    add_retrieval_config(cfg)
    cfg.merge_from_file(str(path))
    pinned = COST_PIPELINE_OPTS if cost_pipeline else ()
    cfg.merge_from_list([str(x) for x in pinned + tuple(opts)])
    cfg.freeze()
    return cfg


def build_model(cfg, seed: int = 0):
    """Eval-mode model from ``cfg`` (random weights unless the backbone loads its own), tamed RPN.

    With random RPN weights the predicted box deltas throw proposals outside the image, so they
    are zeroed (as tests/common.py's ``tame_rpn`` does): proposals are then anchors and every
    image keeps its full NUM_PROPOSALS, which is the cost being measured.
    """
    import torch
    from detectron2.modeling import build_model as build_detectron2_model

    import retrieval_ext  # noqa: F401  registers models and datasets

    torch.manual_seed(seed)
    model = build_detectron2_model(cfg)
    head = getattr(model.proposal_generator, "rpn_head", None)  # DenseRegionProposals: none
    if head is not None:
        torch.nn.init.zeros_(head.anchor_deltas.weight)
        torch.nn.init.zeros_(head.anchor_deltas.bias)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------
def random_unit(rng, n, dim, block=65536):
    """(n, dim) float32 rows uniformly on the unit sphere, made block by block (bounded memory)."""
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + len(x)] = x
    return out


def write_synthetic_index(root, rng, num_images, num_proposals, dim, dtype):
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
                "rpa_max": random_unit(rng, num_proposals, dim),
                "scores": np.full((num_proposals, 2), 0.5, dtype=np.float32),
            },
        )
    writer.finalize(ids)


@contextlib.contextmanager
def synthetic_datasets(tmp, specs, num_instances, queries_per_instance, short_side):
    """Generate and register synthetic benchmarks for the duration of a ``with`` block.

    Args:
        tmp: folder that receives one ``<name>/`` per dataset.
        specs: ``(name, num_db, seed)`` per dataset; ``name_db`` / ``name_query`` are registered.
        num_instances, queries_per_instance, short_side: as ``generate_synthetic_benchmark``.
    """
    from retrieval_ext.data import register_custom_dataset
    from retrieval_ext.data.datasets import unregister_retrieval_dataset
    from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark

    registered = []
    try:
        for name, num_db, seed in specs:
            root = os.path.join(tmp, name)
            generate_synthetic_benchmark(
                root,
                num_instances=num_instances,
                queries_per_instance=queries_per_instance,
                num_db=num_db,
                short_side=short_side,
                seed=seed,
            )
            register_custom_dataset(name, root)
            registered.append(name)
        yield
    finally:
        for name in registered:
            unregister_retrieval_dataset(name)
