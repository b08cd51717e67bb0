"""An index keeps the weights it was built with; every entry point loads them (issue 12.7).

The tiny config has ``MODEL.WEIGHTS: ""`` and no ImageNet weights: every layer is freshly
initialised, so a process that does not load the index's weights computes other features.
"""

import json
import os
import textwrap

import numpy as np
import pytest
import torch

from retrieval_ext.retrieval.extractor import weights_hash
from retrieval_ext.retrieval.index_store import IndexMismatchError, IndexReader
from tests.common import REPO_ROOT, run_python, run_tool, tiny_model, write_benchmark

CONFIG = str(REPO_ROOT / "configs/quick_schedules/EfficientNet-Lite0-tiny.yaml")


def _python(code, env, cwd):
    return run_python(["-c", textwrap.dedent(code)], env, cwd).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("index_weights")
    write_benchmark(tmp / "synthetic", num_db=6, queries_per_instance=1, seed=0)
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = tmp / "out"
    opts = ["OUTPUT_DIR", str(out), "RETRIEVAL.FILTER_BACKEND", "numpy", "RETRIEVAL.TOP_N", "6"]
    opts += ["RETRIEVAL.QE_M", "2"]
    run_tool("retrieve", ["index", "--config-file", CONFIG] + opts, env, tmp)
    return {"tmp": tmp, "out": out, "env": env}


def test_the_index_records_the_weights_it_saved_beside_it(built):
    out = built["out"]
    index = IndexReader(out / "index")
    name = index.manifest["weights_file"]
    assert name == f"weights-{index.manifest['weights_hash']}.pth"
    assert (out / name).is_file() and not (out / "index" / name).exists()  # not in the index
    saved = torch.load(out / name, weights_only=True)["model"]
    # backbone (and a learned proposal generator's weights; the tiny config's dense regions have
    # none) only: this index stores no class outputs, the box head is not in it
    model = tiny_model("EfficientNet-Lite0")
    expected = {k for k in model.state_dict() if not k.startswith("roi_heads.")}
    assert any(k.startswith("backbone.") for k in saved)
    assert set(saved) == expected


def test_the_api_and_the_ui_search_the_cli_index_in_fresh_processes(built):
    out, env = built["out"], built["env"]
    query = str(next((built["tmp"] / "synthetic" / "queries").iterdir()))
    api = f"""
        import json
        from retrieval_ext import InstanceSearch
        engine = InstanceSearch.from_config_file({str(out / "config.yaml")!r})
        hits = engine.query({query!r}, [5, 5, 60, 60], stage="ca_sr", top_k=3)
        print(json.dumps([[h.image_id, h.score] for h in hits]))
        """
    api_hits = json.loads(_python(api, env, built["tmp"]).splitlines()[-1])
    # the UI service as tools/serve.py builds it, with another seed for its fresh layers
    serve_py = str(REPO_ROOT / "tools/serve.py")
    ui = f"""
        import json, importlib.util
        spec = importlib.util.spec_from_file_location("serve", {serve_py!r})
        serve = importlib.util.module_from_spec(spec); spec.loader.exec_module(serve)
        args = serve.get_parser().parse_args(
            ["--config-file", {str(out / "config.yaml")!r}, "SEED", "123"])
        service = serve.build_service(serve.setup_cfg(args), args)
        res = service.search("query", 0, [5, 5, 60, 60], stage="ca_sr", top_k=3)
        print(json.dumps([[r["image_id"], r["score"]] for r in res["results"]]))
        """
    ui_hits = json.loads(_python(ui, env, built["tmp"]).splitlines()[-1])
    assert len(api_hits) == 3 and [h[0] for h in api_hits] == [h[0] for h in ui_hits]
    np.testing.assert_allclose([h[1] for h in api_hits], [h[1] for h in ui_hits], rtol=1e-5)


def test_without_its_weights_the_index_is_refused_naming_them(built, tmp_path):
    """The same config with other fresh layers and the weights file gone: the hash differs and
    the message says where the index's weights were."""
    from retrieval_ext.retrieval.extractor import FeatureExtractor
    from retrieval_ext.retrieval.indexing import open_index
    from tests.common import tiny_cfg

    out = built["out"]
    name = IndexReader(out / "index").manifest["weights_file"]
    os.rename(out / name, tmp_path / name)
    try:
        torch.manual_seed(99)
        ex = FeatureExtractor(tiny_cfg("EfficientNet-Lite0"))
        with pytest.raises(IndexMismatchError, match=f"weights_hash.*{name}"):
            open_index(str(out / "index"), ex, "synthetic")
    finally:
        os.rename(tmp_path / name, out / name)


def test_the_region_scope_ignores_the_box_head_and_not_the_rpn():
    # with an RPN (the tiny config's default dense regions have no weights)
    model = tiny_model("EfficientNet-Lite0", ("MODEL.PROPOSAL_GENERATOR.NAME", "RPN"))
    before = (weights_hash(model, "regions"), weights_hash(model, "all"))
    with torch.no_grad():
        next(model.roi_heads.box_predictor.parameters()).add_(1.0)
    assert weights_hash(model, "regions") == before[0] and weights_hash(model, "all") != before[1]
    with torch.no_grad():
        next(model.proposal_generator.parameters()).add_(1.0)
    assert weights_hash(model, "regions") != before[0]
