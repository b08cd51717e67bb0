"""Where a reference image (a cover scan, a catalogue photo, a logo) appears in a photo.

Local-feature matching: SIFT keypoints (optionally RootSIFT descriptors) of the reference, cropped
to its box, and of the photo; Lowe's ratio test; a RANSAC homography; an acceptance rule (enough
inliers, spread over the reference in area and in both directions, and a homography that maps the
reference box to a plausible quadrilateral). The result is the projected quadrilateral and its
axis-aligned bounding box, clipped to the photo: the box a person would draw around a planar
object.

Coordinate frame: every point and box here is in *continuous* pixel coordinates of its image (the
frame of ``XYXY_ABS`` boxes): pixel ``(i, j)`` covers ``[j, j + 1] x [i, i + 1]``, so its centre
is ``(j + 0.5, i + 0.5)``. OpenCV keypoints (centre of pixel ``(i, j)`` at ``(j, i)``) are shifted
by half a pixel on the way in. Images are (H, W) or (H, W, 3) BGR uint8 arrays as read, i.e.
after their EXIF orientation has been applied.

Pure functions of numpy arrays and OpenCV: no detectron2, no file I/O.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "Features",
    "MatchParams",
    "Localisation",
    "detect_and_describe",
    "root_sift",
    "ratio_match",
    "estimate_homography",
    "project_box",
    "polygon_area",
    "visible_area",
    "quad_problem",
    "quad_bounding_box",
    "inlier_spread",
    "inlier_extent",
    "locate_reference",
    "trim_uniform_border",
]

# Below this many tentative matches a homography (4 points minimum) is not worth estimating.
_MIN_MATCHES = 8


@dataclass
class Features:
    """Local features of one image.

    Attributes:
        points (np.ndarray): (N, 2) float64 keypoint centres, (x, y) continuous pixels.
        descriptors (np.ndarray): (N, D) float32 descriptors (D = 128 for SIFT).
        size (tuple): ``(height, width)`` of the image the points are in.
    """

    points: np.ndarray
    descriptors: np.ndarray
    size: Tuple[int, int]

    def __len__(self) -> int:
        return int(self.points.shape[0])


@dataclass
class MatchParams:
    """Everything that decides whether a match is accepted (defaults tuned on SMVS DVD covers).

    Attributes:
        ratio: Lowe's ratio test: keep a match when nearest / second-nearest distance < ratio.
        ransac_px: RANSAC reprojection threshold, in photo pixels.
        min_inliers: fewest RANSAC inliers for an accepted match.
        min_spread: fewest inliers' convex hull area, as a fraction of the reference box area:
            a homography fitted to one corner of the reference extrapolates badly to the others.
        min_extent: smallest span of the inliers along x and along y (5th to 95th percentile),
            as a fraction of the reference box's width and height: a strip shared by many
            objects (a "BLU-RAY + DVD" band, a studio logo, a title line) matched alone fixes a
            homography that is wrong away from it.
        min_area: smallest visible area of the projected box, as a fraction of the photo.
        max_area: largest area of the projected box (visible or not), as a fraction of the photo.
        min_visible: smallest fraction of the projected box that lies inside the photo.
        min_angle: smallest interior angle of the projected box, in degrees (max is 180 - it).
        max_side_ratio: largest ratio between the relative lengths of opposite sides (the length
            of a projected side divided by that of the same side in the reference box).
    """

    ratio: float = 0.8
    ransac_px: float = 4.0
    min_inliers: int = 15
    min_spread: float = 0.05
    min_extent: float = 0.12
    min_area: float = 0.005
    max_area: float = 4.0
    min_visible: float = 0.2
    min_angle: float = 25.0
    max_side_ratio: float = 4.0


@dataclass
class Localisation:
    """The outcome of matching a reference against a photo.

    Attributes:
        accepted (bool): the match passed every check.
        reason (str): why it was rejected ("" when accepted).
        num_matches (int): tentative matches after the ratio test.
        num_inliers (int): RANSAC inliers (0 without a homography).
        spread (float): inliers' convex hull area / reference box area (0 without a homography).
        extent (tuple): ``(x, y)`` span of the inliers / box width and height
            (:func:`inlier_extent`).
        homography (np.ndarray or None): (3, 3) float64, reference continuous pixels -> photo
            continuous pixels.
        quad (np.ndarray or None): (4, 2) float64 projected reference box corners in the photo,
            in the order (x1, y1), (x2, y1), (x2, y2), (x1, y2) of the reference box; may reach
            outside the photo.
        box (list or None): ``[x1, y1, x2, y2]`` bounding box of ``quad`` clipped to the photo.
    """

    accepted: bool
    reason: str
    num_matches: int = 0
    num_inliers: int = 0
    spread: float = 0.0
    extent: Tuple[float, float] = (0.0, 0.0)
    homography: Optional[np.ndarray] = None
    quad: Optional[np.ndarray] = None
    box: Optional[List[float]] = None


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman, CVPR 2012): L1-normalise, then square root.

    Euclidean distance between RootSIFT vectors is the Hellinger kernel between the SIFT
    histograms, which matches better than the L2 distance between raw SIFT vectors.

    Args:
        descriptors: (N, D) non-negative SIFT descriptors.

    Returns:
        np.ndarray: (N, D) float32, each row of unit L2 norm (all-zero rows stay zero).
    """
    d = np.asarray(descriptors, dtype=np.float64)
    l1 = d.sum(axis=1, keepdims=True)
    d = np.sqrt(d / np.maximum(l1, 1e-12))
    return d.astype(np.float32)


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 2:
        return image
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")


def _sift(max_features: int):
    """OpenCV's SIFT and the bias of its keypoints, in pixels.

    SIFT doubles the image before its first octave; by default OpenCV maps index ``x`` of the
    doubled image to ``x / 2`` although its pixel centre is at ``x / 2 - 0.25``, so every keypoint
    lies a quarter pixel right of and below its true place. ``enable_precise_upscale``
    (OpenCV >= 4.8) removes the bias; older versions get it subtracted.
    """
    try:
        return cv2.SIFT_create(nfeatures=max_features, enable_precise_upscale=True), 0.0
    except TypeError:
        return cv2.SIFT_create(nfeatures=max_features), 0.25


def detect_and_describe(
    image: np.ndarray, max_features: int = 0, upscale: float = 1.0, use_root_sift: bool = True
) -> Features:
    """SIFT keypoints and descriptors of an image.

    Args:
        image: (H, W, 3) BGR or (H, W) uint8.
        max_features: keep the strongest this many (0: all).
        upscale: resize by this factor before detection (small photos give more keypoints when
            upscaled); the points are returned in the frame of ``image``.
        use_root_sift: convert the descriptors to RootSIFT (:func:`root_sift`).

    Returns:
        Features: points in continuous pixels of ``image`` and their descriptors.
    """
    gray = _gray(image)
    h, w = gray.shape
    if upscale != 1.0:
        size = (max(1, round(w * upscale)), max(1, round(h * upscale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC)
    sift, bias = _sift(max_features)
    keypoints, descriptors = sift.detectAndCompute(gray, None)
    if not keypoints:
        return Features(np.zeros((0, 2)), np.zeros((0, 128), np.float32), (h, w))
    pts = np.array([k.pt for k in keypoints], dtype=np.float64) - bias
    # cv2.resize maps continuous coordinates by the exact size ratio, per axis
    sx, sy = gray.shape[1] / w, gray.shape[0] / h
    pts = (pts + 0.5) / np.array([sx, sy])
    if use_root_sift:
        descriptors = root_sift(descriptors)
    return Features(pts, descriptors.astype(np.float32), (h, w))


def ratio_match(query: np.ndarray, target: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """Nearest-neighbour matches that pass Lowe's ratio test.

    Args:
        query: (N, D) float32 descriptors.
        target: (M, D) float32 descriptors.
        ratio: keep ``i -> j`` when ``d(i, j) < ratio * d(i, j')`` for the second nearest ``j'``.

    Returns:
        np.ndarray: (K, 2) int64 pairs ``(query index, target index)``, K <= N.
    """
    if len(query) == 0 or len(target) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    pairs = [
        (m[0].queryIdx, m[0].trainIdx)
        for m in matcher.knnMatch(query, target, k=2)
        if len(m) == 2 and m[0].distance < ratio * m[1].distance
    ]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def estimate_homography(
    src: np.ndarray, dst: np.ndarray, threshold_px: float = 4.0
) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """Robust homography ``dst ~ H src`` (OpenCV's USAC MAGSAC++, deterministic).

    Args:
        src: (K, 2) points in the reference (continuous pixels).
        dst: (K, 2) matching points in the photo.
        threshold_px: inlier reprojection threshold in photo pixels.

    Returns:
        (H, inliers): H (3, 3) float64 normalised to ``H[2, 2] = 1`` (None when none was found)
        and a (K,) bool inlier mask (all False without H).
    """
    none = np.zeros(len(src), dtype=bool)
    if len(src) < 4:
        return None, none
    H, mask = cv2.findHomography(
        src.astype(np.float64),
        dst.astype(np.float64),
        cv2.USAC_MAGSAC,
        threshold_px,
        maxIters=10000,
        confidence=0.9999,
    )
    if H is None or mask is None or not np.all(np.isfinite(H)) or abs(H[2, 2]) < 1e-12:
        return None, none
    return H / H[2, 2], mask.ravel().astype(bool)


def _box_corners(box: Sequence[float]) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)


def project_box(H: np.ndarray, box: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """The corners of a box mapped by a homography.

    Args:
        H: (3, 3) homography, reference frame -> photo frame.
        box: ``[x1, y1, x2, y2]`` in the reference frame.

    Returns:
        (quad, w): quad (4, 2) projected corners (x1, y1), (x2, y1), (x2, y2), (x1, y2); w (4,)
        their homogeneous scales (a corner with ``w <= 0`` is behind the camera: no real image).
    """
    corners = np.hstack([_box_corners(box), np.ones((4, 1))])
    proj = corners @ np.asarray(H, dtype=np.float64).T
    w = proj[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        quad = proj[:, :2] / w[:, None]
    return quad, w


def polygon_area(poly: np.ndarray) -> float:
    """Signed area of a polygon (shoelace): positive when clockwise on screen (y down).

    Args:
        poly: (P, 2) vertices in order.
    """
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def visible_area(quad: np.ndarray, size: Tuple[int, int]) -> float:
    """Area of the part of a convex quadrilateral inside the image ``[0, W] x [0, H]``.

    Args:
        quad: (4, 2) convex quadrilateral, continuous pixels.
        size: ``(height, width)`` of the image.
    """
    h, w = size
    rect = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    area, _ = cv2.intersectConvexConvex(quad.astype(np.float32), rect)
    return max(float(area), 0.0)


def _interior_angles(quad: np.ndarray) -> np.ndarray:
    prev = np.roll(quad, 1, axis=0) - quad
    nxt = np.roll(quad, -1, axis=0) - quad
    cos = (prev * nxt).sum(1) / np.maximum(
        np.linalg.norm(prev, axis=1) * np.linalg.norm(nxt, axis=1), 1e-12
    )
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def quad_problem(
    quad: np.ndarray,
    w: np.ndarray,
    ref_box: Sequence[float],
    size: Tuple[int, int],
    params: MatchParams,
) -> str:
    """Why a projected reference box is not a plausible view of a planar object ("" if it is).

    Checks, in order: every corner in front of the camera (``w > 0``, else the box wraps through
    infinity), a convex quadrilateral with the reference's orientation (a mirror image or a
    bow-tie is a wrong homography), no interior angle below ``min_angle`` or above
    ``180 - min_angle``, opposite sides shrunk alike within ``max_side_ratio``, total area at
    most ``max_area`` x the photo, at least ``min_visible`` of it inside the photo, and a visible
    area of at least ``min_area`` x the photo.

    Args:
        quad, w: see :func:`project_box`.
        ref_box: ``[x1, y1, x2, y2]`` the reference box that was projected.
        size: ``(height, width)`` of the photo.
        params: the thresholds.
    """
    if not (np.all(w > 0) or np.all(w < 0)) or not np.all(np.isfinite(quad)):
        return "degenerate: the box wraps through infinity"
    edges = np.roll(quad, -1, axis=0) - quad
    following = np.roll(edges, -1, axis=0)
    turns = edges[:, 0] * following[:, 1] - edges[:, 1] * following[:, 0]  # z of edge x next
    if np.all(turns < 0):  # the reference corners go clockwise on screen (y down)
        return "mirrored: the projected box is turned inside out"
    if not np.all(turns > 0):
        return "not convex: the projected box crosses itself"
    angles = _interior_angles(quad)
    if angles.min() < params.min_angle or angles.max() > 180.0 - params.min_angle:
        return f"implausible perspective: corner angles {angles.min():.0f}-{angles.max():.0f} deg"
    ref = _box_corners(ref_box)
    rel = np.linalg.norm(edges, axis=1) / np.linalg.norm(np.roll(ref, -1, axis=0) - ref, axis=1)
    for a, b in ((0, 2), (1, 3)):
        if max(rel[a], rel[b]) > params.max_side_ratio * min(rel[a], rel[b]):
            return f"implausible perspective: opposite sides scaled {rel[a]:.2f} vs {rel[b]:.2f}"
    image_area = float(size[0] * size[1])
    area = polygon_area(quad)
    if area > params.max_area * image_area:
        return f"projected box too large: {area / image_area:.2f} x the photo"
    inside = visible_area(quad, size)
    if inside < params.min_visible * area:
        return f"projected box mostly outside the photo ({inside / area:.0%} inside)"
    if inside < params.min_area * image_area:
        return f"projected box too small: {inside / image_area:.2%} of the photo"
    return ""


def quad_bounding_box(quad: np.ndarray, size: Tuple[int, int]) -> List[float]:
    """Axis-aligned bounding box of a quadrilateral, clipped to the image.

    Args:
        quad: (4, 2) points, continuous pixels.
        size: ``(height, width)`` of the image.

    Returns:
        list[float]: ``[x1, y1, x2, y2]`` within ``[0, W] x [0, H]``.
    """
    h, w = size
    x1, y1 = quad.min(axis=0)
    x2, y2 = quad.max(axis=0)
    return [
        float(np.clip(x1, 0, w)),
        float(np.clip(y1, 0, h)),
        float(np.clip(x2, 0, w)),
        float(np.clip(y2, 0, h)),
    ]


def inlier_spread(points: np.ndarray, ref_box: Sequence[float]) -> float:
    """Area of the convex hull of points as a fraction of a box's area.

    Args:
        points: (K, 2) points in the reference frame.
        ref_box: ``[x1, y1, x2, y2]`` in the same frame.
    """
    if len(points) < 3:
        return 0.0
    hull = cv2.convexHull(points.astype(np.float32))
    x1, y1, x2, y2 = ref_box
    return float(cv2.contourArea(hull)) / max((x2 - x1) * (y2 - y1), 1e-12)


def inlier_extent(points: np.ndarray, ref_box: Sequence[float]) -> Tuple[float, float]:
    """Span of points along x and y (5th to 95th percentile) as fractions of a box's size.

    Args:
        points: (K, 2) points in the reference frame.
        ref_box: ``[x1, y1, x2, y2]`` in the same frame.

    Returns:
        (float, float): x span / box width, y span / box height; (0, 0) without points.
    """
    if len(points) == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(points, [5, 95], axis=0)
    x1, y1, x2, y2 = ref_box
    return float((hi[0] - lo[0]) / max(x2 - x1, 1e-12)), float(
        (hi[1] - lo[1]) / max(y2 - y1, 1e-12)
    )


def trim_uniform_border(
    image: np.ndarray,
    box: Sequence[float],
    colour: Optional[Sequence[int]] = None,
    tolerance: int = 16,
    min_fraction: float = 0.98,
) -> List[float]:
    """Shrinks a box past uniform margins (the white paper around a scanned cover).

    Rows and columns are peeled from each side while at least ``min_fraction`` of their pixels
    are within ``tolerance`` (max over channels) of the margin colour. A box whose content is
    uniform throughout is returned unchanged. Give the colour when it is known (white paper):
    an object whose own edge is uniform (a black cover) would otherwise lose it.

    Args:
        image: (H, W, 3) or (H, W) uint8.
        box: ``[x1, y1, x2, y2]`` continuous pixels; rounded outwards to whole pixels.
        colour: the margin colour in the image's channel order (one value per channel); None:
            the median of the box's outermost ring of pixels.
        tolerance: largest difference from the margin colour that still counts as margin.
        min_fraction: share of a row or column's pixels that must be margin to peel it.

    Returns:
        list[float]: ``[x1, y1, x2, y2]`` whole pixels, inside ``box`` (rounded outwards).
    """
    h, w = image.shape[:2]
    x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x2, y2 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
    crop = image[y1:y2, x1:x2].astype(np.int16).reshape(y2 - y1, x2 - x1, -1)
    if colour is None:
        colour = np.median(np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]]), axis=0)
    margin = np.abs(crop - np.asarray(colour, dtype=np.float64)).max(axis=2) <= tolerance
    rows = margin.mean(axis=1) >= min_fraction
    cols = margin.mean(axis=0) >= min_fraction
    if rows.all() or cols.all():
        return [float(x1), float(y1), float(x2), float(y2)]

    def peel(flags):
        return int(np.argmin(flags)), int(np.argmin(flags[::-1]))

    (top, bottom), (left, right) = peel(rows), peel(cols)
    return [float(x1 + left), float(y1 + top), float(x2 - right), float(y2 - bottom)]


def _rejection(result: Localisation, params: MatchParams) -> str:
    """Why the inliers of a match do not support it ("" if they do)."""
    if result.num_inliers < params.min_inliers:
        return f"too few inliers ({result.num_inliers} < {params.min_inliers})"
    if result.spread < params.min_spread:
        return f"inliers cover {result.spread:.1%} of the reference (< {params.min_spread:.0%})"
    if min(result.extent) < params.min_extent:
        ex, ey = result.extent
        return (
            f"inliers span {ex:.0%} x {ey:.0%} of the reference "
            f"(< {params.min_extent:.0%} in one direction)"
        )
    return ""


def locate_reference(
    reference: Features, ref_box: Sequence[float], photo: Features, params: MatchParams
) -> Localisation:
    """Finds the reference box in a photo by feature matching and a verified homography.

    Args:
        reference: features of the reference image (e.g. of the query image cropped to its box).
        ref_box: ``[x1, y1, x2, y2]`` the object's extent in the reference's frame (the frame of
            ``reference.points``).
        photo: features of the photo.
        params: matching and acceptance thresholds.

    Returns:
        Localisation: accepted or not and why, with the homography, the projected quadrilateral
        and its bounding box in photo continuous pixels whenever a homography was found (also
        for rejected matches, so that they can be inspected).
    """
    pairs = ratio_match(reference.descriptors, photo.descriptors, params.ratio)
    result = Localisation(accepted=False, reason="", num_matches=len(pairs))
    if len(pairs) < max(_MIN_MATCHES, 4):
        result.reason = f"too few matches ({len(pairs)})"
        return result
    src, dst = reference.points[pairs[:, 0]], photo.points[pairs[:, 1]]
    H, inliers = estimate_homography(src, dst, params.ransac_px)
    if H is None:
        result.reason = f"no homography from {len(pairs)} matches"
        return result
    quad, w = project_box(H, ref_box)
    result.homography, result.num_inliers = H, int(inliers.sum())
    result.spread = inlier_spread(src[inliers], ref_box)
    result.extent = inlier_extent(src[inliers], ref_box)
    problem = quad_problem(quad, w, ref_box, photo.size, params)
    if not problem:
        result.quad, result.box = quad, quad_bounding_box(quad, photo.size)
    result.reason = _rejection(result, params) or problem
    if result.quad is None and np.all(np.isfinite(quad)) and (np.all(w > 0) or np.all(w < 0)):
        result.quad = quad  # drawn for inspection; no box for an implausible quadrilateral
    result.accepted = not result.reason
    return result
