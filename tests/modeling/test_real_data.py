"""Real-data sanity: ImageNet EfficientNet-Lite0 IPA groups the real Oxford photos by building.

tests/fixtures/oxford5k/sample_jpg holds 10 real Oxford 5k query photos: five of Pitt Rivers and
five of the Radcliffe Camera (one of them named bodleian_*). Which photos show the same building
is read from the official ground truth (gnd_oxford5k.pkl), not from the file names.
"""

import pickle

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from retrieval_ext.data.mapper import RetrievalDatasetMapper
from tests.common import FIXTURES, tiny_cfg

SAMPLES = FIXTURES / "oxford5k" / "sample_jpg"
GND = FIXTURES / "oxford5k" / "gnd_oxford5k.pkl"


def _same_building(names):
    """same[i][j]: photo j is a positive (good/ok) of query photo i in the official ground truth."""
    with open(GND, "rb") as f:
        gnd = pickle.load(f)
    pos = {q: {gnd["imlist"][k] for k in gnd["gnd"][i]["ok"]} for i, q in enumerate(gnd["qimlist"])}
    return [
        [j != i and names[j] in pos[names[i]] for j in range(len(names))] for i in range(len(names))
    ]


@pytest.fixture(scope="module")
def ipa():
    cfg = tiny_cfg(
        "EfficientNet-Lite0",
        [
            "MODEL.EFFICIENTNET.PRETRAINED",
            True,
            "INPUT.MIN_SIZE_TEST",
            320,
            "INPUT.MAX_SIZE_TEST",
            640,
        ],
    )
    model = build_model(cfg).eval()
    mapper = RetrievalDatasetMapper(cfg, is_train=False)
    files = sorted(SAMPLES.glob("*.jpg"))
    names = [f.stem for f in files]
    with torch.no_grad():
        outs = [model([mapper({"file_name": str(f), "image_id": f.stem})])[0] for f in files]
    return names, outs


@pytest.mark.parametrize("pooling", ["ipa_sum", "ipa_max"])
def test_nearest_neighbours_show_the_same_building(ipa, pooling):
    names, outs = ipa
    same = _same_building(names)
    pitt = [i for i, n in enumerate(names) if sum(same[i]) == 4 and n.startswith("pitt_rivers")]
    assert len(pitt) == 5  # the ground truth pairs the five Pitt Rivers photos with each other
    x = np.stack([o[pooling].numpy() for o in outs]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    fractions = []
    for i in range(len(names)):
        neighbours = [j for j in np.argsort(-sims[i]) if j != i][:4]
        fractions.append(np.mean([same[i][j] for j in neighbours]))
    # each Pitt Rivers photo's 4 nearest neighbours are mostly Pitt Rivers photos (chance: 4/9)
    for i in pitt:
        assert fractions[i] >= 0.75, (names[i], fractions[i])
    assert np.mean(fractions) >= 0.75
