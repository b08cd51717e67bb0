"""Bad and unusual images: each kind is read correctly or skipped, named once, listed in the index.

Expected pixels are computed here from the values written (alpha compositing written out,
16-bit scaling written out, the EXIF rotation as a numpy rotation), never read back from the code.
"""

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from retrieval_ext.data.mapper import RetrievalDatasetMapper, UnreadableImageError, read_image
from retrieval_ext.retrieval.indexing import build_index
from retrieval_ext.retrieval.queries import extract_queries
from tests.common import tiny_cfg

from .conftest import make_extractor, pattern_image, register, write_collection

EXIF_ORIENTATION = 0x0112


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(arr, quality=95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _rotated_with_exif(upright: np.ndarray) -> bytes:
    """PNG whose stored pixels are ``upright`` turned 90 degrees counter-clockwise, with EXIF
    orientation 6 ("rotate 90 clockwise to display"): it displays as ``upright``."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _png_bytes(Image.fromarray(np.rot90(upright, k=1).copy()), exif=exif)


def _broken_files():
    good = _jpeg_bytes(pattern_image(64, 64, 0))
    sof = good.find(b"\xff\xc0")
    corrupt = bytearray(good)
    corrupt[sof : sof + 12] = bytes(range(12))  # the frame header (size, components) destroyed
    return {
        "truncated.jpg": good[: len(good) // 3],  # header intact, scan data cut
        "corrupt.jpg": bytes(corrupt),
        "empty.jpg": b"",
        "page.jpg": b"<html><body>302 Found</body></html>",  # Paris 6k's corrupt files
    }


# ------------------------------------------------------------------------------ read_image
def test_unreadable_files_raise_naming_the_file(tmp_path):
    for name, data in list(_broken_files().items()):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UnreadableImageError) as e:
            read_image(str(path), "BGR")
        assert e.value.file_name == str(path) and name in str(e.value)
    with pytest.raises(UnreadableImageError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"), "BGR")


def test_alpha_is_composited_over_white(tmp_path):
    # one row: transparent red, opaque blue, half-transparent green (alpha 128)
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 200, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = 128 / 255
    expected = np.array(
        [[[255, 255, 255], [0, 0, 255], [255 * (1 - a), 200 * a + 255 * (1 - a), 255 * (1 - a)]]]
    )
    got = read_image(str(tmp_path / "a.png"), "RGB")
    np.testing.assert_allclose(got, expected, atol=1)
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png"), "BGR"), got[..., ::-1])

    # gray + alpha, and a palette with a transparent entry
    Image.fromarray(np.array([[[10, 0], [10, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(
        read_image(str(tmp_path / "la.png"), "RGB"), [[[255, 255, 255], [10, 10, 10]]]
    )
    p = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    p.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(
        read_image(str(tmp_path / "p.png"), "RGB"), [[[255, 255, 255], [30, 60, 90]]]
    )


def test_grayscale_cmyk_and_16_bit(tmp_path):
    gray = np.arange(0, 240, 20, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    got = read_image(str(tmp_path / "g.png"), "BGR")
    assert got.shape == (3, 4, 3) and got.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], gray)

    # CMYK JPEG of flat colours: cyan -> (0, 255, 255), magenta -> (255, 0, 255), black
    cmyk = np.zeros((16, 48, 4), np.uint8)
    cmyk[:, :16, 0] = 255
    cmyk[:, 16:32, 1] = 255
    cmyk[:, 32:, 3] = 255
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
    got = read_image(str(tmp_path / "c.jpg"), "RGB").astype(int)
    for cols, rgb in (
        (slice(2, 14), (0, 255, 255)),
        (slice(18, 30), (255, 0, 255)),
        (slice(34, 46), (0, 0, 0)),
    ):
        np.testing.assert_allclose(
            got[2:14, cols], np.broadcast_to(rgb, got[2:14, cols].shape), atol=4
        )

    # 16-bit grayscale: v -> round(v / 257), so 65535 is white and 257 is 1, not clipped at 255
    g16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = read_image(str(tmp_path / "g16.png"), "RGB")
    np.testing.assert_array_equal(got[..., 0], [[0, 1, 128, 255]])
    # 16-bit colour PNG (written by OpenCV, BGR order): the high byte of each channel
    c16 = np.array([[[65535, 0, 4660], [256, 512, 65280]]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), c16)
    np.testing.assert_array_equal(read_image(str(tmp_path / "c16.png"), "BGR"), c16 >> 8)


def test_exif_orientation_and_odd_sizes_and_names(tmp_path):
    upright = pattern_image(20, 36, 1)
    (tmp_path / "r.png").write_bytes(_rotated_with_exif(upright))
    np.testing.assert_array_equal(read_image(str(tmp_path / "r.png"), "RGB"), upright)

    odd = tmp_path / "caf\u00e9 \u540d\u524d 1.png"  # non-ASCII and spaces
    Image.fromarray(upright).save(odd)
    np.testing.assert_array_equal(read_image(str(odd), "RGB"), upright)

    # resize of extreme sizes under ZF-tiny (MIN_SIZE_TEST 128, MAX_SIZE_TEST 224):
    # 8 x 8 -> 128 x 128; 200 high x 20000 wide -> scale 128/200 gives 12800 wide > 224, so
    # scale 224/20000: 200 * 224 / 20000 = 2.24 -> 2 rows, 224 columns
    mapper = RetrievalDatasetMapper(tiny_cfg("ZF"), is_train=False)
    for (h, w), shape in (((8, 8), (3, 128, 128)), ((200, 20000), (3, 2, 224))):
        path = tmp_path / f"s{h}x{w}.png"
        Image.fromarray(pattern_image(h, w, 2)).save(path)
        out = mapper({"file_name": str(path), "image_id": path.stem})
        assert (out["height"], out["width"]) == (h, w) and tuple(out["image"].shape) == shape


# ------------------------------------------------------------------------------ whole pipeline
def test_indexing_a_collection_of_every_kind(zf, tmp_path, registered, logs):
    upright = pattern_image(60, 90, 3)
    readable = {
        "images/a_upright.png": upright,
        "images/b_exif_rotated.png": _rotated_with_exif(upright),
        "images/c_alpha.png": Image.fromarray(
            np.dstack([upright, np.full(upright.shape[:2], 200, np.uint8)]), "RGBA"
        ),
        "images/d_gray.png": Image.fromarray(upright[..., 0], "L"),
        "images/e_cmyk.jpg": Image.fromarray(upright).convert("CMYK"),
        "images/f_16bit.png": Image.fromarray(upright[..., 1].astype(np.uint16) * 257),
        "images/g_wide.png": pattern_image(10, 1000, 4),
        "images/h_tiny.png": pattern_image(8, 8, 5),
        "images/i caf\u00e9 \u540d.png": pattern_image(50, 70, 6),
        "images/j_black.png": np.zeros((40, 40, 3), np.uint8),
    }
    broken = {f"images/x_{k}": v for k, v in _broken_files().items()}
    root = write_collection(
        tmp_path / "every",
        {**readable, **broken},
        [("images/b_exif_rotated.png", [10, 5, 60, 40], "thing")],
    )
    name = register(registered, "rel_every", root)
    extractor = make_extractor(zf)
    index = build_index(
        extractor, name, str(tmp_path / "index"), shard_size=3, dtype="float32", show_progress=False
    )

    stored = [rel.rsplit(".", 1)[0] for rel in sorted(readable)]
    assert index.image_ids == stored
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text(encoding="utf-8"))
    # every unreadable file is listed, with its reason; the loader names them with extension
    failed = manifest["failed"]
    assert len(failed) == len(broken)
    for rel in broken:
        key = rel if rel in failed else rel.rsplit(".", 1)[0]
        assert key in failed and failed[key]
    # ... and named in exactly one warning
    warnings = logs.warnings()
    for rel in broken:
        stem = rel.rsplit(".", 1)[0]
        assert sum(stem in w for w in warnings) == 1, (rel, warnings)

    # EXIF orientation is applied: the rotated copy gives the upright image's features and boxes
    a, b = index.index_of("images/a_upright"), index.index_of("images/b_exif_rotated")
    assert (index.image_field(b, "height"), index.image_field(b, "width")) == (60, 90)
    np.testing.assert_allclose(
        index.image_vectors("ipa_sum")[b], index.image_vectors("ipa_sum")[a], rtol=1e-6
    )
    np.testing.assert_array_equal(index.regions(b)["boxes"], index.regions(a)["boxes"])
    # every stored box lies inside its image (original pixels, oriented frame)
    for i in range(index.num_images):
        boxes = index.regions(i)["boxes"]
        h, w = index.image_field(i, "height"), index.image_field(i, "width")
        assert np.all(np.isfinite(index.image_vectors("ipa_sum")[i]))
        assert len(boxes) > 0 and (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()

    # the query on the EXIF-rotated file, box in the displayed frame, equals the upright query
    (q,) = extract_queries(extractor, name)
    ref = extractor.query_record_from_image(upright[..., ::-1].copy(), [10, 5, 60, 40])  # BGR
    for k in ("ipa_sum", "crop_max", "rpa_max", "box"):
        np.testing.assert_allclose(q[k], ref[k], rtol=1e-5, atol=1e-5)

    # a rerun reuses the complete index, listing the same failures
    again = build_index(
        extractor, name, str(tmp_path / "index"), dtype="float32", show_progress=False
    )
    assert again.image_ids == stored and again.failed == index.failed
