"""Reference-box localisation: hand-worked geometry, a synthetic photo with a known homography."""

import numpy as np
import pytest

from retrieval_ext.data.reference_boxes import (
    MatchParams,
    detect_and_describe,
    inlier_extent,
    inlier_spread,
    locate_reference,
    polygon_area,
    project_box,
    quad_bounding_box,
    quad_problem,
    ratio_match,
    root_sift,
    trim_uniform_border,
    visible_area,
)
from tests.common import KNOWN_H, projected_box, textured, warp_into

REF_H, REF_W = 120, 90
PHOTO_H, PHOTO_W = 240, 320


@pytest.fixture(scope="module")
def scene():
    reference = textured(REF_H, REF_W, seed=1)
    clutter = textured(PHOTO_H, PHOTO_W, seed=2, blobs=120)
    return reference, clutter, warp_into(reference, clutter, KNOWN_H)


def test_root_sift_hand_worked():
    out = root_sift(np.array([[1.0, 3.0], [0.0, 0.0]]))
    # L1: [0.25, 0.75] -> sqrt; the zero row stays zero
    np.testing.assert_allclose(out, [[0.5, np.sqrt(0.75)], [0.0, 0.0]], atol=1e-6)
    assert out.dtype == np.float32


def test_ratio_match_keeps_only_distinct_nearest():
    target = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    # query 0: distances 1 and 9 -> 1/9 passes; query 1: 5 and 5 -> ambiguous, dropped
    query = np.array([[1, 0], [5, 0]], dtype=np.float32)
    np.testing.assert_array_equal(ratio_match(query, target, 0.8), [[0, 0]])
    assert ratio_match(query, target[:1], 0.8).shape == (0, 2)


def test_project_box_and_bounding_box_hand_worked():
    H = np.array([[2.0, 0, 10], [0, 3.0, -5], [0, 0, 1]])
    quad, w = project_box(H, [1, 2, 4, 6])
    np.testing.assert_allclose(quad, [[12, 1], [18, 1], [18, 13], [12, 13]])
    np.testing.assert_allclose(w, 1.0)
    # clipped to a 10 (high) x 15 (wide) image
    assert quad_bounding_box(quad, (10, 15)) == [12.0, 1.0, 15.0, 10.0]


def test_polygon_and_visible_area():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], dtype=np.float64)
    assert polygon_area(square) == 16.0  # clockwise on screen (y down): positive
    assert polygon_area(square[::-1]) == -16.0
    # half of the square hangs off the right edge of a 10 x 2 (wide x high) image
    assert visible_area(square + [0, 0], (2, 10)) == pytest.approx(8.0)
    assert visible_area(square + [8, 0], (10, 10)) == pytest.approx(8.0)


def _quad_check(quad, w=None, size=(100, 100), ref=(0, 0, 10, 10)):
    quad = np.asarray(quad, dtype=np.float64)
    return quad_problem(quad, np.ones(4) if w is None else np.asarray(w), ref, size, MatchParams())


def test_quad_problem_accepts_a_plain_view():
    assert _quad_check([[10, 10], [50, 12], [52, 60], [8, 58]]) == ""


@pytest.mark.parametrize(
    "quad, w, reason",
    [
        ([[50, 10], [10, 10], [10, 50], [50, 50]], None, "mirrored"),  # left-right flip
        ([[10, 10], [50, 10], [10, 50], [50, 50]], None, "not convex"),  # bow-tie
        ([[10, 10], [50, 10], [50, 50], [10, 50]], [1, 1, -1, 1], "infinity"),
        ([[10, 10], [90, 10], [52, 14], [48, 14]], None, "perspective"),  # needle-thin
        ([[10, 10], [90, 10], [55, 30], [45, 30]], None, "opposite sides"),  # 80 vs 10
        ([[10, 10], [12, 10], [12, 12], [10, 12]], None, "too small"),
        ([[-300, -300], [400, -300], [400, 400], [-300, 400]], None, "too large"),
        ([[90, 90], [190, 90], [190, 190], [90, 190]], None, "outside"),
    ],
)
def test_quad_problem_rejects(quad, w, reason):
    assert reason in _quad_check(quad, w)


def test_inlier_spread_hand_worked():
    pts = np.array([[0, 0], [5, 0], [5, 10], [0, 10], [2, 3]], dtype=np.float64)
    assert inlier_spread(pts, [0, 0, 10, 10]) == pytest.approx(0.5)
    assert inlier_spread(pts[:2], [0, 0, 10, 10]) == 0.0


def test_inlier_extent_hand_worked():
    # x = 0, 1, ..., 10 on a 20 x 4 box: 5th..95th percentile 0.5..9.5, a span of 9 of 20
    pts = np.stack([np.arange(11.0), np.full(11, 2.0)], axis=1)
    assert inlier_extent(pts, [0, 0, 20, 4]) == pytest.approx((0.45, 0.0))
    assert inlier_extent(np.zeros((0, 2)), [0, 0, 1, 1]) == (0.0, 0.0)


def test_trim_uniform_border_finds_the_content():
    rng = np.random.default_rng(0)
    image = np.full((50, 40, 3), 250, dtype=np.int16) + rng.integers(-4, 5, (50, 40, 3))
    image[12:30, 7:33] = rng.integers(0, 200, (18, 26, 3))
    image = image.clip(0, 255).astype(np.uint8)
    assert trim_uniform_border(image, [0, 0, 40, 50]) == [7.0, 12.0, 33.0, 30.0]
    # content touching the box on every side: nothing to trim
    assert trim_uniform_border(image, [10, 15, 30, 25]) == [10.0, 15.0, 30.0, 25.0]
    # a uniform box is returned whole
    assert trim_uniform_border(image, [0, 35, 40, 50]) == [0.0, 35.0, 40.0, 50.0]


def test_trim_with_a_known_margin_colour_keeps_a_dark_edge():
    # a white scan margin around an object whose own 5 px edge is black
    image = np.full((60, 50, 3), 255, dtype=np.uint8)
    image[10:50, 8:42] = 0
    image[15:45, 13:37] = 120
    assert trim_uniform_border(image, [0, 0, 50, 60], colour=(255, 255, 255)) == [
        8.0,
        10.0,
        42.0,
        50.0,
    ]
    # without the colour, a box on the object itself takes black for the margin and cuts it
    assert trim_uniform_border(image, [8, 10, 42, 50]) == [13.0, 15.0, 37.0, 45.0]


@pytest.mark.parametrize("upscale", [1.0, 2.0])
def test_keypoints_are_in_continuous_pixels(upscale):
    # one Gaussian blob centred at the continuous point (30, 20): pixel centres are at j + 0.5
    ys, xs = np.mgrid[0:48, 0:64] + 0.5
    blob = 40 + 180 * np.exp(-((xs - 30.0) ** 2 + (ys - 20.0) ** 2) / (2 * 3.0**2))
    feats = detect_and_describe(blob.astype(np.uint8), upscale=upscale)
    assert feats.size == (48, 64)
    nearest = np.linalg.norm(feats.points - [30.0, 20.0], axis=1).min()
    assert nearest < 0.1  # a half-pixel frame error would show as 0.5, OpenCV's bias as 0.35


def test_locates_a_warped_reference_within_two_pixels(scene):
    reference, _, photo = scene
    expected, corners = projected_box(KNOWN_H, REF_W, REF_H)
    assert 0 < expected[0] and expected[2] < PHOTO_W and 0 < expected[1] and expected[3] < PHOTO_H
    result = locate_reference(
        detect_and_describe(reference),
        [0, 0, REF_W, REF_H],
        detect_and_describe(photo),
        MatchParams(),
    )
    assert result.accepted, result.reason
    assert result.num_inliers >= 30
    np.testing.assert_allclose(result.box, expected, atol=2.0)
    np.testing.assert_allclose(result.quad, corners, atol=2.0)


def test_rejects_a_photo_without_the_reference(scene):
    reference, clutter, _ = scene
    result = locate_reference(
        detect_and_describe(reference),
        [0, 0, REF_W, REF_H],
        detect_and_describe(clutter),
        MatchParams(),
    )
    assert not result.accepted
    assert result.reason
    assert result.box is None


def test_rejects_a_match_on_a_shared_strip_only():
    # another object that shares only the reference's top strip (a logo band): enough inliers,
    # all in a band 15% high, so the homography below it is a guess
    reference = textured(240, 180, seed=2, blobs=150)
    other = textured(240, 180, seed=12, blobs=150)
    other[:36] = reference[:36]
    H = np.array([[1.0, -0.1, 60.0], [0.1, 1.0, 40.0], [0.0002, 0.0, 1.0]])
    photo = warp_into(other, textured(360, 420, seed=5, blobs=150), H)
    result = locate_reference(
        detect_and_describe(reference),
        [0, 0, 180, 240],
        detect_and_describe(photo),
        MatchParams(min_inliers=4, min_spread=0.0),
    )
    assert result.num_inliers >= 8
    assert result.extent[1] <= 0.15  # the band's height bounds the inliers' y span
    assert not result.accepted and "span" in result.reason


def test_rejects_a_mirrored_reference(scene):
    reference, clutter, _ = scene
    mirrored = warp_into(reference[:, ::-1].copy(), clutter, KNOWN_H)
    result = locate_reference(
        detect_and_describe(reference),
        [0, 0, REF_W, REF_H],
        detect_and_describe(mirrored),
        MatchParams(min_inliers=4),
    )
    assert not result.accepted
