"""The last hop of a sample: Gaussian targets and JointsMSE as the official HRNet defines them
(`JointsDataset.generate_target`, vectorised over batch and joints; `sigma` in heatmap pixels,
heatmap pixel u on input-crop pixel u * stride), and the one train step, which normalises the crops
and renders the targets on the device. Plain PyTorch: the Ray Train loop (`jobs.train_loop`) and the
train-step benchmarks (`psm bench train`, `psm bench model`) run this same function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from psm_model.config import Config, TrainConfig
from psm_model.hrnet import normalize_images

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp -> autocast dtype


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


def joints_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, ohkm_topk: int = 0
) -> torch.Tensor:
    """0.5 * mean squared error per joint, each joint's maps scaled by its target weight.

    pred, target: (B, J, H, W); weight: (B, J), 0 for unlabelled joints and joints outside the map.
    Without OHKM this equals the official loss (mean over joints of 0.5 * MSE over B*H*W). With
    `ohkm_topk=k` only the k hardest joints of each sample count, averaged (official OHKM).
    """
    w = weight[:, :, None, None]
    per_joint = 0.5 * ((pred - target) * w).pow(2).flatten(2).mean(dim=2)  # (B, J)
    if ohkm_topk <= 0:
        return per_joint.mean()
    hardest, _ = per_joint.topk(min(ohkm_topk, per_joint.shape[1]), dim=1)
    return hardest.mean()


def train_step(
    model: torch.nn.Module,
    batch: Mapping[str, np.ndarray | torch.Tensor],
    cfg: Config,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    world: int = 1,
) -> float | None:
    """One update on `batch` ("image" uint8 (B, H, W, 3), "keypoints" (B, J, 2) in crop pixels,
    "visible" (B, J)): the loss, or None, with no update, if it is not finite on any of the `world`
    ranks."""
    if cfg.train.compile and cfg.train.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused
    images = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
    x = normalize_images(images, cfg.data.channels_last)  # on the device: uint8 moves 4x cheaper
    target, weight = render_targets(
        torch.as_tensor(batch["keypoints"]).to(device),
        torch.as_tensor(batch["visible"]).to(device),
        cfg.model.heatmap_size,
        cfg.model.heatmap_stride,
        cfg.data.sigma,
    )
    dtype = AMP_DTYPES.get(cfg.train.amp)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        heatmaps = model(x)
    loss = joints_mse_loss(heatmaps.float(), target, weight, cfg.train.ohkm_topk)
    optimizer.zero_grad(set_to_none=True)
    if not all_ranks_finite(loss, world):
        return None
    scaler.scale(loss).backward()
    if cfg.train.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def adam(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Adam:
    """The recipe's optimiser (Adam, train.lr, train.weight_decay); train.fused_optimizer: one
    fused kernel for all parameters instead of PyTorch's default (foreach)."""
    return torch.optim.Adam(
        model.parameters(),
        lr=train.lr,
        weight_decay=train.weight_decay,
        fused=train.fused_optimizer or None,
    )


def all_ranks_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank: all of them skip the update together (DDP would
    otherwise wait forever in the gradient all-reduce of the ranks that go on)."""
    flag = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
