#!/usr/bin/env python
"""Derive database boxes of a custom-format collection by matching its reference images.

    python tools/annotate_boxes.py --data ROOT --output ROOT_boxes.json --sheet-dir sheets/ \
        [--trim-border] [--review review.json] [--min-inliers 15]

For every object of ``ROOT/queries.json`` (or ``queries.csv``) and every positive of it in
``ROOT/relevance.json``, the query image cropped to its box (the reference: a cover scan, a
catalogue photo, a logo) is matched against the photo with SIFT + ratio test + RANSAC homography
(``retrieval_ext/data/reference_boxes.py``); an accepted match gives the bounding box of the
projected reference box. Photos rejected by the first pass get a second one (photo upscaled 2x,
ratio test 0.05 looser, the same inlier threshold and geometric checks). Writes:

- ``--output``: a copy of relevance.json with ``boxes`` filled (every object gets a ``boxes``
  dict, empty when nothing was found; boxes already in the input are kept as they are);
- ``--report`` (default: ``--output`` with ``_report.json``): per photo the inliers, the status
  (accepted / accepted in the second pass / from the review file / none) and why;
- ``--sheet-dir``: contact sheets ``sheet_*.png`` (projected outline green when accepted, red
  when not, box yellow, inlier count, the reference beside each photo) and ``references_*.png``
  (query box green, box matched yellow), to be looked at before the boxes are trusted.

``--trim-border`` cuts uniform margins of ``--border-colour`` (white paper around a scan) from
the reference boxes. ``--review FILE`` applies manual corrections of reference and photo boxes,
each with a reason (format: ``retrieval_ext/data/box_annotation.py``). The input is never
overwritten unless ``--overwrite-input`` is given. To use the result, make it the collection's
relevance.json (a copy of the collection with links to its images will do).
"""

import argparse
import dataclasses
import json
import os
import sys
from collections import OrderedDict
from typing import List, Tuple

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from retrieval_ext.data.box_annotation import (  # noqa: E402
    STATUS_AUTO,
    STATUS_GIVEN,
    STATUS_NONE,
    STATUS_REVIEW,
    STATUS_REVIEW_NONE,
    STATUS_SECOND,
    References,
    annotate,
    annotated_relevance,
    apply_photo_review,
    load_collection,
    load_review,
    summarise,
)
from retrieval_ext.data.mapper import read_image  # noqa: E402
from retrieval_ext.data.reference_boxes import MatchParams  # noqa: E402
from retrieval_ext.utils.contact_sheet import Tile, contact_sheets  # noqa: E402
from retrieval_ext.utils.io import atomic_write_json  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="collection root (custom format)")
    parser.add_argument("--output", required=True, help="annotated relevance.json to write")
    parser.add_argument("--report", default=None, help="default: OUTPUT without .json + _report")
    parser.add_argument("--sheet-dir", default=None, help="write contact sheets (PNG) here")
    parser.add_argument("--per-sheet", type=int, default=12, help="photos per contact sheet")
    parser.add_argument("--thumb", type=int, default=300, help="photo size on the sheets, px")
    parser.add_argument("--min-inliers", type=int, default=MatchParams.min_inliers)
    parser.add_argument("--ratio", type=float, default=MatchParams.ratio, help="Lowe's ratio")
    parser.add_argument("--ransac-px", type=float, default=MatchParams.ransac_px)
    parser.add_argument(
        "--trim-border",
        action="store_true",
        help="shrink each reference box past margins of --border-colour (paper around a scan)",
    )
    parser.add_argument(
        "--border-colour", default="255,255,255", help="R,G,B of the margins --trim-border cuts"
    )
    parser.add_argument(
        "--no-second-pass",
        action="store_true",
        help="do not retry rejected photos upscaled 2x with a looser ratio test",
    )
    parser.add_argument("--review", default=None, help="JSON file of manual corrections")
    parser.add_argument(
        "--overwrite-input", action="store_true", help="allow --output to be ROOT/relevance.json"
    )
    return parser


def parse_colour(text: str) -> Tuple[int, int, int]:
    """``"R,G,B"`` (0-255 each) -> the BGR tuple images are read in."""
    try:
        r, g, b = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--border-colour must be R,G,B with three integers, got {text!r}")
    if not all(0 <= v <= 255 for v in (r, g, b)):
        raise ValueError(f"--border-colour values must lie in 0..255, got {text!r}")
    return b, g, r


def match_passes(args) -> List[Tuple[str, MatchParams, float]]:
    """``(status, params, photo upscale)`` tried in order until one accepts."""
    strict = MatchParams(ratio=args.ratio, ransac_px=args.ransac_px, min_inliers=args.min_inliers)
    passes = [(STATUS_AUTO, strict, 1.0)]
    if not args.no_second_pass:
        # more keypoints on small or blurred objects, more candidate matches; the same inlier
        # threshold and geometric checks keep it honest
        loose = dataclasses.replace(strict, ratio=min(0.9, args.ratio + 0.05))
        passes.append((STATUS_SECOND, loose, 2.0))
    return passes


def _caption(rec: dict) -> List[str]:
    name = rec["image"][len("images/") :] if rec["image"].startswith("images/") else rec["image"]
    first = f"{rec['object']}  {name}"
    inl = f"{rec.get('num_inliers', 0)} inl"
    ref = " (ref reviewed)" if "reference_review" in rec else ""
    second = {
        STATUS_AUTO: f"ok {inl}{ref}",
        STATUS_SECOND: f"ok (2nd pass) {inl}{ref}",
        STATUS_REVIEW: f"REVIEWED box ({inl})",
        STATUS_REVIEW_NONE: f"REVIEWED: no box ({inl})",
        STATUS_GIVEN: "box given in the input",
    }.get(rec["status"], f"NO BOX: {rec.get('reason', '')}")
    return [first[:44], second[:44]]


def _photo_tile(rec: dict, root: str, refs: References) -> Tile:
    ref = refs.find(rec.get("query"))
    box = rec.get("box") or (rec["boxes"][0] if rec.get("boxes") else None)
    quad = np.asarray(rec["quad"]) if "quad" in rec and rec["status"] != STATUS_REVIEW else None
    return Tile(
        image=read_image(os.path.join(root, rec["image"]), "BGR"),
        caption=_caption(rec),
        quad=quad,
        box=box,
        good=rec["status"] not in (STATUS_NONE, STATUS_REVIEW_NONE),
        inset=None if ref is None else ref["crop"],
    )


def _save_page(page: np.ndarray, path: str) -> str:
    if not cv2.imwrite(path, page):
        raise OSError(f"could not write the contact sheet {path}")
    return path


def _remove_stale(out_dir: str, prefix: str, keep: List[str]) -> None:
    """Removes this prefix's sheets of an earlier, longer run."""
    names = {os.path.basename(p) for p in keep}
    for name in os.listdir(out_dir):
        if name.startswith(prefix + "_") and name.endswith(".png") and name not in names:
            os.remove(os.path.join(out_dir, name))


def write_sheets(
    records: List[dict], root: str, refs: References, out_dir: str, per_sheet: int, side: int
) -> List[str]:
    """Contact sheets ``sheet_000.png``... of the photos; sets ``rec["sheet"]``.

    Returns:
        list[str]: the sheets written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for start in range(0, len(records), per_sheet):
        chunk = records[start : start + per_sheet]
        (page,) = contact_sheets([_photo_tile(r, root, refs) for r in chunk], per_sheet, side=side)
        paths.append(_save_page(page, os.path.join(out_dir, f"sheet_{len(paths):03d}.png")))
        for rec in chunk:
            rec["sheet"] = os.path.basename(paths[-1])
    _remove_stale(out_dir, "sheet", paths)
    return paths


def write_reference_sheets(refs: References, out_dir: str, per_sheet: int, side: int):
    """Sheets ``references_000.png``... : query box green, the box matched yellow."""
    tiles = []
    for ref in refs.all():
        x1, y1, x2, y2 = ref["query_box"]
        quad = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
        box = [round(v) for v in ref["box"]]
        note = " reviewed" if ref["review"] else ""
        caption = [f"{ref['object']}  {ref['image']}", f"box {box}{note}"]
        image = read_image(os.path.join(refs.root, ref["image"]), "BGR")
        tiles.append(Tile(image, caption, quad, box))
    paths = [
        _save_page(page, os.path.join(out_dir, f"references_{i:03d}.png"))
        for i, page in enumerate(contact_sheets(tiles, per_sheet, side=side))
    ]
    _remove_stale(out_dir, "references", paths)
    return paths


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    root = os.path.abspath(args.data)
    output = os.path.abspath(args.output)
    if output == os.path.join(root, "relevance.json") and not args.overwrite_input:
        raise SystemExit(
            f"--output {args.output} is the input relevance.json: pass --overwrite-input to "
            "replace it, or write elsewhere"
        )
    report_path = args.report or os.path.splitext(output)[0] + "_report.json"
    queries, relevance = load_collection(root)
    review = load_review(args.review) if args.review else None
    trim = parse_colour(args.border_colour) if args.trim_border else None
    refs = References(root, trim, review)
    refs.check_overrides(queries, args.review)
    passes = match_passes(args)
    records = annotate(root, queries, relevance, passes, refs)
    if review is not None:
        print(f"{apply_photo_review(review, root, records)} photo corrections from {args.review}")
    if args.sheet_dir:
        sheets = write_sheets(records, root, refs, args.sheet_dir, args.per_sheet, args.thumb)
        sheets += write_reference_sheets(refs, args.sheet_dir, args.per_sheet, args.thumb)
        print(f"{len(sheets)} contact sheets (sheet_*, references_*) in {args.sheet_dir}")
    summary = summarise(records)
    report = OrderedDict(
        data=root,
        output=output,
        passes=[OrderedDict(status=s, upscale=u, **dataclasses.asdict(p)) for s, p, u in passes],
        trim_border=args.border_colour if args.trim_border else None,
        review=os.path.abspath(args.review) if args.review else None,
        summary=summary,
        images=records,
    )
    json.dumps(report, allow_nan=False)  # refuses NaN / Infinity before anything is written
    atomic_write_json(output, annotated_relevance(relevance, records))
    atomic_write_json(report_path, report)
    print(f"annotated relevance: {output}\nreport: {report_path}")
    for status, count in summary["by_status"].items():
        print(f"  {status:<22} {count:>5}")
    print(f"  (with a reviewed reference box: {summary['reference_reviewed']})")
    return report


if __name__ == "__main__":
    main()
