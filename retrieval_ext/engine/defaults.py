"""The one ``setup(args)`` of the command-line tools (train_net.py, retrieve.py, serve.py)."""

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_retrieval_config
from ..retrieval import pipeline
from .trainer import setup_finetune_cfg

__all__ = ["setup_cfg"]


def setup_cfg(args):
    """get_cfg -> add_retrieval_config -> merge file and opts -> datasets -> freeze -> setup.

    Args:
        args: parsed ``default_argument_parser`` arguments (``config_file``, ``opts``, ...).

    Returns:
        the frozen config; OUTPUT_DIR holds config.yaml and log.txt.
    """
    cfg = get_cfg()
    add_retrieval_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # before setup_finetune_cfg, so that its messages reach OUTPUT_DIR/log.txt
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retrieval_ext")
    pipeline.register_config_datasets(cfg)
    # a fine-tuning config: the class count follows the dataset's query objects, as in training
    setup_finetune_cfg(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
