"""Transforms learned on a dataset's index: PCA whitening, region PCA, region whitening, PQ.

The paper learns its whitening on Paris for Oxford and vice versa, so that nothing is learned
from the test set. :func:`load_or_learn` is that procedure once, for any transform: index the
other dataset (once, under the work dir), learn the transform on its index on the main process,
save it keyed by the model's weights hash, and load it on every rank. The whitening and the
region PCA and the region product quantiser are its users.
"""

import logging
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np
from detectron2.utils import comm

from ..utils.io import atomic_write
from .compression import RegionCompression
from .extractor import FeatureExtractor
from .index_store import IndexReader
from .indexing import build_index
from .normalization import PCAWhitening, l2_normalize, learn_pca_whitening, learn_region_whitening

__all__ = [
    "load_or_learn_region_whitening",
    "load_or_learn",
    "load_or_learn_region_pca",
    "load_or_learn_region_pq",
    "load_or_learn_whitening",
    "region_whitening_of",
]

logger = logging.getLogger("retrieval_ext")
T = TypeVar("T")


def load_or_learn(
    extractor: FeatureExtractor,
    dataset: str,
    work_dir: str,
    kind: str,
    variant: str,
    learn: Callable[[IndexReader], T],
    load: Callable[[Path], T],
    sample_images: int = 0,
    **index_kwargs,
) -> T:
    """A transform learned on ``dataset``'s database features, saved and reused.

    Saved as ``work_dir/<kind>-<dataset>-<weights hash>-<variant>.npz``: another model gets
    another file, and so does anything else the transform depends on (``variant``). Must run on
    every rank (indexing is shared between ranks).

    Args:
        extractor: the model whose features the transform applies to.
        dataset: the dataset learned on; its database is indexed (once) into
            ``work_dir/index-<dataset>`` (``index-<dataset>-sample<n>`` with ``sample_images``).
        work_dir: where the file and that index live.
        kind: what is learned, e.g. ``"whitening"``.
        variant: the transform's settings, e.g. ``"d128"``.
        learn: the index -> the transform (an object with ``save(path)``); main process only.
        load: a saved file -> the transform.
        sample_images: > 0: index and learn on that many of the dataset's images only, evenly
            spread over it (see :func:`~.indexing.build_index`).
        index_kwargs: :func:`~.indexing.build_index`'s options (e.g. ``show_progress=False``), or
            ``cfg=cfg`` to take them from ``cfg.RETRIEVAL``.

    Returns:
        the transform, loaded from its file on every rank.

    Raises:
        OutputWriteError (an OSError): the file cannot be written.
    """
    key = extractor.fingerprint["weights_hash"]
    path = Path(work_dir) / f"{kind}-{dataset}-{key}-{variant}.npz"
    if not path.is_file():
        folder = f"index-{dataset}" + (f"-sample{sample_images}" if sample_images else "")
        index = build_index(
            extractor=extractor,
            dataset=dataset,
            index_dir=str(Path(work_dir) / folder),
            sample_images=sample_images,
            **index_kwargs,
        )
        if comm.is_main_process():
            atomic_write(path, learn(index).save)
        comm.synchronize()
    return load(path)


def load_or_learn_whitening(
    extractor: FeatureExtractor,
    whitening_dataset: str,
    test_dataset: str,
    work_dir: str,
    dim: int = 0,
    **index_kwargs,
) -> Optional[PCAWhitening]:
    """PCA whitening learned on another dataset's database IPA-sum vectors (saved, reused).

    Learning on the test dataset itself is allowed but warned about: it leaks.

    Args:
        dim: dimensions kept; 0 = all.
        index_kwargs: see :func:`load_or_learn`.

    Returns:
        None when ``whitening_dataset`` is empty.

    Raises:
        ValueError: the whitening dataset has fewer than 2 readable images.
        OutputWriteError (an OSError): the whitening file cannot be written.
    """
    if not whitening_dataset:
        return None
    if whitening_dataset == test_dataset:
        logger.warning(
            f"whitening is learned on {whitening_dataset!r}, the dataset being evaluated: "
            "it leaks ground truth (the test images' statistics) into the results; the paper "
            "learns it on another dataset, e.g. Paris 6k for Oxford 5k "
            "(RETRIEVAL.WHITENING_DATASET)"
        )

    def learn(index: IndexReader) -> PCAWhitening:
        X = l2_normalize(index.image_vectors("ipa_sum"))
        try:
            w = learn_pca_whitening(X, dim=dim or None)
        except ValueError as e:
            raise ValueError(
                f"cannot learn the whitening on {whitening_dataset!r} ({index.num_images} "
                f"readable images): {e}"
            ) from e
        logger.info(f"learned PCA whitening on {index.num_images} images of {whitening_dataset}")
        return w

    return load_or_learn(
        extractor,
        whitening_dataset,
        work_dir,
        "whitening",
        f"d{dim}",
        learn,
        PCAWhitening.load,
        **index_kwargs,
    )


def load_or_learn_region_pca(
    extractor: FeatureExtractor,
    dataset: str,
    work_dir: str,
    dim: int,
    num_proposals: int = 0,
    dtype: str = "float16",
    **index_kwargs,
) -> RegionCompression:
    """A region compression whose PCA is learned on ``dataset``'s database region vectors
    (the stored poolings, ``rpa_sum`` and / or ``rpa_max``, together), saved and reused.

    Args:
        dim: PCA dimensions.
        num_proposals, dtype: the rest of the compression (see :class:`RegionCompression`).
        index_kwargs: see :func:`load_or_learn`.
    """

    def learn(index: IndexReader) -> RegionCompression:
        learned = RegionCompression.learn(_region_vectors(index), num_proposals, dim, dtype)
        logger.info(f"learned the region PCA ({dim} dims) on {dataset}")
        return learned

    learned = load_or_learn(
        extractor,
        dataset,
        work_dir,
        "region-pca",
        f"d{dim}",
        learn,
        RegionCompression.load,
        **index_kwargs,
    )
    return RegionCompression(
        num_proposals, dim, dtype, mean=learned.mean, components=learned.components
    )


def _region_vectors(index: IndexReader) -> np.ndarray:
    """Every stored region vector of ``index`` (the stored poolings together), float32."""
    stored = [f for f in ("rpa_sum", "rpa_max") if f in index.schema]
    return np.concatenate(
        [
            np.asarray(index.regions(i)[f], dtype=np.float32)
            for i in range(index.num_images)
            for f in stored
        ]
    )


# at most about this many region vectors learn the region whitening, which bounds its memory on
# a large whitening dataset
REGION_WHITENING_MAX_VECTORS = 65536


def load_or_learn_region_whitening(
    extractor: FeatureExtractor,
    dataset: str,
    work_dir: str,
    pooling: str = "max",
    dim: int = 0,
    eps: float = 1e-6,
    sample_images: int = 0,
    min_vectors: int = 0,
    **index_kwargs,
) -> Optional[PCAWhitening]:
    """PCA whitening of region vectors (:func:`~.normalization.learn_region_whitening`), learned
    on ``dataset``'s database ``rpa_<pooling>`` vectors, saved and reused; applied by the region
    compression as L2 -> whiten -> L2, to the stored vectors and the query's.

    Args:
        dataset: the collection itself, on a sample of ``sample_images`` images (the sample its
            product quantiser is learned on), or another dataset (0 = all of its images).
        pooling: "max" or "sum": the region vectors searched (``RERANK_POOLING``).
        dim, eps: see :func:`~.normalization.learn_region_whitening`.
        min_vectors: fewer region vectors than this learn nothing: None (a warning says so).
        index_kwargs: see :func:`load_or_learn`.

    Raises:
        ValueError: the index of ``dataset`` stores no ``rpa_<pooling>``.
    """
    field = f"rpa_{pooling}"

    def learn(index: IndexReader) -> _Learned:
        if field not in index.schema:
            raise ValueError(
                f"the index of {dataset!r} stores no {field}: the region whitening is learned on "
                f"the region vectors searched (RETRIEVAL.RERANK_POOLING {pooling})"
            )
        per_image = max(1, REGION_WHITENING_MAX_VECTORS // max(index.num_images, 1))
        X = np.concatenate(  # the first proposals of each image: stored best first
            [index.regions(i)[field][:per_image] for i in range(index.num_images)]
        )
        what = f"{len(X)} {field} vectors of {index.num_images} images of {dataset}"
        return _Learned(region_whitening_of(X, dim, eps, min_vectors, what))

    variant = f"{pooling}-d{dim}-e{eps:g}-s{sample_images}-min{min_vectors}"
    learned = load_or_learn(
        extractor,
        dataset,
        work_dir,
        "region-whitening",
        variant,
        learn,
        _Learned.load,
        sample_images=sample_images,
        **index_kwargs,
    )
    return learned.whitening


def region_whitening_of(
    vectors: np.ndarray, dim: int, eps: float, min_vectors: int, what: str
) -> Optional[PCAWhitening]:
    """:func:`~.normalization.learn_region_whitening` of ``vectors`` (described by ``what`` in
    the log), or None with a warning when they are fewer than ``min_vectors``."""
    if len(vectors) < max(int(min_vectors), 2):
        logger.warning(
            f"{what} are too few to learn the region whitening on (RETRIEVAL."
            f"REGION_WHITENING.MIN_VECTORS {min_vectors}): region vectors are not whitened"
        )
        return None
    w = learn_region_whitening(vectors, dim, eps)
    logger.info(f"learned the region whitening ({w.out_dim} dims) on {what}")
    return w


class _Learned:
    """A saved learning outcome that may be "nothing learned" (too few vectors), so that the
    verdict is reused as the whitening would be."""

    def __init__(self, whitening: Optional[PCAWhitening]):
        self.whitening = whitening

    def save(self, path):
        if self.whitening is None:
            np.savez(path, none=np.array(True))
        else:
            self.whitening.save(path)

    @classmethod
    def load(cls, path) -> "_Learned":
        with np.load(path, allow_pickle=False) as d:
            if "none" in d.files:
                return cls(None)
        return cls(PCAWhitening.load(path))


def load_or_learn_region_pq(
    extractor: FeatureExtractor,
    dataset: str,
    work_dir: str,
    m: int,
    opq: bool = False,
    num_proposals: int = 0,
    sample_images: int = 0,
    min_vectors: int = 39 * 256,
    **index_kwargs,
) -> RegionCompression:
    """A region compression to product-quantised codes (``dtype`` "pq") whose quantiser is
    learned on ``dataset``'s database region vectors, saved and reused.

    Args:
        dataset: the collection itself, indexed on a sample of ``sample_images`` images (as
            faiss users learn on a sample of what they index), or another dataset (0 = all of
            its images).
        m, opq: bytes per code and whether an OPQ rotation is learned (see
            :func:`~.product_quantization.learn_region_pq`).
        num_proposals: proposals kept per image (see :class:`RegionCompression`).
        min_vectors: fewer region vectors than this learn no quantiser: the compression is
            int8 then (a warning says so).
        index_kwargs: see :func:`load_or_learn`.
    """

    plain = RegionCompression(num_proposals, 0, "int8")

    def learn(index: IndexReader) -> RegionCompression:
        vecs = _region_vectors(index)
        what = "sampled images" if sample_images else "images"
        trained_on = f"{len(vecs)} region vectors of {index.num_images} {what} of {dataset}"
        if len(vecs) < max(int(min_vectors), 256):
            logger.warning(
                f"{trained_on} are too few to learn a product quantiser (RETRIEVAL.REGION_PQ."
                f"MIN_VECTORS {min_vectors}): region vectors are stored int8 instead"
            )
            return plain
        learned = RegionCompression.learn(
            vecs, num_proposals, dtype="pq", pq_m=m, opq=opq, trained_on=trained_on
        )
        logger.info(f"learned the region product quantiser ({m} bytes) on {trained_on}")
        return learned

    variant = f"m{m}" + ("-opq" if opq else "") + (f"-s{sample_images}" if sample_images else "")
    variant += f"-min{min_vectors}"
    learned = load_or_learn(
        extractor,
        dataset,
        work_dir,
        "region-pq",
        variant,
        learn,
        RegionCompression.load,
        sample_images=sample_images,
        **index_kwargs,
    )
    if learned.pq is None:  # too few vectors: int8
        return plain
    return RegionCompression(num_proposals, 0, "pq", pq=learned.pq)
