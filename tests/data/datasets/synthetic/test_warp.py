"""Tests of placing one object into an image (hand-worked geometry)."""

import numpy as np
import pytest

from retrieval_ext.data.datasets.synthetic.warp import (
    Placed,
    mask_box,
    overlaps,
    photometric,
    render_mask,
    sample_quad,
)


def test_mask_box_pixel_edge_convention():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:8] = True  # rows 2..4, columns 3..7
    assert mask_box(mask) == [3.0, 2.0, 8.0, 5.0]
    assert mask_box(np.zeros((4, 4), bool)) is None


def test_overlaps_with_margin():
    box = (0, 0, 10, 10)
    assert not overlaps(box, [(12, 0, 20, 10)], 1)  # gap of 2 px, margin 1
    assert overlaps(box, [(12, 0, 20, 10)], 3)  # 12 - 3 = 9 < 10
    assert overlaps(box, [(30, 30, 40, 40), (5, 5, 6, 6)], 0)
    assert not overlaps(box, [], 100)


def test_sample_quad_without_rotation_or_perspective_is_the_scaled_rectangle():
    # A 100 x 50 outline scaled to a 40 px long side, centred at (50, 30): corners 20 x 10 away.
    outline = np.array([[0, 0], [100, 0], [100, 50], [0, 50]], np.float32)
    quad = sample_quad(np.random.default_rng(0), outline, 40.0, (50.0, 30.0), 0.0, 0.0)
    np.testing.assert_allclose(quad, [[30, 20], [70, 20], [70, 40], [30, 40]], atol=1e-5)


def test_placed_translation_pastes_the_texture_where_its_corners_go():
    # Texture pixel (i, j) lands on image pixel (i + 3, j + 5): the silhouette covers rows 3..12
    # and columns 5..24, and pasting copies the texture's value there and nothing elsewhere.
    tex = np.full((10, 20, 3), 100, np.float32)
    dst = np.array([[5, 3], [25, 3], [25, 13], [5, 13]], np.float32)
    p = Placed(tex, np.ones((10, 20), np.float32), dst)
    assert p.area == 200
    assert mask_box(p.full_mask(30, 40)) == [5.0, 3.0, 25.0, 13.0]
    img = np.zeros((30, 40, 3), np.float32)
    p.paste(img)
    assert (img[3:13, 5:25] == 100).all()
    img[3:13, 5:25] = 0
    assert not img.any()


def test_placed_is_clipped_at_the_border():
    tex = np.full((10, 20, 3), 50, np.float32)
    dst = np.array([[-5, -2], [15, -2], [15, 8], [-5, 8]], np.float32)
    p = Placed(tex, np.ones((10, 20), np.float32), dst)
    assert p.area == 200  # before clipping
    assert mask_box(p.full_mask(30, 40)) == [0.0, 0.0, 15.0, 8.0]
    img = np.zeros((30, 40, 3), np.float32)
    p.paste(img)
    assert (img[:8, :15] == 50).all() and img[8:].sum() == 0 and img[:, 15:].sum() == 0


def test_render_mask_leaves_out_transparent_pixels():
    tex = np.full((20, 20, 3), 10, np.float32)
    tex[5:10, 5:10] = -1.0
    outline = np.array([[0, 0], [20, 0], [20, 20], [0, 20]], np.float32)
    mask = render_mask(tex, outline)
    assert mask[5:10, 5:10].max() == 0
    assert mask[12:18, 12:18].min() == pytest.approx(1.0)


def test_photometric_identity_at_zero_strength_keeps_transparency():
    tex = np.random.default_rng(1).uniform(0, 255, (6, 7, 3)).astype(np.float32)
    tex[0, 0] = -1.0
    out = photometric(tex, np.random.default_rng(2), 0.0)
    np.testing.assert_allclose(out[1:], tex[1:], rtol=1e-5, atol=1e-3)
    assert (out[0, 0] == -1.0).all()
