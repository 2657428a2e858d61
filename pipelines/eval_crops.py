"""Test-time crops: every box of every image cropped as is, no augmentation, into the columns of a
training batch (`pipelines.augment.SAMPLE_COLUMNS`), with the ground-truth joints (if any) in crop
pixels. One mapper (`eval_batch`) for validation, `psm eval`, `psm infer` (the detector stage
included) and `psm serve`; `eval_crops` maps it over blocks of image rows on Ray Data, as
`pipelines.datasets.train_crops` does `train_batch`, for `pipelines.predict`'s pose actors.
Ray Data is imported by `eval_crops` alone, so Serve's replicas, which call the mapper
(`pipelines.serving`, `pipelines.detect`), never load it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipelines.augment import (
    BATCH_IMAGES,
    BatchColumns,
    columns_to_rows,
    rows_to_columns,
    sample_dicts,
)
from pipelines.images import ImageError, decode_image
from psm_model.geometry import affine_matrix, transform_points, warp_crop
from psm_model.recipe import CropSpec

if TYPE_CHECKING:
    import ray

NO_PERSON = "no_person"  # the skip reason of an image the detector found nobody in


def make_eval_crop(
    image: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    input_size_hw: tuple[int, int],
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unaugmented crop and its image -> crop matrix (`inverse=True` in `affine_matrix` inverts);
    `out` receives the crop (see `warp_crop`)."""
    matrix = affine_matrix(center, scale, 0.0, input_size_hw)
    return warp_crop(image, matrix, input_size_hw, out), matrix


def eval_batch(
    images: Mapping[str, Sequence],
    *,
    input_size: tuple[int, int],
    max_pixels: int,
    no_person_rows: bool = False,
    decoded: Sequence[np.ndarray | ImageError] | None = None,
) -> dict[str, np.ndarray]:
    """`train_batch` without augmentation: every box of every image cropped as is, with the GT
    joints (if any) in crop pixels (validation and inference). With `no_person_rows`, an image
    without boxes gives a skip row "no_person" (the detector stage of `psm infer`: every image
    sent must come back, so its part can close). `decoded`: the images already decoded, one per
    row (the ImageError of one that could not be), instead of decoding each row's path."""
    out = BatchColumns(images, input_size)
    for r, row in enumerate(columns_to_rows(images)):
        try:
            image = decode_image(row["path"], max_pixels) if decoded is None else decoded[r]
            if isinstance(image, ImageError):
                raise image
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


def eval_samples(row: dict, *, input_size: tuple[int, int], max_pixels: int) -> list[dict]:
    """One image row -> its unaugmented samples as dicts (`eval_batch` of one row)."""
    batch = eval_batch(rows_to_columns([row]), input_size=input_size, max_pixels=max_pixels)
    return sample_dicts(batch)


def eval_crops(
    rows: Sequence[dict],
    crop: CropSpec,
    cpus: float,
    *,
    num_blocks: int | None = None,
    concurrency: int | None = None,
    batch_images: int = BATCH_IMAGES,
) -> ray.data.Dataset:
    """Unaugmented crops of every box (ground truth or detections) for evaluation and inference;
    blocks and tasks as `train_crops` (`eval_batch` per block), `cpus` each (data.cpus_per_task)."""
    from pipelines.datasets import crops_graph  # Ray Data: imported here only (module docstring)

    make = functools.partial(eval_batch, input_size=crop.input_size, max_pixels=crop.max_pixels)
    return crops_graph(rows, make, num_blocks, concurrency, cpus, batch_images)
