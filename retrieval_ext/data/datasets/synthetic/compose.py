"""One benchmark image: instances planted on a background among distractors, some occluded.

Also reports, per planted instance, its box, its visible share and its masks, from which the
benchmark decides positives and junk.
"""

from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from .scene import background, finish
from .textures import random_colour
from .warp import Placed, mask_box, overlaps, photometric, render_mask, sample_quad

__all__ = ["compose", "occlude"]

Design = Tuple[np.ndarray, np.ndarray]  # (texture, outline) of an object, see .textures


def compose(
    rng: np.random.Generator,
    h: int,
    w: int,
    instances: Sequence[Tuple[np.ndarray, np.ndarray, dict]],
    distractors: Sequence[Design],
    num_distractors: int,
    difficulty: float,
    occluder_pool: Sequence[Design],
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
    img = background(rng, h, w, clutter=0.5 + 0.5 * difficulty)
    placed, taken = _place_instances(rng, h, w, instances, difficulty)
    for _ in range(num_distractors):
        _paste_distractor(rng, img, distractors, taken, difficulty)
    for p in placed:
        p.paste(img)

    occluder = np.zeros((h, w), bool)
    for p, (_, _, spec) in zip(placed, instances):
        if spec["occlusion"] > 0:
            occluder |= occlude(img, rng, p, spec["occlusion"], occluder_pool)

    # Large instances may not fit side by side; a later one then hides part of an earlier one.
    masks = [p.full_mask(h, w) for p in placed]
    results = []
    for i, (p, mask) in enumerate(zip(placed, masks)):
        hidden = occluder.copy()
        for later in masks[i + 1 :]:
            hidden |= later
        visible = float((mask & ~hidden).sum()) / max(p.area, 1)
        results.append({"box": mask_box(mask), "visible": visible, "mask": mask, "hidden": hidden})
    return finish(img, rng, difficulty), results


def _place_instances(
    rng: np.random.Generator,
    h: int,
    w: int,
    instances: Sequence[Tuple[np.ndarray, np.ndarray, dict]],
    difficulty: float,
) -> Tuple[List[Placed], List[tuple]]:
    """Poses of the instances, apart from each other when 30 tries allow (not pasted yet).

    Returns:
        The placed instances in order and their corner extents (XYXY floats, image pixels).
    """
    short = min(h, w)
    placed: List[Placed] = []
    taken: List[tuple] = []
    for tex, outline, spec in instances:
        size_px = spec["size"] * short
        for _ in range(30):
            # Mostly inside the frame: the centre keeps ~40% of the size from the border.
            m = 0.4 * size_px
            centre = (rng.uniform(m, max(w - m, m + 1)), rng.uniform(m, max(h - m, m + 1)))
            dst = sample_quad(rng, outline, size_px, centre, spec["rot"], spec["persp"])
            box = (dst[:, 0].min(), dst[:, 1].min(), dst[:, 0].max(), dst[:, 1].max())
            if not overlaps(box, taken, 4):
                break
        placed.append(Placed(photometric(tex, rng, difficulty), render_mask(tex, outline), dst))
        taken.append(box)
    return placed, taken


def _paste_distractor(
    rng: np.random.Generator,
    img: np.ndarray,
    distractors: Sequence[Design],
    taken: Sequence[tuple],
    difficulty: float,
) -> None:
    """Pastes one random distractor away from the instances' extents ``taken`` (10 tries)."""
    h, w = img.shape[:2]
    short = min(h, w)
    tex, outline = distractors[int(rng.integers(len(distractors)))]
    size_px = np.exp(rng.uniform(np.log(0.1), np.log(0.35))) * short
    for _ in range(10):
        centre = (rng.uniform(0, w), rng.uniform(0, h))
        dst = sample_quad(rng, outline, size_px, centre, 25 * difficulty, 0.3 * difficulty)
        x0, y0, x1, y1 = dst[:, 0].min(), dst[:, 1].min(), dst[:, 0].max(), dst[:, 1].max()
        if not overlaps((x0, y0, x1, y1), taken, 4):
            tex = photometric(tex, rng, difficulty)
            Placed(tex, render_mask(tex, outline), dst).paste(img)
            return


def occlude(
    img: np.ndarray,
    rng: np.random.Generator,
    p: Placed,
    fraction: float,
    pool: Sequence[Design],
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
    x0, y0, x1, y1 = _occluder_box(rng, (bx0, by0, bx1, by1), fraction)
    if rng.random() < 0.5:
        tex, outline = pool[int(rng.integers(len(pool)))]
        tex = np.clip(tex, 0, 255)
        mask = np.ones(tex.shape[:2], np.float32)
    else:
        tex = np.empty((32, 32, 3), np.float32)
        tex[:] = random_colour(rng, (0.0, 0.7), (0.1, 0.9))
        tex += rng.normal(0, 10, tex.shape).astype(np.float32)
        mask = np.ones((32, 32), np.float32)
    dst = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)
    occ = Placed(tex, mask, dst)
    occ.paste(img)
    return occ.full_mask(H, W)


def _occluder_box(rng: np.random.Generator, extent: tuple, fraction: float) -> tuple:
    """XYXY of an occluder entering the object's ``extent`` from a random side by ``fraction``."""
    bx0, by0, bx1, by1 = extent
    bw, bh = bx1 - bx0, by1 - by0
    side = int(rng.integers(4))
    pad = 0.15 * max(bw, bh)
    if side == 0:  # from the left
        return (bx0 - pad, by0 - pad, bx0 + fraction * bw, by1 + pad)
    if side == 1:  # from the right
        return (bx1 - fraction * bw, by0 - pad, bx1 + pad, by1 + pad)
    if side == 2:  # from the top
        return (bx0 - pad, by0 - pad, bx1 + pad, by0 + fraction * bh)
    return (bx0 - pad, by1 - fraction * bh, bx1 + pad, by1 + pad)
