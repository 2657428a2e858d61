"""The last hop of a sample: JointsMSE as HRNet defines it, and the one train step.

`train_step` takes a batch of `pipelines.augment` columns to an optimiser update: crops normalised
and targets rendered on the device (`psm_model.codec`), the model's heatmaps (`psm_model.hrnet`),
the loss. Plain PyTorch: the Ray Train loop (`jobs.training`) and the train-step benchmark
(`psm bench train`, `psm bench model`) run this same function.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from psm_model.codec import HeatmapCodec, normalize_images
from psm_model.config import Config, TrainConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp -> autocast dtype


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
    codec: HeatmapCodec,
    cfg: Config,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    world: int = 1,
) -> float | None:
    """One update on `batch` ("image" uint8 (B, H, W, 3), "keypoints" (B, J, 2) in crop pixels,
    "visible" (B, J)) under cfg.train's amp, ohkm_topk and grad_clip and cfg.data.channels_last.

    Returns the loss, or None, with no update, if it is not finite on any of the `world` ranks.
    """
    if cfg.train.compile and cfg.train.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused
    images = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
    x = normalize_images(images, cfg.data.channels_last)  # on the device: uint8 moves 4x cheaper
    target, weight = codec.encode(
        torch.as_tensor(batch["keypoints"]).to(device),
        torch.as_tensor(batch["visible"]).to(device),
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
