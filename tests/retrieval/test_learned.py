"""Learned transforms (retrieval_ext.retrieval.learned): learning the whitening on the test dataset
itself is allowed but warned about."""

from retrieval_ext.retrieval.learned import load_or_learn_whitening
from tests.common import make_extractor, pattern_image, register, write_collection


def test_whitening_on_the_test_dataset_warns_about_the_leak(zf, tmp_path, registered, logs):
    root = write_collection(
        tmp_path / "c",
        {f"images/{i}.png": pattern_image(40, 50, i) for i in range(4)},
        [("images/0.png", [5, 5, 30, 30], "obj")],
    )
    name = register(registered, "rel_leak", root)
    extractor = make_extractor(zf)
    w = load_or_learn_whitening(extractor, name, name, str(tmp_path / "w"), show_progress=False)
    assert w is not None
    assert any("leaks ground truth" in m and repr(name) in m for m in logs.warnings())
    n = len(logs.warnings())
    other = register(registered, "rel_leak_other", root)
    load_or_learn_whitening(extractor, other, name, str(tmp_path / "w2"), show_progress=False)
    assert len(logs.warnings()) == n  # another dataset: no warning
