"""Python API: load an index once, then query it with (image, box) from any thread.

Example::

    from retrieval_ext.retrieval.api import InstanceSearch
    engine = InstanceSearch.from_config_file("configs/synthetic/EfficientNet-Lite0.yaml",
                                             ["OUTPUT_DIR", "output/demo/off_the_shelf"])
    for hit in engine.query("query.jpg", [10, 20, 200, 180], stage="ca_sr_qe", top_k=5):
        print(hit.rank, hit.image_id, hit.score, hit.box)
"""
import math
import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image

from ..config import add_retrieval_config
from .extractor import FeatureExtractor
from .pipeline import (
    build_searcher,
    get_dataset_dicts,
    load_or_learn_whitening,
    open_index,
    register_config_datasets,
)

__all__ = ["SearchHit", "InstanceSearch", "validate_box"]


@dataclass
class SearchHit:
    """One ranked result.

    Attributes:
        rank: 1-based position in the ranking.
        image_id, file_name: the database image.
        score: the stage's score (cosine similarity, or class probability for CS-SR).
        box: (4,) XYXY box locating the object in the image's original pixels, or None when the
            stage does not locate (filtering stages, results after the reranked top N).
    """

    rank: int
    image_id: str
    file_name: str
    score: float
    box: Optional[List[float]]


def validate_box(box, image_size, where: str = "query") -> List[float]:
    """Check a query box against its image and return it as 4 floats.

    Coordinates outside the image are clamped to it (documented behaviour); everything else that
    cannot describe a region raises.

    Args:
        box: (x1, y1, x2, y2) in pixels.
        image_size: (height, width) of the image.
        where: names the query in error messages.

    Raises:
        ValueError: not 4 numbers, non-finite, reversed corners, zero area, or outside the image.
    """
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: box {box!r} is not 4 numbers (x1, y1, x2, y2)") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: box {box!r} must be 4 finite numbers (x1, y1, x2, y2)")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"{where}: box {values} has reversed corners or zero area (needs x2 > x1, y2 > y1)"
        )
    h, w = image_size
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"{where}: box {values} lies outside the {w} x {h} image")
    return [cx1, cy1, cx2, cy2]


class InstanceSearch:
    """A loaded model + index + whitening, answering (image, box) queries.

    Args:
        cfg: a frozen retrieval_ext config whose ``RETRIEVAL.INDEX_DIR`` (or
            ``OUTPUT_DIR/index``) holds an index of ``RETRIEVAL.DATASET`` built with the same model.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        register_config_datasets(cfg)
        self.extractor = FeatureExtractor(cfg)
        dataset = cfg.RETRIEVAL.DATASET
        index_dir = cfg.RETRIEVAL.INDEX_DIR or os.path.join(cfg.OUTPUT_DIR, "index")
        self.index = open_index(index_dir, self.extractor, dataset)
        whitening = load_or_learn_whitening(
            self.extractor, cfg.RETRIEVAL.WHITENING_DATASET, dataset, cfg.OUTPUT_DIR,
            dim=cfg.RETRIEVAL.WHITENING_DIM,
        )
        self.searcher = build_searcher(cfg, self.index, whitening)
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
        """Extract a query record from a file name or an array in ``cfg.INPUT.FORMAT`` order."""
        where = f"query {image!r}" if isinstance(image, str) else "query"
        if isinstance(image, str):
            image = read_image(image, format=self.cfg.INPUT.FORMAT)
        box = validate_box(box, image.shape[:2], where)
        with self._model_lock:
            return self.extractor.query_record_from_image(image, box)

    def query(
        self,
        image: Union[str, np.ndarray],
        box,
        stage: str = "ca_sr_qe",
        top_k: int = 10,
        class_id: Optional[int] = None,
    ) -> List[SearchHit]:
        """Rank the database for the object inside ``box`` of ``image``.

        Args:
            image: a file name or an (H, W, 3) uint8 array in ``cfg.INPUT.FORMAT`` order.
            box: (x1, y1, x2, y2) in the image's pixels.
            stage: one of the pipeline stages (see retrieval_ext.retrieval.search).
            top_k: number of hits returned.
            class_id: the query object's class, for the CS-SR stages.

        Returns:
            the top ``top_k`` hits, best first.
        """
        record = self.query_record(image, box)
        return self.search_record(record, stage, top_k, class_id)

    def search_record(self, record: dict, stage="ca_sr_qe", top_k=10, class_id=None):
        """Like :meth:`query` for an already extracted query record."""
        result = self.searcher.search(record, [stage], class_id=class_id)[stage]
        hits = []
        for r, (i, s, b) in enumerate(
            zip(result.order[:top_k], result.scores[:top_k], result.boxes[:top_k])
        ):
            box = [float(v) for v in b] if np.all(np.isfinite(b)) else None
            i = int(i)
            hits.append(SearchHit(r + 1, self.index.image_ids[i], self.file_names[i], float(s), box))
        return hits
