"""Heatmaps both ways: keypoints in crop pixels -> Gaussian targets, heatmaps -> image keypoints.

Stride and sigma live in one `HeatmapCodec`, built from the config once; `sigma` is in HEATMAP
pixels (HRNet: 2 at 64x48, 3 at 96x72). Target semantics are the official HRNet's
(`JointsDataset.generate_target`), vectorised over batch and joints; decoding is the official
`get_final_preds` (argmax, quarter offset, affine map back), or DARK, vectorised likewise.

Pixel convention, shared by encoder, decoder and flip test: heatmap pixel u <-> input-crop pixel
u * stride (the target peak sits at floor(x / stride + 0.5)), input pixel centres at integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from psm_model.config import Config
from psm_model.geometry import COCO_FLIP_PAIRS, affine_matrix, flip_permutation

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

    keypoints (B, J, 2) are (x, y) in input-crop pixels; visible (B, J) is > 0 for labelled joints.
    As official: the peak sits on the integer heatmap pixel floor(x / stride + 0.5) and equals 1
    exactly; exp(-d^2 / (2 sigma^2)) is cut to the square window |dx|, |dy| <= 3 sigma; a joint
    gets weight 0 (and an all-zero map) when invisible or when its window misses the map entirely.
    """
    h, w = heatmap_size_hw
    radius = math.floor(3 * sigma)  # official tmp_size = 3 sigma (an integer for sigma 2 or 3)
    vis = visible > 0
    # invisible joints may carry any coordinates (0, NaN): park them before the integer cast
    xy = torch.where(vis[..., None], keypoints.float(), torch.zeros((), device=keypoints.device))
    mu = torch.floor(xy / stride + 0.5).long()  # (B, J, 2) integer centres in heatmap pixels
    mu_x, mu_y = mu[..., 0], mu[..., 1]

    # window [mu - r, mu + r] (inclusive) must share at least one pixel with [0, w) x [0, h)
    overlaps = (
        (mu_x - radius < w) & (mu_x + radius >= 0) & (mu_y - radius < h) & (mu_y + radius >= 0)
    )
    weights = (vis & overlaps).float()  # (B, J)

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


# ----------------------------------------------------------------------------------------------
# Decoding: heatmaps -> keypoints in the image
# ----------------------------------------------------------------------------------------------

DecodeMethod = Literal["quarter", "dark"]


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _at(maps: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """maps (N, J, h, w) read at integer pixels y, x (N, J), clamped to the map."""
    h, w = maps.shape[-2:]
    flat_idx = y.clamp(0, h - 1) * w + x.clamp(0, w - 1)
    return maps.flatten(2).gather(2, flat_idx[..., None]).squeeze(2)


def dark_kernel_size(sigma: float) -> int:
    """DARK's blur kernel for targets of `sigma`: 11 at sigma 2 and 17 at sigma 3, the DarkPose
    settings for 64x48 and 96x72 heatmaps, i.e. about +-2.5 sigma."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def _blurred_stencil(maps: torch.Tensor, px: torch.Tensor, py: torch.Tensor, kernel_size: int):
    """DarkPose's Gaussian blur (zero padding, cv2's sigma for the kernel size), evaluated only
    on the 5x5 pixels around each (px, py): (N, J, 5, 5), [2, 2] at the argmax.

    Blurring whole maps costs O(h w k) per map for 13 values used; a (k + 4)^2 patch gives the
    same numbers. DarkPose also rescales the blurred map to the original maximum: a constant
    factor, i.e. a constant added to the log, which the derivatives below do not see.
    """
    r = kernel_size // 2
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8  # cv2.getGaussianKernel with sigma <= 0
    t = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    padded = F.pad(maps, (r + 2, r + 2, r + 2, r + 2))  # zeros, as DarkPose's border
    n, j = maps.shape[:2]
    offsets = torch.arange(kernel_size + 4, device=maps.device)  # patch rows/cols, padded frame
    rows = (py[..., None] + offsets)[..., :, None]  # (N, J, k + 4, 1)
    cols = (px[..., None] + offsets)[..., None, :]  # (N, J, 1, k + 4)
    ni = torch.arange(n, device=maps.device).view(n, 1, 1, 1)
    ji = torch.arange(j, device=maps.device).view(1, j, 1, 1)
    patch = padded[ni, ji, rows, cols]  # (N, J, k + 4, k + 4), centred on the argmax
    patch = patch.unfold(3, kernel_size, 1) @ g  # blur along x: (N, J, k + 4, 5)
    return patch.unfold(2, kernel_size, 1) @ g  # along y: (N, J, 5, 5)


def _dark_offsets(
    maps: torch.Tensor, px: torch.Tensor, py: torch.Tensor, kernel_size: int
) -> torch.Tensor:
    """DARK (Zhang et al. 2020): one Newton step -H^-1 g on the log of the blurred map at the
    integer argmax; where the +-2 pixel stencil fits and the Hessian is invertible, else 0."""
    h, w = maps.shape[-2:]
    logm = torch.log(_blurred_stencil(maps.double(), px, py, kernel_size).clamp_min(1e-10))

    def v(dy: int, dx: int) -> torch.Tensor:
        return logm[..., 2 + dy, 2 + dx]

    dx = 0.5 * (v(0, 1) - v(0, -1))
    dy = 0.5 * (v(1, 0) - v(-1, 0))
    dxx = 0.25 * (v(0, 2) - 2 * v(0, 0) + v(0, -2))
    dyy = 0.25 * (v(2, 0) - 2 * v(0, 0) + v(-2, 0))
    dxy = 0.25 * (v(1, 1) - v(-1, 1) - v(1, -1) + v(-1, -1))
    det = dxx * dyy - dxy**2
    ok = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2) & (det != 0)
    det = torch.where(ok, det, torch.ones_like(det))
    off = torch.stack([-(dyy * dx - dxy * dy) / det, -(dxx * dy - dxy * dx) / det], dim=-1)
    return torch.where(ok[..., None], off, torch.zeros_like(off))


def decode_heatmaps(
    heatmaps: np.ndarray | torch.Tensor,
    centers: np.ndarray | torch.Tensor,
    scales: np.ndarray | torch.Tensor,
    method: DecodeMethod = "quarter",
    dark_kernel: int = 11,
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, J, h, w) of crops given by centers (N, 2) and scales (N, 2) (pixel_std 200)
    -> (coords (N, J, 2) float64 in image pixels, maxvals (N, J, 1) float32).

    "quarter" is the official `get_final_preds` with POST_PROCESS: the first argmax; a map whose
    max is <= 0 decodes to heatmap pixel (0, 0); then +-0.25 pixel toward the higher neighbour
    along x and along y, only where 1 < px < w - 1 and 1 < py < h - 1 (the official bounds, which
    also exclude px = 1); "dark" replaces the quarter step by `_dark_offsets` (DarkPose's
    `taylor`, with blur `dark_kernel`). The map back is the official `transform_preds`: the
    inverse crop affine with the HEATMAP size as output size. As the crop affine sends centre c to
    W_in / 2 and the heatmap one to w / 2 = W_in / (2 stride), heatmap u lands on the same image
    point as input pixel u * stride: the stride comes from the shapes, nothing is hard-coded.
    Runs on the heatmaps' device; numpy or torch in, numpy out.
    """
    if method not in ("quarter", "dark"):
        raise ValueError(f"method: {method!r} is not one of ('quarter', 'dark')")
    hm = _as_tensor(heatmaps)
    if hm.ndim != 4 or hm.shape[2] == 0 or hm.shape[3] == 0:
        raise ValueError(f"heatmaps: expected (N, J, h, w), got shape {tuple(hm.shape)}")
    hm = hm.float()
    n, j, h, w = hm.shape
    c = _as_tensor(centers).cpu().double().numpy().reshape(-1, 2)
    s = _as_tensor(scales).cpu().double().numpy().reshape(-1, 2)
    if len(c) != n or len(s) != n:
        raise ValueError(f"centers, scales: expected {n} rows each, got {len(c)} and {len(s)}")

    flat = hm.flatten(2)  # (N, J, h * w)
    idx = flat.argmax(dim=2)  # the first maximum, as np.argmax
    maxvals = flat.gather(2, idx[..., None])  # (N, J, 1)
    positive = maxvals[..., 0] > 0
    px = torch.where(positive, idx % w, torch.zeros_like(idx))
    py = torch.where(positive, idx // w, torch.zeros_like(idx))
    coords = torch.stack([px, py], dim=-1).double()  # (N, J, 2) integer heatmap pixels

    if method == "quarter":
        diff = torch.stack(
            [_at(hm, py, px + 1) - _at(hm, py, px - 1), _at(hm, py + 1, px) - _at(hm, py - 1, px)],
            dim=-1,
        )
        interior = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
        coords = coords + 0.25 * torch.sign(diff).double() * interior[..., None]
    else:
        coords = coords + _dark_offsets(hm, px, py, dark_kernel)

    # heatmap -> image: one inverse affine per crop (no rotation at test time)
    mats = np.zeros((n, 2, 3))
    for i in range(n):
        mats[i] = affine_matrix(c[i], s[i], 0.0, (h, w), inverse=True)
    uv = coords.cpu().numpy()
    image_xy = np.einsum("njk,nik->nji", uv, mats[:, :, :2]) + mats[:, None, :, 2]
    return image_xy, maxvals.cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Flip test
# ----------------------------------------------------------------------------------------------


def flip_shift(stride: int) -> float:
    """Heatmap pixels to shift a column-reversed flipped heatmap to the right: 1 - 1 / stride.

    The flipped crop is x' = W_in - 1 - x. Flipped heatmap column u' shows input x' = u' stride,
    i.e. x = W_in - 1 - u' stride, i.e. original column u = w - 1 / stride - u' (w = W_in / stride).
    Reversing the columns puts it at w - 1 - u' = u - (1 - 1 / stride). So: 0.75 at stride 4 (the
    official code shifts 1), 0.5 at stride 2, 0 at stride 1.
    """
    return 1.0 - 1.0 / stride


def flip_back(
    heatmaps_flipped: np.ndarray | torch.Tensor,
    stride: int,
    shift: float | None = None,
    flip_pairs: tuple[tuple[int, int], ...] = COCO_FLIP_PAIRS,
) -> torch.Tensor:
    """Heatmaps (N, J, h, w) predicted on the mirrored crop -> aligned with the original crop.

    Reverse the columns, swap left/right joints, then shift right by `shift` heatmap pixels
    (default `flip_shift(stride)`) with linear interpolation; the first column repeats the edge.
    `shift=1.0` is exactly the official SHIFT_HEATMAP step.
    """
    delta = flip_shift(stride) if shift is None else float(shift)
    if delta < 0:
        raise ValueError(f"shift: must be >= 0, got {delta}")
    hm = _as_tensor(heatmaps_flipped)
    perm = torch.as_tensor(flip_permutation(hm.shape[1], flip_pairs), device=hm.device)
    hm = hm.flip(-1)[:, perm]  # original joint j is the flipped crop's joint perm[j]
    k, frac = int(delta), delta - int(delta)
    if delta == 0:
        return hm
    w = hm.shape[-1]
    # padded[c + k + 1] = hm[c]; out[c] = (1 - frac) hm[c - k] + frac hm[c - k - 1]
    padded = torch.cat([hm[..., :1].expand(*hm.shape[:-1], k + 1), hm], dim=-1)
    out = padded[..., 1 : w + 1]
    if frac > 0:
        out = (1 - frac) * out + frac * padded[..., 0:w]
    return out.contiguous()


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
        return 0.5 * (_as_tensor(heatmaps) + flip_back(heatmaps_flipped, self.stride))


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
