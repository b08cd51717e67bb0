"""The canvas and the camera of a synthetic image: image size, background scene, final
degradations and the JPEG file.
"""

import io
from typing import Tuple

import cv2
import numpy as np
from PIL import Image

from .textures import blend, coords, random_colour

__all__ = ["JPEG_QUALITY", "background", "finish", "image_size", "save_jpeg"]

JPEG_QUALITY = 92  # of every written file, fixed so that the same seed gives the same bytes


def image_size(rng: np.random.Generator, short_side: int) -> Tuple[int, int]:
    """(h, w): 4:3 landscape (70%) or 3:4 portrait, shorter side ``short_side``."""
    long_side = int(round(short_side * 4 / 3))
    return (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)


def background(
    rng: np.random.Generator, h: int, w: int, clutter: float, blobs: bool = True
) -> np.ndarray:
    """A procedural background scene: gradient + smooth noise + random clutter shapes.

    Args:
        rng: random stream.
        h, w: image size in pixels.
        clutter: multiplier of the number of clutter shapes.
        blobs: whether clutter may hold filled ellipses and quadrilaterals (off for the generic
            detection set, where they would be unannotated look-alikes of its categories).

    Returns:
        (h, w, 3) float32 RGB in [0, 255].
    """
    img = _scene(rng, h, w)
    for _ in range(int(rng.integers(5, 15) * clutter)):
        _clutter_shape(rng, img, blobs)
    img += rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    return img


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """The scene without clutter: outdoor (horizon + blocks), indoor or texture, + smooth noise."""
    xs, ys = coords(h, w)
    img = np.empty((h, w, 3), np.float32)
    scene = rng.choice(["outdoor", "indoor", "texture"])
    top, bottom = random_colour(rng, (0.0, 0.35)), random_colour(rng, (0.0, 0.35))
    img[:] = top
    if scene == "outdoor":
        horizon = rng.uniform(0.3, 0.8) * h
        blend(img, bottom, 1.0 / (1.0 + np.exp(-(ys - horizon) / (0.02 * h + 1))))
        for _ in range(int(rng.integers(2, 8))):  # building-like blocks on the horizon
            bw, bh = rng.uniform(0.05, 0.35) * w, rng.uniform(0.1, 0.6) * h
            x0 = rng.uniform(-0.1, 1.0) * w
            col = tuple(float(v) for v in random_colour(rng, (0.0, 0.4), (0.2, 0.9)))
            cv2.rectangle(img, (int(x0), int(horizon - bh)), (int(x0 + bw), int(horizon)), col, -1)
    else:
        ang = rng.uniform(0, np.pi)
        t = xs * np.cos(ang) + ys * np.sin(ang)
        blend(img, bottom, (t - t.min()) / max(float(t.max() - t.min()), 1e-6))
    amp = rng.uniform(5, 25 if scene == "texture" else 15)
    gh, gw = int(rng.integers(3, 12)), int(rng.integers(3, 12))
    noise = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
    img += amp * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    return img


def _clutter_shape(rng: np.random.Generator, img: np.ndarray, blobs: bool) -> None:
    """Draws one clutter shape (rectangle, ellipse, line or blob) onto img, in place."""
    h, w = img.shape[:2]
    col = tuple(float(v) for v in random_colour(rng, (0.0, 0.4), (0.1, 1.0)))
    cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0, h))
    size = int(rng.uniform(0.02, 0.15) * min(h, w)) + 1
    kind = int(rng.integers(4 if blobs else 2)) * (1 if blobs else 2)
    if kind == 0:
        cv2.rectangle(img, (cx, cy), (cx + size, cy + int(size * rng.uniform(0.3, 2))), col, -1)
    elif kind == 1:
        axes = (size, int(size * rng.uniform(0.3, 1)) + 1)
        cv2.ellipse(img, (cx, cy), axes, rng.uniform(0, 180), 0, 360, col, -1, cv2.LINE_AA)
    elif kind == 2:
        end = (cx + int(rng.normal(0, 3 * size)), cy + int(rng.normal(0, 3 * size)))
        cv2.line(img, (cx, cy), end, col, int(rng.integers(1, 5)), cv2.LINE_AA)
    else:
        pts = np.stack([cx + rng.normal(0, size, 4), cy + rng.normal(0, size, 4)], 1)
        cv2.fillPoly(img, [pts.astype(np.int32)], col, cv2.LINE_AA)


def finish(img: np.ndarray, rng: np.random.Generator, difficulty: float) -> Image.Image:
    """Global degradations of a composed image: light change, blur, sensor and JPEG noise.

    Args:
        img: (H, W, 3) float32 RGB.
        rng: random stream.
        difficulty: scales every degradation.

    Returns:
        The final PIL RGB image (pre-compressed in memory at a random quality; the caller writes
        it at the fixed ``JPEG_QUALITY`` with :func:`save_jpeg`).
    """
    img = img * np.exp(rng.normal(0, 0.12 * difficulty)) + rng.normal(0, 6 * difficulty)
    if rng.random() < 0.6:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.3 + 1.0 * difficulty))
    img = img + rng.normal(0, 2 + 3 * difficulty * rng.random(), img.shape).astype(np.float32)
    pil = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(rng.integers(30, 80)))
        buf.seek(0)
        pil = Image.open(buf).convert("RGB")
    return pil


def save_jpeg(pil: Image.Image, path: str) -> None:
    """Writes ``pil`` at ``JPEG_QUALITY`` without chroma subsampling (deterministic bytes)."""
    pil.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=0)
