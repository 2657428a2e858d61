"""Hand-computed checks of the Gaussian targets and the input normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from psm_model.codec import HeatmapCodec, normalize_images, render_targets
from psm_model.config import Config, DataConfig, ModelConfig


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


def test_just_off_map_but_window_overlaps():
    size, stride = (64, 48), 4
    # x = -10: -2.5 + 0.5 = -2 -> centre two columns left of the map; column 0 is at dx = 2
    heat, weight = render_one(-10.0, 50.0, stride, size)
    assert weight == 1.0
    assert heat[13, 0].item() == pytest.approx(math.exp(-4 / 8), rel=1e-6)
    assert heat[13, 4].item() == pytest.approx(math.exp(-36 / 8), rel=1e-6) and heat[13, 5] == 0
    # right side: x = 204 -> 51.5 -> 51, three past the last column 47; column 47 is at dx = -4
    heat, weight = render_one(204.0, 50.0, stride, size)
    assert weight == 1.0 and heat[13, 47].item() == pytest.approx(math.exp(-16 / 8), rel=1e-6)
    # last overlap: mu = 47 + 6 = 53 (x = 212); one more (x = 216) has no pixel on the map
    assert render_one(212.0, 50.0, stride, size)[1] == 1.0
    assert render_one(216.0, 50.0, stride, size)[1] == 0.0


def test_window_ending_exactly_at_the_left_edge_gets_weight_zero():
    # mu = -7 (x = -28): window columns -13..-1, no pixel on the map. The official test `br < 0`
    # (br = mu + 3 sigma + 1 = 0, exclusive) keeps weight 1 with an all-zero map; we give 0.
    heat, weight = render_one(-28.0, 50.0, 4, (64, 48))
    assert weight == 0.0 and heat.abs().sum() == 0


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
