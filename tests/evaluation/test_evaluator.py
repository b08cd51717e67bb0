"""evaluate_stages / format_table: queries without positives, undefined metrics, strict JSON."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from retrieval_ext.evaluation.evaluator import evaluate_stages, format_table


def _result(order):
    order = np.asarray(order, dtype=np.int64)
    return SimpleNamespace(order=order, boxes=np.full((order.size, 4), np.nan), top_n=0)


def _meta(gnd, protocol="custom"):
    return SimpleNamespace(name="toy", protocol=protocol, gnd=gnd)


def test_query_without_positives_is_counted_named_and_left_out(caplog):
    gnd = [{"ok": [1], "junk": []}, {"ok": [], "junk": []}, {"ok": [0, 2], "junk": []}]
    results = {"filtering": [_result([1, 0, 2]), _result([0, 1, 2]), _result([0, 1, 2])]}
    with caplog.at_level(logging.WARNING, logger="retrieval_ext"):
        out = evaluate_stages(results, _meta(gnd), np.arange(3), query_names=["a", "b", "c"])
    # q0: its positive first, AP 1. q2 (Oxford's trapezoids): positives at ranks 1 and 3:
    # recall 0 -> 1/2 at precision 1 -> 1, then 1/2 -> 1 with precision 1/2 -> 2/3
    ap2 = 0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2
    assert out["filtering"]["mAP"] == pytest.approx((1 + ap2) / 2)
    assert out["filtering"]["queries_without_positives"] == 1
    assert "1 of 3 queries" in caplog.text and "b" in caplog.text.split("results): ")[1]


def test_no_positive_anywhere_gives_none_not_nan_and_strict_json():
    gnd = [{"ok": [], "junk": []}, {"ok": [], "junk": [1]}]
    results = {"ca_sr": [_result([0, 1]), _result([1, 0])]}
    out = evaluate_stages(results, _meta(gnd), np.arange(2))
    assert out["ca_sr"]["mAP"] is None and out["ca_sr"]["queries_without_positives"] == 2
    text = json.dumps(out, allow_nan=False)  # raises on NaN / Infinity
    assert json.loads(text) == {"ca_sr": {"mAP": None, "queries_without_positives": 2}}
    table = format_table(out)
    row = [line for line in table.splitlines() if line.startswith("| ca_sr")][0]
    assert [c.strip() for c in row.split("|")[2:4]] == ["-", "2"]


def test_table_prints_rates_in_percent_and_counts_as_counts():
    table = format_table({"f": {"mAP": 0.12345, "queries_without_positives": 3}})
    row = [line for line in table.splitlines() if line.startswith("| f")][0]
    assert [c.strip() for c in row.split("|")[2:4]] == ["12.35", "3"]
