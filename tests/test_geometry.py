"""Hand-computed checks of the crop geometry: affine maps, crops, flips, box checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from psm_model.geometry import (
    COCO_FLIP_PAIRS,
    PIXEL_STD,
    affine_matrix,
    box_problem,
    flip_keypoints,
    flip_permutation,
    transform_points,
    warp_crop,
)

SIZE_HW = (256, 192)
# scale[0] * 200 == crop width: one image pixel is one crop pixel, so expected values are easy
UNIT_SCALE = np.array([192 / PIXEL_STD, 256 / PIXEL_STD])


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
