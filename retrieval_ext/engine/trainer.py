"""``RetrievalTrainer``: detectron2's ``DefaultTrainer`` for fine-tuning on the query objects.

What it adds to ``DefaultTrainer``:

- ``build_model`` freezes by ``MODEL.FINETUNE.STRATEGY`` (:func:`~.freeze.apply_freeze`, which
  logs the trainable parameters) before the optimizer is built, so the optimizer only holds
  trainable parameters (detectron2's ``build_optimizer`` skips ``requires_grad=False``).
- ``build_train_loader`` maps with ``RetrievalDatasetMapper``, which flips the
  ``horizontal_flip=True`` copies of ``NAME_finetune``, and adds the database images of
  ``MODEL.FINETUNE.NEGATIVE_DATASETS`` as background-only images.
- Evaluation (``TEST.EVAL_PERIOD``, after training, ``--eval-only``) dispatches on the
  metadata's ``evaluator_type``: a retrieval dataset in ``DATASETS.TEST`` (``NAME_query``,
  ``evaluator_type="retrieval"``) is evaluated by retrieval: ``test`` runs a
  :class:`~retrieval_ext.evaluation.retrieval_evaluator.RetrievalEvaluator` that holds the model.
  A detection dataset with ``evaluator_type="coco"`` (e.g. the generic detection set on which
  the embedded default's RPN and box head are pre-trained) gets detectron2's ``COCOEvaluator``
  (box AP, files under ``OUTPUT_DIR/inference``).
- ``MODEL.FINETUNE.IMPRINT_VIEWS``: before the first iteration the classifier of the query
  classes is imprinted from their box features (:mod:`.imprint`).
- Checkpoints load with ``RetrievalCheckpointer`` (torchvision VGG16 files; tensors whose shape
  differs, e.g. a COCO predictor loaded for the query classes, keep their fresh initialisation).

:func:`setup_finetune_cfg` turns ``MODEL.FINETUNE.DATASET`` into the datasets and class count.
"""

import logging
import os
import weakref

from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model

from ..data import RetrievalDatasetMapper, get_retrieval_metadata
from ..data.datasets.catalog import retrieval_dataset_name
from ..evaluation.retrieval_evaluator import RetrievalEvaluator
from ..modeling.checkpoint import RetrievalCheckpointer
from .freeze import apply_freeze
from .imprint import ImprintClassifier

__all__ = ["RetrievalTrainer", "background_dicts", "imprint_inputs", "setup_finetune_cfg"]

logger = logging.getLogger("retrieval_ext")


def setup_finetune_cfg(cfg):
    """Point a config at the fine-tuning dataset ``MODEL.FINETUNE.DATASET`` (if set).

    Sets ``DATASETS.TRAIN = (NAME_finetune,)``, ``DATASETS.TEST = (NAME_query,)`` (retrieval
    evaluation of NAME), ``RETRIEVAL.DATASET = NAME`` (so that tools/retrieve.py run with the
    saved config.yaml searches the same dataset) and ``MODEL.ROI_HEADS.NUM_CLASSES`` to the
    number of query objects. Reads the dataset's query list (it must be on disk); model building
    does not depend on it, so configs build without the data.

    Args:
        cfg (CfgNode): a mutable retrieval_ext config; the dataset must be registered (built-in,
            or ``RETRIEVAL.CUSTOM_DATASETS`` registered first).

    Returns:
        CfgNode: ``cfg``, modified in place.
    """
    name = cfg.MODEL.FINETUNE.DATASET
    if not name:
        return cfg
    meta = get_retrieval_metadata(name)
    if retrieval_dataset_name(name) != name:
        raise ValueError(
            f"MODEL.FINETUNE.DATASET must be a retrieval dataset NAME, not a view: {name!r}"
        )
    num_classes = len(meta.thing_classes)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != num_classes:
        logger.info(
            f"MODEL.ROI_HEADS.NUM_CLASSES: {cfg.MODEL.ROI_HEADS.NUM_CLASSES} -> {num_classes} "
            f"(the query objects of {name})"
        )
    cfg.DATASETS.TRAIN = (f"{name}_finetune",)
    cfg.DATASETS.TEST = (f"{name}_query",)
    cfg.RETRIEVAL.DATASET = name
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    return cfg


def background_dicts(names) -> list:
    """Training dicts without boxes for the database images of retrieval datasets ``names``:
    every proposal on them is background (``MODEL.FINETUNE.NEGATIVE_DATASETS``)."""
    out = []
    for name in names:
        if f"{name}_db" not in DatasetCatalog:
            raise KeyError(
                f"MODEL.FINETUNE.NEGATIVE_DATASETS: {name!r} is not a registered retrieval "
                "dataset (built-in, or RETRIEVAL.CUSTOM_DATASETS)"
            )
        for d in DatasetCatalog.get(f"{name}_db"):
            out.append(
                {
                    "file_name": d["file_name"],
                    "image_id": f"{name}/{d['image_id']}",
                    "annotations": [],
                }
            )
    return out


def _evaluator_type(dataset_name: str):
    """The ``evaluator_type`` of a registered dataset's metadata (``"retrieval"`` for the views of
    a retrieval dataset, ``"coco"`` for COCO-format detection sets), or None."""
    return MetadataCatalog.get(dataset_name).get("evaluator_type")


def imprint_inputs(cfg, views: int):
    """The training inputs whose box features imprint the classifier: each fine-tuning image
    ``views`` times through the training mapper (augmented as in training)."""
    mapper = RetrievalDatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=True)
    for _ in range(views):
        for d in dicts:
            yield mapper(d)


class RetrievalTrainer(DefaultTrainer):
    """``DefaultTrainer`` with freezing, the fine-tuning mapper and retrieval evaluation.

    Use it as ``DefaultTrainer``: ``trainer = RetrievalTrainer(cfg);
    trainer.resume_or_load(resume); trainer.train()``; ``RetrievalTrainer.test(cfg, model)``
    evaluates a model.
    """

    @classmethod
    def build_model(cls, cfg):
        """Build the model and apply ``MODEL.FINETUNE.STRATEGY``.

        Returns:
            torch.nn.Module: the model, its trainable parameters logged.
        """
        model = build_model(cfg)
        logging.getLogger(__name__).info(f"Model:\n{model}")
        apply_freeze(model, cfg.MODEL.FINETUNE.STRATEGY, cfg.MODEL.FINETUNE.TRAINABLE)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = RetrievalDatasetMapper(cfg, True)
        negatives = list(cfg.MODEL.FINETUNE.NEGATIVE_DATASETS)
        if not negatives:
            return build_detection_train_loader(cfg, mapper=mapper)
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        background = background_dicts(negatives)
        logger.info(
            f"fine-tuning on {len(dicts)} images of {list(cfg.DATASETS.TRAIN)} and "
            f"{len(background)} background-only images of {negatives}"
        )
        return build_detection_train_loader(
            dataset=dicts + background,
            mapper=mapper,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Retrieval datasets: their queries, mapped with the query boxes; others: detectron2's.

        Args:
            dataset_name: a ``DATASETS.TEST`` entry (``NAME_query`` for retrieval).
        """
        if _evaluator_type(dataset_name) != "retrieval":
            return super().build_test_loader(cfg, dataset_name)
        name = retrieval_dataset_name(dataset_name)
        return build_detection_test_loader(
            cfg, f"{name}_query", mapper=RetrievalDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, model=None, output_dir=None):
        """The evaluator of a ``DATASETS.TEST`` entry, by its metadata's ``evaluator_type``
        (as detectron2's own ``build_evaluator`` dispatches).

        Args:
            model: for a retrieval dataset, the model that indexes the database (None: built
                from ``MODEL.WEIGHTS``); unused otherwise.
            output_dir: default ``OUTPUT_DIR`` (retrieval) or ``OUTPUT_DIR/inference`` (COCO).

        Returns:
            :class:`RetrievalEvaluator` for ``evaluator_type="retrieval"`` (the views of a
            retrieval dataset), ``COCOEvaluator`` for ``"coco"``.

        Raises:
            ValueError: for any other dataset.
        """
        evaluator_type = _evaluator_type(dataset_name)
        if evaluator_type == "retrieval":
            return RetrievalEvaluator(cfg, dataset_name, model=model, output_dir=output_dir)
        if evaluator_type == "coco":
            return COCOEvaluator(
                dataset_name, output_dir=output_dir or os.path.join(cfg.OUTPUT_DIR, "inference")
            )
        raise ValueError(
            f"no evaluator for {dataset_name!r} (evaluator_type {evaluator_type!r}); "
            "RetrievalTrainer evaluates retrieval datasets and COCO-format detection datasets"
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on each ``DATASETS.TEST`` entry (retrieval or COCO detection).

        Args:
            cfg: the config.
            model: the model to evaluate (also the one that indexes each database).
            evaluators: as ``DefaultTrainer.test``; None builds :meth:`build_evaluator`'s for
                each ``DATASETS.TEST`` entry, giving retrieval evaluators the model.

        Returns:
            dict: for one retrieval dataset ``{"NAME/stage": {metric: value}}``; with several
            test datasets, keyed by dataset name.
        """
        if evaluators is None:
            evaluators = [cls.build_evaluator(cfg, name, model=model) for name in cfg.DATASETS.TEST]
        return super().test(cfg, model, evaluators)

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a DetectionCheckpointer just before calling this; swap
        # it for ours before the PeriodicCheckpointer hook captures it.
        old = self.checkpointer
        self.checkpointer = RetrievalCheckpointer(
            old.model, old.save_dir, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        views = self.cfg.MODEL.FINETUNE.IMPRINT_VIEWS
        if views > 0:
            hooks.insert(
                0,
                ImprintClassifier(
                    lambda: imprint_inputs(self.cfg, views), self.cfg.MODEL.ROI_HEADS.NUM_CLASSES
                ),
            )
        return hooks
