"""RetrievalDatasetMapper and read_image: EXIF orientation, query crops, deterministic flips,
unreadable files, and images of every kind (alpha, grayscale, CMYK, 16 bit, odd sizes and names).

Expected pixels of the read_image tests are computed here from the values written (alpha
compositing written out, 16-bit scaling written out, the EXIF rotation as a numpy rotation),
never read back from the code.
"""

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from retrieval_ext.data import RetrievalDatasetMapper, UnreadableImageError
from retrieval_ext.data.datasets.common import image_size, make_finetune_dicts
from retrieval_ext.data.mapper import read_image
from tests.common import broken_image_files, pattern_image, rotated_with_exif, tiny_cfg


def _png(path, w, h, seed=0):
    arr = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _cfg(min_test=80, max_test=1000, min_train=(120,)):
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST = min_test
    cfg.INPUT.MAX_SIZE_TEST = max_test
    cfg.INPUT.MIN_SIZE_TRAIN = min_train
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


def test_exif_rotated_jpeg_sizes(tmp_path):
    path = str(tmp_path / "rot.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high, displayed rotated by 90 degrees: 20 x 40
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert image_size(path) == (40, 20)

    mapper = RetrievalDatasetMapper(_cfg(min_test=80), is_train=False)
    out = mapper({"file_name": path, "image_id": "rot", "db_index": 0})
    assert (out["height"], out["width"]) == (40, 20)
    # shorter side 20 -> 80: scale 4
    assert tuple(out["image"].shape) == (3, 160, 80)
    assert out["image"].dtype == torch.uint8
    assert out["file_name"] == path and out["image_id"] == "rot" and "query_boxes" not in out

    # a fine-tuning dict of that image passes DatasetMapper's size check in training
    ft, _ = make_finetune_dicts(
        [{"file_name": path, "image_id": "rot", "query_box": [2, 3, 10, 30], "category_id": 0}]
    )
    assert (ft["height"], ft["width"]) == (40, 20)
    train = RetrievalDatasetMapper(_cfg(min_train=(20,)), is_train=True)
    assert tuple(train(ft)["image"].shape) == (3, 40, 20)


def test_query_box_without_and_with_crop(tmp_path):
    path = str(tmp_path / "q.png")
    arr = _png(path, 100, 60)
    query = {
        "file_name": path,
        "image_id": "q",
        "query_index": 0,
        "query_box": [10.5, 20.0, 50.0, 40.2],
        "category_id": 3,
        "object_name": "thing",
    }
    mapper = RetrievalDatasetMapper(_cfg(min_test=120), is_train=False)
    out = mapper(dict(query))
    assert (out["height"], out["width"]) == (60, 100)
    assert tuple(out["image"].shape) == (3, 120, 200)
    assert out["query_boxes"].dtype == torch.float32
    assert out["query_boxes"].tolist() == [[10.5, 20.0, 50.0, pytest.approx(40.2)]]
    assert out["category_id"] == 3

    # crop: columns floor(10.5)=10 .. ceil(50)=50, rows 20 .. ceil(40.2)=41 -> 40 x 21 pixels
    raw = RetrievalDatasetMapper(is_train=False, augmentations=[], image_format="RGB")
    out = raw(dict(query, crop_query=True))
    assert (out["height"], out["width"]) == (21, 40)
    assert out["query_boxes"].tolist() == [[0.0, 0.0, 40.0, 21.0]]
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), arr[20:41, 10:50])


def test_flip_of_finetune_dict(tmp_path):
    path = str(tmp_path / "f.png")
    arr = _png(path, 100, 60, seed=1)
    plain, flipped = make_finetune_dicts(
        [{"file_name": path, "image_id": "f", "query_box": [10, 20, 30, 50], "category_id": 2}]
    )
    assert flipped["horizontal_flip"] and flipped["annotations"][0]["bbox"] == [10, 20, 30, 50]
    assert flipped["annotations"][0]["bbox_mode"] == BoxMode.XYXY_ABS

    raw = RetrievalDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    out = raw(flipped)
    # x1' = w - x2 = 100 - 30, x2' = w - x1 = 100 - 10
    assert out["instances"].gt_boxes.tensor.tolist() == [[70.0, 20.0, 90.0, 50.0]]
    assert out["instances"].gt_classes.tolist() == [2]
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), arr[:, ::-1])
    out = raw(plain)
    assert out["instances"].gt_boxes.tensor.tolist() == [[10.0, 20.0, 30.0, 50.0]]

    # with the config's resize (shorter side 60 -> 120, scale 2) after the flip
    mapper = RetrievalDatasetMapper(_cfg(min_train=(120,)), is_train=True)
    assert [type(a) for a in mapper.augmentations.augs] == [T.ResizeShortestEdge]
    out = mapper(flipped)
    assert tuple(out["image"].shape) == (3, 120, 200)
    assert out["instances"].gt_boxes.tensor.tolist() == [[140.0, 40.0, 180.0, 100.0]]


def test_unreadable_image_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>302 Found</html>")
    mapper = RetrievalDatasetMapper(_cfg(), is_train=False)
    with pytest.raises(UnreadableImageError, match="bad.jpg") as e:
        mapper({"file_name": str(bad), "image_id": "bad"})
    assert e.value.file_name == str(bad) and isinstance(e.value, OSError)

    # a JPEG cut after its header: opens, fails to decode
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:400])
    with pytest.raises(UnreadableImageError, match="cut.jpg"):
        mapper({"file_name": str(cut), "image_id": "cut"})
    with pytest.raises(UnreadableImageError, match="missing.jpg"):
        mapper({"file_name": str(tmp_path / "missing.jpg"), "image_id": "missing"})


def _red_square_dict(tmp_path):
    arr = np.full((160, 200, 3), 128, np.uint8)
    arr[50:100, 60:120] = (220, 20, 20)
    path = str(tmp_path / "square.png")
    Image.fromarray(arr).save(path)
    ann = {"bbox": [60, 50, 120, 100], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}
    return {"file_name": path, "image_id": "sq", "height": 160, "width": 200, "annotations": [ann]}


def test_strong_finetune_augmentation_keeps_the_box_on_the_object(tmp_path):
    """Rotated, zoomed out and recoloured: the box still encloses the object's pixels, tightly."""
    from retrieval_ext.data.mapper import finetune_augmentations

    d = _red_square_dict(tmp_path)
    mapper = RetrievalDatasetMapper(
        is_train=True, augmentations=finetune_augmentations("strong"), image_format="RGB"
    )
    shapes = set()
    for seed in range(24):
        np.random.seed(seed)
        out = mapper(dict(d))
        img = out["image"].permute(1, 2, 0).numpy().astype(int)
        shapes.add(tuple(img.shape[:2]))
        red = (img[..., 0] - np.maximum(img[..., 1], img[..., 2])) > 60
        ys, xs = np.nonzero(red)
        px = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        (box,) = out["instances"].gt_boxes.tensor.tolist()
        # every object pixel inside the box (1 px of interpolation at the edges)
        assert px[0] >= box[0] - 1.5 and px[1] >= box[1] - 1.5, (seed, px, box)
        assert px[2] <= box[2] + 1.5 and px[3] <= box[3] + 1.5, (seed, px, box)
        # and the box hugs them: rotating a box's corners gives the rotated square's extent
        area = (px[2] - px[0]) * (px[3] - px[1])
        assert (box[2] - box[0]) * (box[3] - box[1]) <= 1.15 * area + 40, (seed, px, box)
    assert len(shapes) > 3  # rotation with expand and the extent change the canvas


def test_finetune_augmentation_names():
    from retrieval_ext.data.mapper import finetune_augmentations

    assert finetune_augmentations("none") == []
    assert len(finetune_augmentations("photometric")) == 3
    with pytest.raises(ValueError, match="MODEL.FINETUNE.AUGMENT.*'heavy'"):
        finetune_augmentations("heavy")


def _camera_cfg():
    from retrieval_ext.config import add_retrieval_config

    cfg = _cfg()
    add_retrieval_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.FINETUNE.AUGMENT = "camera"
    cfg.MODEL.FINETUNE.CAMERA_CANVAS = 150
    cfg.MODEL.FINETUNE.CAMERA_FRAME = 0.0
    return cfg


def test_camera_augmentation_through_the_mapper_keeps_the_box_on_the_object(tmp_path):
    """From the config to the instances, the flipped copy's box too (grey scene images as the
    backgrounds, so that the only red pixels are the object's)."""
    from detectron2.data import DatasetCatalog

    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((90, 120, 3), 128, np.uint8)).save(grey)
    DatasetCatalog.register("greyscenes_db", lambda: [{"file_name": str(grey), "image_id": "g"}])
    cfg = _camera_cfg()
    cfg.MODEL.FINETUNE.CAMERA_BACKGROUNDS = ["greyscenes"]
    cfg.MODEL.FINETUNE.CAMERA_OCCLUDERS = 0  # occluders may be red
    try:
        mapper = RetrievalDatasetMapper(cfg, True)
    finally:
        DatasetCatalog.remove("greyscenes_db")
    d = _red_square_dict(tmp_path)
    for seed in range(8):
        np.random.seed(seed)
        out = mapper(dict(d, horizontal_flip=bool(seed % 2)))
        img = out["image"].permute(1, 2, 0).numpy().astype(int)
        assert min(img.shape[:2]) == 120  # canvas 150, then MIN_SIZE_TRAIN
        # reddish after light ramps, casts, desaturation and blur: red well above green, blue
        red = (img[..., 0] > 1.6 * np.maximum(img[..., 1], img[..., 2]) + 10) & (img[..., 0] > 40)
        ys, xs = np.nonzero(red)
        px = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        box = np.array(out["instances"].gt_boxes.tensor.tolist()[0])
        assert (px[:2] >= box[:2] - 3).all() and (px[2:] <= box[2:] + 3).all(), (seed, px, box)
        # a turned, tilted rectangle fills at least half of its bounding box; glare and blur
        # may wash out part of it
        assert red.sum() >= 0.3 * (box[2] - box[0]) * (box[3] - box[1]), seed


def test_camera_options_from_config(tmp_path):
    from retrieval_ext.data.backgrounds import ImageBackgrounds, ProceduralBackgrounds
    from retrieval_ext.data.mapper import camera_options_from_config

    cfg = _camera_cfg()
    cfg.MODEL.FINETUNE.CAMERA_SCALE = (0.2, 0.5)
    opts = camera_options_from_config(cfg)
    assert isinstance(opts["background"], ProceduralBackgrounds)
    assert opts["scale"] == (0.2, 0.5) and opts["canvas_short_side"] == 150
    cfg.MODEL.FINETUNE.CAMERA_BACKGROUNDS = ["no_such_collection"]
    with pytest.raises(KeyError, match="CAMERA_BACKGROUNDS.*no_such_collection"):
        camera_options_from_config(cfg)
    from detectron2.data import DatasetCatalog

    path = tmp_path / "bg.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    DatasetCatalog.register("bgtest_db", lambda: [{"file_name": str(path), "image_id": "b"}])
    try:
        cfg.MODEL.FINETUNE.CAMERA_BACKGROUNDS = ["bgtest"]
        opts = camera_options_from_config(cfg)
        assert isinstance(opts["background"], ImageBackgrounds)
        assert opts["background"].files == [str(path)]
    finally:
        DatasetCatalog.remove("bgtest_db")


# ------------------------------------------------------------------------------ read_image
def test_unreadable_files_raise_naming_the_file(tmp_path):
    for name, data in list(broken_image_files().items()):
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
    (tmp_path / "r.png").write_bytes(rotated_with_exif(upright))
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
