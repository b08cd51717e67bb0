"""Tests of the object generators: shapes, ranges and determinism of posters and generic shapes."""

import numpy as np
import pytest

from retrieval_ext.data.datasets.synthetic import streams
from retrieval_ext.data.datasets.synthetic.textures import (
    CANONICAL_SIDE,
    GENERIC_CATEGORIES,
    generic_shape,
    poster_texture,
)


def _inside(outline, tex):
    h, w = tex.shape[:2]
    return (
        outline.min() >= -1e-3
        and (outline[:, 0] <= w + 1e-3).all()
        and (outline[:, 1] <= h + 1e-3).all()
    )


@pytest.mark.parametrize("k", range(6))
def test_poster_texture(k):
    tex, outline = poster_texture(streams.rng(0, streams.INSTANCE, k))
    h, w = tex.shape[:2]
    assert tex.dtype == np.float32 and outline.dtype == np.float32 and tex.shape[2] == 3
    assert max(h, w) == CANONICAL_SIDE and min(h, w) >= 0.55 * CANONICAL_SIDE - 1
    assert tex.min() >= 0 and tex.max() <= 255
    assert outline.ndim == 2 and outline.shape[1] == 2 and len(outline) >= 4
    assert _inside(outline, tex)


def test_poster_texture_is_a_function_of_its_stream():
    a = poster_texture(streams.rng(3, streams.INSTANCE, 1))
    b = poster_texture(streams.rng(3, streams.INSTANCE, 1))
    c = poster_texture(streams.rng(3, streams.DISTRACTOR, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("category", GENERIC_CATEGORIES)
def test_generic_shape(category):
    tex, outline = generic_shape(np.random.default_rng(5), category)
    assert tex.dtype == np.float32 and tex.shape[2] == 3
    assert _inside(outline, tex)
    transparent = tex[..., 0] < 0
    if category == "ring":
        # The hole is centred on the ring's outer circle of radius CANONICAL_SIDE / 2.
        c = CANONICAL_SIDE // 2
        assert transparent[c, c] and transparent.sum() > 0.1 * transparent.size
    else:
        assert not transparent.any()
    assert tex[~transparent].min() >= 0 and tex.max() <= 255


def test_unknown_generic_category_is_named():
    with pytest.raises(ValueError, match="blob"):
        generic_shape(np.random.default_rng(0), "blob")
