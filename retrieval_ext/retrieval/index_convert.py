"""Converting an index to other contents and region compression, without a network pass.

An index stores features as a model computed them once; what is kept of them (which fields, in
which precision, how region vectors are coded) can change afterwards from the stored values
alone. :func:`convert_index` writes such a copy: fields the new contents leave out are dropped,
IPA vectors are L2-normalised, region vectors are decoded from their stored codes (float, float16
or int8, all proportional to the unit vectors) and encoded again (e.g. product-quantised), class
scores are cut to their top k. ``tools/compress_index.py`` runs it on the index of a config, e.g.
to bring an index written before :mod:`.contents` existed to today's compact layout.

:func:`region_vectors_sample` and :func:`learn_compression_from_index` learn a product quantiser
on the index's own stored vectors, so that the conversion needs no other data either.
"""

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .compression import COMPRESSION_FILE, RegionCompression, load_region_compression
from .contents import IndexContents
from .index_store import IndexReader, IndexWriter
from .normalization import l2_normalize

__all__ = [
    "ConversionError",
    "convert_index",
    "learn_compression_from_index",
    "region_vectors_sample",
]


class ConversionError(ValueError):
    """The source index does not hold what the conversion needs; the message says what."""


def _decoder(source: IndexReader):
    """``fn(stored rows) -> float32 unit vectors`` of the source's region fields."""
    comp = load_region_compression(source.root)
    if comp is not None and (comp.pca_dim or comp.pq is not None):
        raise ConversionError(
            f"{source.root} stores region vectors {comp.describe()}: PCA-projected or "
            "product-quantised vectors cannot be decoded to the original ones; index again"
        )
    return lambda rows: l2_normalize(np.asarray(rows, dtype=np.float32))


def _check_derivable(source: IndexReader, contents: IndexContents):
    have = IndexContents.of_index(source)
    missing = [f"ipa_{p}" for p in contents.ipa_poolings if p not in have.ipa_poolings]
    missing += [f"rpa_{p}" for p in contents.region_poolings if p not in have.region_poolings]
    if contents.class_outputs and not have.class_outputs:
        missing.append("scores")
    if contents.class_boxes and not have.class_boxes:
        missing.append("class_boxes")
    if (
        contents.class_outputs
        and have.class_top_k
        and (not contents.class_top_k or contents.class_top_k > have.class_top_k)
    ):
        missing.append(f"scores of more than the {have.class_top_k} stored classes")
    if contents.objectness and not have.objectness:
        missing.append("objectness")
    if missing:
        raise ConversionError(
            f"{source.root} does not store {missing}, which the new contents need: index again"
        )
    return have


def _class_fields(regions: Dict[str, np.ndarray], have, contents) -> Dict[str, np.ndarray]:
    """The class outputs of ``contents`` from the source's (all classes, or a wider top k)."""
    scores = np.asarray(regions["scores"], dtype=np.float32)
    boxes = regions.get("class_boxes") if contents.class_boxes else None
    k = int(contents.class_top_k)
    if have.class_top_k:  # source top k' >= k: its first k columns, best first
        out = {"class_ids": regions["class_ids"][:, :k], "scores": scores[:, :k]}
        if boxes is not None:
            out["class_boxes"] = boxes[:, :k]
        return out
    if not k:
        return {"scores": scores, **({} if boxes is None else {"class_boxes": boxes})}
    ids = np.argsort(-scores[:, :-1], axis=1, kind="stable")[:, :k]
    out = {"class_ids": ids.astype(np.int16), "scores": np.take_along_axis(scores, ids, 1)}
    if boxes is not None:
        b = np.asarray(boxes)
        out["class_boxes"] = (
            np.repeat(b, k, axis=1) if b.shape[1] == 1 else np.take_along_axis(b, ids[..., None], 1)
        )
    return out


def _record(source, i, have, contents, decode) -> Dict[str, np.ndarray]:
    rec = {"height": source.image_field(i, "height"), "width": source.image_field(i, "width")}
    for p in contents.ipa_poolings:
        v = np.asarray(source.image_field(i, f"ipa_{p}"), dtype=np.float32)
        rec[f"ipa_{p}"] = l2_normalize(v) if contents.ipa_normalized else v
    regions = source.regions(i)
    rec["boxes"] = regions["boxes"]
    if contents.objectness:
        rec["objectness"] = regions["objectness"]
    for p in contents.region_poolings:
        rec[f"rpa_{p}"] = decode(regions[f"rpa_{p}"])
    if contents.class_outputs:
        rec.update(_class_fields(regions, have, contents))
    return rec


def convert_index(
    source: IndexReader,
    dest,
    contents: IndexContents,
    manifest: dict,
    compression: Optional[RegionCompression] = None,
    dtype: str = "float16",
    shard_size: int = 256,
) -> IndexReader:
    """Write a copy of ``source`` holding ``contents``, region vectors compressed as asked.

    Images keep their order, ids and failed list; no network pass.

    Args:
        source: a finalized index whose fields include what ``contents`` needs (region vectors
            stored as float or int8, not PCA-projected or product-quantised).
        dest: folder of the new index (it must not hold another index).
        contents: what the new index stores.
        manifest: the new index's manifest (``contents`` and ``region_compression`` are set
            here).
        compression: how region vectors are stored (saved beside the index); None = ``dtype``.
        dtype: storage of ``"feature"`` fields (uncompressed region vectors, all-class scores).

    Returns:
        the new index.

    Raises:
        ConversionError: the source lacks a field, or its region vectors cannot be decoded.
    """
    have = _check_derivable(source, contents)
    decode = _decoder(source)
    dest = Path(dest)
    schema = contents.schema()
    stored = compression.schema(schema) if compression is not None else schema
    manifest = dict(manifest, contents=contents.to_json())
    manifest.pop("region_compression", None)
    if compression is not None:
        manifest["region_compression"] = compression.describe()
        dest.mkdir(parents=True, exist_ok=True)
        compression.save(dest / COMPRESSION_FILE)
    with IndexWriter(dest, manifest, shard_size, dtype, 0, stored) as writer:
        for i, image_id in enumerate(source.image_ids):
            if image_id in writer.done_ids:
                continue
            rec = _record(source, i, have, contents, decode)
            if compression is not None:
                rec = compression.compress_record(rec, schema)
            writer.add(image_id, rec)
        for image_id, reason in source.failed.items():
            if image_id not in writer.failed:
                writer.mark_failed(image_id, reason)
    IndexWriter(dest, manifest, shard_size, dtype, 0, stored).finalize(source.info["image_list"])
    return IndexReader(dest)


def region_vectors_sample(
    source: IndexReader, fields, max_images: int = 256, seed: int = 0
) -> np.ndarray:
    """Stored region vectors of ``fields`` of at most ``max_images`` images of ``source``
    (evenly spread over it), decoded to float32 unit vectors: (n, D)."""
    decode = _decoder(source)
    n = source.num_images
    picks = sorted({round(x) for x in np.linspace(0, n - 1, min(int(max_images), n))})
    parts = [decode(source.regions(i)[f]) for i in picks for f in fields]
    return np.concatenate([p for p in parts if len(p)])


def learn_compression_from_index(
    source: IndexReader,
    fields,
    dtype: str,
    num_proposals: int = 0,
    pq_m: int = 0,
    opq: bool = False,
    sample_images: int = 256,
) -> RegionCompression:
    """A region compression (int8 / float / product-quantised) learned, for PQ, on a sample of
    the index's own stored region vectors (no network pass)."""
    if dtype != "pq":
        return RegionCompression(num_proposals, 0, dtype)
    vecs = region_vectors_sample(source, fields, sample_images)
    n = min(int(sample_images), source.num_images)
    what = f"{len(vecs)} region vectors of {n} images of the index {source.root.name}"
    return RegionCompression.learn(
        vecs, num_proposals, dtype="pq", pq_m=pq_m, opq=opq, trained_on=what
    )
