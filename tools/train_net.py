#!/usr/bin/env python
"""Fine-tune a Faster R-CNN on the query objects of a retrieval dataset, evaluated by retrieval.

    train_net.py --config-file configs/oxford5k/VGG16_ft2.yaml [KEY VALUE ...]
    train_net.py --config-file CFG --resume                 continue from OUTPUT_DIR/last_checkpoint
    train_net.py --config-file CFG --eval-only MODEL.WEIGHTS OUTPUT_DIR/model_final.pth
    train_net.py --config-file CFG --num-gpus 8             (and --num-machines, --machine-rank)

``MODEL.FINETUNE.DATASET`` NAME sets DATASETS.TRAIN = (NAME_finetune,), DATASETS.TEST =
(NAME_query,) and ROI_HEADS.NUM_CLASSES = the number of query objects;
``MODEL.FINETUNE.STRATEGY`` (ft1 / ft2 / custom / none) chooses what learns.
Everything is written under OUTPUT_DIR: config.yaml, log.txt, metrics.json (losses, and the
retrieval metrics as NAME/stage/metric), TensorBoard events, model_*.pth checkpoints,
last_checkpoint, and one folder per evaluation with its index, whitening and
retrieval_results.json: eval_<iteration> (as model_<iteration>.pth), eval_final after training,
eval_<weights file stem> with --eval-only. The saved config.yaml also drives tools/retrieve.py
on the fine-tuned dataset.
"""

import logging
import os
import sys

from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import retrieval_ext  # noqa: E402,F401  registers models and datasets
from retrieval_ext.engine import RetrievalTrainer  # noqa: E402
from retrieval_ext.engine.defaults import setup_cfg  # noqa: E402
from retrieval_ext.modeling.checkpoint import RetrievalCheckpointer  # noqa: E402

logger = logging.getLogger("retrieval_ext")


def setup(args):
    return setup_cfg(args)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = RetrievalTrainer.build_model(cfg)
        RetrievalCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = RetrievalTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = RetrievalTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser(__doc__).parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
