"""The search stages: their names, which stage builds on which, and the ranking each gives.

- ``filtering``: cosine ranking of the whole database by IPA (L2 / whitening / L2 for sum).
- ``filtering_qe``: the paper's global query expansion: the query IPA averaged with the top M
  database IPA vectors, then filtering again.
- ``ca_sr``: class-agnostic spatial reranking of the filtering top N: an image scores the best
  cosine similarity between the query region vector and its stored proposal RPA vectors.
- ``ca_sr_qe``: ``qe_rerank_mode="region"`` (default): the query region vector averaged with the
  RPA of the best proposals of the CA-SR top M, then the filtering top N reranked again with it;
  ``"global"``: the query IPA averaged with the IPA of the CA-SR top M, filtering again, and CA-SR
  of the new top N with the original query region.
- ``cs_sr``: class-specific spatial reranking of the filtering top N: an image scores the best
  stored probability of the query's class among its proposals (needs a model fine-tuned on the
  query objects).
- ``cs_sr_qe``: the global form: the query IPA averaged with the IPA of the CS-SR top M,
  filtering again, and CS-SR of the new top N.

:data:`STAGE_INPUTS` declares which stages each stage reads the results of; :func:`stage_chain`
gives the stages a search of one stage runs (the UI reports the latency and AP of each).
:class:`~retrieval_ext.retrieval.search.IndexSearcher` runs them on a stored index.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = ["CS_STAGES", "STAGES", "STAGE_INPUTS", "StageResult", "stage_chain"]

STAGES = ("filtering", "filtering_qe", "ca_sr", "ca_sr_qe", "cs_sr", "cs_sr_qe")
CS_STAGES = ("cs_sr", "cs_sr_qe")
# The stages whose results each stage reads (see the module docstring for what each does).
STAGE_INPUTS = {
    "filtering": (),
    "filtering_qe": ("filtering",),
    "ca_sr": ("filtering",),
    "ca_sr_qe": ("filtering", "ca_sr"),
    "cs_sr": ("filtering",),
    "cs_sr_qe": ("cs_sr",),
}


def stage_chain(stage: str) -> Tuple[str, ...]:
    """The stages ``stage`` builds on, in the order they run, ending with ``stage`` itself.

    Raises:
        ValueError: ``stage`` is not one of :data:`STAGES`.
    """
    if stage not in STAGE_INPUTS:
        raise ValueError(f"unknown stage {stage!r}; choose from {list(STAGES)}")
    chain = []
    for before in STAGE_INPUTS[stage]:
        chain += [s for s in stage_chain(before) if s not in chain]
    return tuple(chain) + (stage,)


@dataclass
class StageResult:
    """The ranking one stage gives for one query.

    Attributes:
        order: int64 (N,) database indices, best first (the whole database).
        scores: float32 (N,) the stage's scores (for reranked stages: rerank scores for the top N,
            filtering scores after them).
        boxes: float32 (N, 4) located box per entry, XYXY original-image pixels; NaN where the
            stage does not locate (filtering stages, the tail after the reranked block).
        seconds: wall time of this stage alone (excluding the stages it builds on).
        best_proposal: int64 (N,) index of the located proposal within its image, -1 where none.
        top_n: size of the reranked block (0 for filtering stages).
    """

    order: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    seconds: float
    best_proposal: Optional[np.ndarray] = None
    top_n: int = 0

    @classmethod
    def from_rerank(cls, r, seconds: float) -> "StageResult":
        return cls(r.order, r.scores, r.boxes, seconds, r.best_proposal, r.top_n)
