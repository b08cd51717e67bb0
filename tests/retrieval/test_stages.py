"""The stage graph: which stages a search of each stage runs, in order."""

import pytest

from retrieval_ext.retrieval.stages import STAGES, stage_chain


def test_stage_chains_written_out():
    assert {s: stage_chain(s) for s in STAGES} == {
        "filtering": ("filtering",),
        "filtering_qe": ("filtering", "filtering_qe"),
        "ca_sr": ("filtering", "ca_sr"),
        "ca_sr_qe": ("filtering", "ca_sr", "ca_sr_qe"),
        "cs_sr": ("filtering", "cs_sr"),
        "cs_sr_qe": ("filtering", "cs_sr", "cs_sr_qe"),
    }
    with pytest.raises(ValueError, match="unknown stage 'rerank'"):
        stage_chain("rerank")
