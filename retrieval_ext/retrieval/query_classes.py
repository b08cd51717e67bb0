"""Class scores from the query set: the CS-SR classifier of RETRIEVAL.CS_SR_CLASSIFIER "queries".

Each query object is a class whose weight is the mean of its queries' region vectors (weight
imprinting: the classifier a fine-tuned box head would learn, taken from the query examples
themselves, so it needs no training); a region's class probabilities are a softmax over its
cosines to every class at a temperature, with a background logit at a fixed cosine. A region
therefore scores high for the query's class only when it matches that object better than every
other query object and better than the background level: images that merely look like the
query (the same kind of object, a similar colour layout) lose to the object itself.

The functions here are pure; :class:`~.search.IndexSearcher` applies them to the stored region
vectors of the images it reranks.
"""

import functools
from typing import Callable, Optional, Sequence

import numpy as np

from .normalization import l2_normalize

__all__ = ["QueryClassifier", "class_prototypes", "query_class_probabilities"]

# Images whose probabilities a classifier keeps (about 100 KB each with 100 query objects and
# 262 proposals): the N images a query reranks, reused by the next queries.
_CACHE_IMAGES = 512


def class_prototypes(region_vectors, class_ids: Sequence[int], num_classes: int) -> np.ndarray:
    """The weight of each class: the L2-normalised mean of its queries' L2-normalised region
    vectors.

    Args:
        region_vectors: (Q, D) the queries' region vectors (as CA-SR compares them).
        class_ids: (Q,) each query's class, 0 <= id < ``num_classes``.
        num_classes: number of classes C.

    Returns:
        float32 (C, D).

    Raises:
        ValueError: a class id is out of range, or a class has no query.
    """
    v = l2_normalize(np.asarray(region_vectors, dtype=np.float32))
    ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if v.ndim != 2 or v.shape[0] != ids.size:
        raise ValueError(f"{ids.size} class ids for region vectors of shape {v.shape}")
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
        raise ValueError(f"class id {int(bad[0])} is not one of the {num_classes} classes")
    sums = np.zeros((num_classes, v.shape[1]), dtype=np.float64)
    np.add.at(sums, ids, v)
    empty = np.flatnonzero(np.bincount(ids, minlength=num_classes) == 0)
    if empty.size:
        raise ValueError(f"class {int(empty[0])} has no query to take its weight from")
    return l2_normalize(sums.astype(np.float32))


def query_class_probabilities(cosines, temperature: float, background: float) -> np.ndarray:
    """Softmax class probabilities of regions from their cosines to the class weights.

    ``p_c = exp(t cos_c) / (exp(t background) + sum_k exp(t cos_k))``.

    Args:
        cosines: (K, C) cosine of each region with each class weight.
        temperature: t > 0 (the classifier's scale).
        background: the background logit, as a cosine.

    Returns:
        float32 (K, C + 1) probabilities, background last (detectron2's convention); each row
        sums to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    c = np.asarray(cosines, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"cosines must be 2-D (regions, classes), got shape {c.shape}")
    logits = np.concatenate([c, np.full((c.shape[0], 1), background, np.float32)], axis=1)
    logits *= np.float32(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return p


class QueryClassifier:
    """The class probabilities of stored proposals under the query-set classifier.

    Args:
        weights: (C, D) class weights (:func:`class_prototypes`).
        temperature, background: see :func:`query_class_probabilities`.
        region_vectors: database index -> the image's stored region rows (K_i, D').
        decode: stored rows -> float vectors in the weights' space (product-quantised codes);
            None: the rows are vectors.
    """

    def __init__(
        self,
        weights: np.ndarray,
        temperature: float,
        background: float,
        region_vectors: Callable[[int], np.ndarray],
        decode: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ):
        self.weights = np.asarray(weights, dtype=np.float32)
        self.temperature, self.background = float(temperature), float(background)
        self._rows, self._decode = region_vectors, decode
        # an image's probabilities do not depend on the query: computed once per image
        self.scores = functools.lru_cache(maxsize=_CACHE_IMAGES)(self._scores)

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    def _scores(self, i: int) -> np.ndarray:
        """(K_i, C + 1) probabilities of image ``i``'s proposals, background last."""
        rows = np.asarray(self._rows(int(i)))
        if self._decode is not None:
            rows = self._decode(rows)
        cosines = l2_normalize(rows.astype(np.float32)) @ self.weights.T
        return query_class_probabilities(cosines, self.temperature, self.background)
