"""What ``index-cost`` times: the index pass against the bare backbone, and CA-SR from codes.

Extraction: for each backbone, on one image (a real photo when given, else random pixels), the
median wall time of (a) the backbone alone on the preprocessed image, (b) the index pass without
the box head (``RetrievalRCNN.inference(class_outputs=False)``, the record, and the region codes
of the default compression) and (c) the pass with the box head (the layout before this change:
class scores and boxes of every proposal). Ratios are to (a), in the same run.

CA-SR latency: ``IndexSearcher.search(q, ["ca_sr"])``'s own seconds for N reranked images of 300
proposals of 1280-d vectors, stored float32, int8, and as product-quantised codes.
"""

import time

import numpy as np

from .common import build_cfg, build_model, config_file, random_unit, write_synthetic_index

BACKBONE_CASES = [
    # (label, backbone config, extra options)
    ("EfficientNet-Lite0, dense regions", "EfficientNet-Lite0", ("DenseRegionProposals",)),
    ("EfficientNet-Lite0, RPN", "EfficientNet-Lite0", ()),
    ("R50-C4", "R50-C4", ()),
    ("R50-FPN", "R50-FPN", ()),
    ("VGG16", "VGG16", ()),
    ("ZF", "ZF", ()),
]


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _input(image_path, size: int):
    import cv2
    import torch

    if image_path:
        img = cv2.imread(str(image_path))[:, :, ::-1]
        scale = size / min(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)))
    else:
        img = np.random.default_rng(0).integers(0, 256, (size, size * 4 // 3, 3), np.uint8)
    chw = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32))
    return {"image": chw, "height": img.shape[0], "width": img.shape[1]}


def time_backbone(label, backbone, extra, image_path, size, repeats, compression, quick):
    """Times (a), (b), (c) of the module docstring for one backbone, in seconds."""
    import torch

    from retrieval_ext.retrieval.contents import IndexContents
    from retrieval_ext.retrieval.extractor import outputs_to_record

    opts = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size * 2]
    if extra:
        opts += ["MODEL.PROPOSAL_GENERATOR.NAME", extra[0]]
    cfg = build_cfg(config_file(backbone, quick), opts)
    model = build_model(cfg)
    x = _input(image_path, size)
    bare = IndexContents()
    legacy = IndexContents(
        ipa_poolings=("sum", "max"),
        ipa_dtype="float32",
        region_poolings=("sum", "max"),
        class_outputs=True,
        class_boxes=True,
        num_classes=int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        box_dtype="float32",
        objectness=True,
        ipa_normalized=False,
    )

    def backbone_only():
        with torch.no_grad():
            model.backbone(model.preprocess_image([x]).tensor)

    def index_pass():
        with torch.no_grad():
            out = model.inference([x], class_outputs=False)[0]
        rec = outputs_to_record(out, x["height"], x["width"], bare)
        if compression is not None and compression.dim(rec["rpa_max"]) == compression.pq.dim:
            compression.encode(rec["rpa_max"])

    def with_head():
        with torch.no_grad():
            out = model.inference([x])[0]
        outputs_to_record(out, x["height"], x["width"], legacy)

    with torch.no_grad():
        k = len(model.inference([x], class_outputs=False)[0]["proposals"])
    a, b, c = (_median_s(f, repeats) for f in (backbone_only, index_pass, with_head))
    return {"backbone": label, "proposals": k, "bare_s": a, "index_s": b, "head_s": c}


def time_ca_sr(tmp, compression_factory, n_values=(100, 300), proposals=300, dim=1280, queries=7):
    """Median CA-SR seconds per query for float32, int8 and product-quantised storage."""
    from retrieval_ext.retrieval.compression import RegionCompression, compress_index
    from retrieval_ext.retrieval.index_store import IndexReader
    from retrieval_ext.retrieval.search import IndexSearcher

    rng = np.random.default_rng(0)
    num_images = max(n_values)
    root = f"{tmp}/latency-float32"
    write_synthetic_index(root, rng, num_images, proposals, dim, "float32")
    ref = IndexReader(root)
    learn = random_unit(rng, 8192, dim)  # the quantiser: learned on vectors like the stored ones
    indexes = {
        "float32": ref,
        "int8": compress_index(ref, f"{tmp}/latency-int8", RegionCompression(0, 0, "int8")),
        "pq": compress_index(ref, f"{tmp}/latency-pq", compression_factory(learn)),
    }
    qs = [
        {"ipa_sum": rng.standard_normal(dim), "crop_max": v} for v in random_unit(rng, queries, dim)
    ]
    out = {}
    for name, index in indexes.items():
        for n in n_values:
            s = IndexSearcher(index, top_n=n, filter_backend="numpy")
            for q in qs[:2]:  # warm the memory map and caches
                s.search(q, ["ca_sr"])
            times = [s.search(q, ["ca_sr"])["ca_sr"].seconds for q in qs]
            out[f"{name}/{n}"] = 1000.0 * float(np.median(times))
    return out
