"""Retrieval mAP of a model under training or loaded for ``--eval-only``, the detectron2 way.

Retrieval cannot be scored batch by batch: the database has to be indexed with the model being
evaluated, the whitening learned with it, and every query searched. :func:`evaluate_retrieval`
chains the steps of :mod:`retrieval_ext.retrieval.pipeline` exactly as ``tools/retrieve.py
evaluate`` does (index -> whitening -> queries -> searcher -> applicable stages -> search ->
:func:`~retrieval_ext.evaluation.evaluator.score_run`), into a fresh folder per evaluation
because fine-tuning (strategy #2) changes the features.

:class:`RetrievalEvaluator` wraps it as a ``DatasetEvaluator`` so that ``DefaultTrainer.test``
(periodic evaluation with ``TEST.EVAL_PERIOD``, the evaluation after training, ``--eval-only``)
reports retrieval metrics: ``inference_on_dataset`` runs the model over the ``NAME_query`` images
(with :class:`~retrieval_ext.data.RetrievalDatasetMapper`, which passes the query boxes) and
:meth:`RetrievalEvaluator.process` keeps the query descriptors; :meth:`RetrievalEvaluator.evaluate`
indexes the database and searches them.
"""

import logging
import os
import shutil
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.datasets.catalog import get_dataset_dicts, retrieval_dataset_name
from ..retrieval import pipeline
from ..retrieval.extractor import FeatureExtractor, outputs_to_query
from ..retrieval.paths import index_paths
from ..utils.io import atomic_write_json
from .evaluator import format_table, score_run

__all__ = ["RetrievalEvaluator", "evaluate_retrieval"]

logger = logging.getLogger("retrieval_ext")

# Dataset-dict fields that identify a query in its record (as queries.extract_queries adds them).
_QUERY_INFO = ("image_id", "file_name", "category_id", "object_name", "query_index")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def evaluate_retrieval(
    cfg,
    model: Optional[torch.nn.Module],
    dataset: str,
    work_dir: str,
    queries: Optional[List[dict]] = None,
) -> Dict[str, Dict[str, float]]:
    """Index ``<dataset>_db`` with ``model``, search every query with every stage, score.

    Must be called on every rank: indexing is shared between ranks (each extracts its part of
    the database); searching and scoring run on the main process.

    Args:
        cfg: a frozen retrieval_ext config (``RETRIEVAL.*`` settings of the pipeline).
        model: the model to evaluate (possibly wrapped in DistributedDataParallel), used as is;
            None builds one from ``cfg`` and loads ``MODEL.WEIGHTS``.
        dataset: retrieval dataset NAME.
        work_dir: folder for the index (``work_dir/index``), the whitening, the query cache and
            ``retrieval_results.json``.
        queries: query records in ``<dataset>_query`` order (as
            :func:`~retrieval_ext.retrieval.queries.extract_queries` returns them), e.g.
            collected by :class:`RetrievalEvaluator`; None extracts them here.

    Returns:
        On the main process ``{stage: {metric: value}}`` (see ``evaluate_stages``) for the
        stages of ``RETRIEVAL.STAGES`` that apply (CS-SR only when the model's classes are the
        query objects); ``{}`` on other ranks or when the dataset has no ground truth.
    """
    extractor = FeatureExtractor(cfg, model=None if model is None else _unwrap(model))
    paths = index_paths(cfg, output_dir=work_dir)
    run = pipeline.search_dataset(cfg, extractor, dataset, paths, queries=queries)
    if run is None:
        return {}
    scores = score_run(run, cfg.RETRIEVAL.LOC_TOP_K)
    if scores is None:
        return {}
    atomic_write_json(os.path.join(work_dir, "retrieval_results.json"), scores)
    title = f"{dataset}: {len(run.queries)} queries, {run.index.num_images} images ({work_dir})"
    logger.info("retrieval results (%):\n" + format_table(scores, title))
    return scores


class RetrievalEvaluator(DatasetEvaluator):
    """Retrieval metrics of a retrieval dataset, as a detectron2 ``DatasetEvaluator``.

    Feed it the model's outputs on ``NAME_query`` inputs mapped by ``RetrievalDatasetMapper``
    (``RetrievalTrainer.build_test_loader`` does): :meth:`process` keeps each query's descriptor
    record. :meth:`evaluate` then indexes the database with the same model into
    ``output_dir/eval_<tag>`` (removed first if it exists: the features may have changed) and
    searches. When the processed queries are not the whole query set in order (e.g. nothing was
    processed), the queries are extracted there instead.

    The result is ``{"NAME/stage": {metric: value}}``; ``DefaultTrainer``'s ``EvalHook``
    flattens it into ``NAME/stage/metric`` scalars for metrics.json and TensorBoard. It is also
    written (as ``{stage: {metric: value}}``) to ``eval_<tag>/retrieval_results.json`` and
    logged as a table.
    """

    def __init__(
        self,
        cfg,
        dataset_name: str,
        model: Optional[torch.nn.Module] = None,
        output_dir: Optional[str] = None,
        tag: Optional[str] = None,
    ):
        """
        Args:
            cfg: a frozen retrieval_ext config.
            dataset_name: the retrieval dataset NAME or one of its views (``DATASETS.TEST``
                holds ``NAME_query``).
            model: the model to index with (the one ``process`` sees outputs of); None builds
                one from ``cfg.MODEL.WEIGHTS``.
            output_dir: parent of the ``eval_<tag>`` folders; default ``cfg.OUTPUT_DIR``.
            tag: name of this evaluation's folder. Default: inside training, the iteration as
                in the checkpoint saved with it (``0000299`` for ``model_0000299.pth``; ``final``
                after the last iteration, ``model_final.pth``); outside, the stem of
                ``MODEL.WEIGHTS`` (``model_final``), else ``"model"``.
        """
        self._cfg = cfg
        self._dataset = retrieval_dataset_name(dataset_name)
        self._model = model
        self._output_dir = output_dir or cfg.OUTPUT_DIR
        self._tag = tag
        self._queries: List[dict] = []
        self._extractor: Optional[FeatureExtractor] = None

    @property
    def dataset(self) -> str:
        return self._dataset

    def reset(self):
        self._queries = []

    def process(self, inputs, outputs):
        """Keep the descriptor record of every input that carried a query box.

        With ``RETRIEVAL.QUERY_SCALES`` the record is extracted again at each box size (the
        same :meth:`~retrieval_ext.retrieval.extractor.FeatureExtractor.query_record` as
        ``tools/retrieve.py``), so that the evaluation during training equals the tool's; the
        single-size output of the test loader's pass only says which inputs are queries.

        Args:
            inputs: model inputs (``RetrievalDatasetMapper`` dicts of ``NAME_query``).
            outputs: ``RetrievalRCNN`` outputs; those with a ``"query"`` field are kept.
        """
        extractor = self._query_extractor()
        for inp, out in zip(inputs, outputs):
            if "query" not in out:
                continue
            if self._cfg.RETRIEVAL.QUERY_SCALES:
                if extractor is None:  # no model to extract with: evaluate() extracts them
                    continue
                # the test loader's single pass does not give the multi-scale record: extract it
                # as tools/retrieve.py does (the mapped input is still the query's dataset dict)
                rec = extractor.query_record(inp)
            else:
                rec = outputs_to_query(out)
            rec.update({k: inp[k] for k in _QUERY_INFO if k in inp})
            self._queries.append(rec)

    def _query_extractor(self) -> Optional[FeatureExtractor]:
        """The extractor of multi-scale query records (``RETRIEVAL.QUERY_SCALES``) with the
        evaluated model; None when there is no model or no multi-scale query."""
        if not self._cfg.RETRIEVAL.QUERY_SCALES or self._model is None:
            return None
        if self._extractor is None:
            self._extractor = FeatureExtractor(self._cfg, model=_unwrap(self._model))
        return self._extractor

    def work_dir(self) -> str:
        """``output_dir/eval_<tag>`` (see the constructor for the tag)."""
        tag = self._tag
        if tag is None:
            try:
                it = get_event_storage().iter
                # after training the storage's iteration is MAX_ITER; the weights model_final
                tag = "final" if it >= self._cfg.SOLVER.MAX_ITER else f"{it:07d}"
            except (AssertionError, IndexError):  # not inside training: no event storage
                weights = self._cfg.MODEL.WEIGHTS
                tag = os.path.splitext(os.path.basename(weights))[0] if weights else "model"
        return os.path.join(self._output_dir, f"eval_{tag}")

    def _gathered_queries(self) -> Optional[List[dict]]:
        """All ranks' processed queries in query order, on the main process; None if they are
        not exactly the dataset's queries."""
        per_rank = comm.gather(self._queries, dst=0)
        if not comm.is_main_process():
            return None
        records = sorted(
            (q for part in per_rank for q in part), key=lambda q: q.get("query_index", -1)
        )
        expected = [d["image_id"] for d in get_dataset_dicts(f"{self._dataset}_query")]
        if [q.get("image_id") for q in records] != expected:
            if records:
                logger.warning(
                    f"{len(records)} processed queries are not the {len(expected)} queries of "
                    f"{self._dataset}_query; extracting them again"
                )
            return None
        return records

    def evaluate(self):
        """Index, search and score (see the class docstring); call on every rank.

        Returns:
            On the main process ``OrderedDict({"NAME/stage": {metric: value}})`` (empty
            without ground truth; undefined metrics left out); ``{}`` on other ranks.
        """
        queries = self._gathered_queries()
        work_dir = self.work_dir()
        if comm.is_main_process():
            if os.path.isdir(work_dir):
                logger.info(f"removing {work_dir} left by an earlier evaluation")
                shutil.rmtree(work_dir)
            os.makedirs(work_dir)
        comm.synchronize()
        scores = evaluate_retrieval(self._cfg, self._model, self._dataset, work_dir, queries)
        # detectron2's EvalHook takes floats only: an undefined metric (None) is left out
        return OrderedDict(
            (f"{self._dataset}/{stage}", {k: v for k, v in s.items() if v is not None})
            for stage, s in scores.items()
        )
