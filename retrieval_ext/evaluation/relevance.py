"""Which database images are relevant to one query, under its dataset's protocol.

The one place that reads a query's judgements (an entry of ``metadata.gnd``):

- Oxford / Paris / custom / synthetic: ``ok`` is relevant, ``junk`` is ignored;
- Revisited Oxford / Paris, Medium protocol: ``easy`` and ``hard`` are relevant, ``junk`` ignored
  (mAP over Easy / Medium / Hard is :func:`~.metrics.revisited_map`);
- TRECVid INS: the shots of ``relevant_shots`` are relevant; an image is relevant when its shot
  (``metadata.db_shots``) is.

Database images are identified by their dataset ``db_index``.
"""

from typing import Iterable, Set, Tuple

import numpy as np

from . import metrics

__all__ = ["judged_sets", "num_relevant", "query_average_precision", "relevance_labels"]


def judged_sets(protocol: str, g: dict) -> Tuple[Set[int], Set[int]]:
    """(relevant, junk) database indices of one query's judgements.

    Not for INS, which judges shots (``relevant_shots``), not images.
    """
    if protocol == "ins":
        raise ValueError("INS judges shots, not images: use metadata.db_shots")
    if protocol == "revisited":
        return set(g["easy"]) | set(g["hard"]), set(g["junk"])
    return set(g["ok"]), set(g.get("junk", ()))


def relevance_labels(metadata, g: dict, ranking: Iterable[int]) -> np.ndarray:
    """A label per ranked image: 1 relevant, 0 not, -1 junk (ignored by the protocol).

    Args:
        metadata: the dataset's metadata (``protocol``; ``db_shots`` for INS).
        g: one query's judgements.
        ranking: database indices.

    Returns:
        int8 array, one label per entry of ``ranking``.
    """
    ranking = np.asarray(list(ranking), dtype=np.int64)
    if metadata.protocol == "ins":
        shots = metadata.db_shots
        relevant = set(g["relevant_shots"])
        return np.asarray([1 if shots[r] in relevant else 0 for r in ranking], np.int8)
    pos, junk = (sorted(x) for x in judged_sets(metadata.protocol, g))
    labels = np.zeros(len(ranking), np.int8)
    labels[np.isin(ranking, pos)] = 1
    labels[np.isin(ranking, junk)] = -1
    return labels


def query_average_precision(metadata, g: dict, ranking: Iterable[int]) -> float:
    """AP of one query's ranking (database indices) under the dataset's protocol (NaN when the
    query has no relevant image)."""
    ranking = np.asarray(list(ranking), dtype=np.int64)
    if metadata.protocol == "ins":
        relevant = set(g["relevant_shots"])
        return metrics.ins_average_precision(ranking, metadata.db_shots, relevant)
    pos, junk = (sorted(x) for x in judged_sets(metadata.protocol, g))
    return metrics.average_precision(ranking, pos, junk)


def num_relevant(metadata, g: dict) -> int:
    """Database images relevant to one query (for INS: images of its relevant shots)."""
    if metadata.protocol == "ins":
        relevant = set(g["relevant_shots"])
        return int(sum(s in relevant for s in metadata.db_shots))
    return len(judged_sets(metadata.protocol, g)[0])
