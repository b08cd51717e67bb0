import numpy as np
import pytest

from retrieval_ext.retrieval.reranking import (
    RerankResult,
    class_agnostic_rerank,
    class_specific_rerank,
    vote_box,
)

NAN4 = [np.nan] * 4


class Recorder:
    """Callable accessor that remembers which database indices were read."""

    def __init__(self, data):
        self.data = data
        self.requested = []

    def __call__(self, i):
        self.requested.append(i)
        return self.data[i]


def _hand_ca_data():
    # Query region (1, 0); cosine with a unit proposal vector is its first coordinate.
    vectors = {
        10: np.array([[0.0, 1.0], [0.6, 0.8]]),  # sims 0, 0.6 -> best 1, score 0.6
        20: np.array([[1.0, 0.0], [-1.0, 0.0]]),  # sims 1, -1 -> best 0, score 1.0
        30: np.zeros((0, 2)),  # no proposals -> -inf
        40: np.array([[1.0, 0.0]]),  # tail: never looked at
    }
    boxes = {
        10: np.array([[0, 0, 10, 10], [5, 5, 20, 30]], np.float32),
        20: np.array([[1, 2, 3, 4], [7, 7, 8, 8]], np.float32),
        30: np.zeros((0, 4), np.float32),
        40: np.array([[0, 0, 1, 1]], np.float32),
    }
    return vectors, boxes


def test_ca_rerank_hand_worked_block_and_tail():
    vectors, boxes = _hand_ca_data()
    res = class_agnostic_rerank(
        np.array([1.0, 0.0]), [10, 20, 30, 40], [0.9, 0.8, 0.7, 0.6], vectors, boxes, top_n=3
    )
    assert isinstance(res, RerankResult)
    assert res.top_n == 3
    # Block re-sorted by rerank score 1.0 (20), 0.6 (10), -inf (30); tail (40) unchanged.
    np.testing.assert_array_equal(res.order, [20, 10, 30, 40])
    np.testing.assert_allclose(res.scores, [1.0, 0.6, -np.inf, 0.6], atol=1e-7)  # tail: filtering
    np.testing.assert_array_equal(res.best_proposal, [0, 1, -1, -1])
    np.testing.assert_array_equal(res.boxes, [[1, 2, 3, 4], [5, 5, 20, 30], NAN4, NAN4])
    assert res.order.dtype == np.int64 and res.scores.dtype == np.float32
    assert res.boxes.shape == (4, 4) and res.boxes.dtype == np.float32


def test_ca_rerank_uses_true_cosine_and_float16():
    # Raw vectors: query (2, 0), proposals (3, 4) and (0, 7): cosines 3/5 = 0.6 and 0.
    res = class_agnostic_rerank(
        np.array([2.0, 0.0], np.float16),
        [0],
        [0.5],
        [np.array([[3.0, 4.0], [0.0, 7.0]], np.float16)],
        top_n=1,
    )
    np.testing.assert_allclose(res.scores, [0.6], atol=1e-3)
    assert res.best_proposal[0] == 0
    assert np.all(np.isnan(res.boxes))  # no boxes given


def test_ca_rerank_ties_keep_filtering_order_and_none_means_empty():
    same = np.array([[0.6, 0.8]])
    vectors = [same, None, same, same, np.zeros((0, 2))]
    order = [3, 1, 0, 4, 2]  # 3, 0, 2 tie at 0.6; 1 (None) and 4 (empty) are -inf
    res = class_agnostic_rerank([1.0, 0.0], order, np.linspace(1, 0, 5), vectors, top_n=5)
    np.testing.assert_array_equal(res.order, [3, 0, 2, 1, 4])
    np.testing.assert_allclose(res.scores, [0.6, 0.6, 0.6, -np.inf, -np.inf], atol=1e-7)


def test_only_top_n_images_are_accessed():
    rng = np.random.default_rng(0)
    n_total = 1000
    data = [rng.normal(size=(3, 4)) for _ in range(n_total)]
    box_data = [rng.random((3, 4)) * 100 for _ in range(n_total)]
    order = rng.permutation(n_total)
    vec_acc, box_acc = Recorder(data), Recorder(box_data)
    res = class_agnostic_rerank(rng.normal(size=4), order, np.zeros(n_total), vec_acc, box_acc, 5)
    assert sorted(vec_acc.requested) == sorted(order[:5].tolist())
    assert sorted(box_acc.requested) == sorted(order[:5].tolist())
    assert res.order.shape == (n_total,)
    cls_acc = Recorder([rng.random((3, 6)) for _ in range(n_total)])
    class_specific_rerank(2, order, np.zeros(n_total), cls_acc, top_n=7)
    assert sorted(cls_acc.requested) == sorted(order[:7].tolist())


def test_ca_rerank_brute_force_random():
    rng = np.random.default_rng(1)
    n_total, d = 30, 5
    vectors = [rng.normal(size=(int(rng.integers(0, 6)), d)) for _ in range(n_total)]
    boxes = [rng.random((v.shape[0], 4)) * 50 for v in vectors]
    q = rng.normal(size=d)
    order = rng.permutation(n_total)
    filt = np.sort(rng.random(n_total))[::-1]
    top_n = 12
    res = class_agnostic_rerank(q, order, filt, vectors, boxes, top_n=top_n)

    # Brute force with explicit loops.
    qn = q / np.sqrt(sum(v * v for v in q))
    best_score, best_idx = [], []
    for pos in range(top_n):
        i = order[pos]
        s_best, b_best = -np.inf, -1
        for b in range(vectors[i].shape[0]):
            v = vectors[i][b]
            cos = sum(v[k] * qn[k] for k in range(d)) / np.sqrt(sum(x * x for x in v))
            if cos > s_best:
                s_best, b_best = cos, b
        best_score.append(s_best)
        best_idx.append(b_best)
    positions = sorted(range(top_n), key=lambda p: (-best_score[p], p))
    np.testing.assert_array_equal(res.order[:top_n], [order[p] for p in positions])
    np.testing.assert_array_equal(res.order[top_n:], order[top_n:])
    np.testing.assert_allclose(res.scores[:top_n], [best_score[p] for p in positions], atol=1e-5)
    np.testing.assert_allclose(res.scores[top_n:], filt[top_n:], atol=1e-7)
    for out_pos, p in enumerate(positions):
        i, b = order[p], best_idx[p]
        assert res.best_proposal[out_pos] == b
        expected_box = boxes[i][b] if b >= 0 else NAN4
        np.testing.assert_allclose(res.boxes[out_pos], expected_box, rtol=1e-6)
    assert np.all(np.isnan(res.boxes[top_n:])) and np.all(res.best_proposal[top_n:] == -1)


def test_top_n_clipping_and_zero():
    vectors, boxes = _hand_ca_data()
    res = class_agnostic_rerank([1.0, 0.0], [10, 20], [0.9, 0.8], vectors, boxes, top_n=100)
    assert res.top_n == 2
    np.testing.assert_array_equal(res.order, [20, 10])
    res0 = class_agnostic_rerank([1.0, 0.0], [10, 20], [0.9, 0.8], vectors, boxes, top_n=0)
    assert res0.top_n == 0
    np.testing.assert_array_equal(res0.order, [10, 20])
    np.testing.assert_allclose(res0.scores, [0.9, 0.8])
    assert np.all(np.isnan(res0.boxes)) and np.all(res0.best_proposal == -1)


def test_ca_rerank_validates():
    vectors, boxes = _hand_ca_data()
    with pytest.raises(ValueError):
        class_agnostic_rerank([1.0, 0.0], [10, 20], [0.9], vectors)  # length mismatch
    with pytest.raises(ValueError):
        class_agnostic_rerank([1.0, 0.0, 0.0], [10], [0.9], vectors)  # dim mismatch
    with pytest.raises(ValueError):
        bad_boxes = {10: np.zeros((3, 4))}
        class_agnostic_rerank([1.0, 0.0], [10], [0.9], vectors, bad_boxes)


def _hand_cs_data():
    # 2 foreground classes + background (last column); query class 1 (second column).
    probs = {
        0: np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]),  # class-1 probs 0.2, 0.6 -> best 1
        1: np.array([[0.2, 0.7, 0.1]]),  # 0.7 -> best 0
        2: np.zeros((0, 3)),  # no proposals -> -inf
        3: np.array([[0.0, 0.9, 0.1]]),  # tail
    }
    # Per-class boxes (K, C=2, 4): box of class c for proposal k is (10k + c, 0, 10k + c + 1, 1).
    per_class = {i: np.zeros((p.shape[0], 2, 4), np.float32) for i, p in probs.items()}
    for arr in per_class.values():
        for k in range(arr.shape[0]):
            for c in range(2):
                arr[k, c] = [10 * k + c, 0, 10 * k + c + 1, 1]
    return probs, per_class


@pytest.mark.parametrize("layout", ["per_class", "flat", "agnostic"])
def test_cs_rerank_hand_worked(layout):
    probs, per_class = _hand_cs_data()
    if layout == "per_class":
        boxes = per_class
        expected_boxes = [[1, 0, 2, 1], [11, 0, 12, 1]]  # class-1 boxes of proposals 0 and 1
    elif layout == "flat":  # detectron2 predict_boxes layout (K, 4 * C)
        boxes = {i: b.reshape(b.shape[0], 8) for i, b in per_class.items()}
        expected_boxes = [[1, 0, 2, 1], [11, 0, 12, 1]]
    else:  # class-agnostic: use the class-0 boxes as (K, 4)
        boxes = {i: b[:, 0] for i, b in per_class.items()}
        expected_boxes = [[0, 0, 1, 1], [10, 0, 11, 1]]
    res = class_specific_rerank(1, [0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6], probs, boxes, top_n=3)
    # Block: image 1 (0.7, proposal 0), image 0 (0.6, proposal 1), image 2 (-inf); tail image 3.
    np.testing.assert_array_equal(res.order, [1, 0, 2, 3])
    np.testing.assert_allclose(res.scores, [0.7, 0.6, -np.inf, 0.6], atol=1e-7)
    np.testing.assert_array_equal(res.best_proposal, [0, 1, -1, -1])
    np.testing.assert_array_equal(res.boxes, expected_boxes + [NAN4, NAN4])


def test_cs_rerank_callable_and_validation():
    probs, _ = _hand_cs_data()
    res = class_specific_rerank(0, [0, 1, 3], [0.3, 0.2, 0.1], lambda i: probs[i], top_n=3)
    # Class-0 probs: image 0 -> 0.7, image 1 -> 0.2, image 3 -> 0.0.
    np.testing.assert_array_equal(res.order, [0, 1, 3])
    np.testing.assert_allclose(res.scores, [0.7, 0.2, 0.0], atol=1e-7)
    with pytest.raises(ValueError):
        class_specific_rerank(2, [0], [0.1], probs)  # column 2 is background
    with pytest.raises(ValueError):
        class_specific_rerank(-1, [0], [0.1], probs)
    with pytest.raises(ValueError):
        class_specific_rerank(0, [0], [0.1], probs, {0: np.zeros((2, 3))})


def test_ca_rerank_matches_per_image_reference_on_float16_index_blocks():
    """The vectorised CA-SR against tests.common's per-image oracle on index-like data: float16
    vectors of varying norm, images with no proposals, and images larger than the 1024-row
    conversion buffer, so that images straddle and exceed its blocks."""
    from tests.common import ca_sr_per_image

    rng = np.random.default_rng(7)
    d, n_total, top_n = 24, 60, 40
    order = rng.permutation(n_total)
    counts = rng.integers(1, 300, n_total)
    counts[order[[2, 9, 30]]] = [1500, 2100, 1030]  # in the block, each over one buffer
    counts[order[[4, 18]]] = 0  # in the block, no proposals
    vectors = [
        (rng.standard_normal((int(k), d)) * rng.uniform(0.1, 10)).astype(np.float16) for k in counts
    ]
    vectors[order[25]] = None  # in the block, nothing stored
    boxes = [rng.uniform(0, 500, (int(k), 4)).astype(np.float32) for k in counts]
    filt = np.sort(rng.random(n_total))[::-1].astype(np.float32)
    q = rng.standard_normal(d).astype(np.float32)

    res = class_agnostic_rerank(q, order, filt, vectors, boxes, top_n=top_n)
    want_order, want_scores, want_best, want_boxes = ca_sr_per_image(
        q, order, vectors, boxes, top_n
    )
    np.testing.assert_array_equal(res.order[:top_n], want_order)
    np.testing.assert_allclose(res.scores[:top_n], want_scores, atol=1e-5)
    np.testing.assert_array_equal(res.best_proposal[:top_n], want_best)
    np.testing.assert_allclose(res.boxes[:top_n], want_boxes)
    assert np.all(np.isneginf(res.scores[top_n - 3 : top_n]))  # the 3 empty images sort last
    np.testing.assert_array_equal(res.order[top_n:], order[top_n:])


def test_vote_box_hand_worked():
    # sims 0.9, 0.88, 0.5 with delta 0.05: the first two vote with weights 0.9 and 0.88;
    # x1 = (0.9 * 0 + 0.88 * 2) / 1.78, x2 = (0.9 * 10 + 0.88 * 12) / 1.78
    boxes = [[0, 0, 10, 10], [2, 2, 12, 12], [50, 50, 60, 60]]
    got = vote_box(boxes, [0.9, 0.88, 0.5], 0.05)
    lo, hi = 1.76 / 1.78, 19.56 / 1.78
    np.testing.assert_allclose(got, [lo, lo, hi, hi], rtol=1e-6)
    assert got.dtype == np.float32
    # delta 0.5 lets the third box vote too (weights sum 2.28); delta 0 keeps the best box alone
    a, b = (1.76 + 25.0) / 2.28, (9.0 + 10.56 + 30.0) / 2.28
    np.testing.assert_allclose(vote_box(boxes, [0.9, 0.88, 0.5], 0.5), [a, a, b, b], rtol=1e-6)
    np.testing.assert_array_equal(vote_box(boxes, [0.9, 0.88, 0.5], 0.0), [0, 0, 10, 10])


def test_vote_box_quantile_spans_the_voters_edges():
    # voters (delta 0.2): sims 0.9, 0.8, 0.7 (weights 0.375, 0.333, 0.292 of 2.4); the far
    # box (0.1) does not vote
    boxes = [[10, 20, 50, 60], [0, 30, 40, 90], [20, 0, 70, 50], [90, 90, 99, 99]]
    sims = [0.8, 0.9, 0.7, 0.1]
    # x1 sorted 0 (w 0.9), 10 (0.8), 20 (0.7): cumulative shares 0.375, 0.708, 1 -> q 0.25 at 0
    # y1 sorted 0 (0.7), 20 (0.8), 30 (0.9): shares 0.292, 0.625, 1 -> q 0.25 at 0
    # x2 sorted 40 (0.9), 50 (0.8), 70 (0.7): shares 0.375, 0.708, 1 -> q 0.75 at 70
    # y2 sorted 50 (0.7), 60 (0.8), 90 (0.9): shares 0.292, 0.625, 1 -> q 0.75 at 90
    np.testing.assert_array_equal(vote_box(boxes, sims, 0.2, 0.25), [0, 0, 70, 90])
    # q 0.4: x1 at 10 (share 0.708 >= 0.4), y1 at 20, x2 at 50 (0.708 >= 0.6), y2 at 60
    np.testing.assert_array_equal(vote_box(boxes, sims, 0.2, 0.4), [10, 20, 50, 60])
    # one voter: its own box whatever the quantile
    np.testing.assert_array_equal(vote_box(boxes, sims, 0.0, 0.25), boxes[1])
    with pytest.raises(ValueError, match="quantile"):
        vote_box(boxes, sims, 0.2, 0.5)


def test_vote_box_non_positive_sims_vote_equally_and_bad_input_is_refused():
    np.testing.assert_allclose(
        vote_box([[0, 0, 2, 2], [2, 2, 4, 4]], [-0.1, -0.1], 0.0), [1, 1, 3, 3]
    )
    with pytest.raises(ValueError, match="delta"):
        vote_box([[0, 0, 1, 1]], [0.5], -0.1)
    with pytest.raises(ValueError, match="K >= 1"):
        vote_box(np.zeros((0, 4)), np.zeros(0), 0.1)


def test_ca_rerank_box_voting_changes_only_the_located_boxes():
    vectors, boxes = _hand_ca_data()
    # image 20: sims 1 and -1 -> with delta 0.15 only the first votes: its own box.
    vectors[10] = np.array([[0.0, 1.0], [0.6, 0.8], [0.5, np.sqrt(0.75)]])  # third: sim 0.5
    boxes[10] = np.array([[0, 0, 10, 10], [5, 5, 20, 30], [10, 10, 30, 40]], np.float32)
    args = (np.array([1.0, 0.0]), [10, 20, 30, 40], [0.9, 0.8, 0.7, 0.6], vectors, boxes)
    plain = class_agnostic_rerank(*args, top_n=3)
    voted = class_agnostic_rerank(*args, top_n=3, box_vote_delta=0.15)
    # image 10 voters: sims 0.6 and 0.5 (>= 0.45), not 0:
    # (0.6 * [5, 5, 20, 30] + 0.5 * [10, 10, 30, 40]) / 1.1
    expected10 = [8.0 / 1.1, 8.0 / 1.1, 27.0 / 1.1, 38.0 / 1.1]
    np.testing.assert_array_equal(voted.order, plain.order)
    np.testing.assert_array_equal(voted.scores, plain.scores)
    np.testing.assert_array_equal(voted.best_proposal, plain.best_proposal)
    np.testing.assert_allclose(voted.boxes[0], [1, 2, 3, 4])
    np.testing.assert_allclose(voted.boxes[1], expected10, rtol=1e-6)
    with pytest.raises(ValueError, match="box_vote_delta"):
        class_agnostic_rerank(*args, top_n=3, box_vote_delta=-1.0)


def test_ca_sr_ranks_by_the_rank_scores_and_locates_by_the_cosine():
    # query (1, 0); image 10: proposal 0 has cosine 0.8, proposal 1 cosine 0.6;
    # the rank scores (scale * cos(direction) - offset) / norm prefer proposal 1
    vectors = {10: np.array([[0.8, 0.6], [0.6, 0.8]]), 20: np.array([[1.0, 0.0]])}
    boxes = {10: np.array([[0, 0, 1, 1], [5, 5, 9, 9]], float), 20: np.array([[2, 2, 3, 3.0]])}
    norms = {10: np.array([2.0, 1.0]), 20: np.array([4.0])}
    direction, scale, offset = np.array([0.0, 1.0]), 2.0, 0.4
    res = class_agnostic_rerank(
        np.array([1.0, 0.0]),
        [20, 10],
        [0.5, 0.4],
        vectors,
        boxes,
        top_n=2,
        rank=(direction, scale, offset, norms),
    )
    # image 10: (2 * [0.6, 0.8] - 0.4) / [2, 1] = [0.4, 1.2]; image 20: (2 * 0 - 0.4) / 4 = -0.1
    assert res.order.tolist() == [10, 20]
    np.testing.assert_allclose(res.scores, [1.2, -0.1], rtol=1e-6)
    assert res.best_proposal.tolist() == [1, 0]
    # the box is the cosine's best proposal (0.8 > 0.6), not the rank scores'
    np.testing.assert_allclose(res.boxes[0], [0, 0, 1, 1])


def test_ca_sr_rank_norms_must_match_the_proposals():
    vectors = {0: np.eye(2)}
    with pytest.raises(ValueError, match="rank norms"):
        class_agnostic_rerank(
            np.array([1.0, 0.0]),
            [0],
            [0.0],
            vectors,
            top_n=1,
            rank=(np.array([1.0, 0.0]), 1.0, 0.0, {0: np.ones(3)}),
        )
