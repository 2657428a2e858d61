"""JointsMSE loss as HRNet defines it, vectorised over joints."""

from __future__ import annotations

import torch


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
