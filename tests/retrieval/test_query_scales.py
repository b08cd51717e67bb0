"""Multi-scale queries (RETRIEVAL.QUERY_SCALES): resize factors worked by hand, and query
records equal to the sum of normalised per-size records computed here by calling the model on
images resized here; the query cache follows the sizes."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_ext.data import register_custom_dataset
from retrieval_ext.data.datasets import unregister_retrieval_dataset
from retrieval_ext.data.mapper import read_image
from retrieval_ext.retrieval.extractor import FeatureExtractor
from retrieval_ext.retrieval.queries import extract_queries
from retrieval_ext.retrieval.query_scales import query_resize_factors
from tests.common import tiny_cfg, tiny_model, write_benchmark

FIELDS = ("ipa_sum", "ipa_max", "crop_sum", "crop_max", "rpa_sum", "rpa_max")


def test_resize_factors_worked_by_hand():
    # box 100 x 400 px: sqrt(area) = 200; image 300 x 600 (h, w); MIN 128, MAX 400
    box, size = [50, 0, 150, 400], (300, 600)
    got = query_resize_factors(box, size, [0.75, 0.5, 2.0, 0.01], 128, 400, min_side=32)
    # 0.75 * 128 / 200 = 0.48; 0.5 * 128 / 200 = 0.32; 2 * 128 / 200 = 1.28 is capped so that
    # the longer side (600) stays <= 400: 400 / 600; 0.01 * 128 / 200 = 0.0064 is raised so that
    # the shorter side (300) reaches 32 px: 32 / 300
    assert got == pytest.approx([0.48, 0.32, 400 / 600, 32 / 300])
    # the upper cap wins when both conflict (a very long, thin image)
    assert query_resize_factors([0, 0, 10, 1000], (1000, 10), [0.1], 100, 50, 32) == [0.05]
    with pytest.raises(ValueError, match="positive width and height"):
        query_resize_factors([5, 5, 5, 9], size, [0.5], 128, 400, 32)
    with pytest.raises(ValueError, match="QUERY_SCALES"):
        query_resize_factors(box, size, [0.0], 128, 400, 32)


def _l2(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x)


@torch.no_grad()
def _by_hand(model, image, box, fractions, min_size, max_size, min_side):
    """The multi-scale query record written out: resize with PIL, run the model, sum the
    normalised vectors."""
    h, w = image.shape[:2]
    side = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    total = {f: 0.0 for f in FIELDS}
    for frac in fractions:
        s = frac * min_size / side
        s = min(max(s, min_side / min(h, w)), max_size / max(h, w))
        new_w, new_h = max(1, round(w * s)), max(1, round(h * s))
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        x = {
            "image": torch.as_tensor(resized.transpose(2, 0, 1).copy()),
            "height": h,
            "width": w,
            "query_boxes": torch.tensor([box], dtype=torch.float32),
        }
        out = model([x])[0]
        vectors = {"ipa_sum": out["ipa_sum"], "ipa_max": out["ipa_max"]}
        for f in FIELDS[2:]:
            vectors[f] = out["query"].get(f)[0]
        for f in FIELDS:
            total[f] = total[f] + _l2(vectors[f].numpy())
    return total


# [1.5]: 1.5 * 128 / sqrt(100 * 80) = 2.15 is capped by the longer side, 224 / 200 = 1.12
@pytest.mark.parametrize("fractions", [[0.75, 0.5, 0.33], [1.5]])
def test_query_record_is_the_sum_of_normalised_per_size_records(fractions):
    opts = ["RETRIEVAL.QUERY_SCALES", str(fractions)]
    cfg = tiny_cfg("ZF", opts)
    model = tiny_model("ZF", opts)
    extractor = FeatureExtractor(cfg, model=model)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    box = [20.0, 30.0, 120.0, 110.0]
    rec = extractor.query_record_from_image(image, box)
    # ZF: stride 16; tiny config MIN_SIZE_TEST 128 / MAX_SIZE_TEST 224 (written in the YAML)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (128, 224)
    expected = _by_hand(model, image, box, fractions, 128, 224, min_side=16)
    for f in FIELDS:
        np.testing.assert_allclose(rec[f], expected[f], rtol=1e-4, atol=1e-5, err_msg=f)
    np.testing.assert_allclose(rec["box"], box)


def test_no_scales_is_one_pass_at_the_test_size():
    cfg = tiny_cfg("ZF", ["RETRIEVAL.QUERY_SCALES", "[]"])
    model = tiny_model("ZF")
    extractor = FeatureExtractor(cfg, model=model)
    image = np.random.default_rng(4).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    box = [20.0, 30.0, 120.0, 110.0]
    rec = extractor.query_record_from_image(image, box)
    # shorter side 150 -> 128 (MIN_SIZE_TEST): 128 x 171 (170.67 rounded), vectors as returned
    resized = np.asarray(Image.fromarray(image).resize((171, 128), Image.BILINEAR))
    x = {
        "image": torch.as_tensor(resized.transpose(2, 0, 1).copy()),
        "height": 150,
        "width": 200,
        "query_boxes": torch.tensor([box]),
    }
    with torch.no_grad():
        out = model([x])[0]
    np.testing.assert_allclose(rec["ipa_sum"], out["ipa_sum"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(rec["crop_max"], out["query"].crop_max[0].numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs") / "bench"
    write_benchmark(root, num_instances=2, queries_per_instance=1, num_db=2, seed=2)
    register_custom_dataset("qs_bench", str(root))
    yield root
    unregister_retrieval_dataset("qs_bench")


def test_dataset_queries_and_their_cache_follow_the_scales(bench, tmp_path, monkeypatch):
    model = tiny_model("ZF")
    first = FeatureExtractor(tiny_cfg("ZF", ["RETRIEVAL.QUERY_SCALES", "[0.5]"]), model=model)
    cached = extract_queries(first, "qs_bench", cache_dir=str(tmp_path))
    # a dataset query's record is the one of its image array and box
    image = read_image(cached[0]["file_name"], first.cfg.INPUT.FORMAT)
    direct = first.query_record_from_image(image, cached[0]["box"])
    np.testing.assert_allclose(cached[0]["crop_max"], direct["crop_max"], rtol=1e-5)

    # the same sizes: read from the cache, the model is not run again
    def refuse(*args, **kwargs):
        raise AssertionError("extracted again instead of reading the cache")

    monkeypatch.setattr(first, "run_queries", refuse)
    again = extract_queries(first, "qs_bench", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again[1]["ipa_sum"], cached[1]["ipa_sum"])
    monkeypatch.undo()

    # other sizes, same model and cache folder: extracted again, equal to a fresh extraction
    other = FeatureExtractor(tiny_cfg("ZF", ["RETRIEVAL.QUERY_SCALES", "[0.75]"]), model=model)
    changed = extract_queries(other, "qs_bench", cache_dir=str(tmp_path))
    fresh = extract_queries(other, "qs_bench")
    for a, b, c in zip(changed, fresh, cached):
        np.testing.assert_array_equal(a["crop_max"], b["crop_max"])
        assert not np.allclose(a["crop_max"], c["crop_max"])
