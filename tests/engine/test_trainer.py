"""Fine-tuning on a tiny synthetic benchmark: what learns, the loss, evaluation, resuming.

In process: a few CPU iterations of ft1 / ft2 change exactly the parameters the strategy names
(the expected lists are the hand-written ones of test_freeze.py) and nothing else, buffers
included, and lower the loss on a single repeated batch. Through tools/train_net.py in a
subprocess: periodic retrieval evaluation lands in metrics.json, --resume continues the
iteration count, and --eval-only reports the same numbers as tools/retrieve.py evaluate with the
same weights (whose numbers tests/tools/test_retrieve.py checks against brute force).
"""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.env import seed_all_rng

from retrieval_ext.data.datasets import register_custom_dataset, unregister_retrieval_dataset
from retrieval_ext.engine import RetrievalTrainer, setup_finetune_cfg
from tests.common import CONFIGS, make_cfg, run_tool, write_benchmark
from tests.engine.test_freeze import EXACT, PREFIXES

NAME = "ft_test_bench"
ONE_BATCH = "ft_test_one_batch"
NUM_INSTANCES, QUERIES_PER_INSTANCE = 3, 2
ALL_STAGES = {"filtering", "filtering_qe", "ca_sr", "ca_sr_qe", "cs_sr", "cs_sr_qe"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    write_benchmark(
        tmp / "bench",
        num_instances=NUM_INSTANCES,
        queries_per_instance=QUERIES_PER_INSTANCE,
        num_db=6,
        short_side=112,
        seed=1,
    )
    write_benchmark(
        tmp / "whiten", num_instances=1, queries_per_instance=1, num_db=5, short_side=112, seed=7
    )
    register_custom_dataset(NAME, str(tmp / "bench"))
    # the first query, plain and flipped: both images of every batch of 2, so the loss can be
    # watched on one repeated batch
    one = DatasetCatalog.get(f"{NAME}_finetune")[:2]
    DatasetCatalog.register(ONE_BATCH, lambda: [dict(d) for d in one])
    MetadataCatalog.get(ONE_BATCH).set(thing_classes=[f"obj{i:02d}" for i in range(NUM_INSTANCES)])
    yield tmp
    unregister_retrieval_dataset(NAME)
    DatasetCatalog.remove(ONE_BATCH)
    MetadataCatalog.remove(ONE_BATCH)


def _cfg(backbone, opts):
    return make_cfg(
        CONFIGS / "quick_schedules" / f"{backbone}-tiny.yaml",
        ["MODEL.FINETUNE.DATASET", NAME, "INPUT.RANDOM_FLIP", "none"] + opts,
        freeze=False,
    )


def test_setup_finetune_cfg_follows_the_query_objects(bench):
    cfg = setup_finetune_cfg(_cfg("ZF", []))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == NUM_INSTANCES  # the tiny config says 80
    assert cfg.DATASETS.TRAIN == (f"{NAME}_finetune",)
    assert cfg.DATASETS.TEST == (f"{NAME}_query",)
    assert cfg.RETRIEVAL.DATASET == NAME
    finetune = DatasetCatalog.get(f"{NAME}_finetune")
    # every query once plain and once flipped
    assert len(finetune) == 2 * NUM_INSTANCES * QUERIES_PER_INSTANCE
    assert sum(d["horizontal_flip"] for d in finetune) == NUM_INSTANCES * QUERIES_PER_INSTANCE
    with pytest.raises(ValueError, match="not a view"):
        setup_finetune_cfg(_cfg("ZF", ["MODEL.FINETUNE.DATASET", f"{NAME}_query"]))


def _expected_trainable(model, backbone, strategy):
    if (backbone, strategy) in EXACT:
        return set(EXACT[(backbone, strategy)])
    prefixes = tuple(PREFIXES[(backbone, strategy)][0])
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize(
    "backbone, strategy, iters",
    [("ZF", "ft1", 20), ("ZF", "ft2", 20), ("EfficientNet-Lite0", "ft2", 2)],
)
def test_strategy_trains_exactly_its_parameters(bench, tmp_path, backbone, strategy, iters):
    cfg = _cfg(
        backbone,
        [
            "MODEL.FINETUNE.STRATEGY",
            strategy,
            "SOLVER.MAX_ITER",
            str(iters),
            "SOLVER.BASE_LR",
            "0.001",
            "SOLVER.WARMUP_ITERS",
            "0",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
    )
    setup_finetune_cfg(cfg)
    cfg.DATASETS.TRAIN = (ONE_BATCH,)
    cfg.DATASETS.TEST = ()  # no evaluation after training: this test is about the weights
    cfg.freeze()
    # torch (initialisation, RoI and anchor sampling), numpy (the sampler's seed) and random
    seed_all_rng(0)
    trainer = RetrievalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    expected = _expected_trainable(model, backbone, strategy)

    # the optimizer holds the trainable parameters and nothing else
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert in_optimizer == {id(named[n]) for n in expected}

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train()
    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected  # buffers (frozen BN statistics included) are bit-identical
    if backbone == "EfficientNet-Lite0":
        assert any(k.endswith("running_var") for k in before)  # there were BN buffers to check

    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == iters
    if iters >= 20:
        # one repeated batch: over 24 seeds the last-5 / first-5 mean ratio stayed under 0.76
        assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def _run(tool, args, env, cwd):
    proc = run_tool(tool, args, env, cwd)
    return proc.stdout + proc.stderr


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(bench):
    """tools/train_net.py: 4 iterations with evaluation every 2, then --resume up to 6."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(bench), PYTHONWARNINGS="ignore")
    out = bench / "train"
    common = [
        "--config-file",
        CONFIGS / "quick_schedules" / "ZF-tiny.yaml",
        "RETRIEVAL.CUSTOM_DATASETS",
        f"['{NAME}={bench / 'bench'}', 'whiten={bench / 'whiten'}']",
        "RETRIEVAL.WHITENING_DATASET",
        "whiten",
        "RETRIEVAL.TOP_N",
        "4",
        "RETRIEVAL.QE_M",
        "2",
        "MODEL.FINETUNE.DATASET",
        NAME,
        "MODEL.FINETUNE.STRATEGY",
        "ft2",
        "INPUT.RANDOM_FLIP",
        "none",
        "TEST.EVAL_PERIOD",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "OUTPUT_DIR",
        out,
    ]
    first_log = _run("train_net", common + ["SOLVER.MAX_ITER", "4"], env, bench)
    first = {
        "metrics": _metrics(out / "metrics.json"),
        "eval_dirs": sorted(p.name for p in out.glob("eval_*")),
        "periodic": json.loads((out / "eval_0000001" / "retrieval_results.json").read_text()),
        "log": first_log,
    }
    resume_log = _run("train_net", ["--resume"] + common + ["SOLVER.MAX_ITER", "6"], env, bench)
    return {"out": out, "env": env, "first": first, "resume_log": resume_log}


def test_periodic_evaluation_is_retrieval_in_metrics_json(trained):
    first = trained["first"]
    # evaluated after iteration 1 (2 iterations done, period 2) and after the last one
    assert first["eval_dirs"] == ["eval_0000001", "eval_final"]
    assert set(first["periodic"]) == ALL_STAGES  # 3 classes = 3 query objects: CS-SR applies
    lines = [m for m in first["metrics"] if f"{NAME}/filtering/mAP" in m]
    periodic = [m for m in lines if m["iteration"] == 1]
    assert len(periodic) == 1
    for stage, scores in first["periodic"].items():
        for metric, value in scores.items():
            logged = periodic[0][f"{NAME}/{stage}/{metric}"]
            assert logged == pytest.approx(value, nan_ok=True)
    assert any(p.name.startswith("events.out.tfevents") for p in trained["out"].iterdir())
    assert "'ft2'" in first["log"] and "backbone.conv3.weight" in first["log"]


def test_resume_continues_from_the_last_checkpoint(trained):
    out = trained["out"]
    first_count = len(trained["first"]["metrics"])
    first_iters = {m["iteration"] for m in trained["first"]["metrics"]}
    assert max(first_iters) <= 4
    assert "Starting training from iteration 4" in trained["resume_log"]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 5  # iterations 0..3, then 4..5
    resumed = _metrics(out / "metrics.json")[first_count:]
    assert resumed and min(m["iteration"] for m in resumed) >= 4
    assert any(m["iteration"] == 5 and "total_loss" in m for m in resumed)
    assert any(f"{NAME}/cs_sr/mAP" in m for m in resumed)  # evaluated after training


def test_eval_only_reports_what_retrieve_py_reports(trained, bench):
    out, env = trained["out"], trained["env"]
    weights = out / "model_final.pth"
    eval_out = bench / "eval_only"
    log = _run(
        "train_net",
        [
            "--config-file",
            out / "config.yaml",
            "--eval-only",
            "MODEL.WEIGHTS",
            weights,
            "OUTPUT_DIR",
            eval_out,
        ],
        env,
        bench,
    )
    ours = json.loads((eval_out / "eval_model_final" / "retrieval_results.json").read_text())
    assert set(ours) == ALL_STAGES
    assert f"copypaste: Task: {NAME}/cs_sr_qe" in log and "| stage" in log

    # the saved training config drives tools/retrieve.py on the same dataset and weights
    ret_out = bench / "retrieve"
    _run(
        "retrieve",
        [
            "evaluate",
            "--config-file",
            out / "config.yaml",
            "MODEL.WEIGHTS",
            weights,
            "OUTPUT_DIR",
            ret_out,
        ],
        env,
        bench,
    )
    reference = json.loads((ret_out / "retrieval_results.json").read_text())
    # and the evaluation at the end of the resumed training saw the same weights
    after_training = json.loads((out / "eval_final" / "retrieval_results.json").read_text())
    for other in (reference, after_training):
        assert set(other) == set(ours)
        for stage in ours:
            assert set(other[stage]) == set(ours[stage])
            for metric, value in ours[stage].items():
                assert other[stage][metric] == pytest.approx(value, abs=1e-9, nan_ok=True)


def test_negative_datasets_join_training_as_background_only_images(bench):
    """MODEL.FINETUNE.NEGATIVE_DATASETS: another collection's images, with no boxes, in the
    fine-tuning batches beside the query images."""
    neg = "ft_test_negatives"
    register_custom_dataset(neg, str(bench / "whiten"))
    try:
        cfg = setup_finetune_cfg(
            _cfg(
                "ZF",
                ["MODEL.FINETUNE.NEGATIVE_DATASETS", f"['{neg}']", "SOLVER.IMS_PER_BATCH", "4"],
            )
        )
        whiten_files = {d["file_name"] for d in DatasetCatalog.get(f"{neg}_db")}
        query_files = {d["file_name"] for d in DatasetCatalog.get(f"{NAME}_finetune")}
        seen = {}
        loader = iter(RetrievalTrainer.build_train_loader(cfg))
        for _ in range(12):
            for x in next(loader):
                seen[x["file_name"]] = len(x["instances"])
        negatives = {f: n for f, n in seen.items() if f in whiten_files}
        positives = {f: n for f, n in seen.items() if f in query_files}
        assert negatives and positives and set(seen) == set(negatives) | set(positives)
        assert set(negatives.values()) == {0} and set(positives.values()) == {1}
    finally:
        unregister_retrieval_dataset(neg)
    cfg = setup_finetune_cfg(_cfg("ZF", ["MODEL.FINETUNE.NEGATIVE_DATASETS", "['nowhere']"]))
    with pytest.raises(KeyError, match="nowhere"):
        RetrievalTrainer.build_train_loader(cfg)


def test_evaluator_follows_the_metadata_evaluator_type(bench, tmp_path):
    """A DATASETS.TEST entry is evaluated by what its metadata says (detectron2's
    build_evaluator), not by what its name looks like."""
    from retrieval_ext.data.datasets import register_retrieval_dataset
    from retrieval_ext.evaluation.retrieval_evaluator import RetrievalEvaluator

    cfg = make_cfg(opts=["OUTPUT_DIR", str(tmp_path)], freeze=False)
    ev = RetrievalTrainer.build_evaluator(cfg, f"{NAME}_query")
    assert isinstance(ev, RetrievalEvaluator) and ev.dataset == NAME
    # the views of a retrieval dataset whose metadata names no evaluator
    register_retrieval_dataset(
        "ft_test_unjudged", lambda root: {}, str(tmp_path), evaluator_type=""
    )
    try:
        with pytest.raises(ValueError, match="no evaluator for 'ft_test_unjudged_query'"):
            RetrievalTrainer.build_evaluator(cfg, "ft_test_unjudged_query")
    finally:
        unregister_retrieval_dataset("ft_test_unjudged")
