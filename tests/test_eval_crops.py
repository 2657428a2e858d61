"""Test-time crops: one crop hand-checked, the GT joints mapped into it, the batch equal to its rows
one by one, and the Ray Data graph covering every ground-truth person."""

import cv2
import numpy as np
from test_augment import INPUT, _assert_same_columns, _rows, _stack
from test_geometry import SIZE_HW, UNIT_SCALE

from pipelines.augment import rows_to_columns
from pipelines.eval_crops import eval_batch, eval_crops, eval_samples, make_eval_crop
from psm_model.config_yaml import load_config
from psm_model.geometry import affine_matrix, box_to_center_scale, transform_points
from psm_model.recipe import CropSpec


def test_eval_crop_centre_pixel_and_matrix():
    image = np.zeros((300, 400, 3), np.uint8)
    image[150, 200] = (10, 20, 30)
    crop, matrix = make_eval_crop(image, np.array([200.0, 150.0]), UNIT_SCALE, SIZE_HW)
    assert crop.shape == (256, 192, 3) and crop.dtype == np.uint8
    # image pixel (200, 150) = crop pixel (96, 128), exactly on the grid: no interpolation
    assert tuple(crop[128, 96]) == (10, 20, 30)
    assert crop.sum() == 60
    np.testing.assert_allclose(matrix, affine_matrix((200.0, 150.0), UNIT_SCALE, 0.0, SIZE_HW))


def test_an_eval_crop_warps_into_a_given_batch_row():
    image = cv2.GaussianBlur(
        np.random.default_rng(9).integers(0, 256, (240, 320, 3), np.uint8), (5, 5), 0
    )
    center, scale = box_to_center_scale((100, 40, 80, 160), aspect=192 / 256, padding=1.25)
    batch = np.zeros((3, *SIZE_HW, 3), np.uint8)
    into, _ = make_eval_crop(image, center, scale, SIZE_HW, out=batch[2])
    assert np.shares_memory(into, batch)
    np.testing.assert_array_equal(batch[2], make_eval_crop(image, center, scale, SIZE_HW)[0])
    assert not batch[0].any() and not batch[1].any()


def test_eval_samples_map_gt_joints_into_the_crop(synthetic_root):
    records, rows = _rows(synthetic_root, "val2017", for_training=False)
    rec, row = records[0], rows[0]
    samples = eval_samples(row, input_size=INPUT, max_pixels=10**8)
    assert [s["ann_id"] for s in samples] == [p.ann_id for p in rec.persons]
    p = rec.persons[0]
    m = affine_matrix(p.center, p.scale, 0.0, INPUT)
    vis = p.keypoints[:, 2] > 0
    expected = transform_points(p.keypoints[vis, :2], m)
    np.testing.assert_allclose(samples[0]["keypoints"][vis], expected, atol=1e-3)
    # the box centre lands on the crop centre (w/2, h/2)
    np.testing.assert_allclose(
        transform_points(p.center, m), [INPUT[1] / 2, INPUT[0] / 2], atol=1e-4
    )


def test_eval_batch_gives_exactly_the_per_row_samples(synthetic_root):
    records, val = _rows(synthetic_root, "val2017", for_training=False)
    ev = eval_batch(rows_to_columns(val), input_size=INPUT, max_pixels=10**8)
    per_row = [s for row in val for s in eval_samples(row, input_size=INPUT, max_pixels=10**8)]
    _assert_same_columns(ev, _stack(per_row))
    assert ev["ann_id"].tolist() == [p.ann_id for r in records for p in r.persons]


def test_eval_crops_cover_every_ground_truth_person(ray_local, synthetic_root):
    cfg = load_config(None, ["model.input_size=[128,96]", "model.width=8"])
    records, rows = _rows(synthetic_root, "val2017", for_training=False)
    out = eval_crops(rows, CropSpec.of(cfg), cfg.data.cpus_per_task, concurrency=2).take_all()
    assert [(s["image_id"], s["ann_id"]) for s in out] == [
        (r.image_id, p.ann_id) for r in records for p in r.persons
    ]
    assert all(s["score"] == 1.0 and s["skip"] == "" for s in out)
