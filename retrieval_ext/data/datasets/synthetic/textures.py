"""What the synthetic objects look like in their own frame, before they are placed in a scene.

Two generators of different families: *posters* (the benchmark's instances and distractors: a base
colour or gradient with stripes, checkerboards, discs, polygons, text-like glyph rows, Gabor
gratings and rings on it) and *generic shapes* (the generic detection set's categories, with plain
fills), so that nothing in the generic set is an instance of the benchmark.

Each returns an object as ``(texture, outline)``: texture (H, W, 3) float32 RGB in [0, 255] with
long side ``CANONICAL_SIDE`` (negative values mark transparent pixels, e.g. the hole of a ring);
outline (N, 2) float32 polygon (x, y) of the object's silhouette in texture pixels.
"""

from typing import Tuple

import cv2
import numpy as np

__all__ = [
    "CANONICAL_SIDE",
    "GENERIC_CATEGORIES",
    "blend",
    "coords",
    "generic_shape",
    "poster_texture",
    "random_colour",
]

CANONICAL_SIDE = 160  # long side of an object's texture before warping

GENERIC_CATEGORIES = (
    "ellipse",
    "star",
    "ring",
    "cross",
    "triangle",
    "hexagon",
    "arrow",
    "textured_rectangle",
)

# Patterns painted on a poster; the order fixes which pattern a random draw picks.
_PATTERNS = ("stripes", "checker", "disc", "rect", "polygon", "glyphs", "gabor", "rings")
_FIELD_PATTERNS = ("stripes", "checker", "gabor", "rings")  # an alpha field blended in


def random_colour(rng: np.random.Generator, sat=(0.3, 1.0), val=(0.25, 1.0)) -> np.ndarray:
    """One RGB colour in [0, 255] (float32, shape (3,)) from uniformly drawn hue, sat, value."""
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]],
        dtype=np.float32,
    )
    # OpenCV's float HSV uses H in degrees [0, 360) and S, V in [0, 1].
    hsv[..., 0] *= 2.0
    hsv[..., 1:] /= 255.0
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * 255.0


def coords(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (xs, ys), each (h, w) float32."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs, ys


def blend(dst: np.ndarray, src_colour: np.ndarray, alpha: np.ndarray) -> None:
    """In place: dst (H, W, 3) = alpha * colour + (1 - alpha) * dst; alpha (H, W) in [0, 1]."""
    a = alpha[..., None]
    dst *= 1.0 - a
    dst += a * src_colour


# --------------------------------------------------------------------------------------------
# Posters
# --------------------------------------------------------------------------------------------


def poster_texture(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one planar "poster": the object family of the benchmark (instances and distractors).

    Args:
        rng: the design's own random stream.

    Returns:
        texture: (H, W, 3) float32 RGB in [0, 255], long side ``CANONICAL_SIDE``.
        outline: (N, 2) float32 polygon (x, y) of the object's silhouette in texture pixels.
    """
    L = CANONICAL_SIDE
    short = int(round(L * rng.uniform(0.55, 1.0)))
    h, w = (L, short) if rng.random() < 0.5 else (short, L)
    palette = [random_colour(rng) for _ in range(5)]
    xs, ys = coords(h, w)

    tex = np.empty((h, w, 3), np.float32)
    theta = rng.uniform(0, np.pi)
    t = xs * np.cos(theta) + ys * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    tex[:] = palette[0]
    if rng.random() < 0.6:
        blend(tex, palette[1], t * rng.uniform(0.4, 1.0))
    for _ in range(int(rng.integers(4, 9))):
        _paint_pattern(rng, tex, xs, ys, palette)
    if rng.random() < 0.5:
        th = int(rng.integers(2, 7))
        cv2.rectangle(tex, (0, 0), (w - 1, h - 1), tuple(float(v) for v in palette[4]), th)
    tex = np.clip(tex, 0, 255)
    outline = _poster_outline(rng, w, h)
    return tex.astype(np.float32), outline.astype(np.float32)


def _paint_pattern(
    rng: np.random.Generator, tex: np.ndarray, xs: np.ndarray, ys: np.ndarray, palette: list
) -> None:
    """Paints one random pattern into a random sub-rectangle of ``tex`` (H, W, 3), in place."""
    h, w = tex.shape[:2]
    kind = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    c1, c2 = (palette[int(i)] for i in rng.choice(5, size=2, replace=False))
    rw, rh = int(w * rng.uniform(0.25, 0.75)), int(h * rng.uniform(0.25, 0.75))
    x0, y0 = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
    sub = tex[y0 : y0 + rh, x0 : x0 + rw]
    if kind in _FIELD_PATTERNS:
        blend(sub, c1, _pattern_alpha(rng, kind, xs[:rh, :rw], ys[:rh, :rw]))
        return
    canvas = np.ascontiguousarray(sub)
    col = tuple(float(v) for v in c1)
    if kind == "disc":
        cv2.ellipse(
            canvas, (rw // 2, rh // 2), (max(rw // 2, 1), max(rh // 2, 1)),
            0, 0, 360, col, -1, cv2.LINE_AA,
        )  # fmt: skip
    elif kind == "rect":
        cv2.rectangle(canvas, (0, 0), (rw - 1, rh - 1), col, -1, cv2.LINE_AA)
        cv2.rectangle(canvas, (2, 2), (rw - 3, rh - 3), tuple(float(v) for v in c2), 2, cv2.LINE_AA)
    elif kind == "polygon":
        n = int(rng.integers(3, 7))
        pts = np.stack([rng.uniform(0, rw, n), rng.uniform(0, rh, n)], 1)
        hull = cv2.convexHull(pts.astype(np.float32)).astype(np.int32)
        cv2.fillPoly(canvas, [hull], col, cv2.LINE_AA)
    elif kind == "glyphs":
        blend(canvas, c1, _glyph_ink(rng, rw, rh))
    sub[:] = canvas


def _pattern_alpha(
    rng: np.random.Generator, kind: str, sx: np.ndarray, sy: np.ndarray
) -> np.ndarray:
    """Alpha (rh, rw) float32 in [0, 1] of a periodic pattern on the sub-rectangle's grid."""
    rh, rw = sx.shape
    if kind == "stripes":
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(5, 20)
        phase = (sx * np.cos(ang) + sy * np.sin(ang)) / period
        return (np.sin(2 * np.pi * phase) > 0).astype(np.float32)
    if kind == "checker":
        cell = int(rng.integers(4, 14))
        return (((sx // cell) + (sy // cell)) % 2).astype(np.float32)
    if kind == "gabor":
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(4, 14)
        phase = (sx * np.cos(ang) + sy * np.sin(ang)) / period
        env = np.exp(-(((sx - rw / 2) / (0.35 * rw)) ** 2 + ((sy - rh / 2) / (0.35 * rh)) ** 2))
        return 0.5 * (1 + np.sin(2 * np.pi * phase)) * env
    if kind == "rings":
        period = rng.uniform(5, 15)
        r = np.hypot(sx - rw / 2, sy - rh / 2)
        inside = r < min(rw, rh) / 2
        return ((np.sin(2 * np.pi * r / period) > 0) & inside).astype(np.float32)
    raise ValueError(f"not a field pattern: {kind!r}")


def _glyph_ink(rng: np.random.Generator, rw: int, rh: int) -> np.ndarray:
    """Text-like rows of random capital letters in Hershey fonts: ink (rh, rw) float32 in [0, 1]."""
    scale = rng.uniform(0.35, 0.8)
    font = int(rng.choice([0, 2, 3, 4]))
    line_h = max(int(22 * scale) + 4, 6)
    ink = np.zeros((rh, rw), np.uint8)  # putText draws on 8-bit images only
    for row in range(max(rh // line_h, 1)):
        text = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 12))
        cv2.putText(
            ink, text, (1, (row + 1) * line_h - 3), font, scale, 255,
            max(1, int(round(2 * scale))), cv2.LINE_AA,
        )  # fmt: skip
    return ink.astype(np.float32) / 255.0


def _poster_outline(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Silhouette (N, 2) of a w x h poster: a rectangle (3 in 5), rounded rectangle or ellipse."""
    shape = rng.choice(["rect", "rect", "rect", "rounded", "ellipse"])
    if shape == "rect":
        return np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    if shape == "ellipse":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([w / 2 * (1 + np.cos(a)), h / 2 * (1 + np.sin(a))], 1)
    r = min(w, h) * 0.2
    a = np.linspace(0, np.pi / 2, 8)
    corners = [(w - r, h - r, 0.0), (r, h - r, 0.5), (r, r, 1.0), (w - r, r, 1.5)]
    return np.concatenate(
        [np.stack([cx + r * np.cos(a + k * np.pi), cy + r * np.sin(a + k * np.pi)], 1)
         for cx, cy, k in corners]
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Generic shapes
# --------------------------------------------------------------------------------------------


def generic_shape(rng: np.random.Generator, category: str) -> Tuple[np.ndarray, np.ndarray]:
    """One object of a generic shape category (the generic detection set's generator).

    Deliberately not the poster generator: fills are plain, two-colour gradients, stripes or
    smooth noise, so nothing in the generic set is an instance of the benchmark.

    Args:
        rng: random stream.
        category: one of ``GENERIC_CATEGORIES``.

    Returns:
        texture (H, W, 3) float32 in [0, 255] and outline polygon (N, 2) float32, as
        :func:`poster_texture`.
    """
    outline = _generic_outline(rng, category).astype(np.float32)
    w = int(np.ceil(outline[:, 0].max())) + 1
    h = int(np.ceil(outline[:, 1].max())) + 1
    xs, ys = coords(h, w)
    c1, c2 = random_colour(rng), random_colour(rng)
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = c1
    fill = "noise" if category == "textured_rectangle" else rng.choice(["solid", "grad", "stripes"])
    if fill == "grad":
        blend(tex, c2, xs / w)
    elif fill == "stripes":
        ang = rng.uniform(0, np.pi)
        phase = (xs * np.cos(ang) + ys * np.sin(ang)) / rng.uniform(8, 24)
        blend(tex, c2, (np.sin(2 * np.pi * phase) > 0).astype(np.float32))
    elif fill == "noise":
        small = rng.random((int(rng.integers(3, 10)), int(rng.integers(3, 10)))).astype(np.float32)
        blend(tex, c2, cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1))
    if category == "ring":
        c = CANONICAL_SIDE / 2.0
        hole = np.hypot(xs - c, ys - c) < c * rng.uniform(0.4, 0.7)
        tex[hole] = -1.0  # marker: transparent, removed from the mask by warp.render_mask
    return tex, outline


def _generic_outline(rng: np.random.Generator, category: str) -> np.ndarray:
    """Silhouette (N, 2) of a generic shape in a ``CANONICAL_SIDE`` square (x, y) frame."""
    L = CANONICAL_SIDE
    c = L / 2.0
    if category == "ellipse":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ry = c * rng.uniform(0.4, 1.0)
        return np.stack([c + c * np.cos(a), c + ry * np.sin(a)], 1)
    if category == "star":
        n = int(rng.integers(5, 8))
        a = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) - np.pi / 2
        r = np.where(np.arange(2 * n) % 2 == 0, c, c * rng.uniform(0.35, 0.55))
        return np.stack([c + r * np.cos(a), c + r * np.sin(a)], 1)
    if category == "ring":
        # A ring's silhouette is its outer circle; the hole is painted in the texture and so
        # removed from the mask, because a single polygon cannot have a hole.
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([c + c * np.cos(a), c + c * np.sin(a)], 1)
    if category == "cross":
        t = c * rng.uniform(0.25, 0.45)
        return np.array(
            [[c - t, 0], [c + t, 0], [c + t, c - t], [L, c - t], [L, c + t], [c + t, c + t],
             [c + t, L], [c - t, L], [c - t, c + t], [0, c + t], [0, c - t], [c - t, c - t]]
        )  # fmt: skip
    if category == "triangle":
        return np.array([[c + rng.uniform(-0.5, 0.5) * c, 0], [L, L], [0, L]])
    if category == "hexagon":
        a = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        return np.stack([c + c * np.cos(a), c + c * np.sin(a)], 1)
    if category == "arrow":
        t = c * rng.uniform(0.2, 0.35)
        head = L * rng.uniform(0.35, 0.5)
        return np.array(
            [[0, c - t], [L - head, c - t], [L - head, 0], [L, c], [L - head, L],
             [L - head, c + t], [0, c + t]]
        )  # fmt: skip
    if category == "textured_rectangle":
        hh = L * rng.uniform(0.45, 1.0)
        return np.array([[0, 0], [L, 0], [L, hh], [0, hh]])
    raise ValueError(f"unknown generic category {category!r}; known: {GENERIC_CATEGORIES}")
