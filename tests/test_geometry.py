"""Hand-computed checks of the crop geometry and the training augmentation."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from psm_model.config import DataConfig
from psm_model.geometry import (
    COCO_FLIP_PAIRS,
    PIXEL_STD,
    Augmentation,
    affine_matrix,
    box_problem,
    box_to_center_scale,
    draw_augmentation,
    flip_keypoints,
    flip_permutation,
    half_body_box,
    make_eval_crop,
    make_training_sample,
    transform_points,
    warp_crop,
)

SIZE_HW = (256, 192)
# scale[0] * 200 == crop width: one image pixel is one crop pixel, so expected values are easy
UNIT_SCALE = np.array([192 / PIXEL_STD, 256 / PIXEL_STD])
NO_AUG = Augmentation(scale_factor=1.0, rotation_deg=0.0, flip=False, half_body=False)


def three_point_affine(center, scale, rot_deg, size_hw, inverse=False):
    """The official construction, rebuilt here: centre and a point half a box-width "above" it,
    rotated by the angle, plus a third point at a right angle; cv2 solves for the map."""
    out_h, out_w = size_hw
    src_w = scale[0] * PIXEL_STD
    t = np.deg2rad(rot_deg)
    up = np.array([0.0, -0.5 * src_w])
    up_rot = np.array(
        [up[0] * np.cos(t) - up[1] * np.sin(t), up[0] * np.sin(t) + up[1] * np.cos(t)]
    )

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    src0, dst0 = np.asarray(center, float), np.array([out_w * 0.5, out_h * 0.5])
    src1, dst1 = src0 + up_rot, dst0 + np.array([0.0, -0.5 * out_w])
    src = np.float32([src0, src1, third(src0, src1)])
    dst = np.float32([dst0, dst1, third(dst0, dst1)])
    return cv2.getAffineTransform(dst, src) if inverse else cv2.getAffineTransform(src, dst)


def pose(points: dict[int, tuple[float, float]]) -> np.ndarray:
    kpts = np.zeros((17, 3))
    for j, (x, y) in points.items():
        kpts[j] = (x, y, 2)
    return kpts


# ---------------------------------------------------------------------------------------------
# affine maps


def test_box_centre_lands_on_crop_centre_and_back():
    center, scale = np.array([321.5, 140.25]), np.array([1.7, 2.2])
    fwd = affine_matrix(center, scale, 30.0, SIZE_HW)
    np.testing.assert_allclose(transform_points(center, fwd), [96.0, 128.0], atol=1e-9)
    inv = affine_matrix(center, scale, 30.0, SIZE_HW, inverse=True)
    np.testing.assert_allclose(transform_points(np.array([96.0, 128.0]), inv), center, atol=1e-9)
    pts = np.random.default_rng(0).uniform(-50, 500, (10, 2))
    np.testing.assert_allclose(transform_points(transform_points(pts, fwd), inv), pts, atol=1e-9)


def test_scale_follows_crop_width_over_box_width():
    # box 400 px wide into a 192 px crop: 100 px in the image is 48 px in the crop
    fwd = affine_matrix((300.0, 200.0), (2.0, 2.0), 0.0, SIZE_HW)
    np.testing.assert_allclose(transform_points(np.array([400.0, 200.0]), fwd), [96 + 48, 128])


def test_rotation_by_90_degrees_hand_computed():
    fwd = affine_matrix((100.0, 100.0), UNIT_SCALE, 90.0, SIZE_HW)
    # 10 px right of the centre goes 10 px up (counter-clockwise as displayed, y down) ...
    np.testing.assert_allclose(
        transform_points(np.array([110.0, 100.0]), fwd), [96, 118], atol=1e-9
    )
    # ... and 10 px below it goes 10 px right
    np.testing.assert_allclose(
        transform_points(np.array([100.0, 110.0]), fwd), [106, 128], atol=1e-9
    )


def test_closed_form_equals_official_three_point_construction():
    rng = np.random.default_rng(1)
    for _ in range(50):
        center = rng.uniform(0, 640, 2)
        scale = rng.uniform(0.2, 4.0, 2)
        rot = rng.uniform(-180, 180)
        size = (int(rng.integers(32, 512)), int(rng.integers(32, 512)))
        for inverse in (False, True):
            ours = affine_matrix(center, scale, rot, size, inverse=inverse)
            ref = three_point_affine(center, scale, rot, size, inverse=inverse)
            # the reference goes through float32 points: compare relative to the translation size
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_eval_crop_centre_pixel_and_matrix():
    image = np.zeros((300, 400, 3), np.uint8)
    image[150, 200] = (10, 20, 30)
    crop, matrix = make_eval_crop(image, np.array([200.0, 150.0]), UNIT_SCALE, SIZE_HW)
    assert crop.shape == (256, 192, 3) and crop.dtype == np.uint8
    # image pixel (200, 150) = crop pixel (96, 128), exactly on the grid: no interpolation
    assert tuple(crop[128, 96]) == (10, 20, 30)
    assert crop.sum() == 60
    np.testing.assert_allclose(matrix, affine_matrix((200.0, 150.0), UNIT_SCALE, 0.0, SIZE_HW))


def test_crop_outside_image_is_zero():
    image = np.full((50, 50, 3), 255, np.uint8)
    crop = warp_crop(image, affine_matrix((25.0, 25.0), UNIT_SCALE, 0.0, SIZE_HW), SIZE_HW)
    assert crop[0, 0].sum() == 0 and crop[128, 96].sum() == 3 * 255


# ---------------------------------------------------------------------------------------------
# flip


def test_flip_permutation_swaps_pairs():
    perm = flip_permutation()
    assert perm[0] == 0 and perm[9] == 10 and perm[10] == 9 and perm[15] == 16
    assert sorted(perm) == list(range(17))
    assert len(COCO_FLIP_PAIRS) == 8


def test_flip_moves_left_wrist_to_right_wrist_mirrored():
    kpts = pose({9: (120.0, 90.0), 10: (30.0, 95.0), 0: (70.0, 20.0)})
    kpts[10, 2] = 1
    out = flip_keypoints(kpts, image_width=200)
    np.testing.assert_allclose(out[10], [200 - 1 - 120, 90, 2])  # left wrist became right: x 79
    np.testing.assert_allclose(out[9], [169, 95, 1])
    np.testing.assert_allclose(out[0], [129, 20, 2])  # nose stays the nose
    np.testing.assert_array_equal(flip_keypoints(out, 200), kpts)


def test_flip_twice_is_identity_batched_2d():
    # on a 1/8 px grid, so width - 1 - x is exact in float32 and the round trip can be exact
    kpts = (np.random.default_rng(2).integers(0, 8 * 300, (4, 17, 2)) / 8).astype(np.float32)
    once = flip_keypoints(kpts, 301)
    assert once.dtype == np.float32 and once.shape == (4, 17, 2)
    np.testing.assert_array_equal(flip_keypoints(once, 301), kpts)


@pytest.mark.parametrize("rot", [0.0, 33.0])
def test_mirrored_affine_equals_official_flip_then_crop(rot):
    """Official: fliplr the image, x -> W - 1 - x for joints and centre, crop. Ours: mirror folded
    into the crop matrix. The maps are equal; cv2 interpolates in fixed point (1/32 px steps,
    15-bit integer weights), and the mirrored path uses mirrored weights whose integer rounding can
    differ by one unit: measured, at most 1 level on < 0.05% of pixels, even on pure noise."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
    kpts = pose({j: tuple(rng.uniform(40, 200, 2)) for j in range(17)})
    center, scale = np.array([110.3, 95.7]), np.array([0.9, 1.2])
    aug = Augmentation(scale_factor=1.0, rotation_deg=rot, flip=True, half_body=False)

    crop, xy, vis = make_training_sample(
        image, kpts, center, scale, DataConfig(), SIZE_HW, np.random.default_rng(0), aug
    )

    width = image.shape[1]
    ref_matrix = affine_matrix((width - 1 - center[0], center[1]), scale, rot, SIZE_HW)
    ref_crop = warp_crop(np.ascontiguousarray(np.fliplr(image)), ref_matrix, SIZE_HW)
    ref_xy = transform_points(flip_keypoints(kpts, width)[:, :2], ref_matrix)

    diff = np.abs(crop.astype(int) - ref_crop.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    ok = vis.astype(bool)
    assert ok.sum() > 10
    np.testing.assert_allclose(xy[ok], ref_xy[ok], atol=1e-3)


def test_training_flip_hand_computed():
    image = np.zeros((200, 200, 3), np.uint8)
    kpts = pose({9: (120.0, 90.0)})  # left wrist, right of the centre
    aug = Augmentation(scale_factor=1.0, rotation_deg=0.0, flip=True, half_body=False)
    _, xy, vis = make_training_sample(
        image, kpts, np.array([100.0, 100.0]), UNIT_SCALE, DataConfig(), SIZE_HW,
        np.random.default_rng(0), aug,
    )  # fmt: skip
    # mirrored x = 199 - 120 = 79, mirrored centre x = 99: crop x = 79 - 99 + 96 = 76
    assert vis[10] == 1 and vis[9] == 0
    np.testing.assert_allclose(xy[10], [76, 118])


# ---------------------------------------------------------------------------------------------
# half body


FULL_POSE = pose(
    {0: (50, 10), 5: (40, 30), 6: (60, 30), 9: (30, 60), 10: (70, 60),
     11: (45, 70), 12: (55, 70), 13: (45, 100), 14: (55, 100), 15: (45, 130), 16: (55, 130)}
)  # fmt: skip


def test_half_body_box_upper_or_lower_hand_computed():
    aspect = 0.75
    seen = {}
    rng = np.random.default_rng(4)
    for _ in range(20):
        center, scale = half_body_box(FULL_POSE, rng, aspect)
        seen[tuple(np.round(center, 4))] = scale
    # upper: joints 0, 5, 6, 9, 10: mean (50, 38); box 40 x 50, wider than 0.75 * 50 = 37.5,
    # so h = 40 / 0.75 = 53.33; scale = (40, 53.33) / 200 * 1.5 = (0.3, 0.4)
    # lower: joints 11..16: mean (50, 100); box 10 x 60 -> w = 45; scale = (45, 60) * 1.5 / 200
    assert set(seen) == {(50.0, 38.0), (50.0, 100.0)}
    np.testing.assert_allclose(seen[(50.0, 38.0)], [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(seen[(50.0, 100.0)], [0.3375, 0.45], rtol=1e-6)


def test_half_body_equal_probability():
    rng = np.random.default_rng(5)
    upper = sum(half_body_box(FULL_POSE, rng, 0.75)[0][1] < 50 for _ in range(4000))
    assert 0.45 < upper / 4000 < 0.55


def test_half_body_fallbacks_as_official():
    rng = np.random.default_rng(6)
    only_lower = FULL_POSE.copy()
    only_lower[:11, 2] = 0
    assert all(half_body_box(only_lower, rng, 0.75)[0][1] == 100 for _ in range(20))
    # two upper joints (not > 2) and three lower: always the lower body
    few = pose({5: (40, 30), 6: (60, 30), 11: (45, 70), 12: (55, 70), 13: (45, 100)})
    assert all(half_body_box(few, rng, 0.75)[0][1] > 60 for _ in range(20))
    # one joint per group: official falls back to the upper body, which has < 2 joints -> None
    assert half_body_box(pose({0: (5, 5), 11: (6, 6)}), rng, 0.75) is None


def test_half_body_needs_more_than_min_visible_joints():
    cfg = dataclasses.replace(
        DataConfig(), half_body_prob=1.0, scale_min=1, scale_max=1, rotation_prob=0, flip=False
    )
    image = np.zeros((200, 200, 3), np.uint8)
    center, scale = np.array([50.0, 70.0]), UNIT_SCALE
    aug = Augmentation(1.0, 0.0, False, half_body=True)
    # FULL_POSE has 11 visible joints > 8: the crop is the half-body box, not the person box
    _, xy, _ = make_training_sample(
        image, FULL_POSE, center, scale, cfg, SIZE_HW, np.random.default_rng(0), aug
    )
    _, xy_plain, _ = make_training_sample(
        image, FULL_POSE, center, scale, cfg, SIZE_HW, np.random.default_rng(0), NO_AUG
    )
    assert not np.allclose(xy, xy_plain)
    eight = FULL_POSE.copy()
    eight[[0, 15, 16], 2] = 0  # 8 visible: not more than 8, no half body
    _, xy8, _ = make_training_sample(
        image, eight, center, scale, cfg, SIZE_HW, np.random.default_rng(0), aug
    )
    np.testing.assert_allclose(xy8[eight[:, 2] > 0], xy_plain[eight[:, 2] > 0])


# ---------------------------------------------------------------------------------------------
# augmentation draws, visibility, determinism


def test_joints_pushed_outside_the_crop_become_invisible():
    image = np.zeros((400, 400, 3), np.uint8)
    kpts = pose(
        {0: (200.0, 200.0), 5: (200.0 + 96.0, 200.0), 6: (200.0 - 96.5, 150.0), 7: (190, 400)}
    )
    kpts[3] = (210.0, 210.0, 0)  # unlabelled
    _, xy, vis = make_training_sample(
        image, kpts, np.array([200.0, 200.0]), UNIT_SCALE, DataConfig(), SIZE_HW,
        np.random.default_rng(0), NO_AUG,
    )  # fmt: skip
    np.testing.assert_allclose(xy[0], [96, 128])
    assert vis[0] == 1
    assert vis[5] == 0  # x = 192 == crop width: outside (valid x is 0 <= x < 192)
    assert vis[6] == 0  # x = -0.5
    assert vis[7] == 0  # y = 328 >= 256
    assert vis[3] == 0 and tuple(xy[3]) == (0, 0)
    assert vis.dtype == np.uint8 and xy.dtype == np.float32


def test_draw_augmentation_ranges_and_rates():
    cfg = DataConfig()
    rng = np.random.default_rng(7)
    draws = [draw_augmentation(rng, cfg) for _ in range(3000)]
    scales = np.array([d.scale_factor for d in draws])
    rots = np.array([d.rotation_deg for d in draws])
    assert cfg.scale_min <= scales.min() and scales.max() <= cfg.scale_max
    assert (
        np.abs(rots).max() <= cfg.rotation and np.abs(rots).max() > 40
    )  # uniform reaches the edge
    assert 0.55 < (rots != 0).mean() < 0.65  # rotation_prob 0.6
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    assert 0.25 < np.mean([d.half_body for d in draws]) < 0.35
    no_flip = dataclasses.replace(cfg, flip=False)
    assert not any(draw_augmentation(rng, no_flip).flip for _ in range(100))


def test_same_seed_same_sample_other_seed_differs():
    image = cv2.GaussianBlur(
        np.random.default_rng(8).integers(0, 256, (240, 320, 3), np.uint8), (5, 5), 0
    )
    center, scale = box_to_center_scale((100, 40, 80, 160), aspect=192 / 256)

    def sample(seed):
        rng = np.random.default_rng([seed, 3, 42, 7])  # (seed, epoch, image id, annotation id)
        return make_training_sample(
            image, FULL_POSE + [100, 40, 0], center, scale, DataConfig(), SIZE_HW, rng
        )

    a, b, c = sample(0), sample(0), sample(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.allclose(a[1], c[1])


def test_crops_warp_into_a_given_batch_row():
    image = cv2.GaussianBlur(
        np.random.default_rng(9).integers(0, 256, (240, 320, 3), np.uint8), (5, 5), 0
    )
    center, scale = box_to_center_scale((100, 40, 80, 160), aspect=192 / 256)
    batch = np.zeros((3, *SIZE_HW, 3), np.uint8)
    kw = dict(cfg_data=DataConfig(), input_size_hw=SIZE_HW)
    crop, xy, vis = make_training_sample(
        image, FULL_POSE + [100, 40, 0], center, scale, rng=np.random.default_rng(1), **kw
    )
    into = make_training_sample(
        image, FULL_POSE + [100, 40, 0], center, scale, rng=np.random.default_rng(1),
        out=batch[1], **kw,
    )  # fmt: skip
    assert np.shares_memory(into[0], batch)
    np.testing.assert_array_equal(batch[1], crop)
    np.testing.assert_array_equal(into[1], xy)
    assert not batch[0].any() and not batch[2].any()
    make_eval_crop(image, center, scale, SIZE_HW, out=batch[2])
    np.testing.assert_array_equal(batch[2], make_eval_crop(image, center, scale, SIZE_HW)[0])


@pytest.mark.parametrize("scale", [(0.0, 0.0), (float("nan"), 1.0)])
def test_affine_matrix_names_an_unusable_scale(scale):
    # before: ZeroDivisionError (scale 0) or a matrix of NaNs, naming nothing
    with pytest.raises(ValueError, match="affine_matrix: crop centre"):
        affine_matrix((10.0, 10.0), scale, 0.0, (64, 48))


def test_box_problem_reasons():
    assert box_problem([10, 10, 30, 40], (640, 480)) == ""
    assert box_problem([10, 10, 1e-50, 1e-50]) == "a side under 1.0 pixel"
    assert box_problem([1e39, 10, 30, 40]) == "beyond 1e+06 pixels"
    assert box_problem([700, 10, 30, 40], (640, 480)) == "outside the image"
    assert box_problem([-29, 10, 30, 40], (640, 480)) == ""  # one pixel column inside
