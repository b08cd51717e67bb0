"""The synthetic instance-search benchmark, written to disk in the project's custom format.

K planar object *instances* (posters, :func:`.textures.poster_texture`) are planted into
procedural scenes with a random position, scale, in-plane rotation, perspective warp,
illumination change, partial occlusion, blur and JPEG noise. Every scene is also full of
*distractor* posters from the same generator family that are not among the K instances, so an RPN
sees objects everywhere and a global descriptor cannot rely on "there is an object". Queries are
separate views of each instance (not in the database), each with the instance's box, like
Oxford's 5 query images per building.

On-disk layout (boxes are XYXY absolute pixels, as floats, in the frame of the written image; a
box is the bounding box of the instance's warped outline, clipped to the image, with pixel-edge
convention: a mask covering columns 3..7 gives x1 = 3, x2 = 8)::

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
queries; distractor posters are 10% to 35%. How these settings were chosen, and what simple
global descriptors score on the default benchmark: BENCHMARKS.md, "Synthetic benchmark".
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import streams
from .compose import compose
from .scene import JPEG_QUALITY, image_size, save_jpeg
from .textures import poster_texture

__all__ = ["generate_synthetic_benchmark", "object_names"]

VISIBLE_MIN = 0.4  # below this visible fraction an instance is junk (Oxford: "mostly occluded")
TINY_FRAC = 0.08  # sqrt(box area) under this fraction of the shorter side is junk ("very tiny")


def object_names(num_instances: int) -> List[str]:
    """Names of the benchmark's instances; their sorted order is the class-id order.

    Args:
        num_instances: K.

    Returns:
        ["obj00", "obj01", ...] (zero-padded so that lexicographic order is numeric order).
    """
    width = max(2, len(str(num_instances - 1)))
    return [f"obj{k:0{width}d}" for k in range(num_instances)]


def instance_spec(rng: np.random.Generator, difficulty: float, query: bool) -> dict:
    """Pose and occlusion of one planted instance (db view or query view), as
    :func:`.compose.compose` takes them.

    About 7% of database views are occluded by 65% to 90% and 5% are tiny (junk by design).
    """
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


def is_junk(res: dict, short_side: int) -> bool:
    """Whether a planted instance (a result of :func:`.compose.compose`) is junk, not positive."""
    box = res["box"]
    if box is None or res["visible"] < VISIBLE_MIN:
        return True
    return np.sqrt((box[2] - box[0]) * (box[3] - box[1])) < TINY_FRAC * short_side


def plan_database(
    rng: np.random.Generator, num_db: int, num_instances: int, instance_counts: Sequence[float]
) -> List[List[int]]:
    """Which instances each database image holds.

    Draws a count per image, then deals instances round-robin from a shuffled deck, so that each
    instance appears (almost) equally often and never twice in one image.

    Args:
        rng: the plan's random stream.
        num_db: number of database images.
        num_instances: K.
        instance_counts: probabilities of an image holding 0, 1, 2, ... instances.

    Returns:
        Per database image, the instance indices it holds, in planting order.
    """
    probs = np.asarray(instance_counts, float) / np.sum(instance_counts)
    counts = rng.choice(len(probs), size=num_db, p=probs)
    counts = np.minimum(counts, num_instances)
    deck: List[int] = []
    plan: List[List[int]] = []
    for n in counts:
        chosen: List[int] = []
        while len(chosen) < n:
            if not deck:
                deck = list(rng.permutation(num_instances))
            k = int(deck.pop())
            if k in chosen:  # put it back below the top so the deal stays balanced
                deck.insert(0, k)
                continue
            chosen.append(k)
        plan.append(chosen)
    return plan


@dataclass
class _Job:
    """What every image of one benchmark shares, and the masks collected for the caller."""

    root: str
    seed: int
    short_side: int
    difficulty: float
    names: List[str]
    designs: list  # (texture, outline) per instance
    pool: list  # (texture, outline) per distractor design
    return_masks: bool
    masks: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)
    hidden: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)

    def render(self, rng, h: int, w: int, instances: list, num_distractors: int, rel: str):
        """Composes one image, writes it to ``root/rel`` and returns the per-instance results."""
        pil, res = compose(
            rng, h, w, instances, self.pool, num_distractors, self.difficulty, self.pool
        )
        save_jpeg(pil, os.path.join(self.root, rel))
        return res

    def keep_masks(self, rel: str, names: Sequence[str], res: Sequence[dict]) -> None:
        if self.return_masks:
            self.masks[rel] = {n: r["mask"] for n, r in zip(names, res)}
            self.hidden[rel] = {n: r["hidden"] for n, r in zip(names, res)}


def _write_database(
    job: _Job, plan: List[List[int]], distractors_per_image: Tuple[int, int]
) -> Dict[str, dict]:
    """Renders the database images; returns relevance.json's content."""
    relevance = {n: {"positives": [], "junk": [], "boxes": {}} for n in job.names}
    lo, hi = distractors_per_image
    for i, chosen in enumerate(plan):
        rng = streams.rng(job.seed, streams.DB, i)
        h, w = image_size(rng, job.short_side)
        inst = [(*job.designs[k], instance_spec(rng, job.difficulty, query=False)) for k in chosen]
        n_dis = int(round(rng.integers(lo, hi) * job.difficulty))
        rel = f"images/db_{i:05d}.jpg"
        res = job.render(rng, h, w, inst, n_dis, rel)
        for k, r in zip(chosen, res):
            entry = relevance[job.names[k]]
            entry["junk" if is_junk(r, job.short_side) else "positives"].append(rel)
            if r["box"] is not None:
                entry["boxes"][rel] = [[round(v, 2) for v in r["box"]]]
        job.keep_masks(rel, [job.names[k] for k in chosen], res)
    return relevance


def _write_queries(job: _Job, queries_per_instance: int) -> List[dict]:
    """Renders the query views; returns queries.json's content."""
    queries = []
    for k, name in enumerate(job.names):
        for q in range(queries_per_instance):
            rng = streams.rng(job.seed, streams.QUERY, k, q)
            h, w = image_size(rng, job.short_side)
            spec = instance_spec(rng, job.difficulty, query=True)
            n_dis = int(round(rng.integers(0, 2) * job.difficulty))
            rel = f"queries/{name}_{q + 1}.jpg"
            res = job.render(rng, h, w, [(*job.designs[k], spec)], n_dis, rel)
            queries.append(
                {"image": rel, "box": [round(v, 2) for v in res[0]["box"]], "object": name}
            )
            job.keep_masks(rel, [name], res)
    return queries


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
            (1.0 = the default ranges given in this module; 0 = almost clean).
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
    params = _checked_parameters(
        num_instances,
        queries_per_instance,
        num_db,
        short_side,
        seed,
        difficulty,
        instance_counts,
        distractors_per_image,
        num_distractor_designs,
    )
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "queries"), exist_ok=True)
    designs = [poster_texture(streams.rng(seed, streams.INSTANCE, k)) for k in range(num_instances)]
    pool = [
        poster_texture(streams.rng(seed, streams.DISTRACTOR, j))
        for j in range(num_distractor_designs)
    ]
    names = object_names(num_instances)
    job = _Job(root, seed, short_side, difficulty, names, designs, pool, return_masks)
    plan = plan_database(streams.rng(seed, streams.PLAN), num_db, num_instances, instance_counts)
    relevance = _write_database(job, plan, distractors_per_image)
    queries = _write_queries(job, queries_per_instance)
    hist = np.bincount([len(c) for c in plan], minlength=len(instance_counts))
    summary = {
        "objects": names,
        "num_db": num_db,
        "num_queries": len(queries),
        "positives": {n: len(relevance[n]["positives"]) for n in names},
        "junk": {n: len(relevance[n]["junk"]) for n in names},
        "db_instance_histogram": {str(n): int(c) for n, c in enumerate(hist)},
        "parameters": params,
    }
    _write_metadata(root, queries, relevance, summary)
    if return_masks:
        summary["masks"] = job.masks
        summary["hidden"] = job.hidden
    return summary


def _checked_parameters(
    num_instances: int,
    queries_per_instance: int,
    num_db: int,
    short_side: int,
    seed: int,
    difficulty: float,
    instance_counts: Sequence[float],
    distractors_per_image: Tuple[int, int],
    num_distractor_designs: int,
) -> dict:
    """The generator's parameters as meta.json records them, after checking them (a ValueError
    names the one at fault)."""
    if num_instances < 1 or queries_per_instance < 1 or num_db < 1:
        raise ValueError("num_instances, queries_per_instance and num_db must be >= 1")
    if difficulty < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    return {
        "num_instances": num_instances,
        "queries_per_instance": queries_per_instance,
        "num_db": num_db,
        "short_side": short_side,
        "seed": seed,
        "difficulty": difficulty,
        "instance_counts": [float(p) for p in instance_counts],
        "distractors_per_image": [int(v) for v in distractors_per_image],
        "num_distractor_designs": num_distractor_designs,
        "jpeg_quality": JPEG_QUALITY,
    }


def _write_metadata(root: str, queries: list, relevance: dict, summary: dict) -> None:
    """Writes queries.json, relevance.json, meta.json and README.txt under ``root``."""
    with open(os.path.join(root, "queries.json"), "w") as f:
        json.dump(queries, f, indent=1)
    with open(os.path.join(root, "relevance.json"), "w") as f:
        json.dump(relevance, f, indent=1, sort_keys=True)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write(_readme(summary))


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
