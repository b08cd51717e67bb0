"""The ``Transform`` classes of the camera augmentation (:mod:`.augment` draws their
parameters): each applies one deterministic change to an image and says how coordinates move.

Coordinates are detectron2's: continuous, pixel edges at integers (a W-pixel-wide image spans
x in [0, W]). Only :class:`HomographyTransform` moves them; the others change pixel values.
"""

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "BlurTransform",
    "HomographyTransform",
    "LightingTransform",
    "PasteTransform",
    "SensorNoiseTransform",
]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _shift(matrix: np.ndarray) -> np.ndarray:
    """The homography in OpenCV's pixel-centre coordinates (pixel i's centre at i, not i + 0.5)."""
    to_edges = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    to_centres = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    return to_centres @ matrix @ to_edges


class HomographyTransform(T.Transform):
    """Projective warp of (a box of) the image into a ``height`` x ``width`` canvas, over a
    background."""

    def __init__(
        self,
        matrix: np.ndarray,
        height: int,
        width: int,
        background: Optional[np.ndarray] = None,
        source_box: Optional[Sequence[float]] = None,
        placed: Sequence[Tuple[Sequence[float], int]] = (),
    ):
        """
        Args:
            matrix: (3, 3) homography from input to canvas coordinates (pixel edges).
            height, width: canvas size.
            background: uint8 or float32 (height, width, C) shown where the warped image is not;
                None = black.
            source_box: XYXY region of the input that is warped (the rest is left out, e.g. a
                scan's blank margin); boxes are clipped to it before they are warped. None =
                the whole input.
            placed: other objects the background shows, as (XYXY canvas box, category id):
                annotations for the mapper to add (see ``RandomCameraView``).
        """
        super().__init__()
        self._set_attributes(locals())

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(N, 2) x, y points through the homography."""
        coords = np.asarray(coords, np.float64)
        mapped = np.c_[coords, np.ones(len(coords))] @ np.asarray(self.matrix, np.float64).T
        return mapped[:, :2] / mapped[:, 2:3]

    def apply_box(self, box: np.ndarray) -> np.ndarray:
        """Boxes (N, 4) XYXY: clipped to ``source_box``, then their corners warped and bounded."""
        box = np.asarray(box, np.float64).reshape(-1, 4)
        if self.source_box is not None:
            s = np.asarray(self.source_box, np.float64)
            lo = np.minimum(np.maximum(box[:, :2], s[:2]), s[2:])
            hi = np.maximum(np.minimum(box[:, 2:], s[2:]), lo)
            box = np.concatenate([lo, hi], axis=1)
        return super().apply_box(box)

    def _warp(self, image: np.ndarray, interp: int) -> np.ndarray:
        return cv2.warpPerspective(
            image,
            _shift(self.matrix),
            (self.width, self.height),
            flags=interp,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )

    def _source_mask(self, h: int, w: int) -> np.ndarray:
        """float32 (h, w): 1 on the pixels of ``source_box`` (partial at fractional edges)."""
        x0, y0, x1, y1 = (0, 0, w, h) if self.source_box is None else self.source_box
        xs = np.clip(np.minimum(np.arange(1, w + 1), x1) - np.maximum(np.arange(w), x0), 0, 1)
        ys = np.clip(np.minimum(np.arange(1, h + 1), y1) - np.maximum(np.arange(h), y0), 0, 1)
        return np.outer(ys, xs).astype(np.float32)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        corners = self.apply_coords(np.array([[0, 0], [w, 0], [w, h], [0, h]]))
        shrink = np.sqrt(h * w / max(cv2.contourArea(corners.astype(np.float32)), 1.0))
        source = img
        if shrink > 1.5:  # anti-aliasing: warpPerspective samples, it does not average
            source = cv2.GaussianBlur(img, (0, 0), 0.45 * shrink)
        warped = self._warp(source, cv2.INTER_LINEAR)
        if self.background is None and self.source_box is None:
            return warped
        alpha = self._warp(self._source_mask(h, w), cv2.INTER_LINEAR)
        alpha = alpha.reshape(alpha.shape + (1,) * (warped.ndim - 2))
        background = 0.0 if self.background is None else self.background
        out = alpha * warped.astype(np.float32) + (1 - alpha) * background
        return _to_uint8(out).reshape(warped.shape)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self._warp(segmentation, cv2.INTER_NEAREST)


class PasteTransform(T.Transform):
    """Alpha-composite patches over the image (occluders); coordinates are unchanged."""

    def __init__(self, patches: Sequence[Tuple[int, int, np.ndarray, np.ndarray]]):
        """
        Args:
            patches: (x0, y0, colour, alpha) per patch, composited in order: float32 (h, w, 3)
                colour premultiplied by the alpha (h, w) in [0, 1], placed with their top-left
                pixel at (x0, y0), inside the image.
        """
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img.astype(np.float32)
        for x0, y0, colour, alpha in self.patches:
            h, w = alpha.shape
            window = out[y0 : y0 + h, x0 : x0 + w]
            window *= 1 - alpha[..., None]
            window += colour
        return _to_uint8(out)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class LightingTransform(T.Transform):
    """Uneven light: ``image * ramp * cast + glare``; coordinates are unchanged."""

    def __init__(
        self,
        gains: Tuple[float, float],
        angle: float,
        cast: Sequence[float],
        glare: Optional[Tuple[float, float, float, float]] = None,
    ):
        """
        Args:
            gains: light gain at the two ends of the ramp.
            angle: direction of the ramp in radians.
            cast: per-channel gain (a colour cast), in the image's channel order.
            glare: (x, y, radius, strength): a white Gaussian highlight centred at (x, y) pixels,
                ``strength`` x 255 at its centre; None = no glare.
        """
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        xs = np.arange(w, dtype=np.float32) + 0.5  # pixel centres; the maps are separable
        ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
        t = xs * np.float32(np.cos(self.angle)) + ys * np.float32(np.sin(self.angle))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        gain = self.gains[0] + (self.gains[1] - self.gains[0]) * t
        out = img.astype(np.float32) * gain[..., None] * np.asarray(self.cast, np.float32)
        if self.glare is not None:
            x, y, radius, strength = self.glare
            spot = np.exp(-((ys - y) ** 2) / (2 * radius**2)) * np.exp(
                -((xs - x) ** 2) / (2 * radius**2)
            )
            out += np.float32(255.0 * strength) * spot[..., None]
        return _to_uint8(out)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class BlurTransform(T.Transform):
    """Gaussian defocus (``sigma`` px) and / or linear motion blur (``length`` px at ``angle``)."""

    def __init__(self, sigma: float = 0.0, length: int = 0, angle: float = 0.0):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img
        if self.sigma > 0:
            out = cv2.GaussianBlur(out, (0, 0), self.sigma)
        if self.length > 1:
            k = int(self.length) | 1
            kernel = np.zeros((k, k), np.float32)
            c = k // 2
            dx, dy = np.cos(self.angle) * c, np.sin(self.angle) * c
            cv2.line(
                kernel,
                (int(round(c - dx)), int(round(c - dy))),
                (int(round(c + dx)), int(round(c + dy))),
                1.0,
                1,
            )
            out = cv2.filter2D(out, -1, kernel / kernel.sum())
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class SensorNoiseTransform(T.Transform):
    """Gaussian sensor noise (``sigma`` grey levels, drawn from ``seed``), then JPEG at
    ``quality`` (0 = none); coordinates are unchanged."""

    def __init__(self, sigma: float, quality: int, seed: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img
        if self.sigma > 0:
            noise = np.random.default_rng(self.seed).normal(0, self.sigma, img.shape)
            out = _to_uint8(img.astype(np.float32) + noise)
        if self.quality > 0:
            ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(self.quality)])
            if ok:
                out = cv2.imdecode(data, cv2.IMREAD_UNCHANGED).reshape(out.shape)
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation
