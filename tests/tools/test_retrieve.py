"""tools/retrieve.py: end to end, it indexes, searches, evaluates and draws a tiny synthetic
benchmark; its result files are replaced atomically.

Each stage's saved ranking is recomputed here by brute force from the stored features (plain
numpy loops), and the mAP from the ground truth with an AP written here.
"""

import errno
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from retrieval_ext.data.datasets import register_custom_dataset
from retrieval_ext.retrieval.api import InstanceSearch
from retrieval_ext.retrieval.index_store import IndexMismatchError, IndexReader
from retrieval_ext.utils.io import OutputWriteError
from tests.common import (
    ZF_TINY,
    enospc_on_replace,
    load_strict_json,
    load_tool,
    make_cfg,
    run_tool,
    tiny_cfg,
    write_benchmark,
    written_out_ap,
    written_out_iou,
)

TOP_N = 4
QE_M = 2
# the config defaults the main run searches with (retrieval_ext/config.py)
VOTE_DELTA = 0.15
VOTE_QUANTILE = 0.25
GATE_Z = 4.0  # no region whitening here (too few vectors): QE_GATE_Z


def _run(args, env, cwd):
    """tools/retrieve.py ``args``; the caller checks how it exited."""
    return run_tool("retrieve", args, env, cwd, check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, zf):
    tmp = tmp_path_factory.mktemp("retrieve")
    write_benchmark(
        tmp / "synthetic",
        num_instances=3,
        queries_per_instance=2,
        num_db=10,
        short_side=112,
        seed=1,
    )
    write_benchmark(
        tmp / "whiten", num_instances=2, queries_per_instance=1, num_db=8, short_side=112, seed=7
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp), PYTHONWARNINGS="ignore")
    out = tmp / "out"
    common = [
        "--config-file",
        ZF_TINY,
        *zf["opts"],
        "RETRIEVAL.DATASET",
        "synthetic",
        "RETRIEVAL.CUSTOM_DATASETS",
        f"['whiten={tmp / 'whiten'}']",
        "RETRIEVAL.WHITENING_DATASET",
        "whiten",
        "RETRIEVAL.TOP_N",
        str(TOP_N),
        "RETRIEVAL.QE_M",
        str(QE_M),
        "RETRIEVAL.INDEX_DTYPE",
        "float32",
        "RETRIEVAL.REGION_DTYPE",
        "",  # region vectors stored exactly: compared below
        "RETRIEVAL.STORE.REGION_POOLINGS",
        "['sum', 'max']",  # both: a variant below reranks with sum-pooled region vectors
        "RETRIEVAL.SHARD_SIZE",
        "4",
        "RETRIEVAL.VIS_TOP_K",
        "3",
    ]
    proc = _run(["all"] + common + ["OUTPUT_DIR", str(out)], env, tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"tmp": tmp, "out": out, "env": env, "common": common, "log": proc.stderr + proc.stdout}


def _l2(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_rank(scores, ids_in_order):
    # descending score; equal scores keep their previous order (stable)
    idx = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return [ids_in_order[j] for j in idx], [scores[j] for j in idx]


def _robust_z(score, block):
    """(s - median) / (1.4826 MAD) of the block; with MAD 0, +inf above the median."""
    block = np.asarray(block, dtype=np.float64)
    med = float(np.median(block))
    mad = float(np.median(np.abs(block - med)))
    if mad == 0:
        return np.inf if score > med else -np.inf
    return (score - med) / (1.4826 * mad)


def _gated(ids, scores, block, z):
    """The ids (first QE_M candidates, with their scores) whose robust z reaches z."""
    return [i for i, s in zip(ids[:QE_M], scores[:QE_M]) if _robust_z(s, block) >= z]


def _vote(boxes, sims, delta, q=VOTE_QUANTILE):
    """Box voting written out: the boxes within delta of the best cosine, weighted by cosine;
    each left / top edge the smallest voter edge whose weight share (from the left / top)
    reaches q, each right / bottom edge the smallest one whose share reaches 1 - q."""
    sims = np.asarray(sims, dtype=np.float64)
    voters = sims >= sims.max() - delta
    w = np.clip(sims[voters], 0, None)
    w = w if w.sum() > 0 else np.ones_like(w)
    b = np.asarray(boxes, dtype=np.float64)[voters]
    out = []
    for k, share in enumerate((q, q, 1 - q, 1 - q)):
        pairs = sorted(zip(b[:, k], w), key=lambda p: p[0])
        total = 0.0
        for value, weight in pairs:
            total += weight
            if total / w.sum() >= share - 1e-12:
                out.append(value)
                break
    return np.array(out)


def test_outputs_are_written_under_output_dir(run):
    out = run["out"]
    for name in [
        "config.yaml",
        "log.txt",
        "retrieval_results.json",
        "latency.json",
        "rankings.npz",
        "index/manifest.json",
        "visualization/index.html",
    ]:
        assert (out / name).is_file(), name
    html = (out / "visualization" / "index.html").read_text()
    strips = sorted(p.name for p in (out / "visualization").glob("*.jpg"))
    assert len(strips) == 6  # 3 objects x 2 queries
    for s in strips:
        assert s in html
    assert "indexing synthetic_db" in run["log"]  # progress bar shown


def test_each_stage_ranking_equals_brute_force(run):
    out = run["out"]
    index = IndexReader(out / "index")
    ids = list(index.image_ids)
    assert len(ids) == 10
    qfile = next(out.glob("queries-synthetic-*.npz"))
    q = np.load(qfile)
    w = np.load(next(out.glob("whitening-whiten-*.npz")))
    mean, proj = w["mean"].astype(np.float64), w["projection"].astype(np.float64)

    def filt(x):  # L2 -> whiten -> L2, written out
        return _l2((_l2(x) - mean) @ proj.T)

    db = filt(index.image_vectors("ipa_sum"))
    rk = np.load(out / "rankings.npz")
    voted_away = False
    for qi in range(6):
        qv = filt(q["ipa_sum"][qi])
        scores = [float(db[j] @ qv) for j in range(len(ids))]
        f_ids, f_scores = _brute_rank(scores, ids)
        assert list(rk["filtering/image_ids"][qi]) == f_ids

        # filtering_qe, gated: the query averaged with those of the top M whose filtering score
        # stands out from the top N's; none: the filtering ranking
        kept = _gated(f_ids, f_scores, f_scores[:TOP_N], GATE_Z)
        qe = _l2(qv + db[[ids.index(i) for i in kept]].sum(axis=0))
        qe_ids = _brute_rank([float(db[j] @ qe) for j in range(len(ids))], ids)[0]
        assert list(rk["filtering_qe/image_ids"][qi]) == (qe_ids if kept else f_ids)

        # ca_sr: best cosine between the query crop (max-pooled) and any stored proposal; the
        # located box is the vote of the proposals within VOTE_DELTA of the best
        region = _l2(q["crop_max"][qi])

        def rerank(vec):
            best, located = [], {}
            for image_id in f_ids[:TOP_N]:
                regs = index.regions(ids.index(image_id))
                sims = [float(_l2(v) @ vec) for v in regs["rpa_max"]]
                k = int(np.argmax(sims))
                best.append(sims[k])
                voted = _vote(regs["boxes"], sims, VOTE_DELTA)
                located[image_id] = (voted, regs["rpa_max"][k], regs["boxes"][k])
            order, scores = _brute_rank(best, f_ids[:TOP_N])
            return order + f_ids[TOP_N:], scores, located

        ca_ids, ca_scores, located = rerank(region)
        assert list(rk["ca_sr/image_ids"][qi]) == ca_ids
        for j, image_id in enumerate(ca_ids[:TOP_N]):
            np.testing.assert_allclose(rk["ca_sr/boxes"][qi][j], located[image_id][0], rtol=1e-5)
            voted_away |= not np.allclose(located[image_id][0], located[image_id][2])
        assert np.isnan(rk["ca_sr/boxes"][qi][TOP_N:]).all()

        # ca_sr_qe (region form), gated on the CA-SR cosines of the reranked block: the region
        # averaged with the best proposals of those that stand out
        kept = _gated(ca_ids, ca_scores, ca_scores, GATE_Z)
        expanded = _l2(region + sum(_l2(located[i][1]) for i in kept))
        caqe_ids = rerank(expanded)[0] if kept else ca_ids
        assert list(rk["ca_sr_qe/image_ids"][qi]) == caqe_ids
    # box voting moved some located box away from the best proposal's
    assert voted_away


def test_every_json_written_is_strict(run):
    """No output file holds NaN or Infinity (bare tokens that strict JSON parsers refuse)."""
    written = sorted(run["out"].rglob("*.json"))
    assert {"retrieval_results.json", "latency.json", "manifest.json"} <= {p.name for p in written}
    for path in written:
        load_strict_json(path)


def test_global_qe_rpa_query_and_sum_pooling_equal_brute_force(run):
    """The other forms, on the same index: ca_sr_qe in its global form, the query region through
    the RoI pooler (QUERY_REGION rpa) and sum-pooled region vectors, recomputed here; the QE gate
    threshold is chosen here so that it opens for some queries and stays shut for others."""
    out, variant = run["out"], run["tmp"] / "variant"
    index = IndexReader(out / "index")
    ids = list(index.image_ids)
    # the query records do not depend on the search settings: the main run's cache holds them
    q = np.load(next(out.glob("queries-synthetic-*.npz")))
    w = np.load(next(out.glob("whitening-whiten-*.npz")))
    mean, proj = w["mean"].astype(np.float64), w["projection"].astype(np.float64)

    def filt(x):  # L2 -> whiten -> L2, written out
        return _l2((_l2(x) - mean) @ proj.T)

    db = filt(index.image_vectors("ipa_sum"))

    def filtering(vec):
        return _brute_rank([float(db[j] @ vec) for j in range(len(ids))], ids)[0]

    def rerank(vec, ranked):
        best = []
        for image_id in ranked[:TOP_N]:
            regs = index.regions(ids.index(image_id))["rpa_sum"]
            best.append(max(float(_l2(v) @ vec) for v in regs))
        order, scores = _brute_rank(best, ranked[:TOP_N])
        return order + ranked[TOP_N:], scores

    queries = [(filt(q["ipa_sum"][qi]), _l2(q["rpa_sum"][qi])) for qi in range(6)]
    cas = [rerank(region, filtering(qv)) for qv, region in queries]
    # a threshold between the queries' best robust z-scores: half of them open the gate
    best_z = sorted(_robust_z(scores[0], scores) for _, scores in cas)
    z = (best_z[2] + best_z[3]) / 2
    assert 0 < z < np.inf and best_z[2] < best_z[3]

    opts = ["OUTPUT_DIR", str(variant), "RETRIEVAL.INDEX_DIR", str(out / "index")]
    opts += ["RETRIEVAL.QE_RERANK_MODE", "global", "RETRIEVAL.QUERY_REGION", "rpa"]
    opts += ["RETRIEVAL.RERANK_POOLING", "sum", "RETRIEVAL.STAGES", "['ca_sr', 'ca_sr_qe']"]
    opts += ["RETRIEVAL.QE_GATE_Z", repr(float(z))]
    proc = _run(["evaluate"] + run["common"] + opts, run["env"], run["tmp"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rk = np.load(variant / "rankings.npz")
    opened = []
    for qi, ((qv, region), (ca, ca_scores)) in enumerate(zip(queries, cas)):
        assert list(rk["ca_sr/image_ids"][qi]) == ca
        # global form, gated: query IPA + IPA of the CA-SR top M that stand out, filtering
        # again, CA-SR of its top N; nothing stands out: the CA-SR ranking
        kept = _gated(ca, ca_scores, ca_scores, z)
        opened.append(bool(kept))
        expanded = _l2(qv + db[[ids.index(i) for i in kept]].sum(axis=0))
        expected = rerank(region, filtering(expanded))[0] if kept else ca
        assert list(rk["ca_sr_qe/image_ids"][qi]) == expected
    assert set(opened) == {True, False}


def test_reported_map_matches_ground_truth(run):
    out = run["out"]
    results = load_strict_json(out / "retrieval_results.json")
    # every stage off the shelf: CS-SR's classes are the query objects (RETRIEVAL.CS_SR_CLASSIFIER)
    assert set(results) == {"filtering", "filtering_qe", "ca_sr", "ca_sr_qe", "cs_sr", "cs_sr_qe"}
    rel = json.loads((run["tmp"] / "synthetic" / "relevance.json").read_text())
    queries = json.loads((run["tmp"] / "synthetic" / "queries.json").read_text())
    rk = np.load(out / "rankings.npz")
    for stage, metrics in results.items():
        aps = []
        for qi, qd in enumerate(queries):
            r = rel[qd["object"]]
            pos = {os.path.splitext(p)[0] for p in r["positives"]}
            junk = {os.path.splitext(p)[0] for p in r.get("junk", [])}
            aps.append(written_out_ap(list(rk[f"{stage}/image_ids"][qi]), pos, junk))
        assert metrics["mAP"] == pytest.approx(np.mean(aps), abs=1e-9), stage
        assert metrics["queries_without_positives"] == 0
        if "sr" in stage:
            # the true positives in the top 10 (LOC_TOP_K), each scored by its located box's
            # best IoU with the object's boxes in that image
            ious = []
            for qi, qd in enumerate(queries):
                r = rel[qd["object"]]
                truth = {os.path.splitext(k)[0]: v for k, v in r.get("boxes", {}).items()}
                pos = {os.path.splitext(p)[0] for p in r["positives"]}
                for j, image_id in enumerate(rk[f"{stage}/image_ids"][qi][:10]):
                    if image_id in pos and image_id in truth:
                        box = list(rk[f"{stage}/boxes"][qi][j])
                        ious.append(max(written_out_iou(box, t) for t in truth[image_id]))
            assert ious, "the tiny benchmark must give localisations to score"
            assert metrics["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-6), stage
            assert metrics["frac_iou@0.5"] == pytest.approx(np.mean(np.array(ious) >= 0.5))
        else:
            assert "mean_iou" not in metrics  # filtering does not locate
    lat = load_strict_json(out / "latency.json")
    assert set(lat) == set(results)
    for v in lat.values():  # each stage ran for every query: a real, positive duration
        assert 0 < v["median_ms"] < 60_000 and v["mean_ms"] > 0


def test_gallery_captions_count_the_relevant_results(run):
    """visualize draws the last stage's top VIS_TOP_K (3) per query; its caption counts the
    positives of relevance.json among them (junk is not counted)."""
    out = run["out"]
    rel = json.loads((run["tmp"] / "synthetic" / "relevance.json").read_text())
    queries = json.loads((run["tmp"] / "synthetic" / "queries.json").read_text())
    top = np.load(out / "rankings.npz")["cs_sr_qe/image_ids"][:, :3]
    html = (out / "visualization" / "index.html").read_text()
    expected = []
    for qi, qd in enumerate(queries):
        pos = {os.path.splitext(p)[0] for p in rel[qd["object"]]["positives"]}
        expected.append(f"{sum(i in pos for i in top[qi])}/3 relevant (cs_sr_qe)")
    assert re.findall(r"<p>(\d+/3 relevant \(cs_sr_qe\))</p>", html) == expected


def test_index_is_reused_and_mismatching_model_is_refused(run):
    out = run["out"]
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    # a rerun with the same setup reuses the index (nothing re-extracted)
    proc = _run(["index"] + run["common"] + ["OUTPUT_DIR", str(out)], run["env"], run["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is complete (10 images), reused" in proc.stderr + proc.stdout
    assert json.loads((out / "index" / "manifest.json").read_text()) == manifest
    # another proposal count changes the stored features: refused, naming what differs
    proc = _run(
        ["evaluate"]
        + run["common"]
        + ["OUTPUT_DIR", str(out), "MODEL.RETRIEVAL.NUM_PROPOSALS", "8"],
        run["env"],
        run["tmp"],
    )
    assert proc.returncode != 0
    assert IndexMismatchError.__name__ in proc.stderr
    assert "NUM_PROPOSALS" in proc.stderr


def test_python_api_queries_with_image_and_box(run, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(run["tmp"]))
    opts = run["common"][2:] + ["OUTPUT_DIR", str(run["out"])]  # the options after the config file
    opts[opts.index("RETRIEVAL.CUSTOM_DATASETS") + 1] = [f"whiten={run['tmp'] / 'whiten'}"]
    cfg = make_cfg(ZF_TINY, opts)
    register_custom_dataset("synthetic", str(run["tmp"] / "synthetic"))
    engine = InstanceSearch(cfg)
    queries = json.loads((run["tmp"] / "synthetic" / "queries.json").read_text())
    rk = np.load(run["out"] / "rankings.npz")
    qd = queries[0]
    hits = engine.query(
        str(run["tmp"] / "synthetic" / qd["image"]), qd["box"], stage="ca_sr", top_k=5
    )
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert [h.image_id for h in hits] == list(rk["ca_sr/image_ids"][0][:5])
    assert all(h.box is not None for h in hits[:TOP_N]) and hits[TOP_N].box is None
    assert all(Path(h.file_name).is_file() for h in hits)
    with pytest.raises(ValueError, match="reversed corners"):
        engine.query(str(run["tmp"] / "synthetic" / qd["image"]), [50, 50, 10, 10])


def test_result_files_are_replaced_atomically(tmp_path, monkeypatch):
    tool = load_tool("retrieve")
    cfg = tiny_cfg("ZF", ["OUTPUT_DIR", str(tmp_path), "RETRIEVAL.SAVE_TOP_K", "2"])
    index = SimpleNamespace(num_images=3, image_ids=["a", "b", "c"])
    queries = [{"image_id": "q"}]

    def results(order):
        r = SimpleNamespace(
            order=np.array(order),
            scores=np.array([0.9, 0.5, 0.1], np.float32),
            boxes=np.zeros((3, 4), np.float32),
        )
        return {"filtering": [r]}

    tool.save_rankings(cfg, index, queries, results([2, 0, 1]))
    assert list(np.load(tmp_path / "rankings.npz")["filtering/image_ids"][0]) == ["c", "a"]
    enospc_on_replace(monkeypatch, lambda src, dst: dst.endswith("rankings.npz"))
    with pytest.raises(OutputWriteError) as e:
        tool.save_rankings(cfg, index, queries, results([1, 2, 0]))
    assert e.value.errno == errno.ENOSPC and "rankings.npz" in str(e.value)
    assert "free disk space" in str(e.value) and "previous file is unchanged" in str(e.value)
    monkeypatch.undo()
    assert list(np.load(tmp_path / "rankings.npz")["filtering/image_ids"][0]) == ["c", "a"]
    assert sorted(os.listdir(tmp_path)) == ["rankings.npz"]  # no temp file left
