"""What an index stores per configuration, and the refusal of a stage whose field it lacks."""

import numpy as np
import pytest
import torch

from retrieval_ext.retrieval.contents import (
    IndexContents,
    MissingFieldError,
    class_accessors,
    class_outputs_wanted,
    contents_from_config,
)
from retrieval_ext.retrieval.extractor import outputs_to_record
from retrieval_ext.retrieval.index_store import IndexReader, IndexWriter, default_schema
from retrieval_ext.retrieval.search import IndexSearcher
from tests.common import random_image, tiny_cfg, tiny_model

# (options, stored fields written out by hand, in schema order)
CASES = [
    ([], ["ipa_sum", "height", "width", "boxes", "rpa_max"]),
    (["RETRIEVAL.RERANK_POOLING", "sum"], ["ipa_sum", "height", "width", "boxes", "rpa_sum"]),
    (
        ["RETRIEVAL.FILTER_POOLING", "max", "RETRIEVAL.WHITENING_DATASET", "w"],
        ["ipa_sum", "ipa_max", "height", "width", "boxes", "rpa_max"],
    ),
    (["RETRIEVAL.FILTER_POOLING", "max"], ["ipa_max", "height", "width", "boxes", "rpa_max"]),
    (
        ["RETRIEVAL.STORE.REGION_POOLINGS", "['max', 'sum']", "RETRIEVAL.STORE.OBJECTNESS", "True"],
        ["ipa_sum", "height", "width", "boxes", "objectness", "rpa_sum", "rpa_max"],
    ),
    (
        ["MODEL.FINETUNE.DATASET", "toy", "RETRIEVAL.CS_SR_CLASSIFIER", "model"],
        ["ipa_sum", "height", "width", "boxes", "rpa_max", "scores", "class_boxes"],
    ),
    (
        ["MODEL.FINETUNE.DATASET", "toy", "RETRIEVAL.CS_SR_CLASSIFIER", "model"]
        + ["RETRIEVAL.STORE_CLASS_BOXES", "False"],
        ["ipa_sum", "height", "width", "boxes", "rpa_max", "scores"],
    ),
    # the query-set classifier (the default) scores the region vectors: no class outputs
    (["MODEL.FINETUNE.DATASET", "toy"], ["ipa_sum", "height", "width", "boxes", "rpa_max"]),
    (
        ["RETRIEVAL.STORE.CLASS_OUTPUTS", "yes", "RETRIEVAL.STORE.CLASS_TOP_K", "3"],
        ["ipa_sum", "height", "width", "boxes", "rpa_max", "class_ids", "scores", "class_boxes"],
    ),
    (["RETRIEVAL.STORE.CLASS_OUTPUTS", "no", "MODEL.FINETUNE.DATASET", "toy"], None),
]


@pytest.mark.parametrize("opts,fields", CASES)
def test_stored_fields_per_configuration(opts, fields):
    if fields is None:  # "no" wins over a fine-tuning config
        fields = ["ipa_sum", "height", "width", "boxes", "rpa_max"]
    cfg = tiny_cfg("EfficientNet-Lite0", opts)
    contents = contents_from_config(cfg)
    assert contents.schema().names == fields
    # the records of a real forward pass have exactly these fields, and the writer takes them
    model = tiny_model("EfficientNet-Lite0", opts)
    img = random_image(96, 128)
    with torch.no_grad():
        out = model.inference(
            [{"image": img, "height": 96, "width": 128}], class_outputs=contents.class_outputs
        )[0]
    rec = outputs_to_record(out, 96, 128, contents)
    assert sorted(rec) == sorted(fields)
    assert out["proposals"].has("scores") == contents.class_outputs  # the box head ran or not


def test_auto_class_outputs_follow_the_query_objects():
    # a fine-tuning config, or as many classes as query objects; unknown dataset: no
    assert class_outputs_wanted("auto", "toy", 80, None)
    assert class_outputs_wanted("auto", "", 11, 11)
    assert not class_outputs_wanted("auto", "toy", 11, 11, classifier="queries")
    assert class_outputs_wanted("yes", "", 80, None, classifier="queries")
    assert not class_outputs_wanted("auto", "", 80, 11)
    assert not class_outputs_wanted("auto", "", 11, None)
    assert class_outputs_wanted("yes", "", 80, 11) and not class_outputs_wanted("no", "x", 11, 11)
    with pytest.raises(ValueError, match="CLASS_OUTPUTS"):
        class_outputs_wanted("maybe", "", 1, 1)


def test_top_k_classes_and_their_boxes():
    """Top-k storage keeps the k most probable object classes (ties: lower id), background out;
    the CS-SR accessor puts them back where they were and 0 / NaN elsewhere."""
    from detectron2.structures import Boxes, Instances

    scores = np.array(
        [[0.1, 0.5, 0.05, 0.05, 0.3], [0.2, 0.2, 0.3, 0.0, 0.3], [0.0, 0.0, 0.0, 0.1, 0.9]],
        dtype=np.float32,
    )  # 4 classes + background (last)
    p = Instances((50, 60))
    p.proposal_boxes = Boxes(torch.tensor([[0, 0, 10, 10]] * 3, dtype=torch.float32))
    p.rpa_max = torch.ones(3, 2)
    p.scores = torch.as_tensor(scores)
    p.class_boxes = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4)
    out = {"ipa_sum": torch.ones(2), "proposals": p}
    contents = IndexContents(class_outputs=True, class_boxes=True, class_top_k=2, num_classes=4)
    rec = outputs_to_record(out, 50, 60, contents)
    # by hand: row 0 -> classes 1 (0.5), 0 (0.1); row 1 -> 2 (0.3), then 0 and 1 tie at 0.2 -> 0;
    # row 2 -> 3 (0.1), then 0 (ties 0.0 -> lowest id)
    assert rec["class_ids"].tolist() == [[1, 0], [2, 0], [3, 0]]
    np.testing.assert_allclose(rec["scores"], [[0.5, 0.1], [0.3, 0.2], [0.1, 0.0]])
    cb = p.class_boxes.numpy()
    assert np.array_equal(rec["class_boxes"][1, 0], cb[1, 2])
    assert np.array_equal(rec["class_boxes"][2, 1], cb[2, 0])

    class Fake:  # an index reader's accessors over this one image
        def region_accessor(self, name):
            return lambda i: rec[name]

    dense_scores, dense_boxes = class_accessors(Fake(), contents)
    d = dense_scores(0)
    assert d.shape == (3, 5) and d[0, 1] == np.float32(0.5) and d[0, 2] == 0 and d[0, 4] == 0
    b = dense_boxes(0)
    assert np.array_equal(b[1, 2], cb[1, 2]) and np.isnan(b[1, 3]).all()


def _index(root, fields=("rpa_max",)):
    contents = IndexContents(region_poolings=tuple(f[4:] for f in fields))
    schema = contents.schema()
    manifest = {"dataset": "toy", "contents": contents.to_json()}
    rng = np.random.default_rng(0)
    with IndexWriter(root, manifest, 4, "float32", 0, schema) as w:
        for i in range(3):
            rec = {"ipa_sum": rng.random(4), "height": 10, "width": 10}
            rec["boxes"] = np.tile([0.0, 0.0, 5.0, 5.0], (2, 1))
            rec.update({f: rng.random((2, 4)) for f in fields})
            w.add(f"im{i}", rec)
    IndexWriter(root, manifest, 4, "float32", 0, schema).finalize(["im0", "im1", "im2"])
    return IndexReader(root)


def test_a_stage_missing_its_field_is_refused_with_the_key(tmp_path):
    index = _index(tmp_path / "a")
    query = {"ipa_sum": np.ones(4), "crop_sum": np.ones(4), "crop_max": np.ones(4)}
    s = IndexSearcher(index, rerank_pooling="sum")
    assert s.supported_stages == ("filtering", "filtering_qe")
    with pytest.raises(MissingFieldError, match=r"rpa_sum.*RETRIEVAL.STORE.REGION_POOLINGS"):
        s.search(query, ["ca_sr_qe"])
    with pytest.raises(MissingFieldError, match="index again"):
        s.search(query, ["cs_sr"], class_id=0)
    assert list(s.search(query, ["filtering"])) == ["filtering"]
    # filtering by a pooling the index lacks: refused when the searcher is built
    with pytest.raises(MissingFieldError, match=r"ipa_max.*RETRIEVAL.STORE.IPA_POOLINGS"):
        IndexSearcher(index, filter_pooling="max")
    ok = IndexSearcher(index)  # max: stored
    assert ok.supported_stages == ("filtering", "filtering_qe", "ca_sr", "ca_sr_qe")
    assert ok.num_classes is None


def test_an_index_without_recorded_contents_is_read_from_its_schema(tmp_path):
    """An index written before the contents were recorded stores every field of the old
    default schema: all stages are there."""
    root = tmp_path / "old"
    rng = np.random.default_rng(1)
    schema = default_schema(class_boxes=True)
    with IndexWriter(root, {"dataset": "toy"}, 4, "float16", 0, schema) as w:
        rec = {"ipa_sum": rng.random(4), "ipa_max": rng.random(4), "height": 9, "width": 9}
        rec.update({"boxes": np.tile([0.0, 0, 4, 4], (2, 1)), "objectness": rng.random(2)})
        rec.update({"rpa_sum": rng.random((2, 4)), "rpa_max": rng.random((2, 4))})
        rec.update({"scores": rng.random((2, 4)), "class_boxes": rng.random((2, 3, 4))})
        w.add("a", rec)
    IndexWriter(root, {"dataset": "toy"}, 4, "float16", 0, schema).finalize(["a"])
    c = IndexContents.of_index(IndexReader(root))
    assert (c.ipa_poolings, c.region_poolings) == (("sum", "max"), ("sum", "max"))
    assert (c.class_outputs, c.class_boxes, c.num_classes, c.objectness) == (True, True, 3, True)
    s = IndexSearcher(IndexReader(root))
    assert s.supported_stages == (
        "filtering",
        "filtering_qe",
        "ca_sr",
        "ca_sr_qe",
        "cs_sr",
        "cs_sr_qe",
    )
    assert s.num_classes == 3
