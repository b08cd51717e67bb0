"""Checkpoint loading: detectron2's, plus raw torchvision VGG16 ImageNet state dicts.

``RetrievalCheckpointer`` is a drop-in ``DetectionCheckpointer``: model-zoo ``.pkl`` files,
``detectron2://`` URLs and detectron2 ``.pth`` checkpoints load exactly as there. A ``.pth`` that
holds torchvision's ``vgg16()`` state dict (possibly as ``{"state_dict": ...}``) is renamed with
:func:`retrieval_ext.modeling.backbones.vgg.convert_torchvision_vgg16` first.

Checkpoint tensors whose shape differs from the model's (e.g. an 81-way COCO predictor loaded
into a model with 11 query classes) are not loaded; those layers keep their fresh initialisation
and one log line names them all.
"""

import logging

from detectron2.checkpoint import DetectionCheckpointer

from .backbones.vgg import convert_torchvision_vgg16

__all__ = ["RetrievalCheckpointer", "is_torchvision_vgg16_state_dict"]

logger = logging.getLogger(__name__)


def is_torchvision_vgg16_state_dict(state_dict):
    """Whether a dict has torchvision VGG16's ``features.0.weight`` and ``classifier.0.weight``.

    Args:
        state_dict (dict): any mapping.

    Returns:
        bool
    """
    return (
        isinstance(state_dict, dict)
        and "features.0.weight" in state_dict
        and "classifier.0.weight" in state_dict
    )


class RetrievalCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also reads raw torchvision VGG16 state dicts."""

    def _load_file(self, filename):
        """
        Args:
            filename (str): local path of the checkpoint.

        Returns:
            dict: ``{"model": state_dict, ...}`` as detectron2's checkpointer expects it.
        """
        loaded = super()._load_file(filename)
        model = loaded.get("model")
        # torch.save({"state_dict": sd}) arrives here as {"model": {"state_dict": sd}}
        if isinstance(model, dict) and is_torchvision_vgg16_state_dict(model.get("state_dict")):
            model = model["state_dict"]
        if is_torchvision_vgg16_state_dict(model):
            logger.info(f"{filename} is a torchvision VGG16 state dict; renaming it")
            return {"model": convert_torchvision_vgg16(model), "__author__": "torchvision"}
        return loaded

    def _load_model(self, checkpoint):
        """Load as detectron2 does, then name the tensors left at their initialisation.

        Args:
            checkpoint (dict): the output of :meth:`_load_file`.

        Returns:
            fvcore's ``_IncompatibleKeys`` (missing, unexpected, incorrect_shapes).
        """
        incompatible = super()._load_model(checkpoint)
        skipped = [
            f"{key} (checkpoint {tuple(ckpt)}, model {tuple(own)})"
            for key, ckpt, own in incompatible.incorrect_shapes
        ]
        if skipped:
            logger.warning(
                "Shape mismatch: kept the fresh initialisation of %d tensors: %s",
                len(skipped),
                ", ".join(skipped),
            )
        return incompatible
