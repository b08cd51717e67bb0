"""Tests for retrieval_ext.evaluation.metrics.

Every expected number is worked by hand in the comments, or comes from the brute-force /
second implementations written below (never from the module itself).
"""

import math
import pickle

import numpy as np
import pytest

from retrieval_ext.evaluation.metrics import (
    average_precision,
    box_iou,
    compute_ap,
    ins_average_precision,
    ins_map,
    ins_shot_ranking,
    junk_free_ranks,
    localisation_metrics,
    mean_precision_at_k,
    oxford_paris_map,
    precision_at_k,
    ranks_of,
    revisited_map,
)
from tests.common import FIXTURES

DATA = FIXTURES


# ----------------------------------------------------------------------------------------------
# Independent implementations used as references
# ----------------------------------------------------------------------------------------------


def brute_force_ap(ranking, positives, junk):
    """Literal transcription of the official Oxford compute_ap.cpp loop.

    Walks the ranked list, skips junk, and after every non-junk position adds the trapezoid
    between the previous (recall, precision) point and the current one.
    """
    positives, junk = set(positives), set(junk)
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect, j = 0, 0
    for item in ranking:
        if item in junk:
            continue
        if item in positives:
            intersect += 1
        recall = intersect / len(positives)
        precision = intersect / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def reference_compute_map(ranks_nq, gnd, kappas):
    """Second implementation following cnnimageretrieval-pytorch's compute_map step by step.

    ``ranks_nq`` is N x Q (their layout). Positions of positives are shifted down by the junk
    before them with the same two-pointer walk, AP is accumulated per positive with the
    (j / rank, (j + 1) / (rank + 1)) trapezoid, and precision at k uses kq = min(max(pos), k).
    """
    nq = len(gnd)
    aps, prs = [], []
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        col = ranks_nq[:, i]
        pos = [p for p in range(col.shape[0]) if col[p] in set(qgnd.tolist())]
        junk = [p for p in range(col.shape[0]) if col[p] in set(qgndj.tolist())]
        k, ij = 0, 0
        for ip in range(len(pos)):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        ap = 0.0
        for jj, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else jj / rank
            p1 = (jj + 1) / (rank + 1)
            ap += (p0 + p1) * (1.0 / len(qgnd)) / 2.0
        aps.append(ap)
        pos1 = np.array(pos) + 1
        row = []
        for kap in kappas:
            kq = min(pos1.max(), kap)
            row.append((pos1 <= kq).sum() / kq)
        prs.append(row)
    return float(np.mean(aps)), np.mean(np.array(prs), axis=0) if kappas else None


def brute_force_trec_ap(keyframe_ranking, keyframe_shots, relevant, max_results=None):
    """trec_eval AP: walk shots in order, skip already seen shots, sum precision at each hit."""
    seen, n, hits, total = set(), 0, 0, 0.0
    for kf in keyframe_ranking:
        shot = keyframe_shots[kf]
        if shot in seen:
            continue
        seen.add(shot)
        n += 1
        if max_results is not None and n > max_results:
            break
        if shot in relevant:
            hits += 1
            total += hits / n
    return total / len(relevant)


def load_gnd(name):
    with open(DATA / name, "rb") as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------------------------
# compute_ap / average_precision: hand-worked
# ----------------------------------------------------------------------------------------------


def test_compute_ap_hand_worked():
    # Positives at junk-free ranks 0 and 1 of 2: each trapezoid is (1 + 1) / 2 * 1/2 -> AP 1.
    assert compute_ap([0, 1], 2) == 1.0
    # Positives at ranks 1 and 3 of 2:
    #   j=0, r=1: precision before 0/1 = 0, at 1/2 -> (0 + 1/2) / 2 * 1/2 = 1/8
    #   j=1, r=3: precision before 1/3, at 2/4   -> (1/3 + 1/2) / 2 * 1/2 = 5/24
    #   AP = 3/24 + 5/24 = 1/3
    assert compute_ap([1, 3], 2) == pytest.approx(1.0 / 3.0, abs=1e-15)
    # One of three positives, at rank 0: (1 + 1) / 2 * 1/3 = 1/3; the other two never retrieved.
    assert compute_ap([0], 3) == pytest.approx(1.0 / 3.0, abs=1e-15)
    # One positive at rank 2: (0/2 + 1/3) / 2 * 1 = 1/6.
    assert compute_ap([2], 1) == pytest.approx(1.0 / 6.0, abs=1e-15)
    # Nothing retrieved: 0; no positives at all: nan.
    assert compute_ap([], 4) == 0.0
    assert math.isnan(compute_ap([], 0))


def test_compute_ap_rejects_bad_ranks():
    with pytest.raises(ValueError):
        compute_ap([2, 1], 2)  # not increasing
    with pytest.raises(ValueError):
        compute_ap([0, 1, 2], 2)  # more ranks than positives
    with pytest.raises(ValueError):
        compute_ap([-1], 1)


def test_average_precision_with_junk_hand_worked():
    # Positives 10, 12 at raw ranks 0 and 2, junk 11 at rank 1: junk removed -> positives at
    # junk-free ranks 0 and 1 -> AP = 1.
    assert average_precision([10, 11, 12, 13, 14], [10, 12], [11]) == 1.0
    # Same without junk: positives at ranks 0 and 2 of 2:
    #   (1 + 1) / 2 * 1/2 = 1/2 ; (1/2 + 2/3) / 2 * 1/2 = 7/24 -> AP = 19/24
    assert average_precision([10, 11, 12, 13, 14], [10, 12]) == pytest.approx(19.0 / 24.0)
    # Ranking [5, 7, 3, 9, 1, 2], positives {7, 9, 4} (4 never retrieved), junk {3}.
    # Junk-free ranking [5, 7, 9, 1, 2]: 7 at 1, 9 at 2.
    #   j=0, r=1: (0/1 + 1/2) / 2 = 1/4 ; j=1, r=2: (1/2 + 2/3) / 2 = 7/12 ; sum 5/6 ; / 3 = 5/18
    assert average_precision([5, 7, 3, 9, 1, 2], [7, 9, 4], [3]) == pytest.approx(5.0 / 18.0)
    # A truncated ranking that misses every positive scores 0; no positives -> nan.
    assert average_precision([5, 6], [7, 9]) == 0.0
    assert math.isnan(average_precision([1, 2, 3], []))


def test_junk_free_ranks_and_ranks_of():
    # Raw positions: 0:5 1:7 2:3(junk) 3:9 4:1(junk) 5:2 ; positives 7, 9, 2.
    # 7 -> 1 (no junk before), 9 -> 3 - 1 = 2, 2 -> 5 - 2 = 3.
    np.testing.assert_array_equal(junk_free_ranks([5, 7, 3, 9, 1, 2], [7, 9, 2], [3, 1]), [1, 2, 3])
    np.testing.assert_array_equal(ranks_of([5, 7, 3, 9, 1, 2], [2, 3, 42]), [2, 5])


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        average_precision([1, 2, 3], [1], [1])  # positive and junk at once
    with pytest.raises(ValueError):
        average_precision([1, 2, 1], [1])  # duplicated ranking entry
    with pytest.raises(TypeError):
        average_precision([0.5, 1.0], [1])
    with pytest.raises(ValueError):
        average_precision([-1, 2], [2])  # database indices are non-negative


def test_average_precision_matches_brute_force_random():
    rng = np.random.default_rng(1234)
    for _ in range(400):
        n = int(rng.integers(1, 80))
        labels = rng.integers(0, 3, size=n)  # 0 negative, 1 positive, 2 junk
        if not (labels == 1).any():
            labels[rng.integers(0, n)] = 1
        ids = rng.permutation(10 * n)[:n]  # non-contiguous database indices
        positives = ids[labels == 1]
        junk = ids[labels == 2]
        ranking = rng.permutation(ids)
        if rng.random() < 0.3:  # a truncated ranking (e.g. a reranked top-N list)
            ranking = ranking[: int(rng.integers(0, n + 1))]
        expected = brute_force_ap(ranking.tolist(), positives.tolist(), junk.tolist())
        got = average_precision(ranking, positives, junk)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_ideal_ranking_is_exactly_one_random():
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(2, 300))
        positives = rng.choice(n, size=int(rng.integers(1, n)), replace=False)
        rest = np.setdiff1d(np.arange(n), positives)
        assert average_precision(np.concatenate([positives, rest]), positives) == 1.0


# ----------------------------------------------------------------------------------------------
# precision at k
# ----------------------------------------------------------------------------------------------


def test_precision_at_k_official_definition():
    # 1-based positions [1, 3] of 2 positives: k=1 -> kq=1, 1/1 ; k=5 -> kq=min(3,5)=3, 2/3.
    assert precision_at_k([0, 2], 2, 1) == 1.0
    assert precision_at_k([0, 2], 2, 5) == pytest.approx(2.0 / 3.0)
    # Positions [2, 7] : k=5 -> kq=min(7,5)=5, one positive within -> 1/5.
    assert precision_at_k([1, 6], 2, 5) == pytest.approx(0.2)
    # A third positive is missing from the (truncated) ranking: it lies beyond it, kq = k = 5
    # -> 2/5 rather than 2/3.
    assert precision_at_k([0, 2], 3, 5) == pytest.approx(0.4)
    assert precision_at_k([], 3, 5) == 0.0
    assert math.isnan(precision_at_k([], 0, 5))


def test_mean_precision_at_k_matches_reference_random():
    rng = np.random.default_rng(99)
    n, nq = 40, 12
    ranks = np.stack([rng.permutation(n) for _ in range(nq)])  # Q x N
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n)
        num_pos = 0 if q == 0 else int(rng.integers(1, 8))  # query 0 has no positives
        num_junk = int(rng.integers(0, 6))
        ok, junk = np.split(perm, [num_pos, num_pos + num_junk])[:2]
        gnd.append({"ok": ok.tolist(), "junk": junk})
    kappas = (1, 3, 5, 10)
    ref_map, ref_pr = reference_compute_map(ranks.T, gnd, kappas)
    np.testing.assert_allclose(mean_precision_at_k(ranks, gnd, kappas), ref_pr, rtol=1e-12)
    out = oxford_paris_map(ranks, gnd)
    assert out["mAP"] == pytest.approx(ref_map, rel=1e-12)
    assert math.isnan(out["aps"][0]) and out["aps"].shape == (nq,)


# ----------------------------------------------------------------------------------------------
# Real Oxford 5k / Paris 6k ground truth
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pkl", ["oxford5k/gnd_oxford5k.pkl", "paris6k/gnd_paris6k.pkl"], ids=["oxford", "paris"]
)
def test_real_ground_truth(pkl):
    cfg = load_gnd(pkl)
    gnd, n = cfg["gnd"], len(cfg["imlist"])
    rng = np.random.default_rng(0)
    ideal, junk_on_top, worst = [], [], []
    for g in gnd:
        ok, junk = np.array(g["ok"]), np.array(g["junk"])
        rest = rng.permutation(np.setdiff1d(np.arange(n), np.concatenate([ok, junk])))
        pos = rng.permutation(ok)
        ideal.append(np.concatenate([pos, junk, rest]))
        # Junk interleaved with the positives at the top: every other slot a junk image.
        top = []
        for i in range(max(len(pos), len(junk))):
            if i < len(junk):
                top.append(junk[i])
            if i < len(pos):
                top.append(pos[i])
        junk_on_top.append(np.concatenate([np.array(top, dtype=np.int64), rest]))
        worst.append(np.concatenate([rest, junk, pos]))

    out = oxford_paris_map(np.stack(ideal), gnd)
    assert out["mAP"] == 1.0
    assert np.all(out["aps"] == 1.0)
    assert oxford_paris_map(junk_on_top, gnd)["mAP"] == 1.0

    worst_out = oxford_paris_map(worst, gnd)
    expected = [brute_force_ap(r.tolist(), g["ok"], g["junk"]) for r, g in zip(worst, gnd)]
    np.testing.assert_allclose(worst_out["aps"], expected, rtol=1e-12)
    assert worst_out["mAP"] == pytest.approx(np.mean(expected), rel=1e-12)
    assert worst_out["mAP"] < 0.1

    # Random rankings against the cnnimageretrieval-style second implementation (N x Q layout).
    sub = list(range(0, len(gnd), 5))
    random_ranks = np.stack([rng.permutation(n) for _ in sub])
    ref_map, _ = reference_compute_map(random_ranks.T, [gnd[i] for i in sub], ())
    assert oxford_paris_map(random_ranks, [gnd[i] for i in sub])["mAP"] == pytest.approx(
        ref_map, rel=1e-12
    )


# ----------------------------------------------------------------------------------------------
# Revisited protocols
# ----------------------------------------------------------------------------------------------


def revisited_fixture():
    gnd = [
        {"bbx": [0, 0, 1, 1], "easy": [0, 3], "hard": [5], "junk": [1]},
        {"bbx": [0, 0, 1, 1], "easy": [2], "hard": [], "junk": []},  # no hard images
        {"bbx": [0, 0, 1, 1], "easy": [], "hard": [4], "junk": [7]},  # no easy images
    ]
    rankings = [
        [0, 1, 5, 2, 3, 4, 6, 7, 8, 9],
        [9, 8, 2, 0, 1, 3, 4, 5, 6, 7],
        [7, 6, 4, 0, 1, 2, 3, 5, 8, 9],
    ]
    return rankings, gnd


def test_revisited_hand_worked():
    rankings, gnd = revisited_fixture()
    # q0 Easy: pos {0,3}, junk {1,5}: junk-free [0,2,3,4,...] -> ranks 0, 2.
    #   AP = (2 + (1/2 + 2/3)) / 4 = 19/24 ; 1-based pos [1,3]: P@1 1, P@5 kq=3 -> 2/3, P@10 2/3
    # q1 Easy: pos {2} at rank 2: AP = (0 + 1/3) / 2 = 1/6 ; pos [3]: P@1 0, P@5 1/3, P@10 1/3
    # q2 Easy: no easy images -> skipped.
    # Easy: mAP = (19/24 + 4/24) / 2 = 23/48 ; mP@1 1/2 ; mP@5 (2/3 + 1/3)/2 = 1/2 ; mP@10 1/2
    #
    # q0 Medium: pos {0,3,5}, junk {1}: junk-free [0,5,2,3,...] -> ranks 0, 1, 3.
    #   AP = (2 + 2 + (2/3 + 3/4)) / 6 = 65/72 ; pos [1,2,4]: P@1 1, P@5 kq=4 -> 3/4, P@10 3/4
    # q1 Medium: as Easy: 1/6 ; 0, 1/3, 1/3
    # q2 Medium: pos {4}, junk {7}: junk-free [6,4,...] -> rank 1: AP = (0 + 1/2)/2 = 1/4 ;
    #   pos [2]: P@1 0, P@5 kq=2 -> 1/2, P@10 1/2
    # Medium: mAP = (65 + 12 + 18) / 72 / 3 = 95/216 ; mP@1 1/3 ; mP@5 (3/4+1/3+1/2)/3 = 19/36
    #
    # q0 Hard: pos {5}, junk {1,0,3}: junk-free [5,...] -> AP 1 ; P@k 1 for all k.
    # q1 Hard: no hard images -> skipped (aps nan).
    # q2 Hard: as Medium: 1/4 ; 0, 1/2, 1/2
    # Hard: mAP = (1 + 1/4) / 2 = 5/8 ; mP@1 1/2 ; mP@5 3/4 ; mP@10 3/4
    expected = {
        "easy": {"mAP": 23 / 48, "mP@1": 1 / 2, "mP@5": 1 / 2, "mP@10": 1 / 2},
        "medium": {"mAP": 95 / 216, "mP@1": 1 / 3, "mP@5": 19 / 36, "mP@10": 19 / 36},
        "hard": {"mAP": 5 / 8, "mP@1": 1 / 2, "mP@5": 3 / 4, "mP@10": 3 / 4},
    }
    for as_array in (False, True):
        out = revisited_map(np.array(rankings) if as_array else rankings, gnd)
        for protocol, values in expected.items():
            for key, value in values.items():
                assert out[protocol][key] == pytest.approx(value, rel=1e-12), (protocol, key)
    assert math.isnan(out["easy"]["aps"][2])
    assert math.isnan(out["hard"]["aps"][1])
    np.testing.assert_allclose(out["medium"]["aps"], [65 / 72, 1 / 6, 1 / 4])


def test_revisited_matches_reference_random():
    rng = np.random.default_rng(5)
    n, nq = 60, 10
    gnd = []
    for _ in range(nq):
        perm = rng.permutation(n)
        e, h, j = (int(x) for x in rng.integers(0, 6, size=3))
        easy, hard, junk = np.split(perm, [e, e + h, e + h + j])[:3]
        gnd.append({"easy": easy, "hard": hard, "junk": junk})
    ranks = np.stack([rng.permutation(n) for _ in range(nq)])
    out = revisited_map(ranks, gnd, kappas=(1, 5, 10))
    protocols = {
        "easy": lambda g: {"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])},
        "medium": lambda g: {"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]},
        "hard": lambda g: {"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])},
    }
    for name, convert in protocols.items():
        ref_map, ref_pr = reference_compute_map(ranks.T, [convert(g) for g in gnd], (1, 5, 10))
        assert out[name]["mAP"] == pytest.approx(ref_map, rel=1e-12)
        got_pr = [out[name]["mP@1"], out[name]["mP@5"], out[name]["mP@10"]]
        np.testing.assert_allclose(got_pr, ref_pr, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# TRECVid INS
# ----------------------------------------------------------------------------------------------


def test_ins_hand_worked():
    shots = ["s1", "s1", "s2", "s3", "s3", "s4", "s5"]  # keyframe index -> shot
    ranking = [3, 0, 4, 1, 6, 2, 5]
    # Keyframe shots in order: s3, s1, s3 (dup), s1 (dup), s5, s2, s4 -> [s3, s1, s5, s2, s4]
    assert ins_shot_ranking(ranking, shots) == ["s3", "s1", "s5", "s2", "s4"]
    assert ins_shot_ranking(ranking, shots, max_results=2) == ["s3", "s1"]
    # Relevant {s1, s2, s9}: s1 at shot rank 2 -> 1/2, s2 at rank 4 -> 2/4, s9 never retrieved.
    # AP = (1/2 + 1/2) / 3 = 1/3
    assert ins_average_precision(ranking, shots, {"s1", "s2", "s9"}) == pytest.approx(1 / 3)
    # Top 3 shots [s3, s1, s5]: only s1 -> (1/2) / 3 = 1/6
    assert ins_average_precision(ranking, shots, {"s1", "s2", "s9"}, 3) == pytest.approx(1 / 6)
    assert math.isnan(ins_average_precision(ranking, shots, set()))
    # Topics: {s1,s2,s9} -> 1/3 ; {s3} at rank 1 -> 1 ; {} -> nan, skipped. mAP = 2/3
    out = ins_map([ranking, ranking, ranking], shots, [{"s1", "s2", "s9"}, {"s3"}, set()])
    assert out["mAP"] == pytest.approx(2 / 3)
    assert math.isnan(out["aps"][2])


def test_ins_matches_brute_force_random():
    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        shots = [int(s) for s in rng.integers(0, max(1, n // 3), size=n)]
        relevant = set(int(s) for s in rng.integers(0, max(1, n // 3) + 3, size=3))
        ranking = rng.permutation(n)[: int(rng.integers(0, n + 1))]
        max_results = None if rng.random() < 0.5 else int(rng.integers(1, 10))
        expected = brute_force_trec_ap(ranking.tolist(), shots, relevant, max_results)
        got = ins_average_precision(ranking, shots, relevant, max_results)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------------------------
# Localisation
# ----------------------------------------------------------------------------------------------


def test_box_iou_hand_worked():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0], [np.nan] * 4])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 5, 5]])
    iou = box_iou(a, b)
    assert iou.shape == (3, 4)
    # [0,0,10,10] vs [5,0,15,10]: intersection 5 x 10 = 50, union 100 + 100 - 50 = 150 -> 1/3
    assert iou[0, 0] == pytest.approx(1 / 3)
    assert iou[0, 1] == 0.0  # disjoint
    assert iou[0, 2] == 1.0  # identical
    assert iou[0, 3] == 0.25  # contained: 25 / 100
    np.testing.assert_array_equal(iou[1], 0.0)  # degenerate box: empty union
    np.testing.assert_array_equal(iou[2], 0.0)  # NaN box: "no box"


def test_localisation_metrics_hand_worked():
    box = [0, 0, 10, 10]
    rankings = [[4, 2, 7, 1], [3, 5, 6]]
    located = [
        np.array([box, [1, 1, 2, 2], box, box], dtype=float),
        np.array([[np.nan] * 4, box, box], dtype=float),
    ]
    gt = [
        {4: np.array([[5, 0, 15, 10], box]), 7: np.array([[0, 0, 5, 5]]), 1: np.array([box])},
        {3: np.array([box]), 5: np.array([[5, 0, 15, 10]])},
    ]
    positives = [{4, 7, 1}, {3, 5, 6, 8}]
    # q0, top 3 = [4, 2, 7]: 4 -> max(1/3, 1) = 1 ; 2 negative ; 7 -> 25/100 = 0.25 ;
    #   1 is a positive but beyond the top 3.
    # q1: 3 -> NaN box -> 0 ; 5 -> 1/3 ; 6 positive without ground-truth boxes -> not scored.
    # Pairs [1, 0.25, 0, 1/3]: mean (12 + 3 + 0 + 4) / 12 / 4 = 19/48 ; >= 0.5: 1 of 4.
    out = localisation_metrics(rankings, located, gt, positives, top_k=3)
    assert out["count"] == 4
    assert out["mean_iou"] == pytest.approx(19 / 48)
    assert out["frac_iou@0.5"] == 0.25
    # IoU >= 0.25: 1, 0.25 and 1/3 -> 3 of 4.
    assert localisation_metrics(rankings, located, gt, positives, 3, 0.25)["frac_iou@0.25"] == 0.75
    # top_k = 1: q0 -> 4 (IoU 1), q1 -> 3 (IoU 0): mean 1/2.
    assert localisation_metrics(rankings, located, gt, positives, top_k=1)["mean_iou"] == 0.5
    empty = localisation_metrics([[2]], [np.array([box], float)], [{}], [{4}])
    assert empty["count"] == 0 and math.isnan(empty["mean_iou"])
