"""Python API: load an index once, then query it with (image, box) from any thread.

:class:`InstanceSearch` (also ``retrieval_ext.InstanceSearch``) holds the model, the index and
the whitening; it extracts the query and hands it to an
:class:`~retrieval_ext.retrieval.search.IndexSearcher`, which runs the stages on stored features.

Example::

    from retrieval_ext import InstanceSearch
    engine = InstanceSearch.from_config_file("configs/synthetic/EfficientNet-Lite0.yaml",
                                             ["OUTPUT_DIR", "output/demo/off_the_shelf"])
    for hit in engine.query("query.jpg", [10, 20, 200, 180], stage="ca_sr_qe", top_k=5):
        print(hit.rank, hit.image_id, hit.score, hit.box)
"""

import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
from detectron2.config import get_cfg

from ..config import add_retrieval_config, check_device
from ..data.boxes import validate_box
from ..data.datasets.catalog import (
    get_dataset_dicts,
    get_retrieval_metadata,
    register_config_datasets,
)
from ..data.mapper import read_image
from .extractor import FeatureExtractor
from .indexing import open_index
from .learned import load_or_learn_whitening
from .paths import index_paths
from .queries import extract_queries
from .search import IndexSearcher

__all__ = ["SearchHit", "InstanceSearch"]


@dataclass
class SearchHit:
    """One ranked result.

    Attributes:
        rank: 1-based position in the ranking.
        image_id, file_name: the database image.
        score: the stage's score (cosine similarity, or class probability for CS-SR); None for
            an image the stage left unscored (after an approximate filtering's top K).
        box: (4,) XYXY box locating the object in the image's original pixels, or None when the
            stage does not locate (filtering stages, results after the reranked top N).
    """

    rank: int
    image_id: str
    file_name: str
    score: Optional[float]
    box: Optional[List[float]]


class InstanceSearch:
    """A loaded model + index + whitening, answering (image, box) queries.

    Args:
        cfg: a frozen retrieval_ext config whose ``RETRIEVAL.INDEX_DIR`` (or
            ``OUTPUT_DIR/index``) holds an index of ``RETRIEVAL.DATASET`` built with the same model;
            the whitening is the one learned beside it (see :func:`~.paths.index_paths`).

    Raises:
        DeviceUnavailableError (a ValueError): ``MODEL.DEVICE`` names a device this machine lacks.
    """

    def __init__(self, cfg):
        check_device(cfg)
        self.cfg = cfg
        register_config_datasets(cfg)
        self.extractor = FeatureExtractor(cfg)
        dataset = cfg.RETRIEVAL.DATASET
        paths = index_paths(cfg)
        self.index = open_index(paths.index_dir, self.extractor, dataset)
        whitening = load_or_learn_whitening(
            self.extractor,
            cfg.RETRIEVAL.WHITENING_DATASET,
            dataset,
            paths.work_dir,
            dim=cfg.RETRIEVAL.WHITENING_DIM,
            cfg=cfg,
        )
        self.searcher = IndexSearcher(cfg, self.index, whitening)
        if (
            self.searcher.cs_sr_classifier == "queries"
        ):  # the dataset's query objects are the classes
            queries = extract_queries(self.extractor, dataset, cache_dir=paths.cache_dir)
            classes = get_retrieval_metadata(dataset).thing_classes
            self.searcher.set_query_classes(queries, len(classes))
        files = {d["image_id"]: d["file_name"] for d in get_dataset_dicts(f"{dataset}_db")}
        self.file_names = [files.get(i, "") for i in self.index.image_ids]
        # the model is one torch module: forward passes from several threads are serialised
        self._model_lock = threading.Lock()

    @classmethod
    def from_config_file(cls, config_file: str, opts: Sequence[str] = ()):
        cfg = get_cfg()
        add_retrieval_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
        cfg.freeze()
        return cls(cfg)

    def query_record(self, image: Union[str, np.ndarray], box) -> dict:
        """Extract a query record from a file name or an array in ``cfg.INPUT.FORMAT`` order.

        A file is read as database images are (EXIF orientation applied: ``box`` is in the
        oriented frame). The box is checked against the image (see
        :mod:`retrieval_ext.data.boxes`: errors name the query and the box; a box partly outside
        is clamped).

        Raises:
            UnreadableImageError: the file cannot be read.
            InvalidBoxError (a ValueError): the box does not describe a region of the image.
        """
        where = f"query {image!r}" if isinstance(image, (str, os.PathLike)) else "query (array)"
        if isinstance(image, (str, os.PathLike)):
            image = read_image(os.fspath(image), format=self.cfg.INPUT.FORMAT)
        box = validate_box(box, np.shape(image)[:2], where)  # before waiting for the model
        with self._model_lock:
            return self.extractor.query_record_from_image(image, box, where)

    def query(
        self,
        image: Union[str, np.ndarray],
        box,
        stage: str = "ca_sr_qe",
        top_k: int = 10,
        class_id: Optional[int] = None,
        top_n: Optional[int] = None,
        qe_m: Optional[int] = None,
    ) -> List[SearchHit]:
        """Rank the database for the object inside ``box`` of ``image``.

        Args:
            image: a file name or an (H, W, 3) uint8 array in ``cfg.INPUT.FORMAT`` order.
            box: (x1, y1, x2, y2) in the image's pixels (after EXIF orientation).
            stage: one of the stages of :mod:`retrieval_ext.retrieval.stages`.
            top_k: number of hits returned (fewer when the database is smaller).
            class_id: the query object's class, for the CS-SR stages.
            top_n, qe_m: N (images reranked) and M (images averaged by query expansion) for
                this query; None = ``RETRIEVAL.TOP_N`` / ``RETRIEVAL.QE_M``.

        Returns:
            the top ``top_k`` hits, best first.
        """
        record = self.query_record(image, box)
        return self.search_record(record, stage, top_k, class_id, top_n, qe_m)

    def search_record(
        self, record: dict, stage="ca_sr_qe", top_k=10, class_id=None, top_n=None, qe_m=None
    ) -> List[SearchHit]:
        """Like :meth:`query` for an already extracted query record."""
        if int(top_k) < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        result = self.searcher.search(record, [stage], class_id, top_n, qe_m)[stage]
        return self.hits(result, top_k)

    def hits(self, result, top_k: int) -> List[SearchHit]:
        """The first ``top_k`` entries of a :class:`~.stages.StageResult` as :class:`SearchHit`."""
        out = []
        for r, (i, s, b) in enumerate(
            zip(result.order[:top_k], result.scores[:top_k], result.boxes[:top_k])
        ):
            box = [float(v) for v in b] if np.all(np.isfinite(b)) else None
            i = int(i)
            score = float(s) if np.isfinite(s) else None
            out.append(SearchHit(r + 1, self.index.image_ids[i], self.file_names[i], score, box))
        return out
