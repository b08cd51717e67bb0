"""What the browser UI needs from a loaded index, with no web framework in it.

:class:`SearchService` wraps an :class:`~retrieval_ext.retrieval.api.InstanceSearch` and adds the
catalogue the page browses (database images by index position, the dataset's own queries,
uploads), image serving, and the ground truth of a query when the dataset has one.

Images are addressed as ``(source, id)`` pairs, never by path:

- ``("db", i)``: the i-th image of the loaded index (0 <= i < number of indexed images);
- ``("query", q)``: the dataset's q-th query image (``NAME_query``);
- ``("upload", token)``: an image uploaded in this process, kept in memory (a bounded LRU).

Every file the service opens is therefore a file name of the loaded dataset; nothing a request
carries is ever joined to a path.

Ground truth: a query has judgements when its box marks an annotated object (IoU >= 0.5 with it):
a dataset query's own box, or, when the dataset's judgements carry database boxes (custom and
synthetic sets), an object's box in a database image. The judgements are then those of the
dataset's queries of that object, scored with the dataset's own protocol.
"""

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..data.boxes import InvalidBoxError, validate_box
from ..data.datasets.catalog import get_dataset_dicts, get_retrieval_metadata
from ..data.datasets.common import image_size
from ..data.mapper import read_image, read_image_bytes
from ..evaluation import metrics
from ..evaluation.evaluator import db_positions
from ..evaluation.relevance import num_relevant, query_average_precision, relevance_labels
from ..retrieval.pipeline import available_stages
from ..retrieval.stages import CS_STAGES, STAGES
from ..retrieval.stages import stage_chain as search_stage_chain

__all__ = [
    "ImageNotFound",
    "RequestError",
    "SearchService",
    "UploadTooLarge",
    "stage_chain",
]

logger = logging.getLogger("retrieval_ext")

SOURCES = ("db", "query", "upload")
# IoU above which a drawn box is taken to mark an annotated object (the PASCAL criterion)
GT_IOU = 0.5
JPEG_QUALITY = 88


class RequestError(ValueError):
    """A request the service refuses; the message says which field is wrong and why."""


class ImageNotFound(LookupError):
    """No image has this (source, id) in the loaded index, its queries or the uploads."""


class UploadTooLarge(RequestError):
    """An upload over the byte limit."""


def stage_chain(stage: str) -> Tuple[str, ...]:
    """The stages ``stage`` builds on, ending with ``stage`` itself: a search reports the
    latency and AP of each (see :func:`retrieval_ext.retrieval.stages.stage_chain`)."""
    if stage not in STAGES:
        raise RequestError(f"stage: unknown stage {stage!r}; choose from {list(STAGES)}")
    return search_stage_chain(stage)


@dataclass
class _GroundTruth:
    object_name: str
    how: str  # "query" (a dataset query's box) or "annotation" (a database box)
    gnd: dict


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    return float(metrics.box_iou(np.asarray([a], np.float64), np.asarray([b], np.float64))[0, 0])


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise RequestError(f"{name}: expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise RequestError(f"{name}: expected an integer, got {value!r}") from None


class SearchService:
    """The UI's view of one loaded index. Thread-safe.

    Args:
        engine: a loaded :class:`~retrieval_ext.retrieval.api.InstanceSearch`.
        max_upload_bytes: uploads larger than this are refused.
        max_upload_pixels: uploads with more pixels than this are refused before decoding.
        max_uploads: uploads kept in memory; the least recently used is dropped beyond it.
        max_top_k: most results one search may return.
    """

    def __init__(
        self,
        engine,
        max_upload_bytes: int = 20 * 2**20,
        max_upload_pixels: int = 40_000_000,
        max_uploads: int = 32,
        max_top_k: int = 500,
    ):
        self.engine = engine
        cfg = engine.cfg
        self.dataset = cfg.RETRIEVAL.DATASET
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_upload_pixels = int(max_upload_pixels)
        self.max_uploads = int(max_uploads)
        self.max_top_k = int(max_top_k)
        self.format = cfg.INPUT.FORMAT
        index = engine.index
        self.image_ids: List[str] = list(index.image_ids)
        self.db_files: List[str] = list(engine.file_names)
        self.queries = get_dataset_dicts(f"{self.dataset}_query")
        self.metadata = get_retrieval_metadata(self.dataset)
        self.gnd = getattr(self.metadata, "gnd", None)
        db_dicts = get_dataset_dicts(f"{self.dataset}_db")
        self.positions = db_positions(index, db_dicts)  # index position -> dataset db_index
        self.default_top_n = int(engine.searcher.top_n)
        self.default_qe_m = int(engine.searcher.qe_m)
        self.class_names = list(getattr(self.metadata, "thing_classes", []) or [])
        # the stages the index stores the fields for; CS-SR only where the stored class scores
        # are the query objects' (a fine-tuned model)
        supported = engine.searcher.supported_stages
        self._stages = available_stages(engine.searcher, supported, len(self.class_names))
        self._uploads: "OrderedDict[str, Tuple[np.ndarray, str]]" = OrderedDict()
        self._lock = threading.Lock()
        self._encoded = lru_cache(maxsize=2048)(self._encode_file)
        self._size_of_file = lru_cache(maxsize=65536)(image_size)

    # -- catalogue -------------------------------------------------------------------------------
    def stages(self) -> List[str]:
        """Stages this index can run (CS-SR only with a detector fine-tuned on the objects)."""
        return list(self._stages)

    def info(self) -> dict:
        return {
            "dataset": self.dataset,
            "num_images": len(self.image_ids),
            "num_queries": len(self.queries),
            "stages": self.stages(),
            "default_stage": "ca_sr_qe",
            "top_n": self.default_top_n,
            "qe_m": self.default_qe_m,
            "max_top_k": self.max_top_k,
            "class_names": self.class_names if "cs_sr" in self._stages else [],
            "has_ground_truth": self.gnd is not None,
            "max_upload_bytes": self.max_upload_bytes,
        }

    def size(self, source: str, ident) -> Tuple[int, int]:
        """(width, height) of an image in the frame its boxes are in (EXIF-oriented)."""
        if source == "upload":
            h, w = self.image_array(source, ident).shape[:2]
            return int(w), int(h)
        try:
            h, w = self._size_of_file(self._file_of(source, ident))
        except OSError:  # changed on disk since indexing: the page shows it without a box
            return 0, 0
        return int(w), int(h)

    def list_images(self, source: str, text: str = "", offset: int = 0, limit: int = 60) -> dict:
        """Images of ``source`` ("db" or "query") whose id contains ``text`` (case-insensitive).

        Returns:
            {"total": matches, "items": [{"source", "id", "image_id", "width", "height", "box"
            (queries only), "object" (queries only)}] from ``offset``, at most ``limit``}.
        """
        offset, limit = _as_int(offset, "offset"), _as_int(limit, "limit")
        if offset < 0 or not 1 <= limit <= 1000:
            raise RequestError(f"offset must be >= 0 and limit in [1, 1000], got {offset}, {limit}")
        needle = str(text).strip().lower()
        if source == "db":
            items = [
                {"source": "db", "id": i, "image_id": image_id}
                for i, image_id in enumerate(self.image_ids)
                if needle in image_id.lower()
            ]
        elif source == "query":
            items = [
                {
                    "source": "query",
                    "id": q,
                    "image_id": d["image_id"],
                    "box": [float(v) for v in d["query_box"]],
                    "object": d.get("object_name", ""),
                }
                for q, d in enumerate(self.queries)
                if needle in d["image_id"].lower() or needle in d.get("object_name", "").lower()
            ]
        else:
            raise RequestError(f"source: expected 'db' or 'query', got {source!r}")
        page = items[offset : offset + limit]
        for item in page:
            item["width"], item["height"] = self.size(source, item["id"])
        return {"total": len(items), "items": page}

    def _file_of(self, source: str, ident) -> str:
        if source == "db":
            i = _as_int(ident, "id")
            if not 0 <= i < len(self.db_files):
                raise ImageNotFound(
                    f"no database image {ident} (the index has {len(self.db_files)})"
                )
            return self.db_files[i]
        if source == "query":
            q = _as_int(ident, "id")
            if not 0 <= q < len(self.queries):
                raise ImageNotFound(f"no query {ident} (the dataset has {len(self.queries)})")
            return self.queries[q]["file_name"]
        raise ImageNotFound(f"no image source {source!r}; choose from {list(SOURCES)}")

    def image_array(self, source: str, ident) -> np.ndarray:
        """(H, W, 3) uint8 in ``INPUT.FORMAT`` order, EXIF-oriented (the frame boxes are in)."""
        if source == "upload":
            with self._lock:
                entry = self._uploads.get(str(ident))
                if entry is None:
                    raise ImageNotFound(f"no upload {ident!r} (uploads are kept in memory only)")
                self._uploads.move_to_end(str(ident))
            return entry[0]
        return read_image(self._file_of(source, ident), format=self.format)

    def image_jpeg(self, source: str, ident, max_side: int = 0) -> bytes:
        """The image as JPEG, shrunk to ``max_side`` pixels on its longer side if > 0."""
        max_side = _as_int(max_side, "size")
        if not 0 <= max_side <= 4096:
            raise RequestError(f"size must be in [0, 4096], got {max_side}")
        if source == "upload":
            return self._encode(self.image_array(source, ident), max_side)
        return self._encoded(self._file_of(source, ident), max_side)

    def _encode_file(self, file_name: str, max_side: int) -> bytes:
        return self._encode(read_image(file_name, format=self.format), max_side)

    def _encode(self, image: np.ndarray, max_side: int) -> bytes:
        h, w = image.shape[:2]
        if max_side and max(h, w) > max_side:
            s = max_side / max(h, w)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        bgr = image if self.format == "BGR" else np.ascontiguousarray(image[..., ::-1])
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:  # pragma: no cover - cv2 encodes any uint8 image
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()

    # -- uploads ---------------------------------------------------------------------------------
    def add_upload(self, data: bytes, name: str = "upload") -> dict:
        """Decode and keep an uploaded image. Returns {"source", "id", "width", "height"}.

        Raises:
            UploadTooLarge: more than ``max_upload_bytes``.
            UnreadableImageError: empty, not an image, truncated or corrupt, or too many pixels.
        """
        if len(data) > self.max_upload_bytes:
            raise UploadTooLarge(
                f"upload {name!r}: {len(data)} bytes is more than the {self.max_upload_bytes} "
                "allowed"
            )
        image = read_image_bytes(data, f"upload {name!r}", self.format, self.max_upload_pixels)
        token = secrets.token_hex(8)
        with self._lock:
            self._uploads[token] = (image, name)
            while len(self._uploads) > self.max_uploads:
                self._uploads.popitem(last=False)
        h, w = image.shape[:2]
        return {"source": "upload", "id": token, "width": int(w), "height": int(h)}

    # -- ground truth ----------------------------------------------------------------------------
    def ground_truth(self, source: str, ident, box) -> Optional[_GroundTruth]:
        """The judgements that apply to a query (see the module docstring), or None."""
        if self.gnd is None or source == "upload":
            return None
        if source == "query":
            q = int(ident)
            if _iou(box, self.queries[q]["query_box"]) >= GT_IOU:
                return _GroundTruth(self.queries[q].get("object_name", ""), "query", self.gnd[q])
            return None
        db_index = int(self.positions[int(ident)])
        best, best_iou = None, GT_IOU
        for q, g in enumerate(self.gnd):
            for b in g.get("boxes", {}).get(db_index, []):
                iou = _iou(box, b)
                if iou >= best_iou:
                    best, best_iou = q, iou
        if best is None:
            return None
        return _GroundTruth(self.queries[best].get("object_name", ""), "annotation", self.gnd[best])

    def _judge(self, gt: _GroundTruth, order: np.ndarray) -> Tuple[float, np.ndarray]:
        """AP of a ranking (index positions) and a label per entry: 1 relevant, 0 not, -1 junk."""
        ranking = self.positions[order]
        ap = query_average_precision(self.metadata, gt.gnd, ranking)
        return ap, relevance_labels(self.metadata, gt.gnd, ranking)

    # -- search ----------------------------------------------------------------------------------
    def search(
        self,
        source: str,
        ident,
        box,
        stage: str = "ca_sr_qe",
        top_n: Optional[int] = None,
        qe_m: Optional[int] = None,
        top_k: int = 24,
        class_id: Optional[int] = None,
    ) -> dict:
        """Extract the query and run ``stage`` with the stages it builds on.

        Args:
            source, ident: the query image (see the module docstring).
            box: (x1, y1, x2, y2) in the image's pixels (EXIF-oriented frame).
            stage: the final stage; its ranking is returned.
            top_n, qe_m: N and M for this search (None: the config's).
            top_k: results returned.
            class_id: the query object's class for CS-SR stages (index into ``class_names``).

        Returns:
            {"stage", "box" (as validated), "results": [{"rank", "id", "image_id", "score" (None
            when the stage did not score the image: after ``RETRIEVAL.FILTER_TOP_K``),
            "box" (XYXY image pixels or None), "width", "height" (the image's, the frame of
            its box), "relevant" (1/0/-1, None without ground
            truth)}], "latency_ms": {"extraction": ..., stage: ... for the chain},
            "ap": {stage: AP} or None, "ground_truth": {"object", "how", "num_relevant"} or
            None, "top_n", "qe_m"}.
        """
        chain = stage_chain(stage)
        top_k, n, m, class_id = self._search_settings(stage, top_k, top_n, qe_m, class_id)
        box, record, extraction = self._query_record(source, ident, box)
        results = self.engine.searcher.search(record, chain, class_id, n, m)
        gt = self.ground_truth(source, ident, box)
        ap, labels = self._ap_and_labels(gt, chain, results, stage)
        latency = {"extraction": extraction * 1e3}
        latency.update({s: results[s].seconds * 1e3 for s in chain})
        ground_truth = None
        if gt is not None:
            ground_truth = {
                "object": gt.object_name,
                "how": gt.how,
                "num_relevant": num_relevant(self.metadata, gt.gnd),
            }
        return {
            "stage": stage,
            "box": [float(v) for v in box],
            "top_n": n,
            "qe_m": m,
            "results": self._result_rows(results[stage], top_k, labels),
            "latency_ms": latency,
            "ap": ap,
            "ground_truth": ground_truth,
        }

    def _search_settings(self, stage, top_k, top_n, qe_m, class_id):
        """(top_k, N, M, class_id) of a search, checked; None N and M are the config's."""
        if stage not in self.stages():
            raise RequestError(
                f"stage: {stage!r} needs a detector fine-tuned on the query objects; this index "
                f"offers {self.stages()}"
            )
        top_k = _as_int(top_k, "top_k")
        if not 1 <= top_k <= self.max_top_k:
            raise RequestError(f"top_k must be in [1, {self.max_top_k}], got {top_k}")
        n = self.default_top_n if top_n is None else _as_int(top_n, "top_n")
        m = self.default_qe_m if qe_m is None else _as_int(qe_m, "qe_m")
        if not 0 <= n <= len(self.image_ids) or not 1 <= m <= max(1, len(self.image_ids)):
            raise RequestError(
                f"N must be in [0, {len(self.image_ids)}] and M in [1, {len(self.image_ids)}], "
                f"got N={n}, M={m}"
            )
        if stage in CS_STAGES:
            if class_id is None:
                raise RequestError(f"class_id: {stage} needs the query object's class")
            class_id = _as_int(class_id, "class_id")
            if not 0 <= class_id < len(self.class_names):
                raise RequestError(
                    f"class_id must be in [0, {len(self.class_names)}) (the query objects "
                    f"{self.class_names}), got {class_id}"
                )
        return top_k, n, m, class_id

    def _query_record(self, source: str, ident, box):
        """(the box as validated, the query record, seconds the extraction took)."""
        image = self.image_array(source, ident)
        where = f"query image {source}/{ident}"
        try:
            box = validate_box(box, image.shape[:2], where)
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
        t = time.perf_counter()
        try:
            record = self.engine.query_record(image, box)
        except InvalidBoxError as e:
            raise RequestError(str(e)) from None
        return box, record, time.perf_counter() - t

    def _ap_and_labels(self, gt: Optional[_GroundTruth], chain, results, stage):
        """({stage: AP or None} over the chain, relevance labels of ``stage``'s ranking), or
        (None, None) without ground truth."""
        if gt is None:
            return None, None
        ap, labels = {}, None
        for s in chain:
            value, lab = self._judge(gt, results[s].order)
            ap[s] = None if np.isnan(value) else float(value)
            if s == stage:
                labels = lab
        return ap, labels

    def _result_rows(self, final, top_k: int, labels) -> List[dict]:
        rows = []
        for hit in self.engine.hits(final, top_k):
            i = int(final.order[hit.rank - 1])
            w, h = self.size("db", i)
            rows.append(
                {
                    "rank": hit.rank,
                    "id": i,
                    "image_id": hit.image_id,
                    # None: not scored (after the FILTER_TOP_K an approximate filter returns)
                    "score": hit.score,
                    "box": hit.box,
                    "width": w,
                    "height": h,
                    "relevant": None if labels is None else int(labels[hit.rank - 1]),
                }
            )
        return rows
