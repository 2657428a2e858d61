"""The targets hop: keypoints in crop pixels -> Gaussian heatmaps, and uint8 crops -> model input.

Stride and sigma live in one `HeatmapCodec`, built from the config once, for training targets,
decoding and the flip test (`psm_model.decode`); `sigma` is in HEATMAP pixels (HRNet: 2 at
64x48, 3 at 96x72). Target semantics are the official HRNet's (`JointsDataset.generate_target`),
vectorised over batch and joints.

Pixel convention, shared by encoder, decoder and flip test: heatmap pixel u <-> input-crop pixel
u * stride (the target peak sits at int(x / stride + 0.5)), input pixel centres at integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from psm_model.config import Config
from psm_model.decode import DecodeMethod, as_tensor, dark_kernel_size, decode_heatmaps, flip_back

# ImageNet statistics of RGB images in [0, 1], as the official torchvision Normalize
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def render_targets(
    keypoints: torch.Tensor,
    visible: torch.Tensor,
    heatmap_size_hw: tuple[int, int],
    stride: int,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian heatmaps (B, J, h, w) float32 and joint weights (B, J) float32.

    keypoints (B, J, 2): (x, y) in input-crop pixels, inside the crop or not; visible (B, J) > 0
    for labelled joints. As official (`generate_target`): peak 1 on the heatmap pixel
    mu = int(x / stride + 0.5) (int() truncates toward zero), exp(-d^2 / (2 sigma^2)) cut to the
    window |dx|, |dy| <= 3 sigma and kept where it falls on the map. Weight 0 (all-zero map) only
    for unlabelled joints or where mu - 3 sigma >= w (h) or mu + 3 sigma + 1 < 0, the official
    exclusive bound: a window ending at column (row) -1 keeps weight 1 and an all-zero map.
    """
    h, w = heatmap_size_hw
    radius = math.floor(3 * sigma)  # official tmp_size = 3 sigma (an integer for sigma 2 or 3)
    vis = visible > 0
    # invisible joints may carry any coordinates (0, NaN): park them before the integer cast
    xy = torch.where(vis[..., None], keypoints.float(), torch.zeros((), device=keypoints.device))
    mu = torch.trunc(xy / stride + 0.5).long()  # (B, J, 2) heatmap pixels; trunc as int()
    mu_x, mu_y = mu[..., 0], mu[..., 1]

    # official: weight 0 iff ul >= size or br < 0, with ul = mu - r and br = mu + r + 1
    in_bounds = (mu_x - radius < w) & (mu_x + radius + 1 >= 0)
    in_bounds &= (mu_y - radius < h) & (mu_y + radius + 1 >= 0)
    weights = (vis & in_bounds).float()  # (B, J)

    # exp(-(dx^2 + dy^2) / 2s^2) = exp(-dx^2 / 2s^2) * exp(-dy^2 / 2s^2): render two 1-D profiles
    # and take their outer product; integer offsets keep the peak at exactly 1
    xs = torch.arange(w, device=keypoints.device)
    ys = torch.arange(h, device=keypoints.device)
    dx = xs - mu_x[..., None]  # (B, J, w)
    dy = ys - mu_y[..., None]  # (B, J, h)
    gx = torch.exp(-(dx.float() ** 2) / (2 * sigma**2)) * (dx.abs() <= radius)
    gy = torch.exp(-(dy.float() ** 2) / (2 * sigma**2)) * (dy.abs() <= radius)
    gy = gy * weights[..., None]  # zero maps for weight-0 joints, as official
    heatmaps = gy[..., :, None] * gx[..., None, :]  # (B, J, h, w)
    return heatmaps, weights


@dataclass(frozen=True)
class HeatmapCodec:
    """Where stride and sigma are defined, for training targets, decoding and the flip test."""

    heatmap_size_hw: tuple[int, int]
    stride: int
    sigma: float

    @classmethod
    def from_config(cls, cfg: Config) -> HeatmapCodec:
        return cls(cfg.model.heatmap_size, cfg.model.heatmap_stride, cfg.data.sigma)

    def encode(
        self, keypoints: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return render_targets(keypoints, visible, self.heatmap_size_hw, self.stride, self.sigma)

    def decode(
        self,
        heatmaps: np.ndarray | torch.Tensor,
        centers: np.ndarray | torch.Tensor,
        scales: np.ndarray | torch.Tensor,
        method: DecodeMethod = "quarter",
    ) -> tuple[np.ndarray, np.ndarray]:
        if tuple(heatmaps.shape[-2:]) != tuple(self.heatmap_size_hw):
            raise ValueError(
                f"heatmaps: size {tuple(heatmaps.shape[-2:])} is not the codec's "
                f"{tuple(self.heatmap_size_hw)} (input size / stride {self.stride})"
            )
        kernel = dark_kernel_size(self.sigma)
        return decode_heatmaps(heatmaps, centers, scales, method=method, dark_kernel=kernel)

    def flip_average(self, heatmaps: torch.Tensor, heatmaps_flipped: torch.Tensor) -> torch.Tensor:
        """Flip test: mean of the crop's heatmaps and the aligned ones of its mirror."""
        return 0.5 * (as_tensor(heatmaps) + flip_back(heatmaps_flipped, self.stride))


def normalize_images(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) -> float32 (B, 3, H, W), ImageNet-normalised as the official loader.

    Run it on the device the batch will be used on: moving uint8 is 4x cheaper than float32.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 (B, H, W, 3) batch, got {images.dtype} {tuple(images.shape)}"
        )
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    # a permuted NHWC tensor already has channels_last strides, which elementwise ops keep
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
