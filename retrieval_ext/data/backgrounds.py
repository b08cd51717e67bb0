"""Scenes and clutter for the camera augmentation: what surrounds and covers a query object.

A *background source* is a callable ``source(rng, height, width) -> uint8 (height, width, 3)``:

- :class:`ProceduralBackgrounds`: scenes of the synthetic generator
  (:mod:`retrieval_ext.data.datasets.synthetic`: gradient, smooth noise, clutter shapes) with
  a few of its posters and printed-paper sheets lying on them. None of these is a query object
  of any collection, so every proposal on them is background for the classifier.
- :class:`ImageBackgrounds`: random crops of the user's own images (for example a
  collection's database views that do not show the query objects).

Occluders come from :func:`occluder_texture`: a poster or a paper sheet in its own frame.

Every random draw comes from the ``numpy.random.Generator`` passed in, so a fixed generator gives
the same pixels.
"""

from typing import Sequence, Tuple

import cv2
import numpy as np

from .datasets.synthetic.scene import background as synthetic_scene
from .datasets.synthetic.textures import poster_texture

__all__ = ["ImageBackgrounds", "ProceduralBackgrounds", "occluder_texture", "paste_warped"]


def _paper_texture(rng: np.random.Generator) -> np.ndarray:
    """A printed sheet: light paper with rows of dark text-like glyphs, (H, W, 3) float32."""
    h = int(rng.integers(120, 200))
    w = int(h * rng.uniform(0.7, 1.4))
    paper = np.full((h, w, 3), rng.uniform(200, 250), np.float32)
    paper += rng.normal(0, 4, 3).astype(np.float32)
    ink = np.zeros((h, w), np.uint8)
    scale = rng.uniform(0.25, 0.45)
    line_h = max(int(22 * scale) + 3, 6)
    for row in range(2, h // line_h - 1):
        text = "".join(chr(97 + int(c)) if c < 26 else " " for c in rng.integers(0, 32, 40))
        cv2.putText(ink, text, (6, row * line_h), 0, scale, 255, 1, cv2.LINE_AA)
    colour = rng.uniform(0, 60, 3).astype(np.float32)
    alpha = ink.astype(np.float32)[..., None] / 255.0
    return paper * (1 - alpha) + colour * alpha


def occluder_texture(rng: np.random.Generator) -> np.ndarray:
    """A clutter object in its own frame: a synthetic poster (two thirds) or a paper sheet.

    Returns:
        (H, W, 3) float32 RGB in [0, 255], a rectangle (long side 120 to 200 px).
    """
    if rng.random() < 2 / 3:
        texture, _ = poster_texture(rng)
        return np.clip(texture, 0, 255)
    return np.clip(_paper_texture(rng), 0, 255)


def paste_warped(
    canvas: np.ndarray, texture: np.ndarray, corners: np.ndarray, opacity: float = 1.0
) -> Tuple[np.ndarray, int, int]:
    """Paste a texture warped onto the quadrilateral ``corners`` of ``canvas``.

    Args:
        canvas: (H, W, 3) float32, changed in place.
        texture: (h, w, 3) float32 or uint8.
        corners: (4, 2) destination of the texture's corners (top-left, top-right,
            bottom-right, bottom-left) in canvas pixel-edge coordinates.
        opacity: 1 = opaque.

    Returns:
        (alpha, x0, y0): float32 alpha in [0, 1] of the pasted texture over the canvas window
        whose top-left pixel is (x0, y0) (the quad's bounding box clipped to the canvas; (0, 0)
        in size when the quad misses the canvas).
    """
    corners = np.asarray(corners, np.float64)
    H, W = canvas.shape[:2]
    x0, y0 = np.clip(np.floor(corners.min(0)).astype(int), 0, [W, H])
    x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int), 0, [W, H])
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), int(x0), int(y0)
    h, w = texture.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32) - 0.5
    dst = corners - [x0, y0] - 0.5  # the window's own pixel-centre frame
    matrix = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    size = (int(x1 - x0), int(y1 - y0))
    colour = cv2.warpPerspective(
        np.asarray(texture, np.float32),
        matrix,
        size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    alpha = cv2.warpPerspective(
        np.ones((h, w), np.float32),
        matrix,
        size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    ) * np.float32(opacity)
    window = canvas[y0:y1, x0:x1]
    window *= 1.0 - alpha[..., None]
    window += alpha[..., None] * colour
    return alpha, int(x0), int(y0)


def random_quad(
    rng: np.random.Generator, centre: Tuple[float, float], size: float, aspect: float
) -> np.ndarray:
    """Corners (4, 2) of a turned rectangle: long side ``size``, ``aspect`` = height / width."""
    w, h = (size, size * aspect) if aspect <= 1 else (size / aspect, size)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], np.float64) / 2
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return corners @ rot.T + np.asarray(centre, np.float64)


class ProceduralBackgrounds:
    """Synthetic scenes with 0 to ``max_objects`` posters or paper sheets lying on them.

    Drawn at half the asked resolution and upsampled (a background needs no fine detail; this
    halves the cost of a training image).
    """

    def __init__(self, max_objects: int = 4):
        """
        Args:
            max_objects: most clutter objects drawn on a scene.
        """
        self.max_objects = int(max_objects)

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """A scene, uint8 (height, width, 3)."""
        h, w = max(height // 2, 1), max(width // 2, 1)
        canvas = synthetic_scene(rng, h, w, clutter=1.0)
        for _ in range(int(rng.integers(0, self.max_objects + 1))):
            texture = occluder_texture(rng)
            centre = (rng.uniform(0, w), rng.uniform(0, h))
            size = min(h, w) * rng.uniform(0.25, 0.8)
            quad = random_quad(rng, centre, size, texture.shape[0] / texture.shape[1])
            paste_warped(canvas, texture, quad)
        canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


class ImageBackgrounds:
    """Random crops of image files, resized to the canvas.

    The files must not show any query object: their proposals are trained as background.
    """

    def __init__(self, files: Sequence[str], image_format: str = "RGB", min_area: float = 0.3):
        """
        Args:
            files: image files (read with :func:`retrieval_ext.data.mapper.read_image`).
            image_format: ``INPUT.FORMAT`` of the model.
            min_area: the crop covers at least this fraction of the image's area.

        Raises:
            ValueError: no files.
        """
        if not files:
            raise ValueError("ImageBackgrounds needs at least one image file")
        self.files = list(files)
        self.image_format = image_format
        self.min_area = float(min_area)

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """A random crop of a random file with the canvas's aspect, uint8 (height, width, 3)."""
        from .mapper import read_image  # the mapper imports this module

        image = read_image(self.files[int(rng.integers(len(self.files)))], self.image_format)
        ih, iw = image.shape[:2]
        fit = min(iw / width, ih / height)  # the largest crop of the canvas's aspect
        scale = fit * np.sqrt(rng.uniform(self.min_area, 1.0))
        cw, ch = max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)
        x0 = int(rng.integers(0, iw - cw + 1))
        y0 = int(rng.integers(0, ih - ch + 1))
        crop = image[y0 : y0 + ch, x0 : x0 + cw]
        return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
