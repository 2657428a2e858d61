"""COCO reading: the official selection on real annotations, and every kind of bad input."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipelines.coco import DataError, load_coco_persons, load_split
from pipelines.images import decode_image
from psm_model.config_yaml import load_config

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


def test_load_split_reads_the_configured_train_and_val_files(coco_root):
    cfg = load_config(None, [f"data.root={coco_root}", "data.box_padding=1.5"])
    for split, images, ann, for_training in (
        ("train", "train2017", TRAIN, True),
        ("val", "val2017", VAL, False),
    ):
        records, skips = load_split(cfg, split)
        expected, expected_skips = load_coco_persons(
            coco_root / images, coco_root / ann, cfg.model.input_size, 1.5, for_training
        )
        assert skips == expected_skips
        assert [(r.image_id, r.path) for r in records] == [(r.image_id, r.path) for r in expected]
        for got, want in zip(records, expected, strict=True):
            for a, b in zip(got.persons, want.persons, strict=True):
                np.testing.assert_array_equal(a.scale, b.scale)  # the configured padding
    with pytest.raises(ValueError, match="split: 'test' is not one of"):
        load_split(cfg, "test")  # type: ignore[arg-type]


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
