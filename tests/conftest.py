"""Fixtures shared by every test folder: a tiny ZF checkpoint, dataset registration, log capture.

Helpers that are not fixtures (configs, collections, assertions) are in tests/common.py.
"""

import os

# Before torch is imported: spinning OpenMP threads make small CPU models 5-10x slower whenever
# another process competes for the cores (see Makefile).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402

import pytest  # noqa: E402

from retrieval_ext.data.datasets import unregister_retrieval_dataset  # noqa: E402
from tests.common import save_checkpoint, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def zf(tmp_path_factory):
    """A ZF-tiny model with random (seeded) weights and a tamed RPN, its checkpoint file and the
    matching config options: {"model", "weights", "opts": ["MODEL.WEIGHTS", path]}."""
    model = tiny_model("ZF")
    path = save_checkpoint(model, tmp_path_factory.mktemp("zf") / "zf.pth")
    return {"model": model, "weights": path, "opts": ["MODEL.WEIGHTS", path]}


@pytest.fixture
def registered():
    """Dataset names appended here (tests.common.register does) are unregistered after the
    test."""
    names = []
    yield names
    for n in names:
        unregister_retrieval_dataset(n)


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logs():
    """Records logged under "retrieval_ext" (whatever its propagation), as a list of messages."""
    handler = _ListHandler()
    logger = logging.getLogger("retrieval_ext")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    class Logs:
        def warnings(self):
            return [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]

    yield Logs()
    logger.removeHandler(handler)
    logger.setLevel(old_level)
