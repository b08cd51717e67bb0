"""A procedural instance-search benchmark and a generic detection set, both written to disk.

The benchmark stands in for Oxford 5k on a CPU budget. K planar object *instances* ("posters":
a base colour or gradient with stripes, checkerboards, discs, polygons, text-like glyph rows,
Gabor gratings and rings on it) are planted into procedural scenes with a random position, scale,
in-plane rotation, perspective warp, illumination change, partial occlusion, blur and JPEG noise.
Every scene is also full of *distractor* posters from the same generator family that are not
among the K instances, so an RPN sees objects everywhere and a global descriptor cannot rely on
"there is an object". Queries are separate views of each instance (not in the database), each
with the instance's box, like Oxford's 5 query images per building.

On-disk layout (the project's custom format; boxes are XYXY absolute pixels, as floats, in the
frame of the written image; a box is the bounding box of the instance's warped outline, clipped
to the image, with pixel-edge convention: a mask covering columns 3..7 gives x1 = 3, x2 = 8)::

    ROOT/
      images/db_00000.jpg ...        database images
      queries/obj03_1.jpg ...        query images, 1-based view number, NOT in the database
      queries.json                   [{"image": "queries/obj03_1.jpg", "box": [x1, y1, x2, y2],
                                       "object": "obj03"}, ...]
      relevance.json                 {"obj03": {"positives": ["images/db_00012.jpg", ...],
                                        "junk": [...],
                                        "boxes": {"images/db_00012.jpg": [[x1, y1, x2, y2]]}}}
      README.txt, meta.json          parameters, seed and counts

``boxes`` holds the boxes of positives and of junk images. An image is *junk* for an instance
(ignored by the Oxford protocol) when less than 40% of the instance is visible (occluded or cut
by the border) or when it is very small (square root of its box area under 8% of the shorter
image side); otherwise it is a positive.

Sizes: the long side of a planted instance is 25% to 90% of the shorter image side in the
database (log-uniform; 4% to 7% for the deliberately tiny junk views) and 55% to 85% in the
queries; distractor posters are 10% to 35%. Instances are this large because with smaller ones
global features do no better than chance (see below), unlike Oxford's building-filled photos.

Measured difficulty (defaults: 11 instances x 5 queries, 300 database images, shorter side
300 px, seed 0: 218 positives, 40 junk; ``tools/synthetic_baseline.py``; original Oxford
protocol, junk ignored; matches ``retrieval_ext.evaluation.metrics.oxford_paris_map``):

====================================================  ===========  ====================
global descriptor (cosine similarity)                 whole query  query cropped to box
====================================================  ===========  ====================
random ranking                                        0.075        0.075
RGB colour histogram (8 bins per channel), sqrt       0.091        0.160
EfficientNet-Lite0 (ImageNet), conv_head sum (SPoC)   0.305        0.467
EfficientNet-Lite0 (ImageNet), conv_head max (MAC)    0.318        0.476
====================================================  ===========  ====================

So off-the-shelf whole-image features are far from 1.0, and the query region alone (what
class-agnostic spatial reranking pools) already gains about 0.16. A first version (objects 14%
to 50% of the shorter side, 2 to 5 distractors per image from a pool of 40 designs, more
colourful backgrounds) gave 0.11 / 0.13 (whole) and 0.19 / 0.20 (crop) for SPoC / MAC.

The generic detection set (:func:`generate_generic_detection_set`) stands in for COCO when
pretraining the RPN and box head: shape categories (ellipse, star, ring, ...) drawn by a
different generator from a different random stream, so none of the benchmark's instances (or
its poster family) appears in it. It is written as COCO json (``annotations.json``,
``train.json``, ``val.json``) loadable with ``detectron2.data.datasets.register_coco_instances``.

Everything is deterministic in ``seed``: random numbers come from ``numpy.random.Generator``
streams keyed by (seed, purpose, index), drawing uses OpenCV, files are written by Pillow at a
fixed JPEG quality, so the same seed gives byte-identical files.
"""

import io
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "GENERIC_CATEGORIES",
    "generate_synthetic_benchmark",
    "generate_generic_detection_set",
    "object_names",
]

# Random-stream purposes: each part of the data has its own stream, so changing one count
# (e.g. num_db) does not change the instances, and the generic set never shares a stream with
# the benchmark.
_STREAM_PLAN = 0
_STREAM_INSTANCE = 1
_STREAM_DISTRACTOR = 2
_STREAM_DB = 3
_STREAM_QUERY = 4
_STREAM_GENERIC = 100

_JPEG_QUALITY = 92
_CANONICAL_SIDE = 160  # long side of an object's texture before warping
_VISIBLE_MIN = 0.4  # below this visible fraction an instance is junk (Oxford: "mostly occluded")
_TINY_FRAC = 0.08  # sqrt(box area) under this fraction of the shorter side is junk ("very tiny")

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


def object_names(num_instances: int) -> List[str]:
    """Names of the benchmark's instances; their sorted order is the class-id order.

    Args:
        num_instances: K.

    Returns:
        ["obj00", "obj01", ...] (zero-padded so that lexicographic order is numeric order).
    """
    width = max(2, len(str(num_instances - 1)))
    return [f"obj{k:0{width}d}" for k in range(num_instances)]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# --------------------------------------------------------------------------------------------
# Colours and textures
# --------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator, sat=(0.3, 1.0), val=(0.25, 1.0)) -> np.ndarray:
    """One RGB colour in [0, 255] (float32, shape (3,)) from uniformly drawn hue, sat, value."""
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]],
        dtype=np.float32,
    )
    # OpenCV's float HSV uses H in degrees [0, 360) and S, V in [0, 1].
    hsv[..., 0] *= 2.0
    hsv[..., 1:] /= 255.0
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * 255.0


def _coords(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs, ys


def _blend(dst: np.ndarray, src_colour: np.ndarray, alpha: np.ndarray) -> None:
    """In place: dst (H, W, 3) = alpha * colour + (1 - alpha) * dst; alpha (H, W) in [0, 1]."""
    a = alpha[..., None]
    dst *= 1.0 - a
    dst += a * src_colour


def _poster_texture(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one planar "poster": the object family of the benchmark (instances and distractors).

    Args:
        rng: the design's own random stream.

    Returns:
        texture: (H, W, 3) float32 RGB in [0, 255], long side ``_CANONICAL_SIDE``.
        outline: (N, 2) float32 polygon (x, y) of the object's silhouette in texture pixels.
    """
    L = _CANONICAL_SIDE
    short = int(round(L * rng.uniform(0.55, 1.0)))
    h, w = (L, short) if rng.random() < 0.5 else (short, L)
    palette = [_random_colour(rng) for _ in range(5)]
    xs, ys = _coords(h, w)

    tex = np.empty((h, w, 3), np.float32)
    theta = rng.uniform(0, np.pi)
    t = xs * np.cos(theta) + ys * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    tex[:] = palette[0]
    if rng.random() < 0.6:
        _blend(tex, palette[1], t * rng.uniform(0.4, 1.0))

    kinds = ("stripes", "checker", "disc", "rect", "polygon", "glyphs", "gabor", "rings")
    for _ in range(int(rng.integers(4, 9))):
        kind = kinds[int(rng.integers(len(kinds)))]
        c1, c2 = (palette[int(i)] for i in rng.choice(5, size=2, replace=False))
        rw, rh = int(w * rng.uniform(0.25, 0.75)), int(h * rng.uniform(0.25, 0.75))
        x0, y0 = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
        sub = tex[y0 : y0 + rh, x0 : x0 + rw]
        sx, sy = xs[:rh, :rw], ys[:rh, :rw]
        if kind == "stripes":
            ang = rng.uniform(0, np.pi)
            period = rng.uniform(5, 20)
            phase = (sx * np.cos(ang) + sy * np.sin(ang)) / period
            _blend(sub, c1, (np.sin(2 * np.pi * phase) > 0).astype(np.float32))
        elif kind == "checker":
            cell = int(rng.integers(4, 14))
            _blend(sub, c1, (((sx // cell) + (sy // cell)) % 2).astype(np.float32))
        elif kind == "gabor":
            ang = rng.uniform(0, np.pi)
            period = rng.uniform(4, 14)
            phase = (sx * np.cos(ang) + sy * np.sin(ang)) / period
            env = np.exp(-(((sx - rw / 2) / (0.35 * rw)) ** 2 + ((sy - rh / 2) / (0.35 * rh)) ** 2))
            _blend(sub, c1, 0.5 * (1 + np.sin(2 * np.pi * phase)) * env)
        elif kind == "rings":
            period = rng.uniform(5, 15)
            r = np.hypot(sx - rw / 2, sy - rh / 2)
            inside = r < min(rw, rh) / 2
            _blend(sub, c1, ((np.sin(2 * np.pi * r / period) > 0) & inside).astype(np.float32))
        else:
            canvas = np.ascontiguousarray(sub)
            col = tuple(float(v) for v in c1)
            if kind == "disc":
                cv2.ellipse(
                    canvas, (rw // 2, rh // 2), (max(rw // 2, 1), max(rh // 2, 1)),
                    0, 0, 360, col, -1, cv2.LINE_AA,
                )  # fmt: skip
            elif kind == "rect":
                cv2.rectangle(canvas, (0, 0), (rw - 1, rh - 1), col, -1, cv2.LINE_AA)
                cv2.rectangle(
                    canvas, (2, 2), (rw - 3, rh - 3), tuple(float(v) for v in c2), 2, cv2.LINE_AA
                )
            elif kind == "polygon":
                n = int(rng.integers(3, 7))
                pts = np.stack([rng.uniform(0, rw, n), rng.uniform(0, rh, n)], 1)
                hull = cv2.convexHull(pts.astype(np.float32)).astype(np.int32)
                cv2.fillPoly(canvas, [hull], col, cv2.LINE_AA)
            elif kind == "glyphs":
                # Text-like rows: random capital letters in Hershey fonts.
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
                _blend(canvas, c1, ink.astype(np.float32) / 255.0)
            sub[:] = canvas
    if rng.random() < 0.5:
        th = int(rng.integers(2, 7))
        cv2.rectangle(tex, (0, 0), (w - 1, h - 1), tuple(float(v) for v in palette[4]), th)
    tex = np.clip(tex, 0, 255)

    shape = rng.choice(["rect", "rect", "rect", "rounded", "ellipse"])
    if shape == "rect":
        outline = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    elif shape == "ellipse":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        outline = np.stack([w / 2 * (1 + np.cos(a)), h / 2 * (1 + np.sin(a))], 1)
    else:
        r = min(w, h) * 0.2
        a = np.linspace(0, np.pi / 2, 8)
        corners = [(w - r, h - r, 0.0), (r, h - r, 0.5), (r, r, 1.0), (w - r, r, 1.5)]
        outline = np.concatenate(
            [np.stack([cx + r * np.cos(a + k * np.pi), cy + r * np.sin(a + k * np.pi)], 1)
             for cx, cy, k in corners]
        )  # fmt: skip
    return tex.astype(np.float32), outline.astype(np.float32)


def _generic_shape(rng: np.random.Generator, category: str) -> Tuple[np.ndarray, np.ndarray]:
    """One object of a generic shape category (the generic detection set's generator).

    Deliberately not the poster generator: fills are plain, two-colour gradients, stripes or
    smooth noise, so nothing in the generic set is an instance of the benchmark.

    Args:
        rng: random stream.
        category: one of ``GENERIC_CATEGORIES``.

    Returns:
        texture (H, W, 3) float32 in [0, 255] and outline polygon (N, 2) float32, as
        :func:`_poster_texture`.
    """
    L = _CANONICAL_SIDE
    c = L / 2.0
    if category == "ellipse":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ry = c * rng.uniform(0.4, 1.0)
        outline = np.stack([c + c * np.cos(a), c + ry * np.sin(a)], 1)
    elif category == "star":
        n = int(rng.integers(5, 8))
        a = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) - np.pi / 2
        r = np.where(np.arange(2 * n) % 2 == 0, c, c * rng.uniform(0.35, 0.55))
        outline = np.stack([c + r * np.cos(a), c + r * np.sin(a)], 1)
    elif category == "ring":
        # A ring's silhouette is its outer circle; the hole is painted in the texture and the
        # mask below, because a single polygon cannot have a hole.
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        outline = np.stack([c + c * np.cos(a), c + c * np.sin(a)], 1)
    elif category == "cross":
        t = c * rng.uniform(0.25, 0.45)
        outline = np.array(
            [[c - t, 0], [c + t, 0], [c + t, c - t], [L, c - t], [L, c + t], [c + t, c + t],
             [c + t, L], [c - t, L], [c - t, c + t], [0, c + t], [0, c - t], [c - t, c - t]]
        )  # fmt: skip
    elif category == "triangle":
        outline = np.array([[c + rng.uniform(-0.5, 0.5) * c, 0], [L, L], [0, L]])
    elif category == "hexagon":
        a = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        outline = np.stack([c + c * np.cos(a), c + c * np.sin(a)], 1)
    elif category == "arrow":
        t = c * rng.uniform(0.2, 0.35)
        head = L * rng.uniform(0.35, 0.5)
        outline = np.array(
            [[0, c - t], [L - head, c - t], [L - head, 0], [L, c], [L - head, L],
             [L - head, c + t], [0, c + t]]
        )  # fmt: skip
    elif category == "textured_rectangle":
        hh = L * rng.uniform(0.45, 1.0)
        outline = np.array([[0, 0], [L, 0], [L, hh], [0, hh]])
    else:
        raise ValueError(f"unknown generic category {category!r}")
    outline = outline.astype(np.float32)
    w = int(np.ceil(outline[:, 0].max())) + 1
    h = int(np.ceil(outline[:, 1].max())) + 1
    xs, ys = _coords(h, w)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = c1
    fill = "noise" if category == "textured_rectangle" else rng.choice(["solid", "grad", "stripes"])
    if fill == "grad":
        _blend(tex, c2, xs / w)
    elif fill == "stripes":
        ang = rng.uniform(0, np.pi)
        phase = (xs * np.cos(ang) + ys * np.sin(ang)) / rng.uniform(8, 24)
        _blend(tex, c2, (np.sin(2 * np.pi * phase) > 0).astype(np.float32))
    elif fill == "noise":
        small = rng.random((int(rng.integers(3, 10)), int(rng.integers(3, 10)))).astype(np.float32)
        _blend(tex, c2, cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1))
    if category == "ring":
        hole = np.hypot(xs - c, ys - c) < c * rng.uniform(0.4, 0.7)
        tex[hole] = -1.0  # marker: transparent, removed from the mask by _render_mask
    return tex, outline


# --------------------------------------------------------------------------------------------
# Scenes and warping
# --------------------------------------------------------------------------------------------


def _background(
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
    xs, ys = _coords(h, w)
    img = np.empty((h, w, 3), np.float32)
    scene = rng.choice(["outdoor", "indoor", "texture"])
    top, bottom = _random_colour(rng, (0.0, 0.35)), _random_colour(rng, (0.0, 0.35))
    img[:] = top
    if scene == "outdoor":
        horizon = rng.uniform(0.3, 0.8) * h
        _blend(img, bottom, 1.0 / (1.0 + np.exp(-(ys - horizon) / (0.02 * h + 1))))
        for _ in range(int(rng.integers(2, 8))):  # building-like blocks on the horizon
            bw, bh = rng.uniform(0.05, 0.35) * w, rng.uniform(0.1, 0.6) * h
            x0 = rng.uniform(-0.1, 1.0) * w
            col = tuple(float(v) for v in _random_colour(rng, (0.0, 0.4), (0.2, 0.9)))
            cv2.rectangle(img, (int(x0), int(horizon - bh)), (int(x0 + bw), int(horizon)), col, -1)
    else:
        ang = rng.uniform(0, np.pi)
        t = xs * np.cos(ang) + ys * np.sin(ang)
        _blend(img, bottom, (t - t.min()) / max(float(t.max() - t.min()), 1e-6))
    amp = rng.uniform(5, 25 if scene == "texture" else 15)
    gh, gw = int(rng.integers(3, 12)), int(rng.integers(3, 12))
    noise = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
    img += amp * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    n_shapes = int(rng.integers(5, 15) * clutter)
    for _ in range(n_shapes):
        col = tuple(float(v) for v in _random_colour(rng, (0.0, 0.4), (0.1, 1.0)))
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
    img += rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    return img


def _photometric(tex: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
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


def _render_mask(tex: np.ndarray, outline: np.ndarray) -> np.ndarray:
    """Canonical object mask (H, W) float32 in [0, 1] from the outline (anti-aliased edges)."""
    h, w = tex.shape[:2]
    # Draw at 4x sub-pixel precision so the warped silhouette follows the float outline.
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(outline * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    mask = mask.astype(np.float32) / 255.0
    mask[tex[..., 0] < 0] = 0.0
    return mask


def _sample_quad(
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


class _Placed:
    """An object warped into a patch of the image: alpha, colour and where the patch lies.

    Attributes:
        x0, y0: top-left of the patch in image pixels (may be negative: the patch is not clipped).
        alpha: (ph, pw) float32 in [0, 1], the warped silhouette.
        colour: (ph, pw, 3) float32 RGB, the warped texture.
        area: number of silhouette pixels (alpha > 0.5) before clipping to the image.
    """

    def __init__(self, tex: np.ndarray, mask: np.ndarray, dst: np.ndarray):
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


def _mask_box(mask: np.ndarray) -> Optional[List[float]]:
    """XYXY pixel-edge bounding box of a boolean (H, W) mask, or None if empty."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    if len(xs) == 0:
        return None
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def _overlaps(box, boxes, margin: float) -> bool:
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


def _finish(img: np.ndarray, rng: np.random.Generator, difficulty: float) -> Image.Image:
    """Global degradations of a composed image: light change, blur, sensor and JPEG noise.

    Args:
        img: (H, W, 3) float32 RGB.
        rng: random stream.
        difficulty: scales every degradation.

    Returns:
        The final PIL RGB image (pre-compressed in memory at a random quality; the caller writes
        it at the fixed ``_JPEG_QUALITY``).
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


def _save_jpeg(pil: Image.Image, path: str) -> None:
    pil.save(path, format="JPEG", quality=_JPEG_QUALITY, optimize=False, subsampling=0)


def _image_size(rng: np.random.Generator, short_side: int) -> Tuple[int, int]:
    """(h, w): 4:3 landscape (70%) or 3:4 portrait, shorter side ``short_side``."""
    long_side = int(round(short_side * 4 / 3))
    return (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)


# --------------------------------------------------------------------------------------------
# Scene composition
# --------------------------------------------------------------------------------------------


def _compose(
    rng: np.random.Generator,
    h: int,
    w: int,
    instances: Sequence[Tuple[np.ndarray, np.ndarray, dict]],
    distractors: Sequence[Tuple[np.ndarray, np.ndarray]],
    num_distractors: int,
    difficulty: float,
    occluder_pool: Sequence[Tuple[np.ndarray, np.ndarray]],
) -> Tuple[Image.Image, List[dict]]:
    """Render one image with the given instances and random distractors.

    Args:
        rng: the image's random stream.
        h, w: image size.
        instances: (texture, outline, spec) per instance to plant; spec holds "size" (fraction
            of the shorter side for the object's long side, drawn by the caller), "rot" (deg),
            "persp", "occlusion" (target occluded fraction, 0 for none).
        distractors: pool of distractor designs (texture, outline).
        num_distractors: how many distractors to try to place.
        difficulty: scales photometric changes and degradations.
        occluder_pool: designs that may be used as occluders (posters in front).

    Returns:
        The image and, per instance in order, {"box": XYXY or None, "visible": fraction of the
        silhouette visible in the image (not covered by an occluder, not cut by the border),
        "mask": (h, w) bool silhouette clipped to the image (before occlusion),
        "hidden": (h, w) bool pixels drawn over it: occluders and instances pasted later}.
    """
    img = _background(rng, h, w, clutter=0.5 + 0.5 * difficulty)
    short = min(h, w)
    placed: List[_Placed] = []
    taken: List[Tuple[int, int, int, int]] = []
    for tex, outline, spec in instances:
        size_px = spec["size"] * short
        for _ in range(30):
            # Mostly inside the frame: the centre keeps ~40% of the size from the border.
            m = 0.4 * size_px
            centre = (rng.uniform(m, max(w - m, m + 1)), rng.uniform(m, max(h - m, m + 1)))
            dst = _sample_quad(rng, outline, size_px, centre, spec["rot"], spec["persp"])
            box = (dst[:, 0].min(), dst[:, 1].min(), dst[:, 0].max(), dst[:, 1].max())
            if not _overlaps(box, taken, 4):
                break
        placed.append(_Placed(_photometric(tex, rng, difficulty), _render_mask(tex, outline), dst))
        taken.append(box)

    for _ in range(num_distractors):
        tex, outline = distractors[int(rng.integers(len(distractors)))]
        size_px = np.exp(rng.uniform(np.log(0.1), np.log(0.35))) * short
        for _ in range(10):
            centre = (rng.uniform(0, w), rng.uniform(0, h))
            dst = _sample_quad(rng, outline, size_px, centre, 25 * difficulty, 0.3 * difficulty)
            x0, y0, x1, y1 = dst[:, 0].min(), dst[:, 1].min(), dst[:, 0].max(), dst[:, 1].max()
            if not _overlaps((x0, y0, x1, y1), taken, 4):
                tex = _photometric(tex, rng, difficulty)
                _Placed(tex, _render_mask(tex, outline), dst).paste(img)
                break
    for p in placed:
        p.paste(img)

    occluder = np.zeros((h, w), bool)
    for p, (_, _, spec) in zip(placed, instances):
        if spec["occlusion"] > 0:
            occluder |= _occlude(img, rng, p, spec["occlusion"], occluder_pool)

    # Large instances may not fit side by side; a later one then hides part of an earlier one.
    masks = [p.full_mask(h, w) for p in placed]
    results = []
    for i, (p, mask) in enumerate(zip(placed, masks)):
        hidden = occluder.copy()
        for later in masks[i + 1 :]:
            hidden |= later
        visible = float((mask & ~hidden).sum()) / max(p.area, 1)
        results.append({"box": _mask_box(mask), "visible": visible, "mask": mask, "hidden": hidden})
    return _finish(img, rng, difficulty), results


def _occlude(
    img: np.ndarray,
    rng: np.random.Generator,
    p: _Placed,
    fraction: float,
    pool: Sequence[Tuple[np.ndarray, np.ndarray]],
) -> np.ndarray:
    """Draw an occluder covering about ``fraction`` of object ``p`` from a random side.

    Args:
        img: (H, W, 3) float32, changed in place.
        rng: random stream.
        p: the placed object.
        fraction: target share of the object's extent to cover, in (0, 1).
        pool: poster designs; half of the occluders are posters, half plain shapes.

    Returns:
        (H, W) bool mask of the occluder.
    """
    H, W = img.shape[:2]
    ys, xs = np.nonzero(p.alpha > 0.5)
    if len(xs) == 0:
        return np.zeros((H, W), bool)
    bx0, by0 = xs.min() + p.x0, ys.min() + p.y0
    bx1, by1 = xs.max() + 1 + p.x0, ys.max() + 1 + p.y0
    bw, bh = bx1 - bx0, by1 - by0
    side = int(rng.integers(4))
    pad = 0.15 * max(bw, bh)
    if side == 0:  # from the left
        box = (bx0 - pad, by0 - pad, bx0 + fraction * bw, by1 + pad)
    elif side == 1:  # from the right
        box = (bx1 - fraction * bw, by0 - pad, bx1 + pad, by1 + pad)
    elif side == 2:  # from the top
        box = (bx0 - pad, by0 - pad, bx1 + pad, by0 + fraction * bh)
    else:
        box = (bx0 - pad, by1 - fraction * bh, bx1 + pad, by1 + pad)
    x0, y0, x1, y1 = box
    if rng.random() < 0.5:
        tex, outline = pool[int(rng.integers(len(pool)))]
        tex = np.clip(tex, 0, 255)
        mask = np.ones(tex.shape[:2], np.float32)
    else:
        tex = np.empty((32, 32, 3), np.float32)
        tex[:] = _random_colour(rng, (0.0, 0.7), (0.1, 0.9))
        tex += rng.normal(0, 10, tex.shape).astype(np.float32)
        mask = np.ones((32, 32), np.float32)
    dst = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)
    occ = _Placed(tex, mask, dst)
    occ.paste(img)
    return occ.full_mask(H, W)


# --------------------------------------------------------------------------------------------
# Public generators
# --------------------------------------------------------------------------------------------


def _instance_spec(rng: np.random.Generator, difficulty: float, query: bool) -> dict:
    """Pose and occlusion of one planted instance (db view or query view)."""
    if query:
        return {
            "size": rng.uniform(0.55, 0.85),
            "rot": 12 * difficulty,
            "persp": 0.2 * difficulty,
            "occlusion": rng.uniform(0.05, 0.15) if rng.random() < 0.2 * difficulty else 0.0,
        }
    hard = rng.random()
    spec = {
        "size": float(np.exp(rng.uniform(np.log(0.25), np.log(0.9)))),
        "rot": 25 * difficulty,
        "persp": 0.35 * difficulty,
        "occlusion": 0.0,
    }
    if hard < 0.07:  # junk by occlusion
        spec["occlusion"] = rng.uniform(0.65, 0.9)
    elif hard < 0.12:  # junk by size
        spec["size"] = rng.uniform(0.04, 0.07)
    elif rng.random() < 0.35 * difficulty:
        spec["occlusion"] = rng.uniform(0.1, 0.3)
    return spec


def _is_junk(res: dict, short_side: int) -> bool:
    box = res["box"]
    if box is None or res["visible"] < _VISIBLE_MIN:
        return True
    return np.sqrt((box[2] - box[0]) * (box[3] - box[1])) < _TINY_FRAC * short_side


def generate_synthetic_benchmark(
    root: str,
    num_instances: int = 11,
    queries_per_instance: int = 5,
    num_db: int = 300,
    short_side: int = 300,
    seed: int = 0,
    difficulty: float = 1.0,
    instance_counts: Sequence[float] = (0.4, 0.45, 0.15),
    distractors_per_image: Tuple[int, int] = (1, 4),
    num_distractor_designs: int = 150,
    return_masks: bool = False,
) -> dict:
    """Generate the synthetic instance-search benchmark under ``root`` (custom format).

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        num_instances: K, the number of query objects (``obj00`` ...).
        queries_per_instance: query views per instance (like Oxford's 5).
        num_db: number of database images.
        short_side: shorter side of every image in pixels (4:3 or 3:4 aspect).
        seed: random seed; the same seed gives byte-identical files.
        difficulty: scales rotation, perspective, illumination, occlusion, blur and clutter
            (1.0 = the measured defaults of the module docstring; 0 = almost clean).
        instance_counts: probabilities of a database image holding 0, 1, 2, ... instances.
        distractors_per_image: [low, high) number of distractor posters per image (scaled by
            difficulty).
        num_distractor_designs: size of the pool of distractor poster designs (same generator
            family as the instances, different random streams).
        return_masks: if True, the summary also holds "masks": {relative image path: {object:
            (H, W) bool silhouette clipped to the image}} and "hidden": {relative image path:
            {object: (H, W) bool pixels drawn over that instance (occluders, instances pasted
            later)}} (for tests; memory grows with the set).

    Returns:
        Summary dict: "objects" (names, sorted), "num_db", "num_queries", "positives" and "junk"
        ({object: count}), "db_instance_histogram" ({n: number of db images holding n
        planted instances}), "parameters", and the masks if requested.
    """
    if num_instances < 1 or queries_per_instance < 1 or num_db < 1:
        raise ValueError("num_instances, queries_per_instance and num_db must be >= 1")
    if difficulty < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "queries"), exist_ok=True)
    names = object_names(num_instances)
    params = {
        "num_instances": num_instances,
        "queries_per_instance": queries_per_instance,
        "num_db": num_db,
        "short_side": short_side,
        "seed": seed,
        "difficulty": difficulty,
        "instance_counts": [float(p) for p in instance_counts],
        "distractors_per_image": [int(v) for v in distractors_per_image],
        "num_distractor_designs": num_distractor_designs,
        "jpeg_quality": _JPEG_QUALITY,
    }

    designs = [_poster_texture(_rng(seed, _STREAM_INSTANCE, k)) for k in range(num_instances)]
    pool = [
        _poster_texture(_rng(seed, _STREAM_DISTRACTOR, j)) for j in range(num_distractor_designs)
    ]

    # Plan which instances each db image holds: draw counts, then deal instances round-robin
    # from a shuffled deck so each instance appears (almost) equally often, never twice per image.
    plan_rng = _rng(seed, _STREAM_PLAN)
    probs = np.asarray(instance_counts, float) / np.sum(instance_counts)
    counts = plan_rng.choice(len(probs), size=num_db, p=probs)
    counts = np.minimum(counts, num_instances)
    deck: List[int] = []
    plan: List[List[int]] = []
    for n in counts:
        chosen: List[int] = []
        while len(chosen) < n:
            if not deck:
                deck = list(plan_rng.permutation(num_instances))
            k = int(deck.pop())
            if k in chosen:  # put it back below the top so the deal stays balanced
                deck.insert(0, k)
                continue
            chosen.append(k)
        plan.append(chosen)

    relevance = {n: {"positives": [], "junk": [], "boxes": {}} for n in names}
    masks: Dict[str, Dict[str, np.ndarray]] = {}
    hidden: Dict[str, Dict[str, np.ndarray]] = {}
    lo, hi = distractors_per_image
    for i, chosen in enumerate(plan):
        rng = _rng(seed, _STREAM_DB, i)
        h, w = _image_size(rng, short_side)
        inst = [(*designs[k], _instance_spec(rng, difficulty, query=False)) for k in chosen]
        n_dis = int(round(rng.integers(lo, hi) * difficulty))
        pil, res = _compose(rng, h, w, inst, pool, n_dis, difficulty, pool)
        rel = f"images/db_{i:05d}.jpg"
        _save_jpeg(pil, os.path.join(root, rel))
        for k, r in zip(chosen, res):
            entry = relevance[names[k]]
            entry["junk" if _is_junk(r, short_side) else "positives"].append(rel)
            if r["box"] is not None:
                entry["boxes"][rel] = [[round(v, 2) for v in r["box"]]]
        if return_masks:
            masks[rel] = {names[k]: r["mask"] for k, r in zip(chosen, res)}
            hidden[rel] = {names[k]: r["hidden"] for k, r in zip(chosen, res)}

    queries = []
    for k, name in enumerate(names):
        for q in range(queries_per_instance):
            rng = _rng(seed, _STREAM_QUERY, k, q)
            h, w = _image_size(rng, short_side)
            spec = _instance_spec(rng, difficulty, query=True)
            n_dis = int(round(rng.integers(0, 2) * difficulty))
            pil, res = _compose(rng, h, w, [(*designs[k], spec)], pool, n_dis, difficulty, pool)
            rel = f"queries/{name}_{q + 1}.jpg"
            _save_jpeg(pil, os.path.join(root, rel))
            queries.append(
                {"image": rel, "box": [round(v, 2) for v in res[0]["box"]], "object": name}
            )
            if return_masks:
                masks[rel] = {name: res[0]["mask"]}
                hidden[rel] = {name: res[0]["hidden"]}

    with open(os.path.join(root, "queries.json"), "w") as f:
        json.dump(queries, f, indent=1)
    with open(os.path.join(root, "relevance.json"), "w") as f:
        json.dump(relevance, f, indent=1, sort_keys=True)

    hist = np.bincount([len(c) for c in plan], minlength=len(probs))
    summary = {
        "objects": names,
        "num_db": num_db,
        "num_queries": len(queries),
        "positives": {n: len(relevance[n]["positives"]) for n in names},
        "junk": {n: len(relevance[n]["junk"]) for n in names},
        "db_instance_histogram": {str(n): int(c) for n, c in enumerate(hist)},
        "parameters": params,
    }
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write(_readme(summary))
    if return_masks:
        summary["masks"] = masks
        summary["hidden"] = hidden
    return summary


def _readme(summary: dict) -> str:
    p = summary["parameters"]
    pos = summary["positives"]
    lines = [
        "Synthetic instance-search benchmark (retrieval_ext.data.datasets.synthetic).",
        "",
        f"seed={p['seed']} difficulty={p['difficulty']} short_side={p['short_side']} px",
        f"{p['num_instances']} instances x {p['queries_per_instance']} query views = "
        f"{summary['num_queries']} queries; {summary['num_db']} database images.",
        f"db images by number of planted instances: {summary['db_instance_histogram']}",
        f"positives per instance: min {min(pos.values())}, max {max(pos.values())}, "
        f"total {sum(pos.values())}; junk total {sum(summary['junk'].values())}.",
        "",
        "images/      database images (db_NNNNN.jpg)",
        "queries/     query images <object>_<n>.jpg (not in the database)",
        "queries.json [{image, box: [x1, y1, x2, y2] absolute pixels, object}]",
        "relevance.json {object: {positives, junk, boxes: {image: [[x1, y1, x2, y2]]}}}",
        "meta.json    all parameters and the summary",
        "",
    ]
    return "\n".join(lines)


def generate_generic_detection_set(
    root: str,
    num_train: int = 400,
    num_val: int = 50,
    short_side: int = 320,
    seed: int = 0,
    categories: Sequence[str] = GENERIC_CATEGORIES,
    objects_per_image: Tuple[int, int] = (2, 7),
) -> dict:
    """Generate a generic detection set (COCO json) for pretraining the RPN and box head.

    Images hold several shape objects (category ``categories``) on the same kind of procedural
    backgrounds as the benchmark; shapes come from a generator that never draws the benchmark's
    posters, with random streams disjoint from the benchmark's for any seed.

    Layout::

        ROOT/images/gen_00000.jpg ...
        ROOT/annotations.json   all images (COCO: images, annotations, categories)
        ROOT/train.json         the first num_train images
        ROOT/val.json           the last num_val images

    Register with ``register_coco_instances(name, {}, ROOT/train.json, ROOT/images)``.
    Annotation boxes are COCO XYWH absolute pixels of the warped silhouette clipped to the image
    (no segmentation); category ids are 1-based in ``categories`` order.

    Args:
        root: output folder.
        num_train, num_val: number of images in each split.
        short_side: shorter image side in pixels.
        seed: random seed (deterministic, byte-identical files for the same seed).
        categories: subset of ``GENERIC_CATEGORIES``.
        objects_per_image: [low, high) number of objects placed per image (overlapping
            placements are skipped, so some images hold fewer).

    Returns:
        Summary dict: "num_images", "num_annotations", "categories" (names), "per_category"
        ({name: annotation count}), "parameters".
    """
    unknown = set(categories) - set(GENERIC_CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; known: {GENERIC_CATEGORIES}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    cats = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(categories)]
    images, anns = [], []
    for i in range(num_train + num_val):
        rng = _rng(seed, _STREAM_GENERIC, i)
        h, w = _image_size(rng, short_side)
        img = _background(rng, h, w, clutter=1.0, blobs=False)
        taken: List[Tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(*objects_per_image))):
            c = int(rng.integers(len(categories)))
            tex, outline = _generic_shape(rng, categories[c])
            size_px = np.exp(rng.uniform(np.log(0.1), np.log(0.55))) * min(h, w)
            centre = (rng.uniform(0.2 * size_px, w - 0.2 * size_px), rng.uniform(0, h))
            dst = _sample_quad(rng, outline, size_px, centre, 40.0, 0.25)
            p = _Placed(_photometric(tex, rng, 1.0), _render_mask(tex, outline), dst)
            mask = p.full_mask(h, w)
            box = _mask_box(mask)
            if box is None or _overlaps(p.box(), taken, 2):
                continue
            bw, bh = box[2] - box[0], box[3] - box[1]
            visible = float(mask.sum()) / max(p.area, 1)
            if visible < 0.5 or min(bw, bh) < 6:
                continue
            p.paste(img)
            taken.append(p.box())
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [box[0], box[1], bw, bh],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )
        name = f"gen_{i:05d}.jpg"
        _save_jpeg(_finish(img, rng, 0.7), os.path.join(root, "images", name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})

    def dump(fname: str, ims: List[dict]) -> None:
        ids = {im["id"] for im in ims}
        doc = {
            "info": {"description": "retrieval_ext synthetic generic detection set", "seed": seed},
            "images": ims,
            "annotations": [a for a in anns if a["image_id"] in ids],
            "categories": cats,
        }
        with open(os.path.join(root, fname), "w") as f:
            json.dump(doc, f)

    dump("annotations.json", images)
    dump("train.json", images[:num_train])
    dump("val.json", images[num_train:])
    per_cat = {c: 0 for c in categories}
    for a in anns:
        per_cat[categories[a["category_id"] - 1]] += 1
    return {
        "num_images": len(images),
        "num_annotations": len(anns),
        "categories": list(categories),
        "per_category": per_cat,
        "parameters": {
            "num_train": num_train,
            "num_val": num_val,
            "short_side": short_side,
            "seed": seed,
            "objects_per_image": list(objects_per_image),
        },
    }
