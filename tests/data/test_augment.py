"""Camera augmentations (augment.py, camera_transforms.py, backgrounds.py): each transform moves
the box with the object's pixels, the same seed gives the same image, and clutter never hides
the whole object."""

import numpy as np
import pytest
from detectron2.data import transforms as T

from retrieval_ext.data.augment import (
    RandomCameraBlur,
    RandomCameraView,
    RandomLighting,
    RandomOccluders,
    RandomSensorNoise,
    camera_augmentations,
    content_box,
)
from retrieval_ext.data.backgrounds import ImageBackgrounds, ProceduralBackgrounds
from retrieval_ext.data.camera_transforms import (
    BlurTransform,
    HomographyTransform,
    LightingTransform,
    SensorNoiseTransform,
)

GREY = 128


def _black(rng, h, w):
    return np.zeros((h, w, 3), np.uint8)


def _object_image(h=120, w=160, box=(40, 30, 110, 90)):
    """Grey image with a pure red rectangle (the object) at ``box``."""
    img = np.full((h, w, 3), GREY, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (255, 0, 0)
    return img, np.array([box], np.float64)


def _red_box(img):
    """Bounding box (pixel edges) of the reddish pixels, found independently of any transform."""
    img = img.astype(int)
    red = (img[..., 0] - np.maximum(img[..., 1], img[..., 2])) > 100
    ys, xs = np.nonzero(red)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def _assert_box_covers(pixel_box, box, tol=1.5, slack=1.12):
    assert (pixel_box[:2] >= box[:2] - tol).all() and (pixel_box[2:] <= box[2:] + tol).all(), (
        pixel_box,
        box,
    )
    pixel_area = (pixel_box[2] - pixel_box[0]) * (pixel_box[3] - pixel_box[1])
    assert (box[2] - box[0]) * (box[3] - box[1]) <= slack * pixel_area + 60, (pixel_box, box)


def test_homography_moves_the_box_with_the_object():
    img, boxes = _object_image()
    # a hand-made homography: scale 1.3, turn 35 degrees, shift, and a projective term
    a = np.deg2rad(35)
    m = np.array(
        [
            [1.3 * np.cos(a), -1.3 * np.sin(a), 120],
            [1.3 * np.sin(a), 1.3 * np.cos(a), 10],
            [0.0008, -0.0005, 1.0],
        ]
    )
    t = HomographyTransform(m, 260, 300)
    out = t.apply_image(img)
    assert out.shape == (260, 300, 3)
    box = t.apply_box(boxes)[0]
    # corners mapped by hand: x' = (m0 . p) / (m2 . p)
    corners = np.array([[40, 30, 1], [110, 30, 1], [110, 90, 1], [40, 90, 1]], float) @ m.T
    xy = corners[:, :2] / corners[:, 2:]
    np.testing.assert_allclose(box, [*xy.min(0), *xy.max(0)], rtol=1e-9)
    _assert_box_covers(_red_box(out), box, slack=1.05)


def test_homography_source_box_pastes_only_the_object_and_clips_boxes():
    img, _ = _object_image()
    img[:, :20] = (255, 0, 0)  # red outside the object box must not be pasted
    m = np.array([[1.0, 0, 50], [0, 1.0, 40], [0, 0, 1]])
    t = HomographyTransform(m, 200, 260, np.zeros((200, 260, 3), np.uint8), (40, 30, 110, 90))
    out = t.apply_image(img)
    np.testing.assert_array_equal(_red_box(out), [90, 70, 160, 130])
    # a box reaching outside the pasted region is clipped to it first
    np.testing.assert_allclose(t.apply_box(np.array([[0.0, 0, 120, 100]]))[0], [90, 70, 160, 130])


def test_camera_view_moves_the_box_with_the_object():
    img, boxes = _object_image()
    aug = RandomCameraView(
        _black, scale=(0.3, 1.0), perspective=0.4, canvas_short_side=150, frame_prob=0.0
    )
    shapes = set()
    for seed in range(20):
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=boxes.copy())
        aug(inp)
        shapes.add(inp.image.shape[:2])
        assert min(inp.image.shape[:2]) == 150
        box = np.clip(inp.boxes[0], 0, [inp.image.shape[1], inp.image.shape[0]] * 2)
        _assert_box_covers(_red_box(inp.image), box)
    assert shapes == {(150, 200), (200, 150)}  # landscape and portrait canvases


def test_camera_view_trims_a_blank_margin():
    # a scan padded with white: the object is the coloured content, the box the whole image
    img = np.full((100, 100, 3), 255, np.uint8)
    img[:, 20:80] = (255, 0, 0)
    img[40:60, 30:70] = (200, 0, 0)
    aug = RandomCameraView(
        _black,
        scale=(0.5, 0.9),
        max_rotation=0,
        perspective=0.0,
        canvas_short_side=120,
        frame_prob=0.0,
    )
    for seed in range(5):
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=np.array([[0.0, 0, 100, 100]]))
        aug(inp)
        red = _red_box(inp.image)
        # no white margin was pasted: everything bright in the output is red
        white = (inp.image.astype(int).min(axis=2) > 200).sum()
        assert white == 0
        # the box follows the content (60 x 100): aspect 0.6
        box = inp.boxes[0]
        np.testing.assert_allclose((box[2] - box[0]) / (box[3] - box[1]), 0.6, rtol=0.03)
        _assert_box_covers(red, box, slack=1.05)


def test_content_box_removes_uniform_margins_only():
    img = np.full((50, 80, 3), 250, np.uint8)
    img[7:45, 12:75] = np.random.RandomState(0).randint(0, 200, (38, 63, 3))
    np.testing.assert_array_equal(content_box(img, [0, 0, 80, 50]), [12, 7, 75, 45])
    # no margin: unchanged; a margin wider than max_fraction is cut at that fraction
    full = np.random.RandomState(1).randint(0, 255, (50, 80, 3)).astype(np.uint8)
    np.testing.assert_array_equal(content_box(full, [0, 0, 80, 50]), [0, 0, 80, 50])
    np.testing.assert_array_equal(
        content_box(img, [0, 0, 80, 50], max_fraction=0.1), [8, 5, 75, 45]
    )


@pytest.mark.parametrize(
    "transform",
    [
        LightingTransform((0.5, 1.2), 0.7, (1.1, 0.9, 1.0), glare=(50, 40, 15, 0.8)),
        BlurTransform(sigma=1.5),
        BlurTransform(length=7, angle=0.4),
        SensorNoiseTransform(6.0, 40, seed=3),
    ],
    ids=["lighting", "defocus", "motion", "noise+jpeg"],
)
def test_photometric_transforms_keep_boxes_and_the_object_in_place(transform):
    img, boxes = _object_image()
    np.testing.assert_array_equal(transform.apply_box(boxes), boxes)
    out = transform.apply_image(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    # blur spreads the red by a few pixels at most; nothing moves
    np.testing.assert_allclose(_red_box(out), boxes[0], atol=5)


@pytest.mark.parametrize("max_count,max_cover", [(4, 0.3), (12, 0.95)])
def test_occluders_never_hide_the_whole_box(max_count, max_cover):
    img, boxes = _object_image(200, 240, (60, 50, 180, 150))
    aug = RandomOccluders(max_count=max_count, max_cover=max_cover, prob=1.0)
    hidden_any = 0
    for seed in range(30):
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=boxes.copy())
        aug(inp)
        np.testing.assert_array_equal(inp.boxes, boxes)
        # object pixels still pure red, i.e. not covered at all (an anti-aliased edge with
        # alpha <= 0.5 is not counted by the augmentation but tints a pixel, hence the margin)
        changed = (inp.image != img).any(axis=2)[50:150, 60:180]
        assert changed.mean() <= max_cover + 0.05, (seed, changed.mean())
        assert (~changed).sum() >= 0.04 * changed.size, seed  # some of the object shows
        hidden_any += changed.any()
    assert hidden_any >= 20  # they do cover part of the object


def test_occluders_with_zero_cover_leave_the_box_alone():
    img, boxes = _object_image(200, 240, (60, 50, 180, 150))
    aug = RandomOccluders(max_count=3, max_cover=0.0, prob=1.0)
    for seed in range(10):
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=boxes.copy())
        aug(inp)
        inside = (inp.image != img).any(axis=2)[50:150, 60:180]
        # anti-aliased edges (alpha < 0.5) may tint a border pixel, nothing more
        assert inside.mean() < 0.02


def test_camera_augmentations_are_deterministic_given_the_seed():
    img, boxes = _object_image()
    augs = T.AugmentationList(camera_augmentations(ProceduralBackgrounds(), canvas_short_side=96))

    def run(seed):
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=boxes.copy())
        augs(inp)
        return inp.image, inp.boxes

    (a, ba), (b, bb), (c, _) = run(5), run(5), run(6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ba, bb)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_camera_augmentations_keep_the_box_on_the_object():
    """The whole chain, a red object on procedural scenes (whose colours avoid pure red)."""
    img, boxes = _object_image()
    augs = T.AugmentationList(
        [
            RandomCameraView(_black, canvas_short_side=150, frame_prob=0.0),
            RandomLighting(glare_prob=0.0),
            RandomCameraBlur(max_sigma=1.0, max_length=3),
        ]
    )
    for seed in range(12):
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=boxes.copy())
        augs(inp)
        h, w = inp.image.shape[:2]
        box = np.clip(inp.boxes[0], 0, [w, h, w, h])
        _assert_box_covers(_red_box(inp.image), box, tol=3.0, slack=1.25)


def test_procedural_background_is_deterministic_and_sized():
    a = ProceduralBackgrounds()(np.random.default_rng(1), 61, 83)
    b = ProceduralBackgrounds()(np.random.default_rng(1), 61, 83)
    assert a.shape == (61, 83, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_image_backgrounds_crop_the_files(tmp_path):
    from PIL import Image

    path = tmp_path / "bg.png"
    Image.fromarray(np.full((40, 60, 3), (10, 200, 30), np.uint8)).save(path)
    out = ImageBackgrounds([str(path)], "RGB")(np.random.default_rng(0), 30, 50)
    assert out.shape == (30, 50, 3)
    np.testing.assert_array_equal(out[0, 0], (10, 200, 30))
    with pytest.raises(ValueError, match="at least one"):
        ImageBackgrounds([], "RGB")


def test_bad_camera_parameters_are_refused():
    with pytest.raises(ValueError, match="scale"):
        RandomCameraView(_black, scale=(0.9, 0.2))
    with pytest.raises(ValueError, match="perspective"):
        RandomCameraView(_black, perspective=1.0)
    with pytest.raises(ValueError, match="max_cover"):
        RandomOccluders(max_cover=1.0)
    assert isinstance(
        RandomSensorNoise(prob=0.0).get_transform(np.zeros((4, 4, 3))), T.NoOpTransform
    )


def _green_pool(tmp_path, n=3):
    """Fine-tuning dicts of green objects (a white margin around each), category k for the k-th."""
    from detectron2.structures import BoxMode
    from PIL import Image

    dicts = []
    for k in range(n):
        img = np.full((80, 60, 3), 255, np.uint8)
        img[10:70, 8:52] = (0, 255, 0)
        img[30:40, 20:30] = (0, 200, 0)
        path = str(tmp_path / f"green{k}.png")
        Image.fromarray(img).save(path)
        ann = {"bbox": [0, 0, 60, 80], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 5 + k}
        dicts.append({"file_name": path, "annotations": [ann], "horizontal_flip": k == 1})
    return dicts


def test_other_objects_are_placed_with_their_boxes_and_classes(tmp_path):
    from retrieval_ext.data.augment import ObjectPool

    img, boxes = _object_image()
    pool = ObjectPool(_green_pool(tmp_path), "RGB")
    aug = RandomCameraView(
        _black, scale=(0.3, 0.5), canvas_short_side=300, frame_prob=0.0, others=pool, max_others=3
    )
    count = 0
    for seed in range(12):
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=boxes.copy())
        tfm = aug(inp)
        placed = tfm.transforms[0].placed if isinstance(tfm, T.TransformList) else tfm.placed
        out = inp.image.astype(int)
        green = (out[..., 1] > 150) & (out[..., 0] < 80) & (out[..., 2] < 80)
        claimed = np.zeros(green.shape, bool)
        for box, category in placed:
            assert category in (5, 6, 7)
            x0, y0, x1, y1 = np.round(box).astype(int)
            # the box holds a green object that reaches near each of its sides (no margin was
            # pasted: the white border was trimmed)
            inside = green[y0:y1, x0:x1]
            assert inside.mean() > 0.3, (seed, box)
            assert inside[:, :3].any() and inside[:, -3:].any(), (seed, box)
            assert inside[:3].any() and inside[-3:].any(), (seed, box)
            claimed[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = True
        assert not (green & ~claimed).any(), seed  # every green pixel is in some box
        assert (out.min(axis=2) > 200).sum() == 0  # no white margin anywhere
        count += len(placed)
        _assert_box_covers(_red_box(inp.image), np.clip(inp.boxes[0], 0, 400))
    assert count >= 6


def test_mapper_annotates_the_placed_objects(tmp_path):
    from detectron2.structures import BoxMode
    from PIL import Image

    from retrieval_ext.data import RetrievalDatasetMapper
    from retrieval_ext.data.augment import ObjectPool

    img, _ = _object_image()
    path = str(tmp_path / "red.png")
    Image.fromarray(img).save(path)
    ann = {"bbox": [40, 30, 110, 90], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1}
    d = {"file_name": path, "image_id": "r", "height": 120, "width": 160, "annotations": [ann]}
    view = RandomCameraView(
        _black,
        scale=(0.3, 0.5),
        canvas_short_side=300,
        frame_prob=0.0,
        others=ObjectPool(_green_pool(tmp_path), "RGB"),
        max_others=3,
    )
    resize = T.ResizeShortestEdge(150, 1000)
    mapper = RetrievalDatasetMapper(is_train=True, augmentations=[view, resize], image_format="RGB")
    for seed in range(6):
        np.random.seed(seed)
        inst = mapper(dict(d))["instances"]
        np.random.seed(seed)
        inp = T.AugInput(img, boxes=np.array([[40.0, 30, 110, 90]]))
        tfm = view(inp)
        placed = tfm.placed
        assert inst.gt_classes.tolist() == [1] + [c for _, c in placed]
        # the placed boxes, halved by the resize from 300 to 150
        expected = np.array([b for b, _ in placed]).reshape(-1, 4) / 2
        np.testing.assert_allclose(inst.gt_boxes.tensor[1:].numpy(), expected, atol=1e-3)
