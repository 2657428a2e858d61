"""JointsMSE loss: hand-computed cases, the official per-joint loop, OHKM; the train step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from psm_model.codec import HeatmapCodec
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model, normalize_images
from psm_model.loss import joints_mse_loss, train_step


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    # B=1, J=2, 2x2 maps
    pred = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    return pred, target


def test_hand_computed_values():
    pred, target = _hand_case()
    # joint 0: squared errors 1 + 1 over 4 pixels = 0.5, times 0.5 = 0.25
    # joint 1: squared errors 4 * 4 over 4 pixels = 4, times 0.5 = 2
    both = joints_mse_loss(pred, target, torch.tensor([[1.0, 1.0]]))
    assert both.item() == pytest.approx((0.25 + 2.0) / 2)
    # a zero weight removes joint 1's error, but it still counts in the mean over joints
    only_first = joints_mse_loss(pred, target, torch.tensor([[1.0, 0.0]]))
    assert only_first.item() == pytest.approx(0.25 / 2)
    # a weight scales the maps, so the error by its square: (0.5)^2 * 0.25 = 0.0625
    half = joints_mse_loss(pred, target, torch.tensor([[0.5, 0.0]]))
    assert half.item() == pytest.approx(0.0625 / 2)
    assert joints_mse_loss(target, target, torch.ones(1, 2)).item() == 0.0


def _official_joints_mse(pred, target, weight):
    """JointsMSELoss of the official code (lib/core/loss.py), use_target_weight=True."""
    criterion = nn.MSELoss(reduction="mean")
    b, j = pred.shape[:2]
    heatmaps_pred = pred.reshape(b, j, -1).split(1, 1)
    heatmaps_gt = target.reshape(b, j, -1).split(1, 1)
    loss = 0
    for idx in range(j):
        p, g = heatmaps_pred[idx].squeeze(), heatmaps_gt[idx].squeeze()
        w = weight[:, idx]
        loss = loss + 0.5 * criterion(p.mul(w[:, None]), g.mul(w[:, None]))
    return loss / j


def _official_ohkm(pred, target, weight, topk):
    """JointsOHKMMSELoss of the official code: per-sample top-k joints, summed / k, batch mean."""
    b, j = pred.shape[:2]
    per_joint = []
    for idx in range(j):
        p = pred[:, idx].reshape(b, -1) * weight[:, idx, None]
        g = target[:, idx].reshape(b, -1) * weight[:, idx, None]
        per_joint.append(0.5 * ((p - g) ** 2).mean(dim=1))
    per_joint = torch.stack(per_joint, dim=1)
    total = 0
    for i in range(b):
        top, _ = per_joint[i].topk(topk, sorted=False)
        total = total + top.sum() / topk
    return total / b


def _random_case(seed=0, b=3, j=5, h=8, w=6):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, j, h, w, generator=g, dtype=torch.float64)
    target = torch.rand(b, j, h, w, generator=g, dtype=torch.float64)
    weight = torch.rand(b, j, generator=g, dtype=torch.float64)
    weight[0, 1] = 0.0  # unlabelled joints
    weight[-1, -1] = 0.0
    weight[-1, 0] = 1.0
    return pred, target, weight


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_official_formulation(seed):
    pred, target, weight = _random_case(seed)
    torch.testing.assert_close(
        joints_mse_loss(pred, target, weight), _official_joints_mse(pred, target, weight)
    )


def test_batch_of_one_equals_official():
    pred, target, weight = _random_case(3, b=1, j=4)
    torch.testing.assert_close(
        joints_mse_loss(pred, target, weight), _official_joints_mse(pred, target, weight)
    )


def test_ohkm_hand_case():
    # the error is constant per joint: joint loss = 0.5 * d^2
    d = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 1.0]])  # (B=2, J=3)
    target = torch.zeros(2, 3, 2, 2)
    pred = d[:, :, None, None].expand(2, 3, 2, 2).clone()
    ones = torch.ones(2, 3)
    # per joint: [0.5, 2, 4.5] and [0, 8, 0.5]; top 2: (4.5 + 2) / 2 = 3.25, (8 + 0.5) / 2 = 4.25
    assert joints_mse_loss(pred, target, ones, ohkm_topk=2).item() == pytest.approx(3.75)
    # top 1: 4.5 and 8
    assert joints_mse_loss(pred, target, ones, ohkm_topk=1).item() == pytest.approx(6.25)
    # a zero weight takes a joint out of the hard set: sample 1 joint 1 -> [0, 0, 0.5]
    weight = ones.clone()
    weight[1, 1] = 0.0
    assert joints_mse_loss(pred, target, weight, ohkm_topk=2).item() == pytest.approx(
        (3.25 + 0.25) / 2
    )
    # k >= J keeps every joint, i.e. the plain loss; k = 0 disables OHKM
    plain = joints_mse_loss(pred, target, ones)
    assert plain.item() == pytest.approx((0.5 + 2 + 4.5 + 0 + 8 + 0.5) / 6)
    assert joints_mse_loss(pred, target, ones, ohkm_topk=3).item() == pytest.approx(plain.item())
    assert joints_mse_loss(pred, target, ones, ohkm_topk=5).item() == pytest.approx(plain.item())
    assert joints_mse_loss(pred, target, ones, ohkm_topk=0).item() == pytest.approx(plain.item())


@pytest.mark.parametrize("topk", [1, 3])
def test_ohkm_equals_official_formulation(topk):
    pred, target, weight = _random_case(4)
    torch.testing.assert_close(
        joints_mse_loss(pred, target, weight, ohkm_topk=topk),
        _official_ohkm(pred, target, weight, topk),
    )


def test_loss_gradient_is_zero_for_weightless_joints():
    pred, target, weight = _random_case(5)
    pred.requires_grad_(True)
    joints_mse_loss(pred, target, weight).backward()
    assert torch.all(pred.grad[0, 1] == 0) and torch.all(pred.grad[-1, -1] == 0)
    assert pred.grad[-1, 0].abs().sum() > 0


def test_train_step_returns_the_loss_of_the_codec_targets_and_updates():
    cfg = load_config(None, ["model.width=4", "model.input_size=[64,32]", "train.ohkm_topk=8"])
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (2, 64, 32, 3), dtype=np.uint8),
        "keypoints": rng.uniform(2, 30, (2, 17, 2)).astype(np.float32),
        "visible": (rng.random((2, 17)) > 0.3).astype(np.uint8),
    }
    codec = HeatmapCodec.from_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    reference = copy.deepcopy(model)
    keypoints, visible = torch.from_numpy(batch["keypoints"]), torch.from_numpy(batch["visible"])
    target, weight = codec.encode(keypoints, visible)
    expected = joints_mse_loss(
        reference(normalize_images(torch.from_numpy(batch["image"]))), target, weight, 8
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_step(model, batch, cfg, optimizer, scaler, torch.device("cpu"))
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    after = dict(model.named_parameters())
    assert any(not torch.equal(p, after[k]) for k, p in reference.named_parameters())
