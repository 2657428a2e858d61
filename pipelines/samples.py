"""One image row -> person samples: decode the image once, crop every person. No Ray here.

These are the functions the Ray Data graphs in `pipelines/datasets.py` map over the image rows;
tests and benchmarks call them directly. A sample that crosses the object store is small: the
uint8 crop plus keypoints in crop pixels, visibility, ids, centre/scale and the box score (about
0.33 MB at 384x288). Normalisation and heatmap targets are made batched in torch, in the train
step (`psm_model.codec`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from pipelines.coco import NUM_JOINTS, ImageError, ImageRecord, decode_image
from psm_model.config import DataConfig
from psm_model.geometry import make_eval_crop, make_training_sample, transform_points

# The one place that names the sample columns (and their per-row shapes / dtypes).
SAMPLE_COLUMNS = {
    "image": "uint8 (H, W, 3) RGB crop",
    "keypoints": f"float32 ({NUM_JOINTS}, 2) x, y in crop pixels (0 where not visible)",
    "visible": f"uint8 ({NUM_JOINTS},) 1 = labelled and inside the crop",
    "image_id": "int64",
    "ann_id": "int64 (annotation id, or the detection's index in its image)",
    "center": "float32 (2,) crop centre in image pixels",
    "scale": "float32 (2,) crop size / 200 (pixel_std), padding included",
    "score": "float32 box score (1 for ground-truth boxes)",
    "skip": "str: '' for a sample, else why this image gave none (ImageError.reason)",
}


def image_rows(
    records: Sequence[ImageRecord], scores: Sequence[np.ndarray] | None = None
) -> list[dict]:
    """Per-image rows for Ray Data: the person metadata as arrays, one row per image.

    `scores` gives each image's box scores (detections); ground-truth boxes score 1.
    """
    rows = []
    for i, rec in enumerate(records):
        n = len(rec.persons)
        rows.append(
            {
                "image_id": rec.image_id,
                "path": rec.path,
                "ann_ids": np.array([p.ann_id for p in rec.persons], np.int64),
                "keypoints": np.stack([p.keypoints for p in rec.persons]).astype(np.float32)
                if n
                else np.zeros((0, NUM_JOINTS, 3), np.float32),
                "centers": np.array([p.center for p in rec.persons], np.float32).reshape(n, 2),
                "scales": np.array([p.scale for p in rec.persons], np.float32).reshape(n, 2),
                "scores": np.ones(n, np.float32)
                if scores is None
                else np.asarray(scores[i], np.float32),
            }
        )
    return rows


def train_samples(
    row: dict, *, data: DataConfig, input_size: tuple[int, int], seed: int, epoch: int
) -> list[dict]:
    """Every person of one image, augmented. One generator per sample, seeded by (seed, epoch,
    image id, annotation id): the same samples whatever the number or order of workers."""
    try:
        image = decode_image(row["path"], data.max_image_pixels)
    except ImageError as e:
        return [_skip_row(row, e.reason, input_size)]
    out = []
    for k, ann_id in enumerate(row["ann_ids"]):
        rng = np.random.default_rng([seed, epoch, int(row["image_id"]), int(ann_id)])
        crop, xy, visible = make_training_sample(
            image, row["keypoints"][k], row["centers"][k], row["scales"][k], data, input_size, rng
        )
        out.append(_sample(row, k, crop, xy, visible))
    return out


def eval_samples(row: dict, *, input_size: tuple[int, int], max_pixels: int) -> list[dict]:
    """Every box of one image, cropped without augmentation (validation and inference)."""
    try:
        image = decode_image(row["path"], max_pixels)
    except ImageError as e:
        return [_skip_row(row, e.reason, input_size)]
    out = []
    for k in range(len(row["ann_ids"])):
        crop, matrix = make_eval_crop(image, row["centers"][k], row["scales"][k], input_size)
        xy = transform_points(row["keypoints"][k][:, :2], matrix)  # GT joints, crop pixels
        visible = row["keypoints"][k][:, 2] > 0
        out.append(_sample(row, k, crop, np.where(visible[:, None], xy, 0), visible))
    return out


def count_skips(skip_column: Iterable[str]) -> Counter:
    """Skip reasons in a batch's `skip` column ('' marks a real sample)."""
    return Counter(s for s in skip_column if s)


def _sample(row: dict, k: int, crop: np.ndarray, xy: np.ndarray, visible: np.ndarray) -> dict:
    return {
        "image": crop,
        "keypoints": np.asarray(xy, np.float32),
        "visible": np.asarray(visible, np.uint8),
        "image_id": int(row["image_id"]),
        "ann_id": int(row["ann_ids"][k]),
        "center": np.asarray(row["centers"][k], np.float32),
        "scale": np.asarray(row["scales"][k], np.float32),
        "score": float(row["scores"][k]),
        "skip": "",
    }


def _skip_row(row: dict, reason: str, input_size: tuple[int, int]) -> dict:
    # a row, not an exception: the epoch goes on and the count travels with the data
    return {
        "image": np.zeros((*input_size, 3), np.uint8),
        "keypoints": np.zeros((NUM_JOINTS, 2), np.float32),
        "visible": np.zeros(NUM_JOINTS, np.uint8),
        "image_id": int(row["image_id"]),
        "ann_id": -1,
        "center": np.zeros(2, np.float32),
        "scale": np.zeros(2, np.float32),
        "score": 0.0,
        "skip": reason,
    }
