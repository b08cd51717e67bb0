"""Finalizing an index: every rank's shards merged, in the database's order, into ``manifest.json``.

Runs once, after every writer has closed (:meth:`~.writer.IndexWriter.finalize`). The manifest
is what :class:`~.reader.IndexReader` opens; until it exists the index is not readable, so an
interrupted run is never mistaken for a complete one.
"""

import shutil
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ...utils.io import OutputWriteError, atomic_write
from .errors import IndexIncompleteError, IndexMismatchError, IndexWriteError
from .layout import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARDS_DIR,
    json_bytes,
    list_complete_shards,
    read_failed_logs,
    read_json,
    shard_key,
)
from .schema import IndexSchema

__all__ = ["checked_image_list", "write_manifest"]


def checked_image_list(image_list: Sequence[str]) -> List[str]:
    """The ids as str; refuses an empty list or duplicate ids (naming them)."""
    image_list = [str(i) for i in image_list]
    if not image_list:
        raise ValueError("image_list is empty")
    if len(set(image_list)) != len(image_list):
        seen, dups = set(), []
        for i in image_list:
            if i in seen:
                dups.append(i)
            seen.add(i)
        raise ValueError(f"image_list has duplicate ids: {dups[:10]}")
    return image_list


def _locate_stored(shards_dir: Path, dtype: str, schema: IndexSchema):
    """Where each stored image is, (shard name, row), the first shard in (rank, number) order
    winning for an image stored twice; and the trailing shape of every field."""
    location: Dict[str, Tuple[str, int]] = {}
    shapes: Dict[str, list] = {}
    for name in list_complete_shards(shards_dir):
        meta = read_json(shards_dir / name / "meta.json")
        if meta["dtype"] != dtype or meta["schema"] != schema.to_json():
            raise IndexMismatchError(f"shard {name} has another dtype/schema than the index")
        for f, shape in meta["shapes"].items():
            if shapes.setdefault(f, shape) != shape:
                raise IndexMismatchError(
                    f"shard {name}: field {f} has shape {shape}, other shards {shapes[f]}", [f]
                )
        for row, image_id in enumerate(read_json(shards_dir / name / "ids.json")):
            location.setdefault(image_id, (name, row))
    return location, shapes


def _atomic_write_json(path: Path, obj):
    """Write ``obj`` to ``path`` atomically (the old file is kept on error)."""
    data = json_bytes(obj)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    except OutputWriteError as e:
        cause = e.__cause__
        raise IndexWriteError(
            f"could not write {path}: {getattr(cause, 'strerror', None) or cause}"
        ) from e


def write_manifest(
    root: Path, manifest: dict, dtype: str, schema: IndexSchema, image_list: Sequence[str]
) -> dict:
    """Write ``root/manifest.json`` describing the whole index (every writer must be closed).

    See :meth:`~.writer.IndexWriter.finalize` for the arguments, the result and the errors.
    """
    image_list = checked_image_list(image_list)
    shards_dir = Path(root) / SHARDS_DIR
    location, shapes = _locate_stored(shards_dir, dtype, schema)
    failed_all = read_failed_logs(Path(root))
    missing = [i for i in image_list if i not in location and i not in failed_all]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise IndexIncompleteError(
            f"cannot finalize {root}: {len(missing)} of {len(image_list)} images are "
            f"neither stored nor marked failed: {shown}{more}",
            missing,
        )
    image_ids = [i for i in image_list if i in location]
    failed = {i: failed_all[i] for i in image_list if i not in location}
    used = sorted({location[i][0] for i in image_ids}, key=shard_key)
    shard_index = {name: k for k, name in enumerate(used)}
    locations = [[shard_index[location[i][0]], location[i][1]] for i in image_ids]
    out = {
        "format_version": FORMAT_VERSION,
        "manifest": manifest,
        "dtype": dtype,
        "schema": schema.to_json(),
        "feature_dims": shapes,
        "image_list": image_list,
        "image_ids": image_ids,
        "num_images": len(image_ids),
        "failed": failed,
        "num_failed": len(failed),
        "shards": used,
        "locations": locations,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write_json(Path(root) / MANIFEST_NAME, out)
    for p in shards_dir.iterdir():
        # every writer is closed now, so any temp shard left is garbage of a killed run
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
    return out
