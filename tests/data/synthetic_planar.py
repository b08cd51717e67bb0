"""Tiny synthetic scenes for the reference-box tests: a textured planar reference pasted into a
cluttered photo by a known homography.

Homographies here are in the continuous pixel frame (pixel (i, j) covers [j, j+1] x [i, i+1]);
``warp_into`` converts to OpenCV's pixel-centre frame itself, so the expected box of a test is
computed from the homography alone, by hand-written numpy, independently of the module under
test.
"""

import cv2
import numpy as np


def textured(height, width, seed, blobs=60):
    """(H, W, 3) uint8: random coloured ellipses and lines on a smooth random background."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(blobs):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(2, max(3, width // 8))), int(rng.integers(2, max(3, height // 8))))
        if rng.random() < 0.7:
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(image, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        else:
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, centre, end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    return image


def to_pixel_centre_frame(H):
    """The homography of OpenCV's pixel-centre frame equal to ``H`` of the continuous frame."""
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=np.float64)
    return np.linalg.inv(shift) @ H @ shift


def warp_into(reference, photo, H):
    """``photo`` with ``reference`` pasted by ``H`` (continuous frames, reference -> photo)."""
    h, w = photo.shape[:2]
    Hc = to_pixel_centre_frame(H)
    warped = cv2.warpPerspective(reference, Hc, (w, h), flags=cv2.INTER_LINEAR)
    # 4x supersampled coverage of each photo pixel by the warped reference rectangle
    mask = np.full((reference.shape[0] * 4, reference.shape[1] * 4), 255, dtype=np.uint8)
    up = np.diag([4.0, 4.0, 1.0])
    cover = cv2.warpPerspective(
        mask, to_pixel_centre_frame(up @ H @ np.linalg.inv(up)), (w * 4, h * 4)
    )
    alpha = cv2.resize(cover, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)[..., None]
    alpha /= 255.0
    return np.round(alpha * warped + (1 - alpha) * photo).astype(np.uint8)


def projected_box(H, width, height):
    """Bounding box of the reference rectangle [0, W] x [0, H] mapped by ``H``, by hand."""
    corners = []
    for x, y in ((0, 0), (width, 0), (width, height), (0, height)):
        u = H[0, 0] * x + H[0, 1] * y + H[0, 2]
        v = H[1, 0] * x + H[1, 1] * y + H[1, 2]
        s = H[2, 0] * x + H[2, 1] * y + H[2, 2]
        corners.append((u / s, v / s))
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return [min(xs), min(ys), max(xs), max(ys)], corners


# A rotation by about 20 degrees, a scale of 1.1, a translation and a mild perspective.
KNOWN_H = np.array(
    [[0.98, -0.36, 80.0], [0.40, 1.02, 40.0], [0.0004, 0.0002, 1.0]], dtype=np.float64
)
