"""Heatmaps -> keypoints in the image (argmax with the quarter offset, or DARK), and the flip test.

Decoding is the official HRNet `get_final_preds` (argmax, quarter offset, affine map back) or
DarkPose's `taylor` step, vectorised over crops and joints; `flip_back` aligns the heatmaps of a
mirrored crop with the original's. The pixel convention is `psm_model.codec`'s; `HeatmapCodec`
there holds the stride and sigma these functions take.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from psm_model.geometry import COCO_FLIP_PAIRS, affine_matrix, flip_permutation

DecodeMethod = Literal["quarter", "dark"]


def as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor of x, without autograd history (numpy arrays are shared, not copied)."""
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
    hm = as_tensor(heatmaps)
    if hm.ndim != 4 or hm.shape[2] == 0 or hm.shape[3] == 0:
        raise ValueError(f"heatmaps: expected (N, J, h, w), got shape {tuple(hm.shape)}")
    hm = hm.float()
    n, j, h, w = hm.shape
    c = as_tensor(centers).cpu().double().numpy().reshape(-1, 2)
    s = as_tensor(scales).cpu().double().numpy().reshape(-1, 2)
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
    hm = as_tensor(heatmaps_flipped)
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
