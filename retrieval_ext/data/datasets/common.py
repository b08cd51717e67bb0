"""Shared helpers of the retrieval dataset loaders: registration, metadata, image checks.

Every retrieval dataset ``NAME`` is registered as three views in ``DatasetCatalog``:

- ``NAME_db``: the database, ``{"file_name", "image_id", "db_index"}`` dicts in a fixed order.
- ``NAME_query``: the queries, ``{"file_name", "image_id", "query_index", "query_box",
  "category_id", "object_name"}`` dicts; ``query_box`` is XYXY_ABS in original image pixels.
- ``NAME_finetune``: detectron2 detection dicts made from the query boxes (one plain and one
  ``horizontal_flip=True`` copy per query), for class-specific fine-tuning.

A loader ``loader_fn(root) -> RetrievalData`` computes all three views and the metadata at once;
:func:`register_retrieval_dataset` registers the views lazily (nothing is read until a view is
requested) and sets the computed metadata (ground truth, class names) on all three names the first
time any view is loaded. Use :func:`.catalog.get_retrieval_metadata` to get metadata that is
guaranteed to hold the ground truth.
"""

import contextvars
import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image, UnidentifiedImageError

from ..boxes import as_box

__all__ = [
    "IMAGE_EXTENSIONS",
    "RetrievalData",
    "VIEWS",
    "check_images",
    "clear_retrieval_cache",
    "expected_layout",
    "get_datasets_root",
    "image_size",
    "index_images",
    "make_finetune_dicts",
    "parse_box",
    "register_retrieval_dataset",
    "registered_retrieval_datasets",
    "require_dir",
    "require_file",
    "unregister_retrieval_dataset",
]

logger = logging.getLogger(__name__)

# Suffixes of the three registered views of a retrieval dataset.
VIEWS = ("db", "query", "finetune")
# Database image extensions, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
README_HINT = "see datasets/README.md for the expected layout under $DETECTRON2_DATASETS"
_EXIF_ORIENTATION = 0x0112
# EXIF orientations that transpose the stored pixel grid, so height and width swap once applied.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class RetrievalData:
    """Everything a retrieval loader returns.

    Attributes:
        db (list[dict]): database dicts (see module docstring), ``db_index`` = position in list.
        query (list[dict]): query dicts, ``query_index`` = position in list.
        finetune (list[dict]): detectron2 detection dicts built from the query boxes.
        metadata (dict): computed metadata, e.g. ``protocol``, ``thing_classes``, ``gnd``.
    """

    db: List[dict]
    query: List[dict]
    finetune: List[dict]
    metadata: Dict = field(default_factory=dict)


def get_datasets_root() -> str:
    """Returns the datasets root: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def require_dir(path: str, what: str) -> str:
    """Returns ``abspath(path)``; raises a FileNotFoundError naming it if it is not a folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {os.path.abspath(path)} ({README_HINT})")
    return os.path.abspath(path)


def require_file(path: str, what: str) -> str:
    """Returns ``abspath(path)``; raises a FileNotFoundError naming it if it is not a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {os.path.abspath(path)} ({README_HINT})")
    return os.path.abspath(path)


def read_json(path: str, kind: type, expected: str):
    """The content of the JSON file ``path``, which must be a ``kind`` (``dict`` or ``list``).

    Raises:
        ValueError: the file is not valid JSON, or holds something else than a ``kind``
            (``expected`` says what it should hold); the message names the file.
    """
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected {expected}")
    return data


def index_images(
    folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, key: str = "stem"
) -> Dict[str, str]:
    """Finds every image below ``folder`` (any depth).

    Args:
        folder: the folder to scan; it must exist.
        extensions: accepted extensions (lower case, with dot), compared case-insensitively.
        key: "stem" (file name without extension, which must then be unique: Oxford/Paris
            names are) or "relpath" (posix path relative to ``folder``, with extension).

    Returns:
        dict: key -> absolute path, in sorted key order.
    """
    folder = os.path.abspath(folder)
    found: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for fn in filenames:
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in extensions:
                continue
            path = os.path.join(dirpath, fn)
            k = stem if key == "stem" else os.path.relpath(path, folder).replace(os.sep, "/")
            if k in found:
                raise ValueError(
                    f"Two images under {folder} have the same name {k!r}: {found[k]} and {path}"
                )
            found[k] = path
    return {k: found[k] for k in sorted(found)}


def _readable(path: str) -> Optional[str]:
    """Returns None if PIL can parse the image header of ``path``, else the reason it cannot.

    Only the header is parsed (no pixel decoding), so this costs one small read per file. It
    catches empty files, missing files and non-images (the 20 corrupt Paris 6k files are HTML
    pages); an image truncated after its header passes and is reported by the mapper instead.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
        if w <= 0 or h <= 0:
            return f"empty image {w}x{h}"
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_images(
    dataset: str, names: Sequence[str], paths: Sequence[Optional[str]], header: bool = True
) -> List[int]:
    """Keeps the database images that exist and are readable; warns ONCE about the others.

    Args:
        dataset: dataset name, for the warning.
        names: image ids, parallel to ``paths``.
        paths: image paths; None means "not found on disk".
        header: also parse each image header with PIL (cheap: no decoding).

    Returns:
        list[int]: positions (into ``names``) of the images kept, in order. The skipped ones are
        also recorded, with their reasons, in the loaded dataset's ``skipped_images`` metadata
        (see :func:`register_retrieval_dataset`), so the index manifest can list them.
    """
    kept, skipped = [], []
    for i, (name, path) in enumerate(zip(names, paths)):
        reason = "missing" if path is None else (_readable(path) if header else None)
        if reason is None:
            kept.append(i)
        else:
            skipped.append((name, reason))
    if skipped:
        logger.warning(
            f"{dataset}: skipped {len(skipped)} of {len(names)} database images that are missing "
            f"or unreadable: " + ", ".join(f"{n} ({r})" for n, r in skipped)
        )
    collector = _SKIPPED.get()
    if collector is not None:
        collector.update(skipped)
    return kept


def image_size(path: str) -> Tuple[int, int]:
    """Height and width of an image as it is used (after its EXIF orientation), from the header.

    Args:
        path: image file.

    Returns:
        (int, int): ``(height, width)`` in the EXIF-oriented frame, the frame in which
        ``detection_utils.read_image`` returns pixels.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Image not found: {path}; its size is needed for the fine-tuning dicts ({README_HINT})"
        )
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # malformed EXIF: read_image ignores it too
                orientation = None
    except (OSError, ValueError, SyntaxError) as e:
        raise OSError(f"Cannot read the image header of {path}: {e}") from e
    if orientation in _TRANSPOSING_ORIENTATIONS:
        w, h = h, w
    return h, w


def parse_box(values, where: str) -> List[float]:
    """Checks an XYXY box: 4 finite numbers with x2 > x1 and y2 > y1.

    The image is not read here; the mapper checks the box against the image's size when the query
    is extracted (see :mod:`retrieval_ext.data.boxes`).

    Args:
        values: a sequence of 4 numbers (or strings of numbers).
        where: a description of the source (file and line/entry) for the error message.

    Returns:
        list[float]: ``[x1, y1, x2, y2]``.

    Raises:
        InvalidBoxError (a ValueError): naming ``where`` and the box.
    """
    return as_box(values, where)


def make_finetune_dicts(queries: Sequence[dict]) -> List[dict]:
    """Detection dicts for fine-tuning on the query objects: each query twice, plain and flipped.

    Args:
        queries: query dicts with ``file_name``, ``image_id``, ``query_box`` (XYXY_ABS, original
            image pixels) and ``category_id``.

    Returns:
        list[dict]: ``2 * len(queries)`` detectron2 dicts. The flipped copy has
        ``horizontal_flip=True`` and the SAME (unflipped) box; the mapper flips image and box.
        ``height``/``width`` are read from the image headers (EXIF-oriented).
    """
    sizes: Dict[str, Tuple[int, int]] = {}
    out = []
    for q in queries:
        if q["file_name"] not in sizes:
            sizes[q["file_name"]] = image_size(q["file_name"])
        h, w = sizes[q["file_name"]]
        for flip in (False, True):
            out.append(
                {
                    "file_name": q["file_name"],
                    "image_id": q["image_id"] + ("_hflip" if flip else ""),
                    "height": h,
                    "width": w,
                    "annotations": [
                        {
                            "bbox": [float(v) for v in q["query_box"]],
                            "bbox_mode": BoxMode.XYXY_ABS,
                            "category_id": int(q["category_id"]),
                        }
                    ],
                    "horizontal_flip": flip,
                }
            )
    return out


def remap_names(names: Iterable[str], name_to_index: Dict[str, int]) -> List[int]:
    """Sorted db indices of ``names``; names absent from the db (skipped images) are dropped."""
    return sorted({name_to_index[n] for n in names if n in name_to_index})


# ------------------------------------------------------------------------------ registration
# name -> (loader_fn, root); the cache holds the loaded data of registered names only.
_REGISTRY: Dict[str, Tuple[Callable[[str], RetrievalData], str]] = {}
_CACHE: Dict[str, RetrievalData] = {}
# While a loader runs, {name: reason} of the database images check_images leaves out.
_SKIPPED: contextvars.ContextVar = contextvars.ContextVar("retrieval_skipped", default=None)

# Expected on-disk layouts (datasets/README.md, abridged) quoted when a dataset's files are missing.
_LAYOUTS = {
    "oxford5k": (
        "oxford5k/\n"
        "  jpg/all_souls_000000.jpg ...        the 5,063 images (subfolders accepted)\n"
        "  gnd_oxford5k.pkl                    and/or\n"
        "  gt_files_170407/<landmark>_<n>_{{query,good,ok,junk}}.txt"
    ),
    "paris6k": (
        "paris6k/\n"
        "  jpg/<landmark>/paris_<landmark>_NNNNNN.jpg ...   the 6,412 files (or flat)\n"
        "  gnd_paris6k.pkl                                  and/or\n"
        "  paris_120310/<landmark>_<n>_{{query,good,ok,junk}}.txt"
    ),
    "revisited": (
        "{base}/\n"
        "  gnd_{base}.pkl        imlist, qimlist, gnd[i] = {{bbx, easy, hard, junk}}\n"
        "  jpg/                  optional: else ../oxford5k/jpg or ../paris6k/jpg\n"
        "revisitop1m/            only for the _1m variants\n"
        "  revisitop1m.txt, jpg/..."
    ),
    "ins": (
        "ins13/\n"
        "  tv13.example.images/<topic>.<n>.src.png and <topic>.<n>.mask.png\n"
        "  keyframes/**/shotA_B_*.jpg\n"
        "  ins.search.qrels.tv13"
    ),
    "custom": (
        "{folder}/\n"
        "  images/...        database images (.jpg .jpeg .png .bmp .webp, any depth)\n"
        '  queries.json      [{{"image": "queries/q.jpg", "box": [x1, y1, x2, y2], '
        '"object": "name"}}] (or queries.csv)\n'
        "  relevance.json    optional judgements"
    ),
}


def expected_layout(name: str, root: str, protocol: Optional[str] = None) -> str:
    """The on-disk layout a retrieval dataset needs, as quoted in missing-file errors.

    Args:
        name: dataset name (``oxford5k``, ``roxford5k_1m``, a custom name, ...).
        root: the dataset's folder.
        protocol: its protocol (``oxford``, ``revisited``, ``ins``, ``custom``), if known.

    Returns:
        str: a few lines of layout, or "" for an unknown kind of dataset.
    """
    base = re.sub(r"_1m$", "", name)
    template = _LAYOUTS.get(name) or _LAYOUTS.get(protocol or "")
    if template is None:
        return ""
    return template.format(base=base, folder=os.path.basename(os.path.normpath(root)) or root)


def _static_metadata(name: str, root: str) -> dict:
    return {
        "evaluator_type": "retrieval",
        "db_dataset": f"{name}_db",
        "query_dataset": f"{name}_query",
        "finetune_dataset": f"{name}_finetune",
        "dataset_root": os.path.abspath(root),
    }


def _set_metadata(view_name: str, values: dict) -> None:
    """Sets ``values`` on a view's metadata, replacing (not asserting on) values that changed.

    ``Metadata.set`` refuses to change a value; data reloaded after the files changed on disk
    legitimately changes it, so the entry is rebuilt instead.
    """
    meta = MetadataCatalog.get(view_name)
    missing = object()
    if all(getattr(meta, k, missing) == v for k, v in values.items()):
        return
    old = meta.as_dict()
    old.pop("name", None)
    old.update(values)
    MetadataCatalog.remove(view_name)
    MetadataCatalog.get(view_name).set(**old)


def _load(name: str) -> RetrievalData:
    if name not in _CACHE:
        loader_fn, root = _REGISTRY[name]
        skipped: Dict[str, str] = {}
        token = _SKIPPED.set(skipped)
        try:
            data = loader_fn(root)
        except FileNotFoundError as e:
            protocol = getattr(MetadataCatalog.get(f"{name}_db"), "protocol", None)
            layout = expected_layout(name, root, protocol)
            if not layout:
                raise
            where = os.path.dirname(os.path.abspath(root))
            raise FileNotFoundError(
                f"{e}\nExpected layout of dataset {name!r} under {where}:\n{layout}"
            ) from e
        finally:
            _SKIPPED.reset(token)
        if not isinstance(data, RetrievalData):
            data = RetrievalData(**data)
        if skipped:
            data.metadata = dict(data.metadata, skipped_images=skipped)
        for view in VIEWS:
            _set_metadata(f"{name}_{view}", dict(data.metadata))
        _CACHE[name] = data
    return _CACHE[name]


def _get_view(name: str, view: str) -> List[dict]:
    data = _load(name)
    if view == "db":
        # db dicts only hold immutable values; a shallow copy per dict is enough and cheap for 1M
        return [dict(d) for d in data.db]
    return copy.deepcopy(getattr(data, view))


def register_retrieval_dataset(
    name: str, loader_fn: Callable[[str], RetrievalData], root: str, **metadata
) -> None:
    """Registers ``NAME_db``, ``NAME_query`` and ``NAME_finetune`` lazily.

    Any previous registration of these names (and its metadata) is replaced.

    Args:
        name: dataset name, lower snake case.
        loader_fn: ``loader_fn(root)`` returning a :class:`RetrievalData` (or a dict with its
            fields); called at most once per registration, the first time a view is requested.
        root: the dataset's folder, passed to ``loader_fn``; not accessed here.
        metadata: extra static metadata set now on the three names (e.g. ``protocol``).

    Once loaded, the metadata also holds ``skipped_images`` ({image name: reason}) when the
    loader's :func:`check_images` left out missing or unreadable database images.
    """
    unregister_retrieval_dataset(name)
    _REGISTRY[name] = (loader_fn, root)
    static = _static_metadata(name, root)
    static.update(metadata)
    for view in VIEWS:
        DatasetCatalog.register(f"{name}_{view}", lambda n=name, v=view: _get_view(n, v))
        MetadataCatalog.get(f"{name}_{view}").set(**static)


def unregister_retrieval_dataset(name: str) -> None:
    """Removes the three views of ``name`` and their metadata (no-op for unknown names)."""
    _REGISTRY.pop(name, None)
    _CACHE.pop(name, None)
    for view in VIEWS:
        n = f"{name}_{view}"
        if n in DatasetCatalog:
            DatasetCatalog.remove(n)
        if n in MetadataCatalog:
            MetadataCatalog.remove(n)


def clear_retrieval_cache(name: Optional[str] = None) -> None:
    """Forgets loaded data (of ``name``, or of all datasets) so the next access re-reads disk."""
    if name is None:
        _CACHE.clear()
    else:
        _CACHE.pop(name, None)


def registered_retrieval_datasets() -> List[str]:
    """Names of the registered retrieval datasets (each has ``_db``, ``_query``, ``_finetune``)."""
    names = set(_REGISTRY)
    names.update(n[: -len("_query")] for n in DatasetCatalog.list() if n.endswith("_query"))
    return sorted(n for n in names if all(f"{n}_{v}" in DatasetCatalog for v in ("db", "query")))
