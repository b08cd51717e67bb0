"""FeatureExtractor: database records in batches equal one image at a time."""

import cv2
import numpy as np
import pytest
import torch

from retrieval_ext.retrieval.extractor import FeatureExtractor
from tests.common import tame_rpn, tiny_cfg


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Seven images: five of one size (landscape), two of another (portrait), interleaved."""
    tmp = tmp_path_factory.mktemp("batch_images")
    rng = np.random.default_rng(3)
    dicts = []
    for i, (h, w) in enumerate([(96, 128)] * 3 + [(128, 96)] + [(96, 128)] * 2 + [(128, 96)]):
        path = str(tmp / f"im{i}.png")
        cv2.imwrite(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        dicts.append({"file_name": path, "image_id": f"im{i}.png", "db_index": i})
    return dicts


def _extractor(name):
    cfg = tiny_cfg(name)
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    return FeatureExtractor(cfg, model=tame_rpn(build_model(cfg)).eval())


@pytest.mark.parametrize("name", ["EfficientNet-Lite0", "R50-FPN"])
def test_batches_equal_one_image_at_a_time(images, name, monkeypatch):
    ex = _extractor(name)
    one = [ex.database_records([d], batch_size=1)[0][0] for d in images]
    calls = []
    run = ex.run
    monkeypatch.setattr(ex, "run", lambda x, c=True: calls.append(len(x)) or run(x, c))
    batched, failed = ex.database_records(images, batch_size=3)
    # images are batched with images of their input size only: 5 landscape -> 3 + 2, 2 portrait
    assert sorted(calls) == [2, 2, 3] and not failed
    assert [i for i, _ in batched] == [d["image_id"] for d in images]  # input order kept
    for (id_a, a), (id_b, b) in zip(one, batched):
        assert id_a == id_b and sorted(a) == sorted(b)
        for f in a:
            assert a[f].shape == b[f].shape, (id_a, f)
            # the same arithmetic on stacked inputs: equal up to float summation order
            np.testing.assert_allclose(b[f], a[f], rtol=1e-4, atol=1e-5, err_msg=f"{id_a} {f}")
