"""``limits``: the CPU's sgemm rate and memory bandwidth, and how close extraction (the
EfficientNet-Lite0 backbone) and exact search come to them, measured in the same run."""

import numpy as np

from .common import (
    add_experiment_parser,
    add_threads_arg,
    build_cfg,
    build_model,
    config_file,
    machine_info,
    median_ms,
    print_machine,
    print_table,
    random_unit,
    save_results,
)


def _machine_rates(args):
    """numpy sgemm GFLOP/s on ``--gemm`` squares; copy and sum GB/s on ``--copy-mb`` arrays."""
    n = args.gemm
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    gemm_s = median_ms(lambda: a @ a, args.repeats + 2) / 1000
    x = np.ones(args.copy_mb * (1 << 20) // 4, np.float32)
    y = np.empty_like(x)
    copy_s = median_ms(lambda: np.copyto(y, x), args.repeats + 2) / 1000
    sum_s = median_ms(lambda: x.sum(), args.repeats + 2) / 1000
    return {
        "sgemm_gflops": 2 * n**3 / gemm_s / 1e9,
        "copy_gbs": 2 * x.nbytes / copy_s / 1e9,
        "sum_gbs": x.nbytes / sum_s / 1e9,
    }


def _backbone_rate(args):
    """FLOPs (fvcore, one multiply-add = 2) and median time of the EfficientNet-Lite0 backbone
    on one ``size`` x ``4 size / 3`` image.

    Returns:
        (flops, seconds, (h, w))
    """
    import torch
    from fvcore.nn import FlopCountAnalysis

    cfg = build_cfg(config_file("EfficientNet-Lite0", args.quick), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    h, w = args.size, args.size * 4 // 3
    img = torch.rand(1, 3, h, w) * 255
    with torch.no_grad():
        flops = FlopCountAnalysis(model.backbone, (img,))
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        bb_flops = 2 * flops.total()  # fvcore counts one multiply-add as one flop
        model.backbone(img)
        bb_s = median_ms(lambda: model.backbone(img), args.repeats) / 1000
    return bb_flops, bb_s, (h, w)


def _search_seconds(args):
    """Median time of an exact faiss top-100 search on ``--search-db`` x 1280 float32 rows.

    Returns:
        (seconds, bytes scanned per query)
    """
    from retrieval_ext.retrieval.faiss_search import FaissFilter, FaissParams

    rng = np.random.default_rng(1)
    db = random_unit(rng, args.search_db, 1280)
    flat = FaissFilter(db, FaissParams("flat", use_gpu=False))
    q = db[0]
    return median_ms(lambda: flat.search(q, 100), args.repeats + 4) / 1000, db.nbytes


def _report(args, res):
    n, (h, w) = args.gemm, res["image"]
    bb_flops, bb_s = res["backbone_gflop_per_image"] * 1e9, res["backbone_s"]
    rows = [
        ["sgemm (numpy, %dx%d)" % (n, n), f"{res['sgemm_gflops']:.1f} GFLOP/s", "", ""],
        ["memory: copy (read + write)", f"{res['copy_gbs']:.1f} GB/s", "", ""],
        ["memory: sum (read)", f"{res['sum_gbs']:.1f} GB/s", "", ""],
        [
            f"EfficientNet-Lite0 backbone {h}x{w}",
            f"{res['backbone_gflops']:.1f} GFLOP/s",
            f"{bb_flops / 1e9:.2f} GFLOP in {1000 * bb_s:.0f} ms",
            f"{100 * res['backbone_gflops'] / res['sgemm_gflops']:.0f}% of sgemm",
        ],
        [
            f"exact search, {args.search_db:,} x 1280 float32",
            f"{res['search_gbs']:.1f} GB/s",
            f"{res['search_bytes'] / 1e6:.0f} MB in {1000 * res['search_s']:.1f} ms",
            f"{100 * res['search_gbs'] / res['sum_gbs']:.0f}% of sum bandwidth",
        ],
    ]
    print_table(
        rows,
        ["what", "rate", "work", "vs the limit"],
        title="machine limits and how close the pipeline comes (medians, same run)",
    )


def cmd_limits(args) -> dict:
    import torch

    if args.quick:
        args.gemm, args.copy_mb, args.search_db, args.size, args.repeats = 256, 16, 2000, 96, 1
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)
    res = _machine_rates(args)  # its 2 x copy_mb arrays are freed before the model is built
    bb_flops, bb_s, image = _backbone_rate(args)
    search_s, scanned = _search_seconds(args)
    res.update(
        {
            "backbone_gflop_per_image": bb_flops / 1e9,
            "backbone_s": bb_s,
            "backbone_gflops": bb_flops / bb_s / 1e9,
            "search_db": args.search_db,
            "search_bytes": scanned,
            "search_s": search_s,
            "search_gbs": scanned / search_s / 1e9,
            "image": list(image),
        }
    )
    _report(args, res)
    return save_results(args, "limits", info, results=res)


def register(subparsers):
    p = add_experiment_parser(
        subparsers, "limits", "sgemm GFLOP/s, memory GB/s, and how close we come", cmd_limits
    )
    p.add_argument("--gemm", type=int, default=2048, help="square sgemm size")
    p.add_argument("--copy-mb", type=int, default=512, help="array size of the bandwidth test")
    p.add_argument("--search-db", type=int, default=100000, help="exact-search database rows")
    p.add_argument("--size", type=int, default=600, help="backbone input shorter side")
    p.add_argument("--repeats", type=int, default=3)
    add_threads_arg(p)
