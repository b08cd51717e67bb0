"""Placing one object into an image: pose, illumination change, perspective warp, masks and boxes.

Coordinates: texture pixels for an object's own frame (see :mod:`.textures`), image pixels for
everything placed; boxes are XYXY with the pixel-edge convention (a mask covering columns 3..7
gives x1 = 3, x2 = 8).
"""

from typing import List, Optional, Tuple

import cv2
import numpy as np

__all__ = ["Placed", "mask_box", "overlaps", "photometric", "render_mask", "sample_quad"]


def photometric(tex: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Illumination change of an object's texture: gain, bias, gamma and a colour cast.

    Args:
        tex: (H, W, 3) float32 in [0, 255] (negative values mark transparent pixels and stay).
        rng: random stream.
        strength: 0 = identity; 1 = the benchmark's default ranges.

    Returns:
        The changed texture, same shape, in [0, 255] where it was non-negative.
    """
    gain = np.exp(rng.normal(0, 0.25 * strength))
    bias = rng.normal(0, 12 * strength)
    gamma = np.exp(rng.normal(0, 0.25 * strength))
    cast = np.exp(rng.normal(0, 0.08 * strength, 3)).astype(np.float32)
    out = 255.0 * (np.clip(tex, 0, 255) / 255.0) ** gamma
    out = np.clip(out * gain * cast + bias, 0, 255).astype(np.float32)
    out[tex[..., 0] < 0] = -1.0
    return out


def render_mask(tex: np.ndarray, outline: np.ndarray) -> np.ndarray:
    """Canonical object mask (H, W) float32 in [0, 1] from the outline (anti-aliased edges).

    Transparent texture pixels (negative values) are left out of the mask.
    """
    h, w = tex.shape[:2]
    # Draw at 4x sub-pixel precision so the warped silhouette follows the float outline.
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(outline * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    mask = mask.astype(np.float32) / 255.0
    mask[tex[..., 0] < 0] = 0.0
    return mask


def sample_quad(
    rng: np.random.Generator,
    outline: np.ndarray,
    size_px: float,
    centre: Tuple[float, float],
    rot_deg: float,
    persp: float,
) -> np.ndarray:
    """Destination corners (4, 2) of the object's texture rectangle in image pixels.

    The object's long side becomes ``size_px``; it is rotated in-plane by ``rot_deg`` (normal
    with that standard deviation) and each corner moves by up to ``persp`` x size (perspective).
    """
    w = float(outline[:, 0].max())
    h = float(outline[:, 1].max())
    s = size_px / max(w, h)
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    pts = (src - [w / 2, h / 2]) * s
    a = np.deg2rad(rng.normal(0, rot_deg))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    pts = pts @ rot.T
    # Out-of-plane tilt: foreshorten one side (a vanishing direction), then jitter corners.
    tilt = rng.uniform(0, persp)
    side = int(rng.integers(4))
    pts[side] *= 1 - tilt
    pts[(side + 1) % 4] *= 1 - tilt
    pts += rng.uniform(-persp / 3, persp / 3, (4, 2)) * size_px
    return (pts + centre).astype(np.float32)


class Placed:
    """An object warped into a patch of the image: alpha, colour and where the patch lies.

    Attributes:
        x0, y0: top-left of the patch in image pixels (may be negative: the patch is not clipped).
        alpha: (ph, pw) float32 in [0, 1], the warped silhouette.
        colour: (ph, pw, 3) float32 RGB, the warped texture.
        area: number of silhouette pixels (alpha > 0.5) before clipping to the image.
    """

    def __init__(self, tex: np.ndarray, mask: np.ndarray, dst: np.ndarray):
        """
        Args:
            tex: (H, W, 3) float32 texture in its own frame.
            mask: (H, W) float32 silhouette in [0, 1] (:func:`render_mask`).
            dst: (4, 2) image-pixel corners of the texture rectangle (:func:`sample_quad`).
        """
        h, w = tex.shape[:2]
        src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
        self.x0 = int(np.floor(dst[:, 0].min())) - 1
        self.y0 = int(np.floor(dst[:, 1].min())) - 1
        pw = int(np.ceil(dst[:, 0].max())) + 2 - self.x0
        ph = int(np.ceil(dst[:, 1].max())) + 2 - self.y0
        M = cv2.getPerspectiveTransform(src, dst - np.float32([self.x0, self.y0]))
        self.alpha = cv2.warpPerspective(
            mask, M, (pw, ph), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        )
        # INTER_AREA-like smoothing when shrinking: blur the texture before warping.
        shrink = max(w, h) / max(pw, ph, 1)
        src_tex = np.clip(tex, 0, 255)
        if shrink > 1.5:
            src_tex = cv2.GaussianBlur(src_tex, (0, 0), 0.45 * shrink)
        self.colour = cv2.warpPerspective(
            src_tex, M, (pw, ph), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        self.area = int((self.alpha > 0.5).sum())

    def box(self) -> Tuple[int, int, int, int]:
        """Patch extent in image pixels, XYXY, unclipped."""
        return self.x0, self.y0, self.x0 + self.alpha.shape[1], self.y0 + self.alpha.shape[0]

    def paste(self, img: np.ndarray) -> None:
        """Alpha-composite onto img (H, W, 3) float32 in place."""
        H, W = img.shape[:2]
        x0, y0, x1, y1 = self.box()
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
        if cx0 >= cx1 or cy0 >= cy1:
            return
        a = self.alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, None]
        col = self.colour[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        img[cy0:cy1, cx0:cx1] = a * col + (1 - a) * img[cy0:cy1, cx0:cx1]

    def full_mask(self, h: int, w: int) -> np.ndarray:
        """Binary silhouette (alpha > 0.5) in image coordinates, (h, w) bool, clipped."""
        out = np.zeros((h, w), bool)
        x0, y0, x1, y1 = self.box()
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0:cy1, cx0:cx1] = self.alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] > 0.5
        return out


def mask_box(mask: np.ndarray) -> Optional[List[float]]:
    """XYXY pixel-edge bounding box of a boolean (H, W) mask, or None if empty."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    if len(xs) == 0:
        return None
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def overlaps(box, boxes, margin: float) -> bool:
    """True if ``box`` (XYXY) intersects any of ``boxes`` enlarged by ``margin`` pixels."""
    for b in boxes:
        if (
            box[0] < b[2] + margin
            and b[0] - margin < box[2]
            and box[1] < b[3] + margin
            and b[1] - margin < box[3]
        ):
            return True
    return False
