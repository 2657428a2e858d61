"""Image rows -> person samples: decode each image once, crop every person. No Ray here.

`train_batch` / `eval_batch` are what the Ray Data graphs in `pipelines/datasets.py` map over
blocks of image rows: columns in, one batch of stacked sample columns out (SAMPLE_COLUMNS), the
crops warped straight into it. `train_samples` / `eval_samples` give one row's samples as dicts
(tests). A sample that crosses the object store is small: the uint8 crop plus keypoints in crop
pixels, visibility, ids, centre/scale and the box score (about 0.33 MB at 384x288).
Normalisation and heatmap targets are made batched in torch, in the train step
(`psm_model.codec`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipelines.coco import NUM_JOINTS, ImageError, ImageRecord, decode_image
from psm_model.config import DataConfig
from psm_model.geometry import make_eval_crop, make_training_sample, transform_points

# Images per `train_batch` / `eval_batch` call (one Ray task each) in the Ray Data graphs
# (`pipelines.datasets`). Fewer, larger tasks amortise Ray's per-task cost (~15-20 ms on 2 cores:
# 32 images gave ~1.15x the samples/s of 16 with one worker); 32 COCO images hold ~85 persons,
# 28 MB of crops at 384x288.
BATCH_IMAGES = 32

NO_PERSON = "no_person"  # the skip reason of an image the detector found nobody in

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


def train_batch(
    images: Mapping[str, Sequence],
    *,
    data: DataConfig,
    input_size: tuple[int, int],
    seed: int,
    epoch: int,
) -> dict[str, np.ndarray]:
    """A batch of image rows (the columns of `image_rows`, as Ray Data's numpy batches hold them)
    -> the columns of every person's augmented sample (SAMPLE_COLUMNS), in row order.

    Each image is decoded once; each sample draws from its own generator keyed by (seed, epoch,
    image id, annotation id), so the samples are the same whatever the batching, number or order
    of workers. An image that cannot be decoded gives one skip row.
    """
    rngs = SampleRngs(seed, epoch)
    out = _Columns(images, input_size)
    for row in _rows(images):
        try:
            image = decode_image(row["path"], data.max_image_pixels)
        except ImageError as e:
            out.add_skip(row, e.reason)
            continue
        image_id = int(row["image_id"])
        for k, ann_id in enumerate(row["ann_ids"]):
            i = out.next_index()
            _, xy, visible = make_training_sample(
                image, row["keypoints"][k], row["centers"][k], row["scales"][k], data,
                input_size, rngs.for_sample(image_id, int(ann_id)), out=out.image[i],
            )  # fmt: skip
            out.add_person(row, k, xy, visible)
    return out.columns()


def eval_batch(
    images: Mapping[str, Sequence],
    *,
    input_size: tuple[int, int],
    max_pixels: int,
    no_person_rows: bool = False,
) -> dict[str, np.ndarray]:
    """`train_batch` without augmentation: every box of every image cropped as is, with the GT
    joints (if any) in crop pixels (validation and inference). With `no_person_rows`, an image
    without boxes gives a skip row "no_person" (the detector stage of `psm infer`: every image
    sent must come back, so its part can close)."""
    out = _Columns(images, input_size)
    for row in _rows(images):
        try:
            image = decode_image(row["path"], max_pixels)
        except ImageError as e:
            out.add_skip(row, e.reason)
            continue
        if no_person_rows and not len(row["ann_ids"]):
            out.add_skip(row, NO_PERSON)
            continue
        for k in range(len(row["ann_ids"])):
            i = out.next_index()
            _, matrix = make_eval_crop(
                image, row["centers"][k], row["scales"][k], input_size, out=out.image[i]
            )
            kpts = row["keypoints"][k]
            visible = kpts[:, 2] > 0
            xy = transform_points(kpts[:, :2], matrix)  # GT joints, crop pixels
            out.add_person(row, k, np.where(visible[:, None], xy, 0), visible)
    return out.columns()


def train_samples(
    row: dict, *, data: DataConfig, input_size: tuple[int, int], seed: int, epoch: int
) -> list[dict]:
    """One image row -> its samples as dicts (`train_batch` of one row; tests, notebooks)."""
    batch = train_batch(_one(row), data=data, input_size=input_size, seed=seed, epoch=epoch)
    return sample_dicts(batch)


def eval_samples(row: dict, *, input_size: tuple[int, int], max_pixels: int) -> list[dict]:
    """One image row -> its unaugmented samples as dicts (`eval_batch` of one row)."""
    return sample_dicts(eval_batch(_one(row), input_size=input_size, max_pixels=max_pixels))


def rows_to_columns(rows: Sequence[dict]) -> dict[str, list]:
    """Image rows (`image_rows`) -> the column mapping `train_batch` / `eval_batch` take."""
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def sample_dicts(batch: Mapping[str, np.ndarray]) -> list[dict]:
    """Columns of samples -> one dict per sample (views, not copies)."""
    return [{k: batch[k][i] for k in SAMPLE_COLUMNS} for i in range(len(batch["skip"]))]


def count_skips(skip_column: Iterable[str]) -> Counter:
    """Skip reasons in a batch's `skip` column ('' marks a real sample)."""
    return Counter(s for s in skip_column if s)


class SampleRngs:
    """One generator per sample, keyed by (seed, epoch, image id, annotation id).

    Philox is counter based: keyed by (seed, epoch), a sample's stream starts at the counter
    (0, 0, image id, annotation id), so distinct samples get disjoint streams (each would need
    2^128 draws to reach the next). Re-keying one generator costs a few microseconds, where
    building `np.random.default_rng([seed, epoch, image, ann])` per sample costs about 11.
    `for_sample` returns the same Generator each time, set to that sample's stream start: use it
    before asking for the next sample's.
    """

    def __init__(self, seed: int, epoch: int) -> None:
        self._key = _uint64([seed, epoch])
        self._bits = np.random.Philox(key=self._key)
        self._generator = np.random.Generator(self._bits)

    def for_sample(self, image_id: int, ann_id: int) -> np.random.Generator:
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {"counter": _uint64([0, 0, image_id, ann_id]), "key": self._key},
            "buffer": np.zeros(4, np.uint64),
            "buffer_pos": 4,  # buffer empty: the first draw computes block (counter + 1)
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._generator


class _Columns:
    """The output columns of one batch, allocated once for the most rows the images can give
    (each person, or one skip row per image); crops are warped straight into `image`."""

    def __init__(self, images: Mapping[str, Sequence], input_size: tuple[int, int]) -> None:
        cap = sum(max(1, len(a)) for a in images.get("ann_ids", ()))
        self.image = np.empty((cap, *input_size, 3), np.uint8)
        self.keypoints = np.zeros((cap, NUM_JOINTS, 2), np.float32)
        self.visible = np.zeros((cap, NUM_JOINTS), np.uint8)
        self.image_id = np.zeros(cap, np.int64)
        self.ann_id = np.full(cap, -1, np.int64)
        self.center = np.zeros((cap, 2), np.float32)
        self.scale = np.zeros((cap, 2), np.float32)
        self.score = np.zeros(cap, np.float32)
        self.skip: list[str] = []

    def next_index(self) -> int:
        return len(self.skip)

    def add_person(self, row: dict, k: int, xy: np.ndarray, visible: np.ndarray) -> None:
        i = len(self.skip)
        self.keypoints[i] = xy
        self.visible[i] = visible
        self.image_id[i] = row["image_id"]
        self.ann_id[i] = row["ann_ids"][k]
        self.center[i] = row["centers"][k]
        self.scale[i] = row["scales"][k]
        self.score[i] = row["scores"][k]
        self.skip.append("")

    def add_skip(self, row: dict, reason: str) -> None:
        # a row, not an exception: the epoch goes on and the count travels with the data;
        # zero crop and keypoints, ann_id -1, same shapes, so batches still stack
        i = len(self.skip)
        self.image[i] = 0
        self.image_id[i] = row["image_id"]
        self.skip.append(reason)

    def columns(self) -> dict[str, np.ndarray]:
        n = len(self.skip)  # prefixes of C-contiguous arrays: no copies
        cols = {name: getattr(self, name)[:n] for name in SAMPLE_COLUMNS}
        cols["skip"] = np.array(self.skip, dtype=object)
        return cols


def _uint64(values: list[int]) -> np.ndarray:
    return np.array(values, np.int64).view(np.uint64)  # two's complement: -1 is a valid key too


def _rows(images: Mapping[str, Sequence]) -> Iterator[dict]:
    names = list(images)
    for i in range(len(images[names[0]]) if names else 0):
        yield {k: images[k][i] for k in names}


def _one(row: dict) -> dict[str, list]:
    return {k: [v] for k, v in row.items()}
