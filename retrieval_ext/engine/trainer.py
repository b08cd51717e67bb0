"""``RetrievalTrainer``: detectron2's ``DefaultTrainer`` for fine-tuning on the query objects.

What it adds to ``DefaultTrainer``:

- ``build_model`` freezes by ``MODEL.FINETUNE.STRATEGY`` (:func:`~.freeze.apply_freeze`, which
  logs the trainable parameters) before the optimizer is built, so the optimizer only holds
  trainable parameters (detectron2's ``build_optimizer`` skips ``requires_grad=False``).
- ``build_train_loader`` maps with ``RetrievalDatasetMapper``, which flips the
  ``horizontal_flip=True`` copies of ``NAME_finetune``.
- Evaluation (``TEST.EVAL_PERIOD``, after training, ``--eval-only``) is retrieval: ``test`` runs
  a :class:`~retrieval_ext.evaluation.retrieval_evaluator.RetrievalEvaluator` holding the model
  on each ``DATASETS.TEST`` entry (``NAME_query``).
- Checkpoints load with ``RetrievalCheckpointer`` (torchvision VGG16 files; tensors whose shape
  differs, e.g. a COCO predictor loaded for the query classes, keep their fresh initialisation).

:func:`setup_finetune_cfg` turns ``MODEL.FINETUNE.DATASET`` into the datasets and class count.
"""
import logging
import weakref

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model

from ..data import RetrievalDatasetMapper, get_retrieval_metadata
from ..evaluation.retrieval_evaluator import RetrievalEvaluator, retrieval_dataset_name
from ..modeling.checkpoint import RetrievalCheckpointer
from .freeze import apply_freeze

__all__ = ["RetrievalTrainer", "setup_finetune_cfg"]

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
        return build_detection_train_loader(cfg, mapper=RetrievalDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """The queries of a retrieval dataset, mapped with their query boxes.

        Args:
            dataset_name: a retrieval dataset NAME or view (``DATASETS.TEST`` holds NAME_query).
        """
        queries = f"{retrieval_dataset_name(dataset_name)}_query"
        return build_detection_test_loader(
            cfg, queries, mapper=RetrievalDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, model=None, output_dir=None):
        """A :class:`RetrievalEvaluator`; ``model`` is what it indexes the database with (None:
        built from ``MODEL.WEIGHTS``)."""
        return RetrievalEvaluator(cfg, dataset_name, model=model, output_dir=output_dir)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Retrieval evaluation of ``model`` on each ``DATASETS.TEST`` entry.

        Args:
            cfg: the config.
            model: the model to evaluate (also the one that indexes each database).
            evaluators: as ``DefaultTrainer.test``; None builds a RetrievalEvaluator per dataset.

        Returns:
            dict: ``{"NAME/stage": {metric: value}}`` for one dataset, else keyed by dataset.
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
        return super().build_hooks()
