"""Query extraction (retrieval_ext.retrieval.queries): boxes checked against the image read, and a
query cache that is rebuilt when torn or stale."""

import numpy as np
import pytest

from retrieval_ext.data.boxes import InvalidBoxError
from retrieval_ext.retrieval.queries import extract_queries
from tests.common import make_extractor, pattern_image, register, write_collection


def test_extract_queries_checks_boxes_against_the_image(zf, tmp_path, registered, logs):
    img = pattern_image(30, 40, 0)
    # one pass at the test size (no RETRIEVAL.QUERY_SCALES), whose resize is worked out below
    extractor = make_extractor(zf, ["RETRIEVAL.QUERY_SCALES", "[]"])

    # well-formed at load time, but outside the 40 x 30 image: refused when extracted
    root = write_collection(
        tmp_path / "out", {"images/a.png": img}, [("images/a.png", [45, 5, 60, 20], "obj")]
    )
    name = register(registered, "rel_box_out", root)
    with pytest.raises(InvalidBoxError) as e:
        extract_queries(extractor, name)
    assert "query 'images/a'" in str(e.value) and "[45.0, 5.0, 60.0, 20.0]" in str(e.value)
    assert "outside the 40 x 30" in str(e.value)

    # partly outside: the record's box is the clamped box; a sub-cell box: kept, warned, finite
    root = write_collection(
        tmp_path / "ok",
        {"images/a.png": img, "images/b.png": img},
        [("images/a.png", [20, 10, 55, 44], "obj"), ("images/b.png", [3, 3, 4, 4], "obj")],
    )
    name = register(registered, "rel_box_ok", root)
    clamped, tiny = extract_queries(extractor, name)
    np.testing.assert_array_equal(clamped["box"], [20, 10, 40, 30])
    # ZF-tiny resizes 40 x 30 to 171 x 128 (shorter side 128, 40 * 128 / 30 = 170.7 rounded);
    # stride 16, so a cell is 16 * 40 / 171 = 3.74 by 16 * 30 / 128 = 3.75 original pixels
    cell = f"{16 * 40 / 171:.1f} x {16 * 30 / 128:.1f} px"
    assert any("query 'images/b'" in w and cell in w for w in logs.warnings())
    for rec in (clamped, tiny):
        for k in ("crop_sum", "crop_max", "rpa_sum", "rpa_max", "ipa_sum"):
            assert np.all(np.isfinite(rec[k])) and np.linalg.norm(rec[k]) > 0, k


def test_query_cache_is_rebuilt_when_corrupt_or_stale(zf, tmp_path, registered, logs):
    img = pattern_image(40, 50, 1)
    root = write_collection(
        tmp_path / "c", {"images/a.png": img}, [("images/a.png", [2, 2, 30, 30], "o")]
    )
    name = register(registered, "rel_cache", root)
    extractor = make_extractor(zf)
    cache_dir = tmp_path / "cache"
    (first,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    (cache,) = list(cache_dir.glob("queries-*.npz"))
    (cached,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(cached["crop_max"], first["crop_max"])

    cache.write_bytes(b"PK\x03\x04 torn by an old, non-atomic writer")
    (again,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(again["crop_max"], first["crop_max"])
    assert any("ignoring the unreadable query cache" in w for w in logs.warnings())
    np.load(cache)  # rewritten whole

    # same image id, another box: the cache must not answer
    write_collection(root, {}, [("images/a.png", [10, 10, 40, 35], "o")])
    register(registered, name, root)
    (moved,) = extract_queries(extractor, name, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(moved["box"], [10, 10, 40, 35])
