"""HRNet / PSM model: shapes, Pixel Shuffle placement, key layout, sizes, gradients, overfitting.

The official key layout and parameter counts are checked against `official_reference`, which builds
the official state_dict by hand and shares no code with `psm_model`.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from official_reference import official_state_dict
from torch import nn

from psm_model.config import ModelConfig
from psm_model.hrnet import ExchangeModule, PixelShuffleUp, PoseHRNet, build_model
from psm_model.loss import joints_mse_loss

W8 = (8, 16, 32, 64)
W16 = (16, 32, 64, 128)
W32 = (32, 64, 128, 256)
W48 = (48, 96, 192, 384)
ODD = (8, 12, 20, 28)  # not doubling from branch to branch
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# official upward (low -> high resolution) fusion keys: fuse_layers.i.j.{0,1}.* with j > i
OFFICIAL_UPWARD = re.compile(r"^stage\d\.\d+\.fuse_layers\.(\d+)\.(\d+)\.[01]\.")


def _is_official_upward(key: str) -> bool:
    m = OFFICIAL_UPWARD.match(key)
    return bool(m) and int(m.group(2)) > int(m.group(1))


def _official_param_count(widths: tuple[int, ...]) -> int:
    sd = official_state_dict(widths)
    return sum(v.numel() for k, v in sd.items() if not k.endswith(BUFFER_SUFFIXES))


# --- output shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [W8, W16, ODD], ids=["W8", "W16", "8-12-20-28"])
@pytest.mark.parametrize("stride", [4, 2])
@pytest.mark.parametrize("fusion", ["hrnet", "psm"])
def test_output_shape(fusion, stride, widths):
    torch.manual_seed(0)
    model = PoseHRNet(widths, fusion, stride).eval()
    with torch.no_grad():
        for h, w in ((128, 96), (64, 96)):
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 17, h // stride, w // stride)
            assert torch.isfinite(out).all()


def test_num_joints_and_kernel_change_only_the_head():
    model = PoseHRNet(W8, "psm", 2, num_joints=5, final_conv_kernel=3).eval()
    assert model.final_layer.weight.shape == (5, 8, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5, 32, 48)


@pytest.mark.parametrize("kwargs", [{"fusion": "pms"}, {"heatmap_stride": 8}])
def test_unknown_fusion_or_stride_is_rejected(kwargs):
    with pytest.raises(ValueError):
        PoseHRNet(W8, **kwargs)


# --- Pixel Shuffle fusion -------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_pixel_shuffle_up_shape(factor):
    m = PixelShuffleUp(12, 5, factor).eval()
    out = m(torch.randn(2, 12, 3, 4))
    assert out.shape == (2, 5, 3 * factor, 4 * factor)


@pytest.mark.parametrize("factor", [2, 3])
def test_pixel_shuffle_up_value_placement(factor):
    """With an identity 1x1 conv and an identity BN, channel c*r*r + dy*r + dx lands at (dy, dx)."""
    r, cout, h, w = factor, 3, 2, 3
    cin = cout * r * r
    m = PixelShuffleUp(cin, cout, r).eval()
    with torch.no_grad():
        m.conv.weight.copy_(torch.eye(cin).view(cin, cin, 1, 1))
        m.bn.running_mean.zero_()
        m.bn.running_var.fill_(1.0)
        m.bn.weight.fill_(1.0)
        m.bn.bias.zero_()
    m.bn.eps = 0.0
    x = torch.arange(2 * cin * h * w, dtype=torch.float32).view(2, cin, h, w)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (2, cout, r * h, r * w)
    for b in range(2):
        for c in range(cout):
            for y in range(h):
                for xx in range(w):
                    for dy in range(r):
                        for dx in range(r):
                            expected = x[b, c * r * r + dy * r + dx, y, xx]
                            assert out[b, c, r * y + dy, r * xx + dx] == expected


@pytest.mark.parametrize("widths", [W8, ODD], ids=["W8", "8-12-20-28"])
@pytest.mark.parametrize("stride", [4, 2])
def test_psm_fusion_lands_on_target_branch_shape(widths, stride):
    """Every fuse_layers[i][j](x_j) has exactly x_i's shape, on real tensors (no interpolation)."""
    torch.manual_seed(0)
    model = PoseHRNet(widths, "psm", stride).eval()
    assert not any(isinstance(m, nn.Upsample) for m in model.modules())
    shapes: dict = {}
    hooks = []

    def record(key):
        def hook(_module, _inputs, output):
            shapes[key] = tuple(output.shape)

        return hook

    exchange = [m for m in model.modules() if isinstance(m, ExchangeModule)]
    assert len(exchange) == 1 + 4 + 3
    for e, em in enumerate(exchange):
        for i, branch in enumerate(em.branches):
            hooks.append(branch.register_forward_hook(record((e, "branch", i))))
        for i, row in enumerate(em.fuse_layers):
            for j, fuse in enumerate(row):
                if j > i:
                    assert isinstance(fuse, PixelShuffleUp)
                    assert fuse.shuffle.upscale_factor == 2 ** (j - i)
                hooks.append(fuse.register_forward_hook(record((e, "fuse", i, j))))
    if stride == 2:
        hooks.append(model.head_up.register_forward_hook(record("head_up")))
        hooks.append(model.head_stem.register_forward_hook(record("head_stem")))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 96))
    for h in hooks:
        h.remove()

    for e, em in enumerate(exchange):
        for i, row in enumerate(em.fuse_layers):
            target = shapes[(e, "branch", i)]
            assert target[1] == widths[i]
            assert target[2:] == (64 // 2 ** (i + 2), 96 // 2 ** (i + 2))
            for j in range(len(row)):
                assert shapes[(e, "fuse", i, j)] == target, (e, i, j)
    if stride == 2:
        assert shapes["head_up"] == shapes["head_stem"] == (2, widths[0], 32, 48)


# --- key layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "kernel"), [(W8, 1), (ODD, 1), (W8, 3)], ids=["W8", "8-12-20-28", "W8-k3"]
)
def test_hrnet_stride4_keys_are_the_official_layout(widths, kernel):
    official = official_state_dict(widths, final_kernel=kernel)
    own = PoseHRNet(widths, "hrnet", 4, final_conv_kernel=kernel).state_dict()
    assert set(own) == set(official)
    for k, v in own.items():
        assert v.shape == official[k].shape, k


@pytest.mark.parametrize("widths", [W8, ODD], ids=["W8", "8-12-20-28"])
def test_psm_keys_never_collide_with_official_layout(widths):
    """Keys shared with the official layout have its shapes; PSM layers carry names of their own."""
    official = official_state_dict(widths)
    own = PoseHRNet(widths, "psm", 2).state_dict()
    for k in set(own) & set(official):
        assert own[k].shape == official[k].shape, k
    assert not [k for k in own if _is_official_upward(k)]
    psm_only = re.compile(r"^stage\d\.\d+\.fuse_layers\.(\d+)\.(\d+)\.(conv|bn)\.")
    for k in set(own) - set(official):
        m = psm_only.match(k)
        assert (m and int(m.group(2)) >= int(m.group(1))) or k.startswith(
            ("head_up.", "head_stem.")
        ), k
    # what the official layout has and PSM does not: exactly its upward fusion layers
    assert set(official) - set(own) == {k for k in official if _is_official_upward(k)}
    assert "final_layer.weight" in own and "head_up.conv.weight" in own


def test_hrnet_stride2_adds_only_the_head():
    official = official_state_dict(W8)
    own = PoseHRNet(W8, "hrnet", 2).state_dict()
    assert set(official) <= set(own)
    assert all(k.startswith(("head_up.", "head_stem.")) for k in set(own) - set(official))


# --- parameter counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "expected", "published"),
    [(W32, 28_536_113, 28.5), (W48, 63_595_745, 63.6)],
    ids=["W32", "W48"],
)
def test_official_parameter_counts(widths, expected, published):
    n_model = sum(p.numel() for p in PoseHRNet(widths, "hrnet", 4).parameters())
    n_reference = _official_param_count(widths)
    assert n_model == n_reference == expected
    assert round(n_model / 1e6, 1) == published


# --- gradients and training -----------------------------------------------------------------------


@pytest.mark.parametrize(("fusion", "stride"), [("psm", 2), ("hrnet", 4)])
def test_gradient_reaches_every_parameter(fusion, stride):
    torch.manual_seed(0)
    model = PoseHRNet(W8, fusion, stride).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    target = torch.rand_like(out)
    joints_mse_loss(out, target, torch.ones(2, 17)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    zero_grad = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.norm() == 0
    ]
    assert not no_grad
    assert not zero_grad


def _gaussian_targets(batch: int, joints: int, h: int, w: int, sigma: float = 2.0) -> torch.Tensor:
    cy = torch.randint(2, h - 2, (batch, joints, 1, 1)).float()
    cx = torch.randint(2, w - 2, (batch, joints, 1, 1)).float()
    yy = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def test_tiny_psm_model_overfits_one_batch():
    """W8, stride 2, 4 random 64x64 images, a Gaussian blob per joint: loss / 10 in <= 150 steps.

    Four joints: the final 1x1 conv maps W8's 8 channels to the heatmaps, so 17 independent random
    blobs per image are beyond its rank; a handful is a fair memorisation task.
    """
    torch.manual_seed(0)
    joints = 4
    model = PoseHRNet(W8, "psm", 2, num_joints=joints).train()
    x = torch.randn(4, 3, 64, 64)
    target = _gaussian_targets(4, joints, 32, 32)
    weight = torch.ones(4, joints)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    initial = loss = None
    for _step in range(150):
        loss = joints_mse_loss(model(x), target, weight)
        if initial is None:
            initial = loss.item()
        if loss.item() <= initial / 10:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    assert loss.item() <= initial / 10, (initial, loss.item(), elapsed)


# --- builder and config ---------------------------------------------------------------------------


def test_build_model_from_width():
    cfg = ModelConfig(width=8, fusion="hrnet", heatmap_stride=4, input_size=(64, 96))
    model = build_model(cfg).eval()
    assert model.widths == W8
    assert (model.fusion, model.heatmap_stride) == ("hrnet", 4)
    assert not hasattr(model, "head_up")
    with torch.no_grad():
        out = model(torch.randn(1, 3, *cfg.input_size))
    assert out.shape == (1, 17, *cfg.heatmap_size) == (1, 17, 16, 24)


def test_build_model_explicit_widths_override_width():
    cfg = ModelConfig(
        width=32,
        widths=ODD,
        fusion="psm",
        heatmap_stride=2,
        input_size=(64, 64),
        final_conv_kernel=3,
    )
    model = build_model(cfg).eval()
    assert model.widths == ODD
    assert (model.fusion, model.heatmap_stride) == ("psm", 2)
    assert isinstance(model.head_up, PixelShuffleUp)
    assert model.final_layer.weight.shape == (17, 8, 3, 3)
    assert model.stage4[0].branches[3][0].conv1.weight.shape[0] == 28
    with torch.no_grad():
        out = model(torch.randn(1, 3, *cfg.input_size))
    assert out.shape == (1, 17, *cfg.heatmap_size) == (1, 17, 32, 32)


def test_build_model_defaults_are_psm_w32_stride2():
    model = build_model(ModelConfig())
    assert model.widths == W32
    assert (model.fusion, model.heatmap_stride) == ("psm", 2)


@pytest.mark.parametrize("size", [(250, 192), (256, 190), (0, 192), (-32, 64)])
def test_config_rejects_input_size_not_multiple_of_32(size):
    with pytest.raises(ValueError, match="input_size"):
        ModelConfig(input_size=size)


def test_config_rejects_wrong_number_of_widths():
    with pytest.raises(ValueError, match="widths"):
        ModelConfig(widths=(8, 16, 32))


def test_fewer_stage_modules_drop_whole_modules_and_keep_the_rest_of_the_layout():
    """stage_modules (1, 1, 1): stage 3 keeps its first module, stage 4 only its last (the
    single-output one); every key left is the full model's, with its shape."""
    cfg = ModelConfig(width=8, input_size=(64, 64))
    full = build_model(cfg).state_dict()
    shallow_model = build_model(ModelConfig(width=8, input_size=(64, 64), stage_modules=(1, 1, 1)))
    shallow = shallow_model.state_dict()
    assert [len(getattr(shallow_model, f"stage{s}")) for s in (2, 3, 4)] == [1, 1, 1]
    dropped = re.compile(r"^(stage3\.[123]\.|stage4\.[12]\.|stage4\.0\.fuse_layers\.[123]\.)")
    assert set(shallow) == {k for k in full if not dropped.match(k)}
    assert all(shallow[k].shape == full[k].shape for k in shallow)
    with torch.no_grad():
        out = shallow_model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 17, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("modules", [(1, 0, 1), (1, 4), (1, 4, 3, 1)])
def test_config_rejects_stage_modules_other_than_three_positive_counts(modules):
    with pytest.raises(ValueError, match="stage_modules"):
        ModelConfig(stage_modules=modules)
