"""Hand-computed checks of the Gaussian targets and the input normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.official_loader import official_geometry, official_target
from pipelines.augment import make_training_sample
from pipelines.coco import load_coco_persons
from pipelines.images import decode_image
from psm_model.codec import HeatmapCodec
from psm_model.config import Config, DataConfig, ModelConfig
from psm_model.config_yaml import load_config
from psm_model.hrnet import normalize_images
from psm_model.loss import render_targets

TRAIN = "annotations/person_keypoints_train2017.json"


def render_one(x, y, stride, size_hw, sigma=2.0, visible=1):
    kpts = torch.tensor([[[x, y]]], dtype=torch.float32)
    heat, weight = render_targets(kpts, torch.tensor([[visible]]), size_hw, stride, sigma)
    return heat[0, 0], float(weight[0, 0])


@pytest.mark.parametrize(
    "stride, size_hw, peak_xy",
    [
        (4, (64, 48), (9, 13)),  # x: 37 / 4 + 0.5 = 9.75 -> 9; y: 50 / 4 + 0.5 = 13.0 -> 13
        (2, (128, 96), (19, 25)),  # x: 37 / 2 + 0.5 = 19.0 -> 19; y: 50 / 2 + 0.5 = 25.5 -> 25
    ],
)
def test_peak_and_window(stride, size_hw, peak_xy):
    sigma = 2.0
    heat, weight = render_one(37.0, 50.0, stride, size_hw, sigma)
    px, py = peak_xy
    assert heat.shape == size_hw and heat.dtype == torch.float32 and weight == 1.0
    assert heat[py, px] == 1.0 and heat.max() == 1.0
    assert heat[py, px + 1].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-6)
    assert heat[py - 1, px].item() == pytest.approx(math.exp(-1 / 8), rel=1e-6)
    assert heat[py + 6, px + 6].item() == pytest.approx(
        math.exp(-72 / 8), rel=1e-5
    )  # window corner
    assert heat[py, px + 7] == 0 and heat[py - 7, px] == 0  # outside |d| <= 3 sigma
    assert int((heat > 0).sum()) == 13 * 13


def test_sigma_three_window():
    heat, _ = render_one(100.0, 100.0, 2, (128, 96), sigma=3.0)
    assert heat[50, 50] == 1.0 and heat[50, 59] > 0 and heat[50, 60] == 0
    assert heat[50, 51].item() == pytest.approx(math.exp(-1 / 18), rel=1e-6)


def test_weights_invisible_and_off_map():
    size, stride = (64, 48), 4
    heat, weight = render_one(37.0, 50.0, stride, size, visible=0)
    assert weight == 0.0 and heat.abs().sum() == 0
    heat, weight = render_one(-100.0, 50.0, stride, size)  # window far left of the map
    assert weight == 0.0 and heat.abs().sum() == 0
    heat, weight = render_one(50.0, 400.0, stride, size)  # far below
    assert weight == 0.0 and heat.abs().sum() == 0


def gaussian(dx: int, dy: int, sigma: float = 2.0) -> float:
    return math.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def test_left_and_top_of_the_crop_window_still_on_the_map():
    size, stride = (64, 48), 4  # 256x192 crop; sigma 2, window |d| <= 6
    # x = -10: int(-2.5 + 0.5) = -2, the centre two columns left of the map; y = 50 -> row 13
    heat, weight = render_one(-10.0, 50.0, stride, size)
    assert weight == 1.0
    assert heat[13, 0].item() == pytest.approx(gaussian(2, 0), rel=1e-6)
    assert heat[11, 1].item() == pytest.approx(gaussian(3, -2), rel=1e-6)
    assert heat[13, 4].item() == pytest.approx(gaussian(6, 0), rel=1e-6)
    assert heat[19, 4].item() == pytest.approx(gaussian(6, 6), rel=1e-5)  # the window's corner
    assert heat[13, 5] == 0 and heat[20, 0] == 0 and int((heat > 0).sum()) == 5 * 13
    # x = -9: -2.25 + 0.5 = -1.75, which int() truncates toward zero: mu = -1 (floor: -2)
    heat, weight = render_one(-9.0, 50.0, stride, size)
    assert weight == 1.0 and heat[13, 0].item() == pytest.approx(gaussian(1, 0), rel=1e-6)
    # x = -3: int(-0.25) = 0, the peak on column 0 although the joint is left of the crop
    heat, weight = render_one(-3.0, 50.0, stride, size)
    assert weight == 1.0 and heat[13, 0] == 1.0
    # top: y = -17 -> int(-3.75) = -3, rows 0..3 of the window on the map; x = 37 -> column 9
    heat, weight = render_one(37.0, -17.0, stride, size)
    assert weight == 1.0 and int((heat > 0).sum()) == 4 * 13
    assert heat[0, 9].item() == pytest.approx(gaussian(0, 3), rel=1e-6)
    assert heat[3, 12].item() == pytest.approx(gaussian(3, 6), rel=1e-6)


def test_right_and_bottom_of_the_crop_window_still_on_the_map():
    size, stride = (64, 48), 4
    # x = 204: 51.5 -> 51, three past the last column 47; column 47 is at dx = -4
    heat, weight = render_one(204.0, 50.0, stride, size)
    assert weight == 1.0 and int((heat > 0).sum()) == 3 * 13
    assert heat[13, 47].item() == pytest.approx(gaussian(-4, 0), rel=1e-6)
    assert heat[15, 45].item() == pytest.approx(gaussian(-6, 2), rel=1e-6) and heat[13, 44] == 0
    # bottom at stride 2 (128x96 maps): y = 259 -> int(130.0) = 130, rows 124..127 on the map
    heat, weight = render_one(37.0, 259.0, 2, (128, 96))
    assert weight == 1.0 and int((heat > 0).sum()) == 4 * 13
    assert heat[127, 19].item() == pytest.approx(gaussian(0, -3), rel=1e-6)
    assert heat[124, 13].item() == pytest.approx(gaussian(-6, -6), rel=1e-5)


def test_window_off_the_map_gets_weight_zero():
    size, stride = (64, 48), 4
    # right: mu = 47 + 6 = 53 (x = 212) is the last centre whose window reaches column 47
    heat, weight = render_one(212.0, 50.0, stride, size)
    assert weight == 1.0 and heat[13, 47].item() == pytest.approx(gaussian(-6, 0), rel=1e-6)
    heat, weight = render_one(216.0, 50.0, stride, size)  # mu = 54: ul = 48 >= 48
    assert weight == 0.0 and heat.abs().sum() == 0
    heat, weight = render_one(37.0, 280.0, stride, size)  # bottom: mu_y = 70, ul = 64 >= 64
    assert weight == 0.0 and heat.abs().sum() == 0
    # left: x = -36, int(-9 + 0.5) = -8: br = mu + 6 + 1 = -1 < 0
    heat, weight = render_one(-36.0, 50.0, stride, size)
    assert weight == 0.0 and heat.abs().sum() == 0
    heat, weight = render_one(37.0, -36.0, stride, size)  # top, the same
    assert weight == 0.0 and heat.abs().sum() == 0


def test_window_ending_at_column_minus_one_keeps_weight_one_as_official():
    # x = -32, int(-8 + 0.5) = -7: window columns -13..-1, no pixel on the map, but the official
    # test is `br < 0` with br = mu + 3 sigma + 1 = 0 (an exclusive end): weight 1, all-zero map
    heat, weight = render_one(-32.0, 50.0, 4, (64, 48))
    assert weight == 1.0 and heat.abs().sum() == 0
    heat, weight = render_one(37.0, -32.0, 4, (64, 48))
    assert weight == 1.0 and heat.abs().sum() == 0


def test_unlabelled_joint_gets_weight_zero_wherever_it_lies():
    for x, y in [(37.0, 50.0), (-10.0, 50.0), (204.0, 50.0), (float("nan"), 0.0)]:
        heat, weight = render_one(x, y, 4, (64, 48), visible=0)
        assert weight == 0.0 and heat.abs().sum() == 0


def test_equals_the_official_targets_on_the_real_coco_train_sample(coco_root):
    """Every person of the real train sample, five seeded augmentations each, HRNet-W32 256x192:
    our path (make_training_sample, then the codec) gives the official loader's weights and
    maps (`benchmarks.official_loader`, an emulation of `__getitem__` + `generate_target`). Before
    labelled joints outside the crop kept weight 1, 125 of these 7,310 weights differed."""
    size, sigma = (256, 192), 2.0
    cfg = load_config(None, [f"data.sigma={sigma}", "model.input_size=[256,192]"])
    records, _ = load_coco_persons(coco_root / "train2017", coco_root / TRAIN, size)
    ours, official = [], []
    for rec in records:
        image = decode_image(rec.path, cfg.data.max_image_pixels)
        for p, k in ((p, k) for p in rec.persons for k in range(5)):
            key = [0, k, rec.image_id, p.ann_id]
            _, xy, vis = make_training_sample(
                image, p.keypoints, p.center, p.scale, cfg.data, size, np.random.default_rng(key)
            )
            ours.append((xy, vis))
            _, _, joints, off_vis = official_geometry(
                p, image.shape[1], np.random.default_rng(key), cfg, size
            )
            official.append((joints, *official_target(joints, off_vis, size, sigma)))
    xy = torch.from_numpy(np.stack([o[0] for o in ours]))
    vis = torch.from_numpy(np.stack([o[1] for o in ours]))
    heat, weight = HeatmapCodec((64, 48), 4, sigma).encode(xy, vis)  # (430, 17, 64, 48)
    joints = np.stack([o[0] for o in official])
    assert weight.numel() == 7310
    np.testing.assert_array_equal(weight.numpy(), np.stack([o[2][:, 0] for o in official]))
    np.testing.assert_allclose(heat.numpy(), np.stack([o[1] for o in official]), atol=1e-6)
    outside = (joints < 0).any(-1) | (joints >= [192, 256]).any(-1)
    assert int((weight.numpy() * outside).sum()) > 100  # the case this test is about occurs


def test_batched_matches_single_and_nan_invisible():
    g = torch.Generator().manual_seed(0)
    kpts = torch.rand(3, 17, 2, generator=g) * torch.tensor([192.0, 256.0])
    vis = torch.rand(3, 17, generator=g) > 0.3
    kpts[~vis] = float("nan")  # invisible joints may carry garbage
    heat, weight = render_targets(kpts, vis, (128, 96), 2, 2.0)
    assert heat.shape == (3, 17, 128, 96) and weight.shape == (3, 17)
    assert torch.equal(weight, vis.float()) and not heat.isnan().any()
    b, j = torch.nonzero(vis)[5].tolist()
    one, _ = render_targets(
        kpts[b : b + 1, j : j + 1], vis[b : b + 1, j : j + 1], (128, 96), 2, 2.0
    )
    assert torch.equal(heat[b, j], one[0, 0])


def test_codec_from_config():
    cfg = Config(
        model=ModelConfig(input_size=(256, 192), heatmap_stride=2), data=DataConfig(sigma=3.0)
    )
    codec = HeatmapCodec.from_config(cfg)
    assert codec == HeatmapCodec((128, 96), 2, 3.0)
    heat, _ = codec.encode(torch.tensor([[[100.0, 100.0]]]), torch.ones(1, 1))
    assert heat.shape == (1, 1, 128, 96) and heat[0, 0, 50, 50] == 1.0


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_images(channels_last):
    images = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    images[0, 1, 2] = torch.tensor([255, 0, 124])
    out = normalize_images(images, channels_last=channels_last)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(out[0, :, 1, 2], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert out[1, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, rel=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(images.float())
