"""Dataset mapper for retrieval datasets (database, query and fine-tuning dicts).

Training behaves like detectron2's ``DatasetMapper`` and also honours ``horizontal_flip=True``
(the flipped copies of the fine-tuning set). Inference reads the image (EXIF-oriented), checks
the query box against it, crops queries marked ``crop_query`` to their box, resizes, and returns
the query box in original (or crop) coordinates so that the model can map it to its feature map.

Images are read by :func:`read_image`, for database images, queries and the Python API alike:

- the whole file is decoded at once, so a truncated or corrupt file, an empty file, a non-image
  with an image extension or a missing file raises :class:`UnreadableImageError`;
- the EXIF orientation is applied (``height``, ``width`` and boxes are in that oriented frame);
- transparency (RGBA, LA, palette with a transparent colour) is composited over white, the
  background viewers show, so hidden colour values under transparent pixels never matter;
- 16-bit grayscale ("I;16", "I") is scaled to 8 bits (value / 257) rather than clipped at 255;
- grayscale, CMYK, palette and bilevel images are converted by PIL to ``INPUT.FORMAT``.
"""

import copy
import io
import math
from typing import List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode, Instances
from detectron2.utils.file_io import PathManager
from PIL import Image

from .augment import ObjectPool, camera_augmentations
from .backgrounds import ImageBackgrounds, ProceduralBackgrounds
from .boxes import validate_box

__all__ = [
    "RetrievalDatasetMapper",
    "AUGMENT_KINDS",
    "UnreadableImageError",
    "camera_options_from_config",
    "crop_to_box",
    "finetune_augmentations",
    "placed_instances",
    "read_image",
    "read_image_bytes",
]

# PIL modes carrying transparency; composited over _BACKGROUND before any conversion.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_BACKGROUND = (255, 255, 255)
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (missing, corrupt, truncated, not an image).

    Attributes:
        file_name (str): the file.
        reason (str): what went wrong.
    """

    def __init__(self, file_name: str, reason: str = ""):
        self.file_name = file_name
        self.reason = reason
        super().__init__(f"Cannot read image {file_name}" + (f": {reason}" if reason else ""))

    def __reduce__(self):
        # keep both fields across pickling (DataLoader workers send exceptions between processes)
        return type(self), (self.file_name, self.reason)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    # 65535 -> 255 exactly; PIL's own convert("L") would clip every value above 255 to white
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def read_image(file_name: str, format: str = "BGR") -> np.ndarray:
    """Reads an image the way every part of retrieval_ext does (see the module docstring).

    Args:
        file_name: the image file (any name: spaces and non-ASCII characters are fine).
        format: ``INPUT.FORMAT``: "BGR", "RGB", or another PIL mode (as detectron2's
            ``read_image``).

    Returns:
        np.ndarray: (H, W, C) uint8 in ``format`` channel order, H x W in the EXIF-oriented frame.

    Raises:
        UnreadableImageError: the file is missing, empty, not an image, truncated or corrupt.
    """
    return _decode(file_name, None, format)


def read_image_bytes(
    data: bytes, name: str, format: str = "BGR", max_pixels: Optional[int] = None
) -> np.ndarray:
    """Like :func:`read_image` for an encoded image held in memory (an upload).

    Args:
        data: the encoded file's bytes.
        name: what error messages call it (e.g. the uploaded file's name).
        format: as :func:`read_image`.
        max_pixels: refuse images with more pixels than this before decoding them (None: PIL's
            own decompression-bomb limit only).

    Raises:
        UnreadableImageError: empty, not an image, truncated, corrupt or too large.
    """
    return _decode(name, data, format, max_pixels)


def _decode(name: str, data: Optional[bytes], format: str, max_pixels=None) -> np.ndarray:
    try:
        with PathManager.open(name, "rb") if data is None else io.BytesIO(data) as f:
            image = Image.open(f)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise UnreadableImageError(
                    name,
                    f"{image.width}x{image.height} pixels is more than the {max_pixels} allowed",
                )
            image.load()  # decode everything now: a truncated file fails here, not later
        image = utils._apply_exif_orientation(image)
        if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
            image = _flatten_alpha(image)
        elif image.mode in _16BIT_MODES:
            image = _to_8bit(image)
        array = utils.convert_PIL_to_numpy(image, format)
    except UnreadableImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(name, f"{type(e).__name__}: {e}") from e
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UnreadableImageError(name, f"empty image of shape {array.shape}")
    return array


def crop_to_box(image: np.ndarray, box) -> tuple:
    """Crops an image to the pixels a box touches.

    Args:
        image: HxWxC array.
        box: ``[x1, y1, x2, y2]`` XYXY_ABS, continuous pixel-edge coordinates of ``image``.

    Returns:
        (np.ndarray, (int, int)): the crop (floor of x1/y1 to ceil of x2/y2, clipped to the
        image, at least 1 pixel) and its top-left ``(x0, y0)`` in ``image``.
    """
    h, w = image.shape[:2]
    x0 = min(max(int(math.floor(box[0])), 0), w - 1)
    y0 = min(max(int(math.floor(box[1])), 0), h - 1)
    x1 = min(max(int(math.ceil(box[2])), x0 + 1), w)
    y1 = min(max(int(math.ceil(box[3])), y0 + 1), h)
    return image[y0:y1, x0:x1], (x0, y0)


AUGMENT_KINDS = ("none", "photometric", "strong", "camera")


def finetune_augmentations(kind: str, camera: Optional[dict] = None) -> List[T.Augmentation]:
    """The augmentations of ``MODEL.FINETUNE.AUGMENT`` (see config.py), applied first.

    Args:
        kind: one of :data:`AUGMENT_KINDS`.
        camera: for ``"camera"``, the keyword arguments of
            :func:`~retrieval_ext.data.augment.camera_augmentations` (``background`` required).
    """
    if kind == "none":
        return []
    photometric = [
        T.RandomBrightness(0.6, 1.4),
        T.RandomContrast(0.6, 1.4),
        T.RandomSaturation(0.6, 1.4),
    ]
    if kind == "photometric":
        return photometric
    if kind == "strong":
        return photometric + [
            T.RandomApply(T.RandomRotation([-30, 30], expand=True), prob=0.5),
            # a canvas up to twice the image's size around it: the object shrinks to half
            T.RandomApply(T.RandomExtent(scale_range=(1.0, 2.0), shift_range=(1.0, 1.0)), 0.5),
        ]
    if kind == "camera":
        if not camera or "background" not in camera:
            raise ValueError("MODEL.FINETUNE.AUGMENT 'camera' needs a background source")
        return camera_augmentations(**camera)
    raise ValueError(f"MODEL.FINETUNE.AUGMENT must be one of {AUGMENT_KINDS}, got {kind!r}")


def camera_options_from_config(cfg) -> dict:
    """``MODEL.FINETUNE.CAMERA_*`` as the arguments of ``camera_augmentations``.

    Raises:
        KeyError: a ``CAMERA_BACKGROUNDS`` name that is not a registered retrieval dataset.
    """
    ft = cfg.MODEL.FINETUNE
    if ft.CAMERA_BACKGROUNDS:
        files = []
        for name in ft.CAMERA_BACKGROUNDS:
            if f"{name}_db" not in DatasetCatalog:
                raise KeyError(
                    f"MODEL.FINETUNE.CAMERA_BACKGROUNDS: {name!r} is not a registered retrieval "
                    "dataset (built-in, or RETRIEVAL.CUSTOM_DATASETS)"
                )
            files += [d["file_name"] for d in DatasetCatalog.get(f"{name}_db")]
        background = ImageBackgrounds(files, cfg.INPUT.FORMAT)
    else:
        background = ProceduralBackgrounds()
    others = None
    if ft.CAMERA_OBJECTS > 0:
        others = ObjectPool(
            [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)], cfg.INPUT.FORMAT
        )
    return {
        "others": others,
        "max_others": int(ft.CAMERA_OBJECTS),
        "background": background,
        "scale": tuple(float(v) for v in ft.CAMERA_SCALE),
        "max_rotation": float(ft.CAMERA_ROTATION),
        "perspective": float(ft.CAMERA_PERSPECTIVE),
        "canvas_short_side": int(ft.CAMERA_CANVAS),
        "frame_prob": float(ft.CAMERA_FRAME),
        "max_occluders": int(ft.CAMERA_OCCLUDERS),
        "max_occlusion": float(ft.CAMERA_MAX_OCCLUSION),
    }


def placed_instances(transforms: T.TransformList, image_shape) -> Instances:
    """The other objects a camera view drew into its scene (``HomographyTransform.placed``),
    their boxes carried through the transforms that follow it, as ``gt_boxes`` /
    ``gt_classes`` in the final ``image_shape`` (H, W) frame; empty ones dropped."""
    boxes, classes = [], []
    steps = transforms.transforms
    for i, tfm in enumerate(steps):
        for box, category in getattr(tfm, "placed", ()):
            later = T.TransformList(steps[i + 1 :])
            boxes.append(later.apply_box(np.array([box], np.float64))[0])
            classes.append(category)
    annos = [
        {"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c} for b, c in zip(boxes, classes)
    ]
    return utils.filter_empty_instances(utils.annotations_to_instances(annos, image_shape))


class RetrievalDatasetMapper(DatasetMapper):
    """Maps retrieval dataset dicts to model inputs.

    Training (fine-tuning dicts): as ``DatasetMapper``; a dict with ``horizontal_flip=True`` has
    its image and boxes flipped (deterministically) before the augmentations.

    Inference (db / query dicts) returns::

        {"image": uint8 tensor (C, H', W') resized by ResizeShortestEdge(MIN_SIZE_TEST,
                  MAX_SIZE_TEST), "height": H, "width": W (EXIF-oriented, after the crop if
                  cropped), "file_name", "image_id", all other input keys, and, when the dict has
                  "query_box": "query_boxes": float32 tensor (1, 4) XYXY in the H x W frame
                  (the whole crop for crop_query dicts)}
    """

    @configurable
    def __init__(self, is_train: bool, **kwargs):
        """
        Args:
            is_train: training (fine-tuning) or inference.
            kwargs: as ``DatasetMapper`` (``augmentations``, ``image_format``, ...).
        """
        super().__init__(is_train, **kwargs)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        # the same arguments as DatasetMapper: augmentations from build_augmentation(cfg, ...)
        ret = super().from_config(cfg, is_train)
        if is_train:
            # a plain detectron2 config (no add_retrieval_config) has no FINETUNE node
            kind = cfg.MODEL.FINETUNE.AUGMENT if "FINETUNE" in cfg.MODEL else "none"
            camera = camera_options_from_config(cfg) if kind == "camera" else None
            extra = finetune_augmentations(kind, camera)
            ret["augmentations"] = extra + list(ret["augmentations"])
        return ret

    def _object_boxes(self, dataset_dict: dict, pre: List[T.Transform]) -> Optional[np.ndarray]:
        """Training: the annotated boxes (N, 4) XYXY after the transforms ``pre``; else None."""
        annotations = dataset_dict.get("annotations") if self.is_train else None
        if not annotations:
            return None
        boxes = np.array(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
            dtype=np.float64,
        )
        return T.TransformList(pre).apply_box(boxes) if pre else boxes

    def _read(self, file_name: str) -> np.ndarray:
        return read_image(file_name, format=self.image_format)

    def _checked_query(self, dataset_dict: dict, image: np.ndarray):
        """(image, query box or None): at inference the box is checked against the image and a
        ``crop_query`` dict's image is cropped to it (the box then is the whole crop)."""
        query_box = dataset_dict.get("query_box")
        if query_box is not None and not self.is_train:
            where = f"query {dataset_dict.get('image_id', '')!r} ({dataset_dict['file_name']})"
            query_box = validate_box(query_box, image.shape[:2], where)
        elif query_box is not None:
            query_box = [float(v) for v in query_box]
        if not self.is_train and query_box is not None and dataset_dict.get("crop_query"):
            image, _ = crop_to_box(image, query_box)
            query_box = [0.0, 0.0, float(image.shape[1]), float(image.shape[0])]
        return image, query_box

    def query_image(self, dataset_dict: dict):
        """A query dict's image and box as inference sees them before the resize.

        Returns:
            (image, box): the (H, W, C) uint8 array (EXIF-oriented, cropped to the box for
            ``crop_query`` dicts, flipped for ``horizontal_flip`` ones) and the box [x1, y1, x2,
            y2] in its pixels.

        Raises:
            UnreadableImageError: the image cannot be read.
            InvalidBoxError (a ValueError): the query box does not fit the image.
            KeyError: the dict has no ``query_box``.
        """
        if "query_box" not in dataset_dict:
            raise KeyError(f"{dataset_dict.get('file_name')}: not a query (no 'query_box')")
        image, box = self._checked_query(dataset_dict, self._read(dataset_dict["file_name"]))
        if dataset_dict.get("horizontal_flip", False):
            flip = T.HFlipTransform(image.shape[1])
            image = flip.apply_image(image)
            box = flip.apply_box(np.array([box]))[0].tolist()
        return image, [float(v) for v in box]

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: a db, query or fine-tuning dict (see retrieval_ext.data.datasets).

        Returns:
            dict: model input (see class docstring).

        Raises:
            UnreadableImageError: the image cannot be read.
            InvalidBoxError (a ValueError): at inference, the query box does not fit the image
                (see :mod:`retrieval_ext.data.boxes`; a box partly outside is clamped).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read(dataset_dict["file_name"])
        if self.is_train:
            utils.check_image_size(dataset_dict, image)
        image, query_box = self._checked_query(dataset_dict, image)

        pre: List[T.Transform] = []
        if dataset_dict.get("horizontal_flip", False):
            flip = T.HFlipTransform(image.shape[1])
            image = flip.apply_image(image)
            pre.append(flip)
            if query_box is not None:
                query_box = flip.apply_box(np.array([query_box]))[0].tolist()

        orig_h, orig_w = image.shape[:2]
        # camera-like augmentations place the object by its box, in the frame after the flip
        aug_input = T.AugInput(image, boxes=self._object_boxes(dataset_dict, pre))
        transforms = T.TransformList(pre) + self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict["height"], dataset_dict["width"] = orig_h, orig_w
            if query_box is not None:
                dataset_dict["query_boxes"] = torch.tensor([query_box], dtype=torch.float32)
            return dataset_dict

        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
            placed = placed_instances(transforms, image.shape[:2])
            if len(placed):
                dataset_dict["instances"] = Instances.cat([dataset_dict["instances"], placed])
        return dataset_dict
