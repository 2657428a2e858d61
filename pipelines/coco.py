"""COCO person keypoints -> per-image records (the first hop of a sample; `pipelines.augment` next).

Instance selection is the official HRNet loader's (`lib/dataset/coco.py`,
`_load_coco_keypoint_annotation_kernal`), which serves both training and validation with
ground-truth boxes (`USE_GT_BBOX`):

- only category 1 (person), never `iscrowd`;
- boxes cleaned to the image: x1 = max(0, x), y1 = max(0, y), x2 = min(W-1, x1 + max(0, w-1)),
  y2 = min(H-1, y1 + max(0, h-1)); kept if `area` > 0 and x2 >= x1 and y2 >= y1, as [x1, y1, x2-x1,
  y2-y1] (the box that sets centre and scale);
- instances without any labelled keypoint are dropped.

Where we are stricter, and why: a box must have w > 0 and h > 0 before cleaning (the design's
filter; the official code turns w <= 1 into a zero-width box) and must not clean to a single point
(its crop scale would be 0); "labelled" means v > 0 (official: any non-zero value among the 51,
which agrees on valid COCO); keypoints must be 51 finite numbers with v in {0, 1, 2}.

`for_training=False` keeps the same instance rules (what the official validation with GT boxes
evaluates; COCOeval ignores GT persons with num_keypoints == 0 anyway) and the images left without
persons: evaluation and detector-box inference go over every image of the file. Every rejected
entry is counted under one reason (`SkipCounts`); only a file that cannot be read as COCO at all
raises `DataError`. No image is opened here: each is decoded once, in the Ray tasks.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipelines.uris import join, read_json_at
from psm_model.coco_eval import json_int
from psm_model.coco_keypoints import NUM_JOINTS, PERSON_CATEGORY_ID
from psm_model.config import Config, DataConfig
from psm_model.errors import PsmError, redact_secrets
from psm_model.files import collector_paused
from psm_model.geometry import boxes_to_centers_scales

log = logging.getLogger(__name__)


# reason -> what it counts. Image-level reasons count entries of "images", the rest count
# entries of "annotations"; an annotation of a rejected image counts as 'unknown_image'.
SKIP_REASONS = {
    "bad_image": "image entry: not an object, or id / file_name / width / height invalid",
    "unsafe_file_name": "image entry: file_name absolute or escaping the image folder",
    "empty_image": "image left without persons (training only)",
    "bad_annotation": "annotation: not an object, or id not an integer",
    "unknown_image": "annotation: image_id not among the (accepted) images",
    "not_person": "annotation: category_id is not 1 (person)",
    "crowd": "annotation: iscrowd (the official loader never uses crowd regions)",
    "bad_box": "annotation: bbox not 4 finite numbers, w or h <= 0, area <= 0, outside the image",
    "bad_keypoints": "annotation: keypoints not 51 finite numbers with v in {0, 1, 2}",
    "no_keypoints": "annotation: no labelled keypoint (v > 0)",
}
# reasons that point at broken data rather than the selection rules: logged as a warning
_DATA_PROBLEMS = frozenset(SKIP_REASONS) - {"empty_image", "not_person", "crowd", "no_keypoints"}


class DataError(PsmError, ValueError):
    """An annotation file that cannot be used at all; the message names the file and the field."""


class SkipCounts(Counter):
    """Skipped entries by reason (keys of SKIP_REASONS); a Counter, so files' counts add up."""

    def skip(self, reason: str) -> None:
        if reason not in SKIP_REASONS:  # a typo would otherwise invent a new, undocumented reason
            raise KeyError(f"unknown skip reason {reason!r}")
        self[reason] += 1

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items()) if v) or "none"


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: ndarray fields have no tuple equality
class PersonRecord:
    ann_id: int
    box: tuple[float, float, float, float]  # cleaned COCO xywh in image pixels
    keypoints: np.ndarray  # (17, 3) float32: x, y, v as in COCO (v: 0 unlabelled, 1 hidden, 2 seen)
    num_keypoints: int  # keypoints with v > 0
    area: float  # COCO segment area (the OKS scale)
    center: np.ndarray  # (2,) float32 crop centre, pixels
    scale: np.ndarray  # (2,) float32 crop size (w, h) in units of PIXEL_STD, padding included


@dataclass(frozen=True, slots=True, eq=False)
class ImageRecord:
    image_id: int
    file_name: str
    path: str  # absolute
    width: int
    height: int
    persons: list[PersonRecord]


def load_split(cfg: Config, split: Literal["train", "val"]) -> tuple[list[ImageRecord], SkipCounts]:
    """The config's train or val split (data.root, data.{split}_images / _annotations) for
    `model.input_size` and `data.box_padding`; val keeps the images without persons."""
    if split not in ("train", "val"):
        raise ValueError(f"split: {split!r} is not one of ('train', 'val')")
    root = cfg.data.root  # a folder, or a URI (s3://bucket/coco): images are read in the tasks
    return load_coco_persons(
        join(root, getattr(cfg.data, f"{split}_images")),
        join(root, getattr(cfg.data, f"{split}_annotations")),
        cfg.model.input_size,
        cfg.data.box_padding,
        for_training=split == "train",
    )


@collector_paused()  # millions of containers made, no cycle among them
def load_coco_persons(
    images_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    input_size_hw: tuple[int, int],
    padding: float = DataConfig.box_padding,
    for_training: bool = True,
) -> tuple[list[ImageRecord], SkipCounts]:
    """Images with their selected persons (module docstring) and the skips by reason."""
    ann_path = _shown(annotation_file)
    data = _read_json(annotation_file)
    images_raw = _list_field(data, "images", ann_path)
    anns_raw = _list_field(data, "annotations", ann_path)
    root = _root(images_dir)
    aspect = input_size_hw[1] / input_size_hw[0]
    skips = SkipCounts()

    images = _parse_images(images_raw, root, ann_path, skips)
    _check_unique_ids(anns_raw, ann_path)
    persons = _parse_persons(anns_raw, images, aspect, padding, skips)

    records = []
    for image_id, (file_name, path, width, height) in images.items():
        if for_training and not persons[image_id]:
            skips.skip("empty_image")
            continue
        records.append(ImageRecord(image_id, file_name, path, width, height, persons[image_id]))

    kept = sum(len(r.persons) for r in records)
    level = logging.WARNING if any(skips[r] for r in _DATA_PROBLEMS) else logging.INFO
    log.log(
        level,
        "%s: %d images, %d persons; skipped: %s",
        ann_path,
        len(records),
        kept,
        skips.summary(),
    )
    return records, skips


def load_images(
    images_dir: str | os.PathLike, info_file: str | os.PathLike
) -> tuple[list[ImageRecord], SkipCounts]:
    """Every image of a COCO JSON's "images" list (the test-dev image info, or an annotation
    file, whose annotations are not read), without persons, in id order; skips by reason."""
    info_path = _shown(info_file)
    skips = SkipCounts()
    images = _parse_images(
        _list_field(_read_json(info_file), "images", info_path),
        _root(images_dir),
        info_path,
        skips,
    )
    level = logging.WARNING if skips else logging.INFO
    log.log(level, "%s: %d images; skipped: %s", info_path, len(images), skips.summary())
    return [ImageRecord(i, *images[i], persons=[]) for i in sorted(images)], skips


def _parse_images(
    entries: list, root: Path | str, source: str, skips: SkipCounts
) -> dict[int, tuple[str, str, int, int]]:
    """image id -> (file_name, absolute path, width, height) of the usable entries."""
    images: dict[int, tuple[str, str, int, int]] = {}
    for i, entry in enumerate(entries):
        image = _parse_image(entry, root)
        if isinstance(image, str):
            skips.skip(image)
            continue
        if image[0] in images:  # ambiguous: which entry do its annotations / boxes belong to?
            raise DataError(f"{source}: images[{i}].id: duplicate image id {image[0]}")
        images[image[0]] = image[1:]
    return images


def _check_unique_ids(anns: list, source: str) -> None:
    """Two annotations with one id: pycocotools keeps the last for both, so evaluation would run on
    other ground truth than training; which one is meant cannot be guessed."""
    seen: dict[int, int] = {}
    for i, ann in enumerate(anns):
        ann_id = json_int(ann.get("id")) if isinstance(ann, dict) else None
        if ann_id is None:
            continue  # counted as bad_annotation
        if ann_id in seen:
            raise DataError(
                f"{source}: annotations[{i}].id: duplicate annotation id {ann_id} "
                f"(first at annotations[{seen[ann_id]}])"
            )
        seen[ann_id] = i


def _read_json(location: str | os.PathLike) -> dict:
    # the segment polygons are never read here, and are most of COCO train's memory
    data = read_json_at(str(location), DataError, frozenset({"segmentation"}))
    if not isinstance(data, dict):
        raise DataError(
            f"{_shown(location)}: top level: expected a JSON object, got {type(data).__name__}"
        )
    return data


def _shown(location: str | os.PathLike) -> str:
    return redact_secrets(str(location))


def _root(images_dir: str | os.PathLike) -> Path | str:
    """An image folder as image paths are built from it: an absolute Path, or a URI as given."""
    return str(images_dir) if "://" in str(images_dir) else Path(images_dir).resolve()


def _list_field(data: dict, field: str, path: str) -> list:
    if field not in data:
        raise DataError(f"{path}: {field}: missing (not a COCO annotation file?)")
    if not isinstance(data[field], list):
        raise DataError(f"{path}: {field}: expected a list, got {type(data[field]).__name__}")
    return data[field]


def _parse_image(entry: object, root: Path | str) -> tuple[int, str, str, int, int] | str:
    """(id, file_name, absolute path, width, height), or the skip reason."""
    if not isinstance(entry, dict):
        return "bad_image"
    image_id, width, height = json_int(entry.get("id")), entry.get("width"), entry.get("height")
    width, height = json_int(width), json_int(height)
    file_name = entry.get("file_name")
    if image_id is None or width is None or height is None or width <= 0 or height <= 0:
        return "bad_image"
    if not isinstance(file_name, str) or not file_name:
        return "bad_image"
    # Lexical check, not resolve(): symlinks inside the folder are the owner's choice, but a name
    # must not climb out of it or replace it ('../x.jpg', '/etc/passwd').
    if isinstance(root, str):  # a URI: keys are plain strings, '..' is only a name part
        key = posixpath.normpath(file_name)
        if "\x00" in file_name or key.startswith(("/", "../")) or key in ("..", "."):
            return "unsafe_file_name"
        return image_id, file_name, join(root, key), width, height
    # strings, not Path objects: a COCO-size file has 118k of them (3x faster); a plain name
    # (COCO's all are) needs no normalising
    if "/" not in file_name and "\x00" not in file_name and file_name not in (".", ".."):
        return image_id, file_name, _inside(root) + file_name, width, height
    path = os.path.normpath(os.path.join(root, file_name))
    if "\x00" in file_name or os.path.isabs(file_name) or not path.startswith(_inside(root)):
        return "unsafe_file_name"
    return image_id, file_name, path, width, height


@functools.lru_cache(maxsize=8)
def _inside(root: Path) -> str:
    """The prefix of every path inside `root` (root itself is not an image)."""
    return os.path.join(str(root), "")


def _finite_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type(): bool is no number


def _finite(values: object, n: int) -> np.ndarray | None:
    """`values` as float64 if it is a list of exactly n finite JSON numbers."""
    if not isinstance(values, list) or len(values) != n:
        return None
    array = np.asarray(values)  # numbers give an int/float dtype; strings, None, lists do not
    if array.shape != (n,) or array.dtype.kind not in "iuf":
        return None
    array = array.astype(np.float64)
    return array if np.isfinite(array).all() else None


def _clean_box(ann: dict, width: int, height: int) -> tuple[float, float, float, float] | None:
    box, area = ann.get("bbox"), ann.get("area")
    # four plain numbers, checked without numpy: 254k boxes in a COCO-size file
    if not (isinstance(box, list) and len(box) == 4):
        return None
    if not (_finite_number(box[0]) and _finite_number(box[1])):
        return None
    if not (_finite_number(box[2]) and _finite_number(box[3])):
        return None
    if not _finite_number(area) or area <= 0:
        return None
    x, y, w, h = map(float, box)
    if w <= 0 or h <= 0:
        return None
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(width - 1.0, x1 + max(0.0, w - 1)), min(height - 1.0, y1 + max(0.0, h - 1))
    if x2 < x1 or y2 < y1 or (x2 == x1 and y2 == y1):  # outside the image, or a point
        return None
    return (x1, y1, x2 - x1, y2 - y1)


def _parse_persons(
    anns: list, images: dict, aspect: float, padding: float, skips: SkipCounts
) -> dict[int, list[PersonRecord]]:
    """image id -> its person records; each skipped annotation counted by the first reason in
    this order: bad_annotation, unknown_image, not_person, crowd, bad_box, bad_keypoints,
    no_keypoints. The keypoints of all boxed persons are checked as one array (a COCO-size file
    has 254k of them; one small array each took most of the parse)."""
    boxed: list[tuple[int, int, tuple, float, object]] = []  # image id, ann id, box, area, kp
    for ann in anns:
        if not isinstance(ann, dict) or (ann_id := json_int(ann.get("id"))) is None:
            skips.skip("bad_annotation")
            continue
        image_id = json_int(ann.get("image_id"))
        image = images.get(image_id)  # (file_name, path, width, height)
        if image is None:
            skips.skip("unknown_image")
        elif ann.get("category_id") != PERSON_CATEGORY_ID:
            skips.skip("not_person")
        elif ann.get("iscrowd", 0):
            skips.skip("crowd")
        elif (box := _clean_box(ann, image[2], image[3])) is None:
            skips.skip("bad_box")
        else:
            boxed.append((image_id, ann_id, box, float(ann["area"]), ann.get("keypoints")))

    flat, good = _keypoint_rows([b[4] for b in boxed])
    visibility = flat[:, 2::3]
    good &= ((visibility == 0) | (visibility == 1) | (visibility == 2)).all(axis=1)
    counts = (visibility > 0).sum(axis=1)
    keypoints = flat.astype(np.float32).reshape(-1, NUM_JOINTS, 3)  # (17*3,) -> (17, x y v)
    keypoints.flags.writeable = False  # records are shared by every epoch's augmentation
    centers, scales = boxes_to_centers_scales([b[2] for b in boxed], aspect, padding)
    centers.flags.writeable = scales.flags.writeable = False
    persons: dict[int, list[PersonRecord]] = {image_id: [] for image_id in images}
    for k, (image_id, ann_id, box, area, _) in enumerate(boxed):
        if not good[k]:
            skips.skip("bad_keypoints")
            continue
        if counts[k] == 0:
            skips.skip("no_keypoints")
            continue
        persons[image_id].append(
            PersonRecord(ann_id, box, keypoints[k], int(counts[k]), area, centers[k], scales[k])
        )
    return persons


def _keypoint_rows(values: list) -> tuple[np.ndarray, np.ndarray]:
    """(M, 51) float64 of the annotations' keypoint lists and which rows are exactly 51 finite
    JSON numbers; the fast path takes them as one array, a malformed file row by row."""
    n = NUM_JOINTS * 3
    if not values:
        return np.zeros((0, n)), np.zeros(0, bool)
    try:
        array = np.array(values)
    except (ValueError, TypeError):  # ragged
        array = np.array([])
    if array.dtype.kind in "iuf" and array.shape == (len(values), n):
        array = array.astype(np.float64)
        return array, np.isfinite(array).all(axis=1)
    rows = [_finite(v, n) for v in values]  # ragged, strings, nulls: each row on its own
    good = np.array([r is not None for r in rows], bool)
    return np.array([r if r is not None else np.zeros(n) for r in rows]).reshape(-1, n), good
