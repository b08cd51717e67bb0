"""Helpers shared by the tests: tiny configs, models and checkpoints, synthetic inputs,
collections, benchmarks and indexes, planar scenes with a known homography, the tools run in a
subprocess, fixture paths, and the assertions and written-out references several tests use.

The fixtures built on them (a tiny ZF checkpoint, dataset registration, log capture) are in
tests/conftest.py.
"""

import errno
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from PIL import Image

import retrieval_ext  # noqa: F401  registers models and datasets
from retrieval_ext.config import add_retrieval_config
from retrieval_ext.data.datasets import register_custom_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
# Small real files (Oxford / Paris ground truth, 10 real Oxford photos): see fixtures/README.md.
FIXTURES = REPO_ROOT / "tests" / "fixtures"


ZF_TINY = str(CONFIGS / "quick_schedules" / "ZF-tiny.yaml")


def make_cfg(config_file=None, opts=(), freeze=True):
    """A retrieval_ext config as the tools build it: defaults, ``config_file`` (if any), then
    ``opts`` (KEY VALUE ...); frozen unless ``freeze`` is False."""
    cfg = get_cfg()
    add_retrieval_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg


def load_tool(name):
    """The module of script ``tools/<name>.py``, loaded from its file (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_tool", REPO_ROOT / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(args, env, cwd, timeout=600, check=True):
    """``python ARGS`` with this interpreter in a subprocess (in ``cwd``, with ``env``, output
    captured as text). With ``check``, asserts that it exited 0, showing the end of its stderr.
    Returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable] + [str(a) for a in args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_tool(name, args, env, cwd, timeout=600, check=True):
    """Script ``tools/<name>.py`` with ``args`` in a subprocess: :func:`run_python`."""
    return run_python([REPO_ROOT / "tools" / f"{name}.py"] + list(args), env, cwd, timeout, check)


def tiny_cfg(name="R50-C4", opts=()):
    """A frozen config from configs/quick_schedules/<name>-tiny.yaml plus ``opts``."""
    return make_cfg(CONFIGS / "quick_schedules" / f"{name}-tiny.yaml", opts)


def tame_rpn(model):
    """Zero the RPN's box-delta predictor so that proposals are anchors.

    With random backbone weights the activations are large and the predicted deltas throw every
    proposal outside the image; anchors give well-defined proposals to test pooling on. A model
    without an RPN (dense region proposals) is returned as it is.
    """
    head = getattr(model.proposal_generator, "rpn_head", None)
    if head is None:
        return model
    torch.nn.init.zeros_(head.anchor_deltas.weight)
    torch.nn.init.zeros_(head.anchor_deltas.bias)
    return model


def tiny_model(name="R50-C4", opts=(), seed=0):
    """An eval-mode model with random weights (seeded) and tamed RPN."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(name, opts))
    return tame_rpn(model).eval()


def save_checkpoint(model, path):
    """Saves ``model``'s weights as a checkpoint file that MODEL.WEIGHTS loads; returns the path
    (str)."""
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def make_extractor(zf, opts=(), model=None):
    """A FeatureExtractor on the ``zf`` fixture's weights (tests/conftest.py), with ZF-tiny plus
    ``opts``; its model is reused (or ``model``), not reloaded from the checkpoint."""
    from retrieval_ext.retrieval.extractor import FeatureExtractor

    cfg = tiny_cfg("ZF", list(zf["opts"]) + list(opts))
    return FeatureExtractor(cfg, model=model if model is not None else zf["model"])


def random_image(height, width, seed=0):
    """A ``(3, H, W)`` float tensor with 0..255 values, as detectron2 models take."""
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.integers(0, 256, (3, height, width)).astype(np.float32))


def pattern_image(h, w, seed):
    """A deterministic (h, w, 3) uint8 RGB picture with structure (gradients + blocks)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 64) * 4], -1
    ).astype(np.uint8)
    for _ in range(3):
        y0, x0 = rng.randint(0, max(h - 8, 1)), rng.randint(0, max(w - 8, 1))
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.randint(0, 256, 3)
    return img


def write_collection(root, db, queries, relevance=None):
    """Writes a custom-format collection (see datasets/README.md).

    Args:
        root: the folder.
        db: {relative path under root: RGB array, PIL image or raw bytes}.
        queries: [(relative path from root, box, object)]; the image must exist (write it
            through ``db``).
        relevance: optional relevance.json content.

    Returns:
        Path: root.
    """
    root = Path(root)
    for rel, content in db.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, Image.Image):
            content.save(path)
        else:
            Image.fromarray(content).save(path)
    entries = [{"image": im, "box": list(box), "object": obj} for im, box, obj in queries]
    (root / "queries.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    if relevance is not None:
        (root / "relevance.json").write_text(json.dumps(relevance), encoding="utf-8")
    return root


def write_benchmark(
    root, num_instances=2, queries_per_instance=2, num_db=6, short_side=96, seed=3, **kwargs
):
    """A tiny synthetic benchmark (custom format) under ``root``: by default 2 objects, 4 queries
    and 6 database images of 96 px, seconds to index with ZF-tiny on a CPU. Returns the
    generator's summary."""
    from retrieval_ext.data.datasets.synthetic import generate_synthetic_benchmark

    return generate_synthetic_benchmark(
        str(root),
        num_instances=num_instances,
        queries_per_instance=queries_per_instance,
        num_db=num_db,
        short_side=short_side,
        seed=seed,
        **kwargs,
    )


def register(registered, name, root):
    """Registers the custom collection at ``root`` as ``name``; the ``registered`` fixture
    (tests/conftest.py) unregisters it after the test."""
    register_custom_dataset(name, str(root))
    registered.append(name)
    return name


def assert_same_index(a, b, rtol=None, atol=0.0, region_atol=None):
    """Two indexes (IndexReader) hold the same images, in the same order, with the same failures,
    and the same stored arrays (per-image fields and every region array of every image): byte
    for byte, or within ``rtol`` / ``atol`` when ``rtol`` is given (indexes built in other
    processes or with other shard boundaries; ``region_atol``, default ``atol``, for the region
    arrays)."""
    assert a.image_ids == b.image_ids and len(set(a.image_ids)) == len(a.image_ids)
    assert a.failed == b.failed
    fields = [f.name for f in a.schema.image_fields]
    assert fields == [f.name for f in b.schema.image_fields]

    def same(x, y, what, tol):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        if rtol is None:
            assert x.tobytes() == y.tobytes(), what
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=tol, err_msg=str(what))

    for f in fields:
        same(a.image_vectors(f, dtype=None), b.image_vectors(f, dtype=None), f, atol)
    region_atol = atol if region_atol is None else region_atol
    for i in range(a.num_images):
        ra, rb = a.regions(i), b.regions(i)
        assert ra.keys() == rb.keys(), a.image_ids[i]
        for f in ra:
            same(ra[f], rb[f], (a.image_ids[i], f), region_atol)


def random_record(rng, num_proposals, dim=8):
    """An index record with every field of the default schema: random (uniform [0, 1)) IPA and
    RPA vectors of ``dim``, objectness and 3 class scores per proposal, a 10 x 10 image whose
    ``num_proposals`` proposals are all the box (0, 0, 5, 5)."""
    k = num_proposals
    return {
        "ipa_sum": rng.random(dim),
        "ipa_max": rng.random(dim),
        "height": 10,
        "width": 10,
        "boxes": np.tile([0, 0, 5, 5], (k, 1)),
        "objectness": rng.random(k),
        "rpa_sum": rng.random((k, dim)),
        "rpa_max": rng.random((k, dim)),
        "scores": rng.random((k, 3)),
    }


def write_index(root, records):
    """A finalized float32 index (default schema, shards of 4 images) in ``root`` of ``records``
    ({image id: record}, in index order); returns its IndexReader."""
    from retrieval_ext.retrieval.index_store import IndexReader, IndexWriter, default_schema

    with IndexWriter(root, {"t": 1}, 4, "float32", 0, default_schema()) as w:
        for image_id, rec in records.items():
            w.add(image_id, rec)
    IndexWriter(root, {"t": 1}, 4, "float32", 0, default_schema()).finalize(list(records))
    return IndexReader(root)


def enospc_on_replace(monkeypatch, predicate):
    """Makes ``os.replace(src, dst)`` fail with ENOSPC (disk full) when ``predicate(src, dst)``
    holds: the step where atomic writers move a finished file into place."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if predicate(str(src), str(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


EXIF_ORIENTATION = 0x0112


def png_bytes(img, **kw):
    """The PNG file of a PIL image (``kw``: PIL's save options, e.g. ``exif``)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(arr, quality=95):
    """The JPEG file of an RGB array."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rotated_with_exif(upright):
    """PNG whose stored pixels are ``upright`` turned 90 degrees counter-clockwise, with EXIF
    orientation 6 ("rotate 90 clockwise to display"): it displays as ``upright``."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return png_bytes(Image.fromarray(np.rot90(upright, k=1).copy()), exif=exif)


def broken_image_files():
    """{file name: bytes} of files no image reader can decode, as found in real collections."""
    good = jpeg_bytes(pattern_image(64, 64, 0))
    sof = good.find(b"\xff\xc0")
    corrupt = bytearray(good)
    corrupt[sof : sof + 12] = bytes(range(12))  # the frame header (size, components) destroyed
    return {
        "truncated.jpg": good[: len(good) // 3],  # header intact, scan data cut
        "corrupt.jpg": bytes(corrupt),
        "empty.jpg": b"",
        "page.jpg": b"<html><body>302 Found</body></html>",  # Paris 6k's corrupt files
    }


def written_out_ap(ranked_ids, positives, junk):
    """Oxford's compute_ap written out independently of retrieval_ext.evaluation.metrics: junk
    skipped, trapezoids with precision 1 at recall 0."""
    ranked = [r for r in ranked_ids if r not in junk]
    ap, old_recall, old_precision, hits = 0.0, 0.0, 1.0, 0
    for i, r in enumerate(ranked):
        if r in positives:
            hits += 1
        recall, precision = hits / len(positives), hits / (i + 1)
        if r in positives:
            ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
    return ap


def _refuse_constant(token):
    raise ValueError(f"{token} is not JSON")


def load_strict_json(path):
    """Parse a JSON file as a strict parser would: NaN, Infinity and -Infinity are refused."""
    return json.loads(Path(path).read_text(), parse_constant=_refuse_constant)


def written_out_iou(a, b):
    """IoU of two XYXY boxes, written out independently of retrieval_ext.evaluation.metrics;
    a box with a NaN coordinate (no box) gives 0."""
    if any(v != v for v in list(a) + list(b)):
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ca_sr_per_image(query_region, order, region_vectors, region_boxes, top_n):
    """CA-SR written out one image at a time, independently of retrieval_ext.retrieval.reranking
    (the per-image reference the benchmark once checked the vectorised version against).

    Cosines in float64; an image's best proposal is the first maximum; images without proposals
    (None or 0 rows) score -inf; the block is stably sorted by descending score.

    Args:
        query_region: (D,) query region vector (any scale).
        order: (L,) database indices from the filtering stage, best first.
        region_vectors, region_boxes: database index -> (K_i, D) vectors, (K_i, 4) boxes.
        top_n: images reranked.

    Returns:
        (order, scores, best_proposal, boxes) of the reranked block of ``min(top_n, L)`` images.
    """
    q = np.asarray(query_region, dtype=np.float64).ravel()
    q = q / np.linalg.norm(q)
    block = [int(i) for i in order[:top_n]]
    scores, best, boxes = [], [], []
    for i in block:
        v = region_vectors[i]
        if v is None or len(v) == 0:
            scores.append(-np.inf)
            best.append(-1)
            boxes.append([np.nan] * 4)
            continue
        v = np.asarray(v, dtype=np.float64)
        cos = (v @ q) / np.maximum(np.linalg.norm(v, axis=1), 1e-12)
        b = int(np.argmax(cos))
        scores.append(cos[b])
        best.append(b)
        boxes.append(np.asarray(region_boxes[i], dtype=np.float64)[b])
    perm = sorted(range(len(block)), key=lambda j: (-scores[j], j))
    return (
        np.array([block[j] for j in perm]),
        np.array([scores[j] for j in perm]),
        np.array([best[j] for j in perm]),
        np.array([boxes[j] for j in perm]),
    )


# -- planar scenes for the reference-box tests: a textured planar reference pasted into a
# cluttered photo by a known homography. Homographies are in the continuous pixel frame (pixel
# (i, j) covers [j, j+1] x [i, i+1]); warp_into converts to OpenCV's pixel-centre frame itself,
# so a test's expected box comes from the homography alone, by hand-written numpy.


def textured(height, width, seed, blobs=60):
    """(H, W, 3) uint8: random coloured ellipses and lines on a smooth random background."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(blobs):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(2, max(3, width // 8))), int(rng.integers(2, max(3, height // 8))))
        if rng.random() < 0.7:
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(image, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        else:
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, centre, end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    return image


def to_pixel_centre_frame(H):
    """The homography of OpenCV's pixel-centre frame equal to ``H`` of the continuous frame."""
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=np.float64)
    return np.linalg.inv(shift) @ H @ shift


def warp_into(reference, photo, H):
    """``photo`` with ``reference`` pasted by ``H`` (continuous frames, reference -> photo)."""
    h, w = photo.shape[:2]
    Hc = to_pixel_centre_frame(H)
    warped = cv2.warpPerspective(reference, Hc, (w, h), flags=cv2.INTER_LINEAR)
    # 4x supersampled coverage of each photo pixel by the warped reference rectangle
    mask = np.full((reference.shape[0] * 4, reference.shape[1] * 4), 255, dtype=np.uint8)
    up = np.diag([4.0, 4.0, 1.0])
    cover = cv2.warpPerspective(
        mask, to_pixel_centre_frame(up @ H @ np.linalg.inv(up)), (w * 4, h * 4)
    )
    alpha = cv2.resize(cover, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)[..., None]
    alpha /= 255.0
    return np.round(alpha * warped + (1 - alpha) * photo).astype(np.uint8)


def projected_box(H, width, height):
    """Bounding box of the reference rectangle [0, W] x [0, H] mapped by ``H``, by hand."""
    corners = []
    for x, y in ((0, 0), (width, 0), (width, height), (0, height)):
        u = H[0, 0] * x + H[0, 1] * y + H[0, 2]
        v = H[1, 0] * x + H[1, 1] * y + H[1, 2]
        s = H[2, 0] * x + H[2, 1] * y + H[2, 2]
        corners.append((u / s, v / s))
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return [min(xs), min(ys), max(xs), max(ys)], corners


# A rotation by about 20 degrees, a scale of 1.1, a translation and a mild perspective.
KNOWN_H = np.array(
    [[0.98, -0.36, 80.0], [0.40, 1.02, 40.0], [0.0004, 0.0002, 1.0]], dtype=np.float64
)
