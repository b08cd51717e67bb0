"""The tools' config setup (retrieval_ext.engine.defaults.setup_cfg)."""

import argparse

import pytest

from retrieval_ext.engine.defaults import setup_cfg
from retrieval_ext.utils.io import OutputWriteError
from tests.common import ZF_TINY


@pytest.mark.parametrize("under", ["file/out", "file"])
def test_output_dir_under_a_regular_file_is_named_before_anything_runs(tmp_path, under):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / under
    args = argparse.Namespace(config_file=str(ZF_TINY), opts=["OUTPUT_DIR", str(out)])
    with pytest.raises(OutputWriteError) as e:
        setup_cfg(args)
    assert str(out) in str(e.value) and "regular file" in str(e.value)
    assert (tmp_path / "file").read_text() == "a file, not a folder"
