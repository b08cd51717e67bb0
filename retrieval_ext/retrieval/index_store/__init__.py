"""On-disk feature index of a database: sharded, resumable, memory-mapped.

One Faster R-CNN forward pass per database image yields image-wise vectors (IPA), per-proposal
vectors (RPA), proposal boxes and class scores. :class:`IndexWriter` stores them in **shards** and
:class:`IndexReader` serves them to search and spatial reranking without loading everything.

Layout under ``root``::

    index_config.json          manifest + schema + dtype, written by the first writer (resume check)
    shards/rank000-00000/      one complete shard (atomically renamed from a temp dir)
        ids.json               image ids of the shard, in row order
        offsets.npy            (N_s + 1,) int64: proposals of row j are [offsets[j], offsets[j+1])
        <image field>.npy      (N_s, *shape) per-image arrays stacked
        <proposal field>.npy   (sum_j K_j, *shape) per-proposal arrays concatenated
        meta.json              shard description, written last
    shards/.tmp-rank000-00001-<pid>/   a shard being written (never read; removed on next open)
    failed-rank000.jsonl       append-only log of images that could not be processed
    manifest.json              final index description, written by ``finalize`` (atomically)

Which fields exist and whether each is per image or per proposal is declared by an
:class:`IndexSchema`, so new fields (e.g. compressed RPA) need no change here. Fields of kind
``"feature"`` are stored in the index dtype (float16 or float32); fields of kind ``"exact"`` keep
their declared dtype (boxes float32, sizes int64). All boxes are XYXY in original-image pixels.

Several processes may write into one root at once, one writer per rank (shard names carry the
rank). After every rank has closed its writer, one process calls :meth:`IndexWriter.finalize` with
the ordered image list; the final index presents images in that order whatever order they were
extracted in, so an interrupted-and-resumed index equals an uninterrupted one image for image.

Modules: :mod:`.errors`, :mod:`.schema` (the fields), :mod:`.manifest` (comparing what produced
two indexes), :mod:`.layout` (file names and reading them), :mod:`.writer`, :mod:`.finalize`
(merging the shards into ``manifest.json``), :mod:`.reader`. Only numpy, PyYAML, the standard
library and :mod:`retrieval_ext.utils.io` are imported (no torch, no detectron2).
"""

from .errors import (
    IndexIncompleteError,
    IndexMismatchError,
    IndexNotFinalizedError,
    IndexStoreError,
    IndexWriteError,
)
from .layout import FORMAT_VERSION
from .manifest import check_manifest_compatible
from .reader import IndexReader
from .schema import FieldSpec, IndexSchema, default_schema
from .writer import IndexWriter

__all__ = [
    "FORMAT_VERSION",
    "FieldSpec",
    "IndexSchema",
    "default_schema",
    "IndexStoreError",
    "IndexMismatchError",
    "IndexWriteError",
    "IndexIncompleteError",
    "IndexNotFinalizedError",
    "check_manifest_compatible",
    "IndexWriter",
    "IndexReader",
]
