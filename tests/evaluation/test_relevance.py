"""One query's relevance under each protocol, labels and AP worked out by hand."""

import math
from types import SimpleNamespace

import pytest

from retrieval_ext.evaluation.relevance import (
    judged_sets,
    num_relevant,
    query_average_precision,
    relevance_labels,
)
from tests.common import written_out_ap


def test_oxford_ok_is_relevant_and_junk_ignored():
    meta = SimpleNamespace(protocol="oxford")
    g = {"ok": [3, 0], "junk": [5]}
    ranking = [5, 3, 1, 0, 2]
    assert relevance_labels(meta, g, ranking).tolist() == [-1, 1, 0, 1, 0]
    assert num_relevant(meta, g) == 2
    # junk skipped, ranking 3, 1, 0, 2: recall 1/2 at rank 1 (precision 1), precision 1/2 at rank
    # 2, recall 1 at rank 3 (precision 2/3); Oxford's trapezoids pair each recall step with the
    # precision of the rank before it
    assert query_average_precision(meta, g, ranking) == pytest.approx(
        0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2
    )
    assert query_average_precision(meta, g, ranking) == pytest.approx(
        written_out_ap(ranking, {0, 3}, {5})
    )


def test_custom_judgements_without_junk():
    meta = SimpleNamespace(protocol="custom")
    assert relevance_labels(meta, {"ok": [2]}, [0, 2]).tolist() == [0, 1]
    assert judged_sets("custom", {"ok": [2]}) == ({2}, set())


def test_revisited_medium_easy_and_hard_are_relevant():
    meta = SimpleNamespace(protocol="revisited")
    g = {"easy": [1], "hard": [4], "junk": [2]}
    assert relevance_labels(meta, g, [4, 2, 0, 1]).tolist() == [1, -1, 0, 1]
    assert num_relevant(meta, g) == 2
    assert query_average_precision(meta, g, [4, 2, 0, 1]) == pytest.approx(
        written_out_ap([4, 2, 0, 1], {1, 4}, {2})
    )


def test_ins_judges_shots():
    # images 0, 1 in shot "a", 2 in "b", 3 in "c"; shot "a" relevant
    meta = SimpleNamespace(protocol="ins", db_shots=["a", "a", "b", "c"])
    g = {"relevant_shots": ["a"]}
    assert relevance_labels(meta, g, [2, 1, 0, 3]).tolist() == [0, 1, 1, 0]
    assert num_relevant(meta, g) == 2  # images of the relevant shot
    # shot ranking b, a, c: the one relevant shot at rank 2 -> AP 1/2
    assert query_average_precision(meta, g, [2, 1, 0, 3]) == pytest.approx(0.5)
    assert math.isnan(query_average_precision(meta, {"relevant_shots": []}, [0]))
    with pytest.raises(ValueError, match="shots"):
        judged_sets("ins", g)
