"""Dataset mapper for retrieval datasets (database, query and fine-tuning dicts).

Training behaves like detectron2's ``DatasetMapper`` and also honours ``horizontal_flip=True``
(the flipped copies of the fine-tuning set). Inference reads the image (EXIF-oriented), crops
queries marked ``crop_query`` to their box, resizes, and returns the query box in original (or
crop) coordinates so that the model can map it to its feature map.
"""

import copy
import math
from typing import List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image

__all__ = ["RetrievalDatasetMapper", "UnreadableImageError", "crop_to_box"]


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
        return super().from_config(cfg, is_train)

    def _read(self, file_name: str) -> np.ndarray:
        try:
            return utils.read_image(file_name, format=self.image_format)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UnreadableImageError(file_name, f"{type(e).__name__}: {e}") from e

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: a db, query or fine-tuning dict (see retrieval_ext.data.datasets).

        Returns:
            dict: model input (see class docstring).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read(dataset_dict["file_name"])
        if self.is_train:
            utils.check_image_size(dataset_dict, image)

        query_box = dataset_dict.get("query_box")
        if query_box is not None:
            query_box = [float(v) for v in query_box]
        if not self.is_train and query_box is not None and dataset_dict.get("crop_query"):
            image, _ = crop_to_box(image, query_box)
            query_box = [0.0, 0.0, float(image.shape[1]), float(image.shape[0])]

        pre: List[T.Transform] = []
        if dataset_dict.get("horizontal_flip", False):
            flip = T.HFlipTransform(image.shape[1])
            image = flip.apply_image(image)
            pre.append(flip)
            if query_box is not None:
                query_box = flip.apply_box(np.array([query_box]))[0].tolist()

        orig_h, orig_w = image.shape[:2]
        aug_input = T.AugInput(image)
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
        return dataset_dict
