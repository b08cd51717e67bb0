"""What ``index-cost`` compares on a benchmark: index layouts and their bytes, side by side.

A float32 reference index of the collection (both region poolings, float32 IPA and boxes) is
built once per benchmark (kept under ``--work-dir``: a rerun reuses it); every layout compared is
derived from it by :func:`retrieval_ext.retrieval.index_convert.convert_index` (no network pass)
and searched with the same query records. Bytes per image count every file of the index folder.
"""

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from .common import build_cfg

REFERENCE_OPTS = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.WEIGHTS",
    "",
    "MODEL.PROPOSAL_GENERATOR.NAME",
    "DenseRegionProposals",
    "RETRIEVAL.INDEX_DTYPE",
    "float32",
    "RETRIEVAL.REGION_DTYPE",
    "",
    "RETRIEVAL.STORE.IPA_DTYPE",
    "float32",
    "RETRIEVAL.STORE.IPA_POOLINGS",
    "['sum', 'max']",
    "RETRIEVAL.STORE.REGION_POOLINGS",
    "['sum', 'max']",
    "RETRIEVAL.STORE.BOX_DTYPE",
    "float32",
    "RETRIEVAL.FILTER_BACKEND",
    "numpy",
]


@dataclass
class Bench:
    """One benchmark collection, its float32 reference index and query records."""

    name: str  # "synthetic" / "smvs"
    dataset: str  # registered retrieval dataset
    cfg: object
    work: Path
    reference: object = None
    queries: list = None
    whitening: object = None
    other_vectors: Optional[np.ndarray] = None  # another dataset's region vectors (rpa_max)
    other_name: str = ""
    other_sum: Optional[np.ndarray] = None  # its rpa_sum vectors (sum-pooling whitening)
    index_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def folder_bytes(root) -> int:
    """Bytes of every file under ``root``."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def prepare(bench: Bench, whiten: str, learn_whitening: bool):
    """Index (or reuse) the reference, the other dataset (for PQ learned elsewhere and region
    whitening) and extract the queries."""
    import torch

    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.indexing import build_index
    from retrieval_ext.retrieval.learned import load_or_learn_whitening
    from retrieval_ext.retrieval.queries import extract_queries

    torch.manual_seed(bench.cfg.SEED)
    ex = FeatureExtractor(bench.cfg)
    t = time.perf_counter()
    bench.reference = build_index(bench.cfg, ex, bench.dataset, str(bench.work / "index"))
    bench.index_seconds = time.perf_counter() - t
    other = build_index(bench.cfg, ex, whiten, str(bench.work / f"index-{whiten}"))
    bench.other_name = whiten
    bench.other_vectors = _vectors(other, "rpa_max")
    bench.other_sum = _vectors(other, "rpa_sum")
    if learn_whitening:
        bench.whitening = load_or_learn_whitening(
            ex, whiten, bench.dataset, str(bench.work), cfg=bench.cfg
        )
    bench.queries = extract_queries(ex, bench.dataset, cache_dir=str(bench.work))
    return ex


def _vectors(index, field_name) -> np.ndarray:
    return np.concatenate(
        [np.asarray(index.regions(i)[field_name]) for i in range(index.num_images)]
    ).astype(np.float32)


@dataclass
class Layout:
    """One index layout: what it stores and how region vectors are coded."""

    label: str
    pooling: str = "max"  # RERANK_POOLING searched with
    region_dtype: str = "float32"  # float32 / float16 / int8 / pq / legacy
    ipa_dtype: str = "float16"
    box_dtype: str = "float16"
    pq_m: int = 0
    opq: bool = False
    proposals: int = 0
    pq_source: str = "own"  # "own": a sample of the collection; "other": another dataset
    whiten_regions: bool = False  # sum-pooled region vectors PCA-whitened (issue 12.4)
    default: bool = False


def _contents(layout: Layout):
    from retrieval_ext.retrieval.contents import IndexContents

    return IndexContents(
        ipa_poolings=("sum",),
        ipa_dtype=layout.ipa_dtype,
        region_poolings=(layout.pooling,),
        box_dtype=layout.box_dtype,
    )


def _compression(bench: Bench, layout: Layout):
    from retrieval_ext.retrieval.compression import RegionCompression
    from retrieval_ext.retrieval.index_convert import learn_compression_from_index
    from retrieval_ext.retrieval.normalization import l2_normalize, learn_pca_whitening

    fields = (f"rpa_{layout.pooling}",)
    if layout.whiten_regions:
        w = learn_pca_whitening(l2_normalize(bench.other_sum))
        return RegionCompression(
            0, w.out_dim, "float32", fields, mean=w.mean, components=w.projection
        )
    if layout.region_dtype != "pq":
        if layout.region_dtype == "float32" and not layout.proposals:
            return None
        return RegionCompression(layout.proposals, 0, layout.region_dtype, fields)
    if layout.pq_source == "other":
        what = f"{len(bench.other_vectors)} region vectors of {bench.other_name}"
        return RegionCompression.learn(
            bench.other_vectors,
            layout.proposals,
            dtype="pq",
            pq_m=layout.pq_m,
            opq=layout.opq,
            trained_on=what,
            fields=fields,
        )
    comp = learn_compression_from_index(
        bench.reference, fields, "pq", layout.proposals, layout.pq_m, layout.opq
    )
    comp.fields = fields
    return comp


def _legacy_layout(bench: Bench, dest: Path, num_classes: int = 80):
    """The layout an off-the-shelf index had before this change: IPA sum and max (raw float32),
    float32 boxes, objectness, both RPA poolings int8, and the box head's 81 class scores
    (float16) and 80 class boxes (float32) per proposal. The off-the-shelf model's class outputs
    are never read (its classes are not the query objects); their bytes are written as zeros of
    their shapes, which is what they cost."""
    from retrieval_ext.retrieval.compression import COMPRESSION_FILE, RegionCompression
    from retrieval_ext.retrieval.index_store import (
        FieldSpec,
        IndexSchema,
        IndexWriter,
        default_schema,
    )
    from retrieval_ext.retrieval.normalization import l2_normalize

    ref = bench.reference
    comp = RegionCompression(0, 0, "int8")
    schema = IndexSchema(  # IPA vectors were exact float32 fields
        FieldSpec(f.name, "image", "exact", f.shape, "float32") if f.name.startswith("ipa_") else f
        for f in default_schema(class_boxes=True).fields
    )
    manifest = {k: v for k, v in ref.manifest.items() if k not in ("contents", "weights_scope")}
    manifest["region_compression"] = comp.describe()
    dest.mkdir(parents=True)
    comp.save(dest / COMPRESSION_FILE)
    with IndexWriter(dest, manifest, 256, "float16", 0, comp.schema(schema)) as w:
        for i, image_id in enumerate(ref.image_ids):
            r = ref.regions(i)
            k = len(r["boxes"])
            rec = {f: ref.image_field(i, f) for f in ("ipa_sum", "ipa_max", "height", "width")}
            rec.update({"boxes": r["boxes"], "objectness": np.zeros(k, np.float32)})
            rec["rpa_sum"], rec["rpa_max"] = l2_normalize(r["rpa_sum"]), l2_normalize(r["rpa_max"])
            rec["scores"] = np.zeros((k, num_classes + 1), np.float32)
            rec["class_boxes"] = np.zeros((k, num_classes, 4), np.float32)
            w.add(image_id, comp.compress_record(rec, schema))
    IndexWriter(dest, manifest, 256, "float16", 0, comp.schema(schema)).finalize(ref.image_ids)


def build_layout(bench: Bench, layout: Layout, dest: Path):
    """Write ``layout`` of the reference into ``dest``; returns (reader, seconds to learn)."""
    from retrieval_ext.retrieval.index_convert import convert_index
    from retrieval_ext.retrieval.index_store import IndexReader

    if dest.exists():
        shutil.rmtree(dest)
    if layout.region_dtype == "legacy":
        _legacy_layout(bench, dest)
        return IndexReader(dest), 0.0
    t = time.perf_counter()
    comp = _compression(bench, layout)
    learn_s = time.perf_counter() - t
    dtype = "float32" if layout.region_dtype == "float32" else "float16"
    manifest = {k: v for k, v in bench.reference.manifest.items() if k != "contents"}
    index = convert_index(bench.reference, dest, _contents(layout), manifest, comp, dtype)
    return index, learn_s


def measure(bench: Bench, layout: Layout, index, stages: List[str]) -> dict:
    """Search every query on ``index``; mAP / IoU per stage, bytes per image, CA-SR latency."""
    from retrieval_ext.data.datasets.catalog import get_dataset_dicts, get_retrieval_metadata
    from retrieval_ext.evaluation.evaluator import db_positions, evaluate_stages
    from retrieval_ext.retrieval.search import IndexSearcher

    searcher = IndexSearcher(
        bench.cfg, index, bench.whitening, rerank_pooling=layout.pooling, filter_backend="numpy"
    )
    results = {s: [] for s in stages}
    for q in bench.queries:
        out = searcher.search(q, stages)
        for s in stages:
            results[s].append(out[s])
    meta = get_retrieval_metadata(bench.dataset)
    positions = db_positions(index, get_dataset_dicts(f"{bench.dataset}_db"))
    scores = evaluate_stages(results, meta, positions)
    row = {"layout": layout.label, "default": layout.default}
    row["bytes_per_image"] = folder_bytes(index.root) / index.num_images
    row["fields_bytes_per_image"] = index.nbytes_per_image()["total"]
    comp = getattr(searcher, "region_compression", None)
    row["region_compression"] = comp.describe() if comp is not None else None
    for s in stages:
        row[f"{s}_mAP"] = 100.0 * scores[s]["mAP"]
        if "mean_iou" in scores[s] and scores[s]["mean_iou"] is not None:
            row[f"{s}_iou"] = 100.0 * scores[s]["mean_iou"]
    ca = [r.seconds for r in results.get("ca_sr", [])]
    row["ca_sr_ms"] = 1000.0 * float(np.median(ca)) if ca else None
    return row


def run_layouts(bench: Bench, layouts: List[Layout], stages, log: Callable[[str], None]):
    """Build and measure every layout in turn (each folder removed after it is measured)."""
    rows = []
    for k, layout in enumerate(layouts):
        dest = bench.work / "layouts" / f"{k:02d}"
        index, learn_s = build_layout(bench, layout, dest)
        row = measure(bench, layout, index, stages)
        row["learn_s"] = learn_s
        rows.append(row)
        log(
            f"  {bench.name} {layout.label}: {row['bytes_per_image']:,.0f} B/image, "
            + ", ".join(f"{s} {row[f'{s}_mAP']:.2f}" for s in stages)
        )
        shutil.rmtree(dest, ignore_errors=True)
    return rows


def register_synthetic(work: Path, num_db: int, quick: bool, seed: int = 0):
    """Generate (once) and register the synthetic benchmark of generator seed ``seed`` (0: the
    report set; another seed: a validation set) and its whitening set (seed 1000)."""
    from retrieval_ext.data import register_custom_dataset
    from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark

    name = "bench_syn" if seed == 0 else f"bench_syn_seed{seed}"
    specs = [(name, num_db, seed, 5), ("bench_syn_whiten", max(num_db // 3, 20), 1000, 1)]
    for dataset, n, set_seed, per in specs:
        root = work / "datasets" / dataset
        if not (root / "relevance.json").is_file():
            kw = {"num_instances": 3, "short_side": 96} if quick else {}
            generate_synthetic_benchmark(
                str(root), num_db=n, seed=set_seed, queries_per_instance=per, **kw
            )
        register_custom_dataset(dataset, str(root))
    return name, "bench_syn_whiten"


def synthetic_bench(
    work: Path, config: Path, num_db: int, quick: bool, opts=(), seed: int = 0
) -> Bench:
    dataset, whiten = register_synthetic(work, num_db, quick, seed)
    cfg = build_cfg(
        config, REFERENCE_OPTS + ["RETRIEVAL.DATASET", dataset] + list(opts), cost_pipeline=False
    )
    bench = Bench("synthetic", dataset, cfg, work / ("synthetic" if seed == 0 else dataset))
    bench.extra["whiten"] = whiten
    return bench


def smvs_bench(work: Path, root: str, config: Path, whiten: str, opts=()) -> Bench:
    from retrieval_ext.data import register_custom_dataset

    register_custom_dataset("bench_smvs", os.path.abspath(root))
    cfg = build_cfg(
        config,
        REFERENCE_OPTS + ["RETRIEVAL.DATASET", "bench_smvs"] + list(opts),
        cost_pipeline=False,
    )
    bench = Bench("smvs", "bench_smvs", cfg, work / ("smvs-" + Path(root).name))
    bench.extra["whiten"] = whiten
    return bench
