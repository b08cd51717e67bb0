"""Indexes written before this change keep working: read as they are, or converted without a
network pass by tools/compress_index.py (issue 14.4)."""

import hashlib
import importlib.util
import logging

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from retrieval_ext.data import register_custom_dataset
from retrieval_ext.data.datasets import unregister_retrieval_dataset
from retrieval_ext.data.datasets.catalog import get_dataset_dicts
from retrieval_ext.retrieval.compression import COMPRESSION_FILE, RegionCompression
from retrieval_ext.retrieval.extractor import FeatureExtractor, model_fingerprint
from retrieval_ext.retrieval.index_convert import ConversionError, convert_index
from retrieval_ext.retrieval.index_store import (
    FieldSpec,
    IndexMismatchError,
    IndexReader,
    IndexSchema,
    IndexWriter,
    default_schema,
)
from retrieval_ext.retrieval.indexing import build_index, open_index
from retrieval_ext.retrieval.search import IndexSearcher
from retrieval_ext.retrieval.stages import STAGES
from tests.common import REPO_ROOT, ca_sr_per_image, save_checkpoint, tiny_cfg, write_benchmark

NAME = "old_format"
OPTS = ["MODEL.PROPOSAL_GENERATOR.NAME", "DenseRegionProposals", "RETRIEVAL.DATASET", NAME]
OPTS += ["RETRIEVAL.CS_SR_CLASSIFIER", "model"]  # CS-SR reads the stored class scores


def _full_model_hash(model):
    """The weights hash indexes were written with: every tensor of the model (written out)."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def write_old_format_index(cfg, model, root):
    """The index layout of main before this change (commit a44f88a), written field by field:
    raw float32 IPA sum and max, float32 boxes and objectness, int8 RPA sum and max (scaled
    unit vectors, ``region_compression.npz``), float16 class scores and float32 class boxes, and
    a manifest of dataset, model config and the whole model's weights hash."""
    schema = IndexSchema(
        FieldSpec(f.name, "image", "exact", f.shape, "float32") if f.name.startswith("ipa_") else f
        for f in default_schema(class_boxes=True).fields
    )
    comp = RegionCompression(0, 0, "int8")
    manifest = {
        "dataset": NAME,
        "model_config": model_fingerprint(cfg, model)["model_config"],
        "weights_hash": _full_model_hash(model),
        "region_compression": {
            "num_proposals": 0,
            "pca_dim": 0,
            "dtype": "int8",
            "fields": ["rpa_sum", "rpa_max"],
        },
    }
    root.mkdir(parents=True)
    comp.save(root / COMPRESSION_FILE)
    ex = FeatureExtractor(cfg, model=model)
    dicts = get_dataset_dicts(f"{NAME}_db")
    with IndexWriter(root, manifest, 8, "float16", 0, comp.schema(schema)) as w:
        for d in dicts:
            x = ex.mapper(dict(d))
            out = ex.run([x])[0]
            p = out["proposals"]
            rec = {"ipa_sum": out["ipa_sum"].numpy(), "ipa_max": out["ipa_max"].numpy()}
            rec.update({"height": x["height"], "width": x["width"]})
            rec["boxes"] = p.proposal_boxes.tensor.numpy()
            rec["objectness"] = p.objectness_logits.numpy()
            for f in ("rpa_sum", "rpa_max"):
                v = p.get(f).numpy()
                rec[f] = v / np.linalg.norm(v, axis=1, keepdims=True)
            rec["scores"], rec["class_boxes"] = p.scores.numpy(), p.class_boxes.numpy()
            w.add(d["image_id"], comp.compress_record(rec, schema))
    ids = [d["image_id"] for d in dicts]
    IndexWriter(root, manifest, 8, "float16", 0, comp.schema(schema)).finalize(ids)
    return IndexReader(root)


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("old_index")
    write_benchmark(tmp / "data", num_db=20, queries_per_instance=1, seed=0)
    register_custom_dataset(NAME, str(tmp / "data"))
    torch.manual_seed(0)
    cfg0 = tiny_cfg("ZF", OPTS)
    model = build_model(cfg0).eval()
    weights = save_checkpoint(model, tmp / "zf.pth")
    cfg = tiny_cfg("ZF", OPTS + ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp)])
    index = write_old_format_index(cfg, model, tmp / "index")
    yield {"tmp": tmp, "cfg": cfg, "index": index}
    unregister_retrieval_dataset(NAME)


def test_an_old_index_is_read_as_it_is(old):
    ex = FeatureExtractor(old["cfg"])
    index = open_index(str(old["tmp"] / "index"), ex, NAME)  # its whole-model hash matches
    s = IndexSearcher(old["cfg"], index)
    assert s.supported_stages == STAGES and s.num_classes == 80
    rng = np.random.default_rng(0)
    q = {"ipa_sum": rng.random(256), "crop_max": rng.standard_normal(256)}
    got = s.search(q, ["ca_sr"])["ca_sr"]
    # brute force over the stored int8 rows, each proportional to its unit vector
    vecs = [np.asarray(index.regions(i)["rpa_max"], np.float64) for i in range(index.num_images)]
    boxes = [index.regions(i)["boxes"] for i in range(index.num_images)]
    order = s.search(q, ["filtering"])["filtering"].order
    want, scores, best, _ = ca_sr_per_image(q["crop_max"], order, vecs, boxes, 100)
    assert got.order[: len(want)].tolist() == want.tolist()
    np.testing.assert_allclose(got.scores[: len(want)], scores, atol=1e-5)


def test_reusing_an_old_index_says_how_to_convert_it(old, caplog):
    ex = FeatureExtractor(old["cfg"])
    with caplog.at_level(logging.WARNING, logger="retrieval_ext"):
        index = build_index(old["cfg"], ex, NAME, str(old["tmp"] / "index"))
    assert index.num_images == 20
    assert "python tools/compress_index.py --config-file CFG" in caplog.text


def test_an_old_index_of_other_weights_is_refused(old):
    torch.manual_seed(5)
    other = FeatureExtractor(tiny_cfg("ZF", OPTS))  # fresh random weights, no file
    with pytest.raises(IndexMismatchError, match="weights_hash"):
        open_index(str(old["tmp"] / "index"), other, NAME)


def _tool():
    spec = importlib.util.spec_from_file_location("ci", REPO_ROOT / "tools" / "compress_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tool_converts_an_old_index_without_extracting(old, tmp_path, monkeypatch):
    opts = ["RETRIEVAL.REGION_DTYPE", "pq", "RETRIEVAL.REGION_PQ.M", "16"]
    cfg = tiny_cfg("ZF", OPTS + ["MODEL.WEIGHTS", str(old["tmp"] / "zf.pth")] + opts)
    monkeypatch.setattr(FeatureExtractor, "run", _no_network)  # nothing is extracted
    dest = _tool().convert(cfg, str(old["tmp"] / "index"), str(tmp_path / "new"))
    new, src = IndexReader(dest), old["index"]
    assert new.manifest["weights_scope"] == "regions" and new.manifest["contents"]
    assert new.schema.names == ["ipa_sum", "height", "width", "boxes", "rpa_max"]
    assert new.schema["rpa_max"].dtype == "uint8" and new.feature_dims["rpa_max"] == (16,)
    comp = RegionCompression.load(tmp_path / "new" / COMPRESSION_FILE)
    assert "20 images" in comp.describe()["pq"]["trained_on"]
    for i in range(src.num_images):
        a, b = src.regions(i), new.regions(i)
        rows = np.asarray(a["rpa_max"], np.float32)
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        assert np.array_equal(b["rpa_max"], comp.encode(unit))
        assert np.array_equal(b["boxes"], a["boxes"].astype(np.float16))
        ipa = src.image_field(i, "ipa_sum")
        want = (ipa / np.linalg.norm(ipa)).astype(np.float16)
        assert np.array_equal(new.image_field(i, "ipa_sum"), want)
    assert new.nbytes_per_image()["total"] < src.nbytes_per_image()["total"] / 10
    # converted, the index searches with the same model
    monkeypatch.undo()
    s = IndexSearcher(cfg, open_index(dest, FeatureExtractor(cfg), NAME))
    assert s.supported_stages == ("filtering", "filtering_qe", "ca_sr", "ca_sr_qe")
    # a product-quantised index cannot be decoded to convert it again
    with pytest.raises(ConversionError, match="index again"):
        convert_index(new, tmp_path / "again", s.contents, dict(new.manifest))


def _no_network(*args, **kwargs):
    raise AssertionError("the conversion ran the network")


def test_the_tool_learns_the_collection_whitening_from_the_index(old, tmp_path, monkeypatch):
    opts = ["RETRIEVAL.REGION_DTYPE", "int8", "RETRIEVAL.REGION_WHITENING.MIN_VECTORS", "10"]
    opts += ["RETRIEVAL.REGION_WHITENING.DIM", "8"]
    cfg = tiny_cfg("ZF", OPTS + ["MODEL.WEIGHTS", str(old["tmp"] / "zf.pth")] + opts)
    monkeypatch.setattr(FeatureExtractor, "run", _no_network)  # nothing is extracted
    dest = _tool().convert(cfg, str(old["tmp"] / "index"), str(tmp_path / "new"))
    new, src = IndexReader(dest), old["index"]
    w = RegionCompression.load(tmp_path / "new" / COMPRESSION_FILE).whitening
    rows = np.concatenate([np.asarray(src.regions(i)["rpa_max"], np.float64) for i in range(20)])
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert w.out_dim == 8
    np.testing.assert_allclose(w.mean, unit.mean(axis=0), atol=1e-5)  # the index's own vectors
    a = np.asarray(src.regions(3)["rpa_max"], np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(
        new.regions(3)["rpa_max_wnorm"], np.linalg.norm(w.transform(a), axis=1), rtol=1e-3
    )
