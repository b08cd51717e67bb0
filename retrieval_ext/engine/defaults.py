"""The one ``setup(args)`` of the command-line tools (train_net.py, retrieve.py, serve.py)."""

import logging
import os

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import DeviceUnavailableError, add_retrieval_config, check_device
from ..data.datasets.catalog import register_config_datasets
from ..utils.io import OutputWriteError
from .trainer import setup_finetune_cfg

__all__ = ["setup_cfg"]


def setup_cfg(args):
    """get_cfg -> add_retrieval_config -> merge file and opts -> datasets -> freeze -> setup.

    Args:
        args: parsed ``default_argument_parser`` arguments (``config_file``, ``opts``, ...).

    Returns:
        the frozen config; OUTPUT_DIR holds config.yaml and log.txt.

    Raises:
        SystemExit: MODEL.DEVICE names a device this machine lacks (one line naming the key and
            the fix), before anything is loaded or written.
        OutputWriteError: OUTPUT_DIR cannot be created (under a regular file, not writable);
            raised before anything is loaded or written.
    """
    cfg = get_cfg()
    add_retrieval_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    try:
        device = check_device(cfg)
    except DeviceUnavailableError as e:
        raise SystemExit(f"error: {e}") from None
    try:  # here, not deep inside detectron2's default_setup with a bare NotADirectoryError
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(cfg.OUTPUT_DIR, e) from None
    # before setup_finetune_cfg, so that its messages reach OUTPUT_DIR/log.txt
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retrieval_ext")
    logging.getLogger("retrieval_ext").info(f"running on MODEL.DEVICE {device}")
    register_config_datasets(cfg)
    # a fine-tuning config: the class count follows the dataset's query objects, as in training
    setup_finetune_cfg(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
