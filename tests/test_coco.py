"""COCO reading: the official selection on real annotations, and every kind of bad input."""

from __future__ import annotations

import io
import json
import logging
import math

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from pipelines.coco import DataError, ImageError, decode_image, load_coco_persons

INPUT_HW = (384, 288)
TRAIN = "annotations/person_keypoints_train2017.json"
VAL = "annotations/person_keypoints_val2017.json"


# --- real annotations ------------------------------------------------------------------------


def _official_count(ann_file: str) -> set[int]:
    """Ann ids the official rules keep, computed independently through pycocotools."""
    coco = COCO(ann_file)
    kept = set()
    for ann in coco.loadAnns(coco.getAnnIds(catIds=[1], iscrowd=False)):
        image = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        x1, y1 = max(0, x), max(0, y)
        x2 = min(image["width"] - 1, x1 + max(0, w - 1))
        y2 = min(image["height"] - 1, y1 + max(0, h - 1))
        if ann["area"] > 0 and x2 >= x1 and y2 >= y1 and ann["num_keypoints"] > 0:
            kept.add(ann["id"])
    return kept


def test_real_train_sample_keeps_the_official_86_persons(coco_root):
    records, skips = load_coco_persons(coco_root / "train2017", coco_root / TRAIN, INPUT_HW)
    ids = {p.ann_id for r in records for p in r.persons}
    assert len(ids) == 86
    assert ids == _official_count(str(coco_root / TRAIN))
    # 172 annotations = 86 kept + 5 crowd + 81 without keypoints; 80 images, 28 with persons
    assert dict(skips) == {"crowd": 5, "no_keypoints": 81, "empty_image": 80 - len(records)}
    assert all(r.persons for r in records)
    assert all(r.path.startswith(str(coco_root / "train2017")) for r in records)


def test_validation_mode_keeps_every_image_and_the_same_persons(coco_root):
    records, skips = load_coco_persons(
        coco_root / "val2017", coco_root / VAL, INPUT_HW, for_training=False
    )
    assert len(records) == 79
    assert sum(len(r.persons) for r in records) == 68
    assert "empty_image" not in skips


def test_hand_checked_center_and_scale(coco_root):
    records, _ = load_coco_persons(coco_root / "val2017", coco_root / VAL, INPUT_HW)
    image = next(r for r in records if r.image_id == 397133)
    person = next(p for p in image.persons if p.ann_id == 200887)
    # bbox [388.66, 69.92, 109.41, 277.62] in a 640x427 image: cleaned w, h = 108.41, 276.62
    np.testing.assert_allclose(person.box, (388.66, 69.92, 108.41, 276.62), atol=1e-6)
    # centre = (388.66 + 108.41 / 2, 69.92 + 276.62 / 2)
    np.testing.assert_allclose(person.center, (442.865, 208.23), atol=1e-3)
    # w < 0.75 h, so w = 0.75 * 276.62 = 207.465; scale = (207.465, 276.62) / 200 * 1.25
    np.testing.assert_allclose(person.scale, (1.29666, 1.72888), atol=1e-5)
    assert person.keypoints.shape == (17, 3) and person.keypoints.dtype == np.float32
    assert person.num_keypoints == 13
    assert tuple(person.keypoints[0]) == (433, 94, 2)
    assert not person.keypoints.flags.writeable


def test_decode_real_image_matches_annotation_size(coco_root):
    records, _ = load_coco_persons(coco_root / "val2017", coco_root / VAL, INPUT_HW)
    image = decode_image(records[0].path, max_pixels=10**8)
    assert image.shape == (records[0].height, records[0].width, 3) and image.dtype == np.uint8


# --- bad annotation files ----------------------------------------------------------------------


def _annotation(**changes) -> dict:
    keypoints = [0.0] * 51
    keypoints[15:18] = [30.0, 20.0, 2]  # left shoulder
    ann = {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 40, 50]}
    ann.update(area=1200.0, keypoints=keypoints, num_keypoints=1)
    ann.update(changes)
    return ann


def _write(tmp_path, images=None, annotations=None, raw: str | None = None):
    if raw is None:
        images = images if images is not None else [_image()]
        raw = json.dumps({"images": images, "annotations": annotations or []})
    path = tmp_path / "ann.json"
    path.write_text(raw)
    return path


def _image(**changes) -> dict:
    return {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80, **changes}


def _load(tmp_path, images=None, annotations=None, **kwargs):
    ann_file = _write(tmp_path, images, annotations)
    return load_coco_persons(tmp_path, ann_file, INPUT_HW, **kwargs)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"bbox": [10, 10, 0, 20]}, "bad_box"),
        ({"bbox": [10, 10, -5, 20]}, "bad_box"),
        ({"bbox": [10, 10, math.nan, 20]}, "bad_box"),
        ({"bbox": [200, 10, 20, 20]}, "bad_box"),  # right of a 100-pixel-wide image
        ({"bbox": [10, 10, 40]}, "bad_box"),
        ({"bbox": "10 10 40 50"}, "bad_box"),
        ({"area": 0}, "bad_box"),
        ({"keypoints": [1.0] * 50}, "bad_keypoints"),
        ({"keypoints": [math.nan] + [1.0] * 50}, "bad_keypoints"),
        ({"keypoints": [1.0, 1.0, 3] * 17}, "bad_keypoints"),  # v must be 0, 1 or 2
        ({"keypoints": ["1"] * 51}, "bad_keypoints"),
        ({"keypoints": [0] * 51}, "no_keypoints"),
        ({"iscrowd": 1}, "crowd"),
        ({"image_id": 999}, "unknown_image"),
        ({"category_id": 2}, "not_person"),
        ({"id": "seven"}, "bad_annotation"),
    ],
)
def test_one_bad_instance_is_a_counted_skip(tmp_path, changes, reason):
    good = _annotation(id=1)
    records, skips = _load(tmp_path, annotations=[good, _annotation(**changes)])
    assert [p.ann_id for p in records[0].persons] == [1]
    assert dict(skips) == {reason: 1}


@pytest.mark.parametrize("file_name", ["../x.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_file_names_escaping_the_image_folder_are_skipped(tmp_path, file_name):
    images = [_image(), _image(id=2, file_name=file_name)]
    records, skips = _load(tmp_path, images, [_annotation(id=1), _annotation(id=2, image_id=2)])
    assert [r.image_id for r in records] == [1]
    assert dict(skips) == {"unsafe_file_name": 1, "unknown_image": 1}


def test_inner_folders_and_dots_that_stay_inside_are_fine(tmp_path):
    images = [_image(file_name="sub/./b/../a.jpg")]
    records, skips = _load(tmp_path, images, [_annotation()])
    assert records[0].path == str(tmp_path.resolve() / "sub" / "a.jpg")
    assert not skips


def test_bad_image_entries_and_empty_images(tmp_path, caplog):
    images = [_image(), _image(id=2, width=0), _image(id=3, file_name=None), _image(id=4)]
    with caplog.at_level(logging.INFO, logger="pipelines.coco"):
        records, skips = _load(tmp_path, images, [_annotation()])
    assert [r.image_id for r in records] == [1]
    assert dict(skips) == {"bad_image": 2, "empty_image": 1}
    assert "skipped: bad_image=2, empty_image=1" in caplog.text
    records, skips = _load(tmp_path, images, [_annotation()], for_training=False)
    assert [r.image_id for r in records] == [1, 4] and "empty_image" not in skips


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"images": [], "annotations": [', "not valid JSON"),
        ('{"images": [], "annotations": {}}', "annotations: expected a list, got dict"),
        ('{"annotations": []}', "images: missing"),
        ('[{"images": []}]', "top level: expected a JSON object"),
        (json.dumps({"images": [_image(), _image()], "annotations": []}), "images[1].id"),
    ],
)
def test_unusable_annotation_files_raise_data_error_naming_file_and_field(tmp_path, raw, field):
    ann_file = _write(tmp_path, raw=raw)
    with pytest.raises(DataError) as error:
        load_coco_persons(tmp_path, ann_file, INPUT_HW)
    assert str(ann_file) in str(error.value) and field in str(error.value)


def test_duplicate_annotation_ids_are_an_error_naming_file_and_id(tmp_path):
    # pycocotools would keep the last of the two and return it for both
    anns = [_annotation(id=5), _annotation(id=6), _annotation(id=5, bbox=[20, 20, 30, 30])]
    with pytest.raises(DataError) as error:
        _load(tmp_path, annotations=anns)
    message = str(error.value)
    assert str(tmp_path / "ann.json") in message
    assert "annotations[2].id: duplicate annotation id 5 (first at annotations[0])" in message


def test_missing_annotation_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.json: cannot read"):
        load_coco_persons(tmp_path, tmp_path / "nope.json", INPUT_HW)


# --- image decoding ----------------------------------------------------------------------------


@pytest.fixture
def picture() -> np.ndarray:
    """RGB (60, 80, 3): a red left half, a blue right half."""
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, :40] = (255, 0, 0)
    image[:, 40:] = (0, 0, 255)
    return image


def _encode(image_rgb: np.ndarray, ext: str, *params: int) -> bytes:
    if image_rgb.ndim == 3:  # cv2 writes BGR(A)
        rgba = image_rgb.shape[2] == 4
        image_rgb = cv2.cvtColor(image_rgb, cv2.COLOR_RGBA2BGRA if rgba else cv2.COLOR_RGB2BGR)
    return cv2.imencode(ext, image_rgb, list(params))[1].tobytes()


def test_decode_returns_rgb(tmp_path, picture):
    for ext in (".png", ".jpg"):
        path = tmp_path / f"p{ext}"
        path.write_bytes(_encode(picture, ext))
        image = decode_image(path, max_pixels=10_000)
        assert image.shape == (60, 80, 3)
        np.testing.assert_allclose(image[30, 10], (255, 0, 0), atol=8)  # red stays red
        np.testing.assert_allclose(image[30, 70], (0, 0, 255), atol=8)


def test_decode_progressive_jpeg_and_trailing_bytes(tmp_path, picture):
    path = tmp_path / "p.jpg"
    path.write_bytes(_encode(picture, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1) + b"\0" * 50)
    assert decode_image(path, max_pixels=10_000).shape == (60, 80, 3)


def test_gray_and_rgba_become_rgb(tmp_path, picture):
    (tmp_path / "g.png").write_bytes(_encode(picture[..., 0], ".png"))
    gray = decode_image(tmp_path / "g.png", max_pixels=10_000)
    assert gray.shape == (60, 80, 3) and (gray == picture[..., :1]).all()
    rgba = np.dstack([picture, np.full((60, 80), 9, np.uint8)])
    (tmp_path / "a.png").write_bytes(_encode(rgba, ".png"))
    assert (decode_image(tmp_path / "a.png", max_pixels=10_000) == picture).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path, picture):
    image_module = pytest.importorskip("PIL.Image", reason="PIL writes the CMYK JPEG; cv2 cannot")
    image_module.fromarray(picture).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    image = decode_image(tmp_path / "c.jpg", max_pixels=10_000)
    assert image.shape == (60, 80, 3)
    np.testing.assert_allclose(image[30, 10], (255, 0, 0), atol=20)
    np.testing.assert_allclose(image[30, 70], (0, 0, 255), atol=20)


def test_exif_orientation_is_ignored(tmp_path, picture):
    image_module = pytest.importorskip("PIL.Image", reason="PIL writes the EXIF orientation tag")
    exif = image_module.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": COCO's annotations use the stored pixels
    buffer = io.BytesIO()
    image_module.fromarray(picture).save(buffer, "JPEG", exif=exif.tobytes())
    (tmp_path / "e.jpg").write_bytes(buffer.getvalue())
    assert decode_image(tmp_path / "e.jpg", max_pixels=10_000).shape == (60, 80, 3)


def test_bad_images_raise_image_error_naming_the_path(tmp_path, picture):
    jpeg = _encode(picture, ".jpg")
    cases = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "no_eoi.jpg": jpeg[:-2],
        "random.jpg": np.random.default_rng(0).bytes(2000),
        "empty.jpg": b"",
        "truncated.png": _encode(picture, ".png")[:-40],
        "header_only.jpg": jpeg[:20],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "missing.jpg"]:
        with pytest.raises(ImageError, match=str(tmp_path / name)):
            decode_image(tmp_path / name, max_pixels=10_000)


def test_huge_declared_size_is_refused_before_decoding(tmp_path, picture):
    png = bytearray(_encode(picture, ".png"))
    png[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height: 10^10 pixels, bad CRC
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    with pytest.raises(ImageError, match="100000x100000 pixels"):
        decode_image(tmp_path / "bomb.png", max_pixels=89_478_485)
    (tmp_path / "p.jpg").write_bytes(_encode(picture, ".jpg"))
    with pytest.raises(ImageError, match="80x60 pixels"):
        decode_image(tmp_path / "p.jpg", max_pixels=80 * 60 - 1)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path, picture):
    # a small valid JPEG followed by 32 MiB of (sparse) zeros: before, the whole file was read
    # into memory first (a multi-GB file would exhaust the task's memory), then called corrupt
    path = tmp_path / "huge.jpg"
    path.write_bytes(_encode(picture, ".jpg"))
    with open(path, "r+b") as f:
        f.truncate(32 << 20)
    with pytest.raises(ImageError, match=r"huge\.jpg: file of 33,554,432 bytes") as error:
        decode_image(path, max_pixels=10_000)
    assert error.value.reason == "too_large"
