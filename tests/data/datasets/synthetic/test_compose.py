"""Tests of composing one benchmark image: boxes, visibility and occlusion."""

import numpy as np
import pytest

from retrieval_ext.data.datasets.synthetic import streams
from retrieval_ext.data.datasets.synthetic.compose import compose
from retrieval_ext.data.datasets.synthetic.textures import poster_texture


def _bbox_of(mask):
    """Pixel-edge XYXY box of a boolean mask, by brute force over rows and columns."""
    rows = [y for y in range(mask.shape[0]) if mask[y].any()]
    cols = [x for x in range(mask.shape[1]) if mask[:, x].any()]
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


@pytest.mark.parametrize("seed", range(4))
def test_occlusion_hides_about_the_requested_share(seed):
    # Upright and unwarped (rot = persp = 0), every poster outline (rectangle, rounded rectangle,
    # ellipse) is symmetric about its centre lines, so an occluder entering from one side by half
    # the object's extent hides half of it. The border may cut up to 0.1 of the long side
    # (the centre keeps 0.4 of the size from it), which moves the share within [0.44, 0.56],
    # give or take the anti-aliased edge pixels.
    design = poster_texture(streams.rng(seed, streams.INSTANCE, 0))
    pool = [poster_texture(streams.rng(seed, streams.DISTRACTOR, j)) for j in range(3)]
    spec = {"size": 0.5, "rot": 0.0, "persp": 0.0, "occlusion": 0.5}
    rng = np.random.default_rng(seed)
    pil, (res,) = compose(rng, 120, 160, [(*design, spec)], pool, 0, 1.0, pool)
    assert pil.size == (160, 120)
    mask, hidden = res["mask"], res["hidden"]
    assert res["box"] == _bbox_of(mask)
    share = (mask & hidden).sum() / mask.sum()
    assert 0.4 <= share <= 0.6
    assert 0.35 <= res["visible"] <= 0.6


def test_without_occlusion_nothing_hides_a_lone_instance():
    design = poster_texture(streams.rng(0, streams.INSTANCE, 0))
    spec = {"size": 0.3, "rot": 0.0, "persp": 0.0, "occlusion": 0.0}
    _, (res,) = compose(np.random.default_rng(1), 120, 160, [(*design, spec)], [design], 0, 1.0, [])
    assert not res["hidden"].any()
    assert res["box"] == _bbox_of(res["mask"])
    # Fully visible, except what the border may cut: up to 0.1 of the long side (see above).
    assert 0.88 <= res["visible"] <= 1.0


def test_a_later_instance_hides_an_earlier_one_where_they_overlap():
    # Two instances larger than the image cannot be placed apart: the second is pasted over the
    # first, so the first's hidden pixels are exactly the second's silhouette.
    a = poster_texture(streams.rng(0, streams.INSTANCE, 0))
    b = poster_texture(streams.rng(0, streams.INSTANCE, 1))
    spec = {"size": 1.0, "rot": 0.0, "persp": 0.0, "occlusion": 0.0}
    _, (ra, rb) = compose(
        np.random.default_rng(2), 60, 80, [(*a, spec), (*b, spec)], [a], 0, 1.0, []
    )
    assert np.array_equal(ra["hidden"], rb["mask"])
    assert not rb["hidden"].any()
    assert ra["visible"] < 1.0
