"""Decoding (quarter offset, DARK, map back) and the flip test, against hand-computed heatmaps and
independent re-statements of the official HRNet / DarkPose semantics."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from psm_model.codec import HeatmapCodec
from psm_model.decode import dark_kernel_size, decode_heatmaps, flip_back, flip_shift
from psm_model.geometry import affine_matrix, flip_keypoints, flip_permutation, transform_points
from psm_model.loss import render_targets


def identity_crop(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """centre/scale whose heatmap -> image map is the identity on an (h, w) map."""
    return np.array([[w / 2, h / 2]]), np.array([[w / 200, h / 200]])


def one_map(h: int, w: int, values: dict[tuple[int, int], float]) -> np.ndarray:
    hm = np.zeros((1, 1, h, w), np.float32)
    for (x, y), v in values.items():
        hm[0, 0, y, x] = v
    return hm


# ---------------------------------------------------------------------------------------------
# Quarter offset on hand-computed maps
# ---------------------------------------------------------------------------------------------


def decode_one(hm: np.ndarray, method: str = "quarter") -> tuple[np.ndarray, float]:
    c, s = identity_crop(*hm.shape[-2:])
    coords, maxvals = decode_heatmaps(hm, c, s, method=method)
    return coords[0, 0], float(maxvals[0, 0, 0])


def test_single_peak_symmetric_neighbours():
    xy, score = decode_one(one_map(8, 6, {(3, 4): 1.0, (2, 4): 0.5, (4, 4): 0.5}))
    assert xy.tolist() == [3.0, 4.0] and score == 1.0


def test_higher_right_neighbour_and_higher_upper_neighbour():
    xy, _ = decode_one(one_map(8, 6, {(3, 4): 1.0, (4, 4): 0.6, (2, 4): 0.5, (3, 3): 0.7}))
    assert xy.tolist() == [3.25, 3.75]  # +0.25 toward x = 4, -0.25 toward y = 3


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (1, 4, [1.0, 4.0]),  # px = 1: official bounds are 1 < px, no offset despite neighbours
        (2, 4, [2.25, 4.0]),
        (4, 4, [4.25, 4.0]),  # px = w - 2 is still interior
        (5, 4, [5.0, 4.0]),  # right border: no right neighbour, no offset
        (3, 6, [3.25, 6.0]),  # py = h - 2: y offset allowed, neighbours equal -> 0
        (3, 7, [3.0, 7.0]),  # bottom border row: no offset at all
    ],
)
def test_peak_near_and_on_the_border(x, y, expected):
    values = {(x, y): 1.0}
    if x + 1 < 6:
        values[(x + 1, y)] = 0.6
    if x - 1 >= 0:
        values[(x - 1, y)] = 0.5
    xy, _ = decode_one(one_map(8, 6, values))
    assert xy.tolist() == expected


@pytest.mark.parametrize("fill", [0.0, -0.3])
def test_zero_or_negative_map_decodes_to_pixel_zero(fill):
    hm = np.full((1, 1, 8, 6), fill, np.float32)
    hm[0, 0, 5, 3] = fill  # a flat map: no peak anywhere
    c, s = np.array([[100.0, 50.0]]), np.array([[0.6, 0.8]])
    coords, maxvals = decode_heatmaps(hm, c, s)
    corner = transform_points(np.zeros(2), affine_matrix(c[0], s[0], 0.0, (8, 6), inverse=True))
    np.testing.assert_allclose(coords[0, 0], corner)
    assert maxvals[0, 0, 0] == np.float32(fill)


# ---------------------------------------------------------------------------------------------
# Against the official get_final_preds, restated independently (loops, cv2 3-point affine)
# ---------------------------------------------------------------------------------------------


def official_final_preds(hm: np.ndarray, centers: np.ndarray, scales: np.ndarray):
    n, j, h, w = hm.shape
    flat = hm.reshape(n, j, -1)
    idx, maxvals = flat.argmax(2), flat.max(2)[..., None]
    preds = np.stack([idx % w, idx // w], -1).astype(np.float32) * (maxvals > 0)
    for a in range(n):
        for b in range(j):
            px, py = (int(math.floor(v + 0.5)) for v in preds[a, b])
            if 1 < px < w - 1 and 1 < py < h - 1:
                m = hm[a, b]
                diff = np.array([m[py, px + 1] - m[py, px - 1], m[py + 1, px] - m[py - 1, px]])
                preds[a, b] += np.sign(diff) * 0.25
    out = np.zeros(preds.shape)
    for a in range(n):  # three point pairs: centre, a point above it, and the perpendicular
        src0 = centers[a].astype(np.float32)
        src1 = src0 + np.array([0, -0.5 * scales[a, 0] * 200], np.float32)
        dst0 = np.array([w * 0.5, h * 0.5], np.float32)
        dst1 = dst0 + np.array([0, -0.5 * w], np.float32)

        def third(p, q):
            d = p - q
            return q + np.array([-d[1], d[0]], np.float32)

        src = np.stack([src0, src1, third(src0, src1)]).astype(np.float32)
        dst = np.stack([dst0, dst1, third(dst0, dst1)]).astype(np.float32)
        inv = cv2.getAffineTransform(dst, src)
        out[a] = preds[a] @ inv[:, :2].T + inv[:, 2]
    return out, maxvals


@pytest.mark.parametrize("size_hw", [(64, 48), (96, 72), (192, 144), (7, 5), (3, 3)])
def test_matches_official_get_final_preds(size_hw):
    h, w = size_hw
    rng = np.random.default_rng(h * 1000 + w)
    n, j = 4, 17
    hm = rng.random((n, j, h, w)).astype(np.float32) * 0.5
    # peaks on every border, corners, ties, zero and negative maps
    specials = [(0, 0), (w - 1, h - 1), (0, h // 2), (w - 1, h // 2), (w // 2, 0), (1, 1)]
    for k, (x, y) in enumerate(specials):
        hm[0, k, y, x] = 1.0
    hm[1, 0] = 0.0
    hm[1, 1] = -0.2
    hm[1, 2, 1, 1] = hm[1, 2, 2, 2] = 2.0  # tie: the first in row-major order wins
    hm[2] = np.round(hm[2] * 4) / 4  # many equal neighbours -> sign 0
    centers = rng.uniform(50, 500, (n, 2))
    scales = rng.uniform(0.3, 3.0, (n, 2))
    ref, ref_max = official_final_preds(hm, centers, scales)
    for inp in (hm, torch.from_numpy(hm)):
        coords, maxvals = decode_heatmaps(inp, centers, scales)
        np.testing.assert_allclose(coords, ref, atol=1e-3)  # cv2 works in float32
        np.testing.assert_array_equal(maxvals, ref_max)


@pytest.mark.parametrize(("input_hw", "stride"), [((384, 288), 2), ((256, 192), 4)])
def test_map_back_is_the_input_crop_affine_at_u_times_stride(input_hw, stride):
    """Heatmap pixel u decodes to the image point of input pixel u * stride: the stride comes
    from the heatmap size, never from a constant; renderer + decoder round-trip exactly."""
    h, w = input_hw[0] // stride, input_hw[1] // stride
    center, scale = np.array([321.5, 207.25]), np.array([1.1, 1.1 * input_hw[0] / input_hw[1]])
    to_crop = affine_matrix(center, scale, 0.0, input_hw)
    # keypoints on the input lattice of multiples of the stride, incl. the first and last pixel
    crop_xy = np.array([[0, 0], [stride * 7, stride * 11], [(w - 1) * stride, (h - 1) * stride]])
    image_xy = transform_points(
        crop_xy.astype(float), affine_matrix(center, scale, 0, input_hw, True)
    )
    hm, _ = render_targets(
        torch.tensor(crop_xy[None], dtype=torch.float32), torch.ones(1, 3), (h, w), stride, 2.0
    )
    coords, _ = decode_heatmaps(hm, center[None], scale[None])
    np.testing.assert_allclose(coords[0], image_xy, atol=1e-9)
    np.testing.assert_allclose(transform_points(coords[0], to_crop), crop_xy, atol=1e-9)


def test_codec_decode_checks_size_and_errors_name_the_argument():
    codec = HeatmapCodec((96, 72), 4, 3.0)
    c, s = identity_crop(96, 72)
    with pytest.raises(ValueError, match="heatmaps: size"):
        codec.decode(torch.zeros(1, 17, 64, 48), c, s)
    with pytest.raises(ValueError, match="centers, scales"):
        decode_heatmaps(np.zeros((2, 17, 8, 6)), c, s)
    with pytest.raises(ValueError, match="method"):
        decode_heatmaps(np.zeros((1, 17, 8, 6)), c, s, method="argmax")
    coords, maxvals = decode_heatmaps(np.zeros((0, 17, 8, 6)), np.zeros((0, 2)), np.zeros((0, 2)))
    assert coords.shape == (0, 17, 2) and maxvals.shape == (0, 17, 1)


# ---------------------------------------------------------------------------------------------
# DARK
# ---------------------------------------------------------------------------------------------


def gaussian_maps(uv: np.ndarray, size_hw: tuple[int, int], sigma: float) -> np.ndarray:
    """Continuous (sub-pixel) Gaussians at heatmap coordinates uv (J, 2): (1, J, h, w)."""
    h, w = size_hw
    ys, xs = np.mgrid[0:h, 0:w]
    d2 = (xs[None] - uv[:, 0, None, None]) ** 2 + (ys[None] - uv[:, 1, None, None]) ** 2
    return np.exp(-d2 / (2 * sigma**2))[None].astype(np.float32)


def darkpose_reference(hm: np.ndarray, kernel: int) -> np.ndarray:
    """DarkPose semantics, full maps and loops: zero-padded cv2 blur, rescale, log, Newton step."""
    n, j, h, w = hm.shape
    flat = hm.reshape(n, j, -1)
    idx, maxvals = flat.argmax(2), flat.max(2)
    coords = np.stack([idx % w, idx // w], -1).astype(np.float64) * (maxvals > 0)[..., None]
    b = (kernel - 1) // 2
    for a in range(n):
        for k in range(j):
            padded = np.zeros((h + 2 * b, w + 2 * b))
            padded[b:-b, b:-b] = hm[a, k]
            m = cv2.GaussianBlur(padded, (kernel, kernel), 0)[b:-b, b:-b]
            m = np.log(np.maximum(m * hm[a, k].max() / m.max(), 1e-10))
            px, py = int(coords[a, k, 0]), int(coords[a, k, 1])
            if 1 < px < w - 2 and 1 < py < h - 2:
                g = np.array([m[py, px + 1] - m[py, px - 1], m[py + 1, px] - m[py - 1, px]]) / 2
                dxx = (m[py, px + 2] - 2 * m[py, px] + m[py, px - 2]) / 4
                dyy = (m[py + 2, px] - 2 * m[py, px] + m[py - 2, px]) / 4
                dxy = (
                    m[py + 1, px + 1] - m[py - 1, px + 1] - m[py + 1, px - 1] + m[py - 1, px - 1]
                ) / 4
                hess = np.array([[dxx, dxy], [dxy, dyy]])
                if np.linalg.det(hess) != 0:
                    coords[a, k] -= np.linalg.solve(hess, g)
    return coords


def test_dark_recovers_a_subpixel_centre_and_matches_darkpose():
    uv = np.array([[10.3, 7.6], [20.8, 30.1], [1.0, 5.0], [24.45, 38.9]])  # third: x border
    hm = gaussian_maps(uv, (48, 36), 2.0)
    c, s = identity_crop(48, 36)
    coords, _ = decode_heatmaps(hm, c, s, method="dark", dark_kernel=11)
    np.testing.assert_allclose(coords[0, [0, 1, 3]], uv[[0, 1, 3]], atol=0.01)
    assert coords[0, 2].tolist() == [1.0, 5.0]  # px = 1: outside DARK's stencil bounds
    noisy = hm + np.random.default_rng(0).random(hm.shape).astype(np.float32) * 0.05
    coords, _ = decode_heatmaps(noisy, c, s, method="dark", dark_kernel=11)
    ref = darkpose_reference(noisy, 11)  # identity crop: heatmap coords are image coords
    np.testing.assert_allclose(coords[0], ref[0], atol=1e-4)


def test_dark_kernel_follows_sigma():
    assert dark_kernel_size(2.0) == 11 and dark_kernel_size(3.0) == 17  # DarkPose's settings


# ---------------------------------------------------------------------------------------------
# Flip test
# ---------------------------------------------------------------------------------------------


def test_flip_shift_per_stride():
    assert flip_shift(4) == 0.75 and flip_shift(2) == 0.5 and flip_shift(1) == 0.0


def test_flip_back_hand_computed_at_stride_2():
    hm = torch.zeros(1, 17, 1, 6)
    hm[0, 1, 0] = torch.arange(6.0)  # left eye of the flipped crop: the original's right eye
    out = flip_back(hm, stride=2)
    # reversed [5, 4, 3, 2, 1, 0], then moved right by half a pixel (edge repeated)
    assert out[0, 2, 0].tolist() == [5.0, 4.5, 3.5, 2.5, 1.5, 0.5]
    assert out[0, 1].abs().sum() == 0


def test_flip_back_with_shift_one_is_the_official_step():
    hm = torch.rand(2, 17, 5, 7)
    ref = hm.flip(-1)[:, torch.as_tensor(flip_permutation())]
    ref[..., 1:] = ref.clone()[..., :-1]
    assert torch.equal(flip_back(hm, stride=4, shift=1.0), ref)
    twice = flip_back(flip_back(hm, stride=1), stride=1)
    assert torch.equal(twice, hm)  # no shift: flipping twice gives the input back


def mirrored_case(stride: int, input_hw: tuple[int, int], sigma: float):
    """Crop keypoints, and the heatmaps of the crop and of its mirror rendered without
    quantisation (what an ideal network sees): the flip test must not move the peaks."""
    h_in, w_in = input_hw
    rng = np.random.default_rng(stride)
    xy = rng.uniform(20, [w_in - 21, h_in - 21], (17, 2))  # input-crop pixels
    mirrored = flip_keypoints(np.concatenate([xy, np.ones((17, 1))], 1), w_in)[:, :2]
    size = (h_in // stride, w_in // stride)
    plain = gaussian_maps(xy / stride, size, sigma)
    flipped = gaussian_maps(mirrored / stride, size, sigma)
    center, scale = np.array([[w_in / 2, h_in / 2]]), np.array([[w_in / 200, h_in / 200]])
    return xy, torch.from_numpy(plain), torch.from_numpy(flipped), center, scale


@pytest.mark.parametrize("stride", [2, 4])
def test_flip_average_keeps_the_peaks(stride):
    input_hw = (256, 192)
    xy, plain, flipped, center, scale = mirrored_case(stride, input_hw, 2.0)
    codec = HeatmapCodec((input_hw[0] // stride, input_hw[1] // stride), stride, 2.0)
    ref, _ = codec.decode(plain, center, scale, method="dark")  # image px = input px here
    np.testing.assert_allclose(ref[0], xy, atol=0.02)
    averaged = codec.flip_average(plain, flipped)
    coords, _ = codec.decode(averaged, center, scale, method="dark")
    np.testing.assert_allclose(coords[0], ref[0], atol=0.05)
    # a blindly copied one-pixel shift misses by (1 - flip_shift) heatmap pixels in the flipped
    # half, i.e. stride (1 - flip_shift) / 2 input pixels in the average: 0.5 px at both strides
    official = 0.5 * (plain + flip_back(flipped, stride, shift=1.0))
    coords, _ = codec.decode(official, center, scale, method="dark")
    np.testing.assert_allclose(coords[0, :, 0] - ref[0, :, 0], 0.5, atol=0.1)
