#!/usr/bin/env python
"""A local web page for query-by-box instance search over a built index.

    serve.py --config-file CFG [--host 127.0.0.1] [--port 8000] [--build-index] [KEY VALUE ...]

Takes the same config and KEY VALUE options as ``retrieve.py``: it loads the index that
``retrieve.py index`` built for them (``--build-index`` builds it first, or finishes an interrupted
build) and serves http://HOST:PORT/: pick an image of the collection or upload one, draw a box,
choose the stages, N and M, and look at the ranked results with their located boxes. The JSON API
behind the page is documented at http://HOST:PORT/api/docs.

Binds 127.0.0.1 unless told otherwise: the page can run the model on any uploaded image and
serves every image of the collection, so expose it only where that is intended.
"""

import os  # noqa: E402  (before torch is imported: OpenMP reads it once)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import sys

from detectron2.engine import default_argument_parser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import retrieval_ext  # noqa: E402,F401  registers models and datasets
from retrieval_ext.engine.defaults import setup_cfg  # noqa: E402
from retrieval_ext.retrieval import pipeline  # noqa: E402
from retrieval_ext.retrieval.api import InstanceSearch  # noqa: E402
from retrieval_ext.retrieval.extractor import FeatureExtractor  # noqa: E402
from retrieval_ext.retrieval.index_store import IndexNotFinalizedError  # noqa: E402
from retrieval_ext.retrieval.paths import index_paths  # noqa: E402
from retrieval_ext.serving import SearchService  # noqa: E402

logger = logging.getLogger("retrieval_ext")


def get_parser():
    parser = default_argument_parser(__doc__)
    parser.usage = "serve.py --config-file CFG [options] [KEY VALUE ...]"
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument(
        "--build-index", action="store_true", help="build (or finish) the index before serving"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest accepted upload, in MiB"
    )
    parser.add_argument(
        "--max-upload-pixels",
        type=int,
        default=40_000_000,
        help="uploads with more pixels are refused before they are decoded",
    )
    return parser


def build_service(cfg, args) -> SearchService:
    if args.build_index:
        pipeline.prepare_index(cfg, FeatureExtractor(cfg), cfg.RETRIEVAL.DATASET, index_paths(cfg))
    try:
        engine = InstanceSearch(cfg)
    except IndexNotFinalizedError as e:
        raise SystemExit(
            f"{e}\nBuild it first: tools/retrieve.py index with the same --config-file and "
            "options, or add --build-index"
        ) from None
    return SearchService(
        engine,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_upload_pixels=args.max_upload_pixels,
    )


def main(args):
    import uvicorn

    from retrieval_ext.serving.app import create_app

    cfg = setup_cfg(args)
    service = build_service(cfg, args)
    app = create_app(service)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
    server = uvicorn.Server(config)
    # the address is announced once the socket is bound (port 0 picks a free one)
    logger.info(
        f"serving {service.dataset} ({len(service.image_ids)} images) - press Ctrl+C to stop"
    )
    server.run()


if __name__ == "__main__":
    main(get_parser().parse_args())
