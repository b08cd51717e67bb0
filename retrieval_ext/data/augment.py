"""Camera-like augmentations for fine-tuning on a few clean views of each query object.

A clean query view (a scan, a catalogue image) looks nothing like the photos a collection holds:
there the object is smaller, turned, seen in perspective, lying among other things, partly
covered, lit unevenly (often with glare), blurred and noisy. ``MODEL.FINETUNE.AUGMENT "camera"``
produces such photos from the query view, as detectron2 ``Augmentation`` classes (here) whose
``Transform`` classes (:mod:`.camera_transforms`) move the boxes with the pixels:

==========================  ====================================================================
:class:`RandomCameraView`   the view warped by a random homography (scale, in-plane rotation,
                            out-of-plane tilt, position) onto a background scene that holds no
                            query object, sometimes with a dark frame (a case) around it:
                            :class:`HomographyTransform`; boxes: corners through the homography,
                            then their bounding box
:class:`RandomOccluders`    clutter lying over part of the object (never all of its box):
                            :class:`PasteTransform`; boxes unchanged
:class:`RandomLighting`     uneven light (a gain ramp), a colour cast and specular glare:
                            :class:`LightingTransform`
:class:`RandomCameraBlur`   defocus or motion blur: :class:`BlurTransform`
:class:`RandomSensorNoise`  sensor noise and JPEG compression: :class:`SensorNoiseTransform`
==========================  ====================================================================

Randomness: augmentations draw from NumPy's global generator (as detectron2's do, seeded per
data-loader worker); the procedural content (background, occluders) from a
``numpy.random.Generator`` seeded by one such draw, so ``np.random.seed(s)`` fixes the output.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .backgrounds import occluder_texture, paste_warped, random_quad
from .camera_transforms import (
    BlurTransform,
    HomographyTransform,
    LightingTransform,
    PasteTransform,
    SensorNoiseTransform,
)

__all__ = [
    "ObjectPool",
    "RandomCameraBlur",
    "RandomCameraView",
    "RandomLighting",
    "RandomOccluders",
    "RandomSensorNoise",
    "camera_augmentations",
    "content_box",
]

BackgroundSource = Callable[[np.random.Generator, int, int], np.ndarray]


def _generator() -> np.random.Generator:
    return np.random.default_rng(np.random.randint(0, 2**31 - 1))


def _object_box(image: np.ndarray, boxes) -> np.ndarray:
    """The first box (the query object) or, without boxes, the whole image; XYXY float."""
    if boxes is not None and len(boxes):
        return np.asarray(boxes, np.float64).reshape(-1, 4)[0]
    return np.array([0.0, 0.0, image.shape[1], image.shape[0]])


def _leading(flags: np.ndarray) -> int:
    """Number of leading True values."""
    return int(np.argmin(flags)) if not flags.all() else len(flags)


def content_box(
    image: np.ndarray, box: Sequence[float], tol: float = 12.0, max_fraction: float = 0.3
) -> np.ndarray:
    """``box`` shrunk past a uniform margin (the blank border a scan is padded with).

    The margin colour is the median of the box's outermost pixels; a row or column of the box
    is margin when its pixels differ from it by less than ``tol`` grey levels on average and
    less than ``5 * tol`` everywhere. Margin rows and columns are removed from each side, at
    most ``max_fraction`` of the box per side.

    Args:
        image: (H, W, C) array.
        box: XYXY pixel-edge coordinates inside the image.

    Returns:
        float64 (4,) XYXY, inside ``box``.
    """
    h, w = image.shape[:2]
    x0, y0 = (int(np.clip(np.floor(v), 0, m)) for v, m in zip(box[:2], (w, h)))
    x1, y1 = (int(np.clip(np.ceil(v), 0, m)) for v, m in zip(box[2:], (w, h)))
    if x1 - x0 < 3 or y1 - y0 < 3:
        return np.asarray(box, np.float64)
    region = image[y0:y1, x0:x1].astype(np.float32).reshape(y1 - y0, x1 - x0, -1)
    ring = np.concatenate([region[0], region[-1], region[:, 0], region[:, -1]])
    diff = np.abs(region - np.median(ring, axis=0)).max(axis=2)
    cols = (diff.mean(axis=0) < tol) & (diff.max(axis=0) < 5 * tol)
    rows = (diff.mean(axis=1) < tol) & (diff.max(axis=1) < 5 * tol)
    cap_x, cap_y = int(max_fraction * (x1 - x0)), int(max_fraction * (y1 - y0))
    left, right = min(_leading(cols), cap_x), min(_leading(cols[::-1]), cap_x)
    top, bottom = min(_leading(rows), cap_y), min(_leading(rows[::-1]), cap_y)
    return np.array(
        [
            max(box[0], x0 + left),
            max(box[1], y0 + top),
            min(box[2], x1 - right),
            min(box[3], y1 - bottom),
        ],
        np.float64,
    )


class ObjectPool:
    """Query views that :class:`RandomCameraView` places beside the object, each annotated with
    its own class: the fine-tuning set's other objects, so one photo teaches several classes.

    Images are read on first use and kept (a few hundred query views fit in memory).
    """

    def __init__(self, dicts: Sequence[dict], image_format: str = "RGB"):
        """
        Args:
            dicts: fine-tuning dicts (``file_name``, ``annotations`` with ``bbox``,
                ``bbox_mode``, ``category_id``; ``horizontal_flip`` honoured); one entry per
                annotation.
            image_format: ``INPUT.FORMAT``.

        Raises:
            ValueError: no annotated object in ``dicts``.
        """
        self.items = [
            (
                d["file_name"],
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS),
                int(a["category_id"]),
                bool(d.get("horizontal_flip", False)),
            )
            for d in dicts
            for a in d.get("annotations", [])
        ]
        if not self.items:
            raise ValueError("ObjectPool needs at least one annotated object")
        self.image_format = image_format
        self._images: Dict[Tuple[str, bool], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int) -> Tuple[np.ndarray, np.ndarray, int]:
        """(image, XYXY box of the object in it, category id) of entry ``index``."""
        from .mapper import read_image  # the mapper imports this module

        file_name, box, category, flip = self.items[index]
        image = self._images.get((file_name, flip))
        if image is None:
            image = read_image(file_name, self.image_format)
            image = np.ascontiguousarray(image[:, ::-1]) if flip else image
            self._images[(file_name, flip)] = image
        box = np.asarray(box, np.float64)
        if flip:
            box = np.array([image.shape[1] - box[2], box[1], image.shape[1] - box[0], box[3]])
        return image, box, category


def _overlap(box: np.ndarray, others: Sequence[np.ndarray]) -> float:
    """Largest fraction of ``box``'s area covered by one of ``others`` (XYXY)."""
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
    fractions = [
        max(min(box[2], o[2]) - max(box[0], o[0]), 0)
        * max(min(box[3], o[3]) - max(box[1], o[1]), 0)
        for o in others
    ]
    return max(fractions, default=0.0) / area


class RandomCameraView(T.Augmentation):
    """The object (its box) seen by a camera: a random homography onto a background scene.

    The canvas is 4:3 (landscape 70% of the time), its shorter side ``canvas_short_side``
    (0 = the input's shorter side). The object (the first box, or the whole image; with
    ``trim_margin`` shrunk past a blank margin, see :func:`content_box`) alone is pasted: its
    long side becomes ``scale`` (log-uniform) times the canvas's shorter side, it turns by up to
    ``max_rotation`` degrees, one of its sides is foreshortened by up to ``perspective`` and its
    corners jitter by up to a quarter of that, and its centre lies in the middle 40% of the
    canvas (a large object may leave the frame, as in photos). With probability ``frame_prob``
    a dark frame (4-10% wider than the object) is drawn around it on the background.

    With an ``others`` pool, 0 to ``max_others`` other objects from it are drawn into the scene
    first (a fifth to half of the canvas's shorter side, anywhere, away from most of the band around
    the object where occluders go, each overlapping another's box by at most a quarter); the
    transform lists their canvas boxes and classes in ``placed`` for the mapper to annotate.
    """

    def __init__(
        self,
        background: BackgroundSource,
        scale: Tuple[float, float] = (0.4, 1.1),
        max_rotation: float = 180.0,
        perspective: float = 0.35,
        canvas_short_side: int = 0,
        frame_prob: float = 0.5,
        trim_margin: bool = True,
        others: Optional[ObjectPool] = None,
        max_others: int = 0,
    ):
        super().__init__()
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"camera scale range must satisfy 0 < low <= high, got {scale}")
        if not 0 <= perspective < 1:
            raise ValueError(f"camera perspective must be in [0, 1), got {perspective}")
        self._init(locals())

    def _canvas(self, image: np.ndarray) -> Tuple[int, int]:
        short = int(self.canvas_short_side) or min(image.shape[:2])
        long = int(round(short * 4 / 3))
        return (short, long) if np.random.rand() < 0.7 else (long, short)

    def _destination(self, box, height, width, scale, centre_range=(0.3, 0.7)) -> np.ndarray:
        """Canvas corners (4, 2) of the box's corners (top-left, top-right, bottom-right, ...)."""
        bw, bh = box[2] - box[0], box[3] - box[1]
        size = min(height, width) * np.exp(np.random.uniform(*np.log(scale)))
        pts = np.array([[-bw, -bh], [bw, -bh], [bw, bh], [-bw, bh]]) / 2 * (size / max(bw, bh))
        a = np.deg2rad(np.random.uniform(-self.max_rotation, self.max_rotation))
        pts = pts @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]).T
        side = np.random.randint(4)  # the far side of a tilted object looks shorter
        tilt = np.random.uniform(0, self.perspective)
        pts[[side, (side + 1) % 4]] *= 1 - tilt
        pts += np.random.uniform(-1, 1, (4, 2)) * self.perspective / 4 * size
        centre = np.array([width, height]) * np.random.uniform(*centre_range, 2)
        return pts + centre

    def _paste(self, canvas, rng, image, box, dst) -> None:
        """Draw ``image``'s ``box`` onto the quad ``dst`` of ``canvas``, maybe framed."""
        if rng.random() < self.frame_prob:
            centre = dst.mean(0)
            frame = centre + (dst - centre) * rng.uniform(1.04, 1.10)
            paste_warped(canvas, np.full((8, 8, 3), rng.uniform(5, 45), np.float32), frame)
        if image is not None:
            x0, y0, x1, y1 = np.round(box).astype(int)
            paste_warped(canvas, image[y0:y1, x0:x1], dst)

    def _place_others(self, canvas, rng, main_dst) -> List[Tuple[List[float], int]]:
        h, w = canvas.shape[:2]
        # occluders lie across the object's border (up to 0.4 of its long side beyond it): keep
        # the others out of most of that band, so that an occluder rarely hides one of them
        lo, hi = main_dst.min(0), main_dst.max(0)
        margin = 0.25 * (hi - lo).max()
        taken = [np.r_[lo - margin, hi + margin]]
        placed = []
        for _ in range(int(np.random.randint(0, self.max_others + 1))):
            image, box, category = self.others.get(int(rng.integers(len(self.others))))
            box = np.round(content_box(image, box) if self.trim_margin else box)
            dst = self._destination(box, h, w, (0.2, 0.5), (0.1, 0.9))
            extent = np.r_[dst.min(0), dst.max(0)]
            if _overlap(extent, taken) > 0.25 or max(_overlap(t, [extent]) for t in taken) > 0.25:
                continue
            self._paste(canvas, rng, image, box, dst)
            taken.append(extent)
            clipped = np.clip(extent, 0, [w, h, w, h])
            if clipped[2] - clipped[0] >= 4 and clipped[3] - clipped[1] >= 4:
                placed.append((clipped.tolist(), category))
        return placed

    def get_transform(self, image: np.ndarray, boxes=None) -> HomographyTransform:
        height, width = self._canvas(image)
        box = _object_box(image, boxes)
        if self.trim_margin:
            box = content_box(image, box)
        dst = self._destination(box, height, width, self.scale)
        src = box[[0, 1, 2, 1, 2, 3, 0, 3]].reshape(4, 2)
        matrix = cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))
        rng = _generator()
        background = self.background(rng, height, width).astype(np.float32)
        placed = self._place_others(background, rng, dst) if self.others and self.max_others else []
        self._paste(background, rng, None, box, dst)  # the object's own frame
        return HomographyTransform(
            matrix.astype(np.float64), height, width, background, box, placed
        )


class RandomOccluders(T.Augmentation):
    """With probability ``prob``, 1 to ``max_count`` clutter objects over the object's box
    (centred on its border), covering together at most ``max_cover`` of its area (an occluder
    that would exceed it is left out), so that the object always shows."""

    def __init__(self, max_count: int = 2, max_cover: float = 0.3, prob: float = 0.5):
        super().__init__()
        if not 0 <= max_cover < 1:
            raise ValueError(f"max_cover must be in [0, 1), got {max_cover}")
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes=None) -> T.Transform:
        if np.random.rand() >= self.prob or self.max_count <= 0:
            return T.NoOpTransform()
        rng = _generator()
        h, w = image.shape[:2]
        box = np.clip(_object_box(image, boxes), 0, [w, h, w, h])
        x0, y0, x1, y1 = (
            np.floor(box[:2]).astype(int).tolist() + np.ceil(box[2:]).astype(int).tolist()
        )
        if x1 <= x0 or y1 <= y0:
            return T.NoOpTransform()
        covered = np.zeros((h, w), bool)
        patches = []
        for _ in range(int(rng.integers(1, self.max_count + 1))):
            texture = occluder_texture(rng)
            t, edge = rng.uniform(0, 1), int(rng.integers(4))  # a point on the box's border
            px = x0 + (x1 - x0) * (t if edge % 2 == 0 else float(edge == 1))
            py = y0 + (y1 - y0) * (t if edge % 2 == 1 else float(edge == 2))
            size = max(x1 - x0, y1 - y0) * rng.uniform(0.33, 0.8)
            quad = random_quad(rng, (px, py), size, texture.shape[0] / texture.shape[1])
            colour = np.zeros((h, w, 3), np.float32)  # pasted over black: premultiplied
            alpha, ax, ay = paste_warped(colour, texture, quad)
            if alpha.size == 0:
                continue
            union = covered.copy()
            union[ay : ay + alpha.shape[0], ax : ax + alpha.shape[1]] |= alpha > 0.5
            if union[y0:y1, x0:x1].mean() > self.max_cover:
                continue
            covered = union
            window = colour[ay : ay + alpha.shape[0], ax : ax + alpha.shape[1]]
            patches.append((ax, ay, window, alpha))
        return PasteTransform(patches) if patches else T.NoOpTransform()


class RandomLighting(T.Augmentation):
    """A light ramp (gains in ``gain_range``), a colour cast and, with ``glare_prob``, glare."""

    def __init__(self, gain_range=(0.5, 1.3), cast: float = 0.1, glare_prob: float = 0.3):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> LightingTransform:
        h, w = image.shape[:2]
        gains = tuple(float(g) for g in np.random.uniform(*self.gain_range, 2))
        angle = float(np.random.uniform(0, 2 * np.pi))
        cast = np.exp(np.random.uniform(-self.cast, self.cast, image.shape[2])).tolist()
        glare = None
        if np.random.rand() < self.glare_prob:
            radius = min(h, w) * np.random.uniform(0.03, 0.15)
            glare = (
                np.random.uniform(0, w),
                np.random.uniform(0, h),
                radius,
                np.random.uniform(0.3, 0.9),
            )
        return LightingTransform(gains, angle, cast, glare)


class RandomCameraBlur(T.Augmentation):
    """Defocus (sigma up to ``max_sigma``) or motion blur (up to ``max_length`` px), each with
    probability ``prob / 2``."""

    def __init__(self, max_sigma: float = 2.0, max_length: int = 9, prob: float = 0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        r = np.random.rand()
        if r < self.prob / 2:
            return BlurTransform(sigma=float(np.random.uniform(0.5, self.max_sigma)))
        if r < self.prob:
            length = int(np.random.randint(3, max(self.max_length, 3) + 1))
            return BlurTransform(length=length, angle=float(np.random.uniform(0, np.pi)))
        return T.NoOpTransform()


class RandomSensorNoise(T.Augmentation):
    """With probability ``prob``: noise (sigma up to ``max_sigma``) and JPEG (quality 30-90)."""

    def __init__(self, max_sigma: float = 8.0, prob: float = 0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        if np.random.rand() >= self.prob:
            return T.NoOpTransform()
        return SensorNoiseTransform(
            float(np.random.uniform(0, self.max_sigma)),
            int(np.random.randint(30, 91)),
            int(np.random.randint(0, 2**31 - 1)),
        )


def camera_augmentations(
    background: BackgroundSource, max_occluders: int = 2, max_occlusion: float = 0.3, **view
) -> List[T.Augmentation]:
    """The ``"camera"`` augmentation list, in the order a photo is made (see the module
    docstring): view and scene, clutter on top, light, then the camera's blur and noise.

    Args:
        background: where the scene's backgrounds come from.
        max_occluders, max_occlusion: :class:`RandomOccluders`' ``max_count`` and ``max_cover``.
        view: the other keyword arguments of :class:`RandomCameraView` (``scale``,
            ``max_rotation``, ``perspective``, ``canvas_short_side``, ``frame_prob``,
            ``trim_margin``, ``others``, ``max_others``); its defaults where not given.
    """
    return [
        RandomCameraView(background, **view),
        RandomOccluders(max_occluders, max_occlusion),
        RandomLighting(),
        T.RandomBrightness(0.7, 1.3),
        T.RandomContrast(0.6, 1.3),
        T.RandomSaturation(0.6, 1.3),
        RandomCameraBlur(),
        RandomSensorNoise(),
    ]
