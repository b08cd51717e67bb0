"""Training: fine-tuning on the query objects (freezing strategies, trainer)."""

from .freeze import STRATEGIES, apply_freeze, early_layer_prefixes, trainable_parameter_names
from .trainer import RetrievalTrainer, setup_finetune_cfg

__all__ = [
    "STRATEGIES",
    "RetrievalTrainer",
    "apply_freeze",
    "early_layer_prefixes",
    "setup_finetune_cfg",
    "trainable_parameter_names",
]
