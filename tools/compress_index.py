#!/usr/bin/env python
"""Convert an existing index to what a config stores, without extracting the images again.

    compress_index.py --config-file CFG [--index-dir DIR] [--output DIR] [KEY VALUE ...]

Reads the index of the config (``RETRIEVAL.INDEX_DIR`` or ``OUTPUT_DIR/index``; ``--index-dir``
to name another), checks that it was built by the config's model, and writes the fields the
config's stages read (``RETRIEVAL.STORE.*``) with its region compression (``RETRIEVAL.REGION_*``;
a product quantiser is learned on a sample of the index's own region vectors). Without
``--output`` the new index replaces the old one, which is kept as ``<index>.before-conversion``
until you delete it. Indexes written before the index recorded its contents (every field, int8
region vectors in ``region_compression.npz``) convert this way to the compact layout.
"""

import os  # noqa: E402  (before torch is imported: OpenMP reads it once)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import shutil
import sys
from dataclasses import replace

from detectron2.engine import default_argument_parser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import retrieval_ext  # noqa: E402,F401  registers models and datasets
from retrieval_ext.engine.defaults import setup_cfg  # noqa: E402
from retrieval_ext.retrieval.extractor import FeatureExtractor  # noqa: E402
from retrieval_ext.retrieval.index_convert import (  # noqa: E402
    convert_index,
    learn_compression_from_index,
    region_vectors_sample,
)
from retrieval_ext.retrieval.index_store import IndexReader  # noqa: E402
from retrieval_ext.retrieval.index_weights import (  # noqa: E402
    WEIGHTS_KEY,
    adopt_index_weights,
    weights_record,
)
from retrieval_ext.retrieval.indexing import check_index_model, index_manifest  # noqa: E402
from retrieval_ext.retrieval.learned import region_whitening_of  # noqa: E402
from retrieval_ext.retrieval.paths import index_paths  # noqa: E402
from retrieval_ext.retrieval.pipeline import region_compression, region_whitening  # noqa: E402

logger = logging.getLogger("retrieval_ext")


def get_parser():
    parser = default_argument_parser(__doc__)
    parser.usage = (
        "compress_index.py --config-file CFG [--index-dir DIR] [--output DIR] [KEY VALUE]"
    )
    parser.add_argument("--index-dir", default="", help="the index to convert (default: CFG's)")
    parser.add_argument("--output", default="", help="write the new index here (default: replace)")
    return parser


def _whitening(cfg, extractor, source, dataset, work_dir):
    """The config's region whitening; one learned on the collection itself is learned on a
    sample of the source index's stored region vectors (no network pass)."""
    w = cfg.RETRIEVAL.REGION_WHITENING
    if w.SOURCE != "collection":
        return region_whitening(cfg, extractor, dataset, work_dir)
    field = f"rpa_{cfg.RETRIEVAL.RERANK_POOLING}"
    vecs = region_vectors_sample(source, [field], cfg.RETRIEVAL.REGION_PQ.SAMPLE_IMAGES)
    what = f"{len(vecs)} {field} vectors of the index {source.root}"
    return region_whitening_of(vecs, w.DIM, w.EPS, w.MIN_VECTORS, what)


def _compression(cfg, extractor, source, dataset, work_dir):
    """The config's region compression; a product quantiser (and a whitening) of the collection
    itself is learned on the source index's stored vectors (no network pass)."""
    r = cfg.RETRIEVAL
    if r.REGION_WHITENING.SOURCE and r.REGION_PCA_DIM:
        return region_compression(cfg, extractor, dataset, work_dir)  # refuses the pair
    whitening = _whitening(cfg, extractor, source, dataset, work_dir)
    if (r.REGION_DTYPE or "") == "pq" and not r.REGION_PQ.DATASET and not r.REGION_PCA_DIM:
        fields = [f"rpa_{p}" for p in extractor.contents.region_poolings]
        learned = learn_compression_from_index(
            source,
            fields,
            "pq",
            r.REGION_NUM_PROPOSALS,
            r.REGION_PQ.M,
            r.REGION_PQ.OPQ,
            r.REGION_PQ.SAMPLE_IMAGES,
        )
        return replace(learned, whitening=whitening)
    return region_compression(cfg, extractor, dataset, work_dir, whitening)


def convert(cfg, index_dir: str = "", output: str = "") -> str:
    """Convert the config's index (see the module docstring); returns the new index's folder."""
    dataset = cfg.RETRIEVAL.DATASET
    paths = index_paths(cfg)
    source_dir = index_dir or paths.index_dir
    extractor = FeatureExtractor(cfg)
    adopt_index_weights(extractor, source_dir)
    source = IndexReader(source_dir)
    check_index_model(source, extractor, dataset)
    work_dir = os.path.dirname(os.path.abspath(source_dir))
    manifest = index_manifest(extractor, dataset)
    manifest[WEIGHTS_KEY] = weights_record(extractor, work_dir)
    compression = _compression(cfg, extractor, source, dataset, work_dir)
    dest = output or source_dir.rstrip("/") + ".converting"
    if not output and os.path.exists(dest):
        shutil.rmtree(dest)  # left by an interrupted conversion
    new = convert_index(
        source, dest, extractor.contents, manifest, compression, cfg.RETRIEVAL.INDEX_DTYPE
    )
    before, after = source.nbytes_per_image()["total"], new.nbytes_per_image()["total"]
    logger.info(f"converted {source_dir}: {before:,.0f} -> {after:,.0f} bytes per image")
    if output:
        return output
    kept = source_dir.rstrip("/") + ".before-conversion"
    os.replace(source_dir, kept)
    os.replace(dest, source_dir)
    logger.info(f"the index before conversion is kept in {kept}; delete it once satisfied")
    return source_dir


def main(args):
    cfg = setup_cfg(args)
    return convert(cfg, args.index_dir, args.output)


if __name__ == "__main__":
    main(get_parser().parse_args())
