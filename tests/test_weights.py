"""Official HRNet weights: strict pose checkpoints, reported ImageNet backbones, clear errors.

The checkpoints are built by hand in the official key layout by `official_reference`, whose
functional forward pass is the reference output.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from official_reference import official_forward, official_state_dict

from psm_model.config import ModelConfig
from psm_model.hrnet import PoseHRNet, build_model
from psm_model.weights import (
    BACKBONE_PREFIXES,
    CheckpointError,
    from_official_checkpoint,
    load_pretrained,
    read_state_dict,
)

W8 = (8, 16, 32, 64)
W16 = (16, 32, 64, 128)
W32 = (32, 64, 128, 256)
ODD = (8, 12, 20, 28)


@pytest.fixture(scope="module")
def sd_w8() -> dict[str, torch.Tensor]:
    """Official-layout W8 pose state_dict; tests copy it before changing it."""
    return official_state_dict(W8, seed=1)


def _max_diff_to_official(model: PoseHRNet, sd: dict, shape=(2, 3, 128, 96)) -> float:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = official_forward(sd, x)
    assert reference.abs().max() > 1e-2  # a non-trivial output, so the comparison means something
    with torch.no_grad():
        out = model.double().eval()(x)
    assert out.shape == reference.shape
    return (out - reference).abs().max().item()


def _assert_holds(model: torch.nn.Module, sd: dict) -> None:
    own = model.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


# --- official pose checkpoints: strict load, same output ------------------------------------------


def test_official_checkpoint_gives_the_official_output(sd_w8):
    model = from_official_checkpoint(sd_w8)
    assert model.widths == W8
    assert (model.fusion, model.heatmap_stride) == ("hrnet", 4)
    assert not model.training
    _assert_holds(model, sd_w8)
    assert _max_diff_to_official(model, sd_w8) <= 1e-5
    assert _max_diff_to_official(model, sd_w8, (1, 3, 64, 96)) <= 1e-5


def test_official_checkpoint_with_non_doubling_widths():
    sd = official_state_dict(ODD, num_joints=5, seed=2)
    model = from_official_checkpoint(sd)
    assert model.widths == ODD
    assert model.final_layer.weight.shape == (5, 8, 1, 1)
    assert _max_diff_to_official(model, sd) <= 1e-5


def test_official_w32_checkpoint_with_3x3_head():
    sd = official_state_dict(W32, final_kernel=3, seed=3)  # about 1 s on one CPU thread
    model = from_official_checkpoint(sd)
    assert model.widths == W32
    assert model.final_layer.weight.shape == (17, 32, 3, 3)
    assert _max_diff_to_official(model, sd, (1, 3, 64, 64)) <= 1e-5


def test_official_checkpoint_from_file(sd_w8, tmp_path):
    path = tmp_path / "pose_hrnet_w8.pth"
    torch.save(sd_w8, path)
    model = from_official_checkpoint(path)
    _assert_holds(model, sd_w8)
    assert from_official_checkpoint(str(path)).widths == W8


@pytest.mark.parametrize("wrap", ["state_dict", "module", "both"])
def test_official_checkpoint_wrapped_or_prefixed(sd_w8, tmp_path, wrap):
    obj: dict = dict(sd_w8)
    if wrap in ("module", "both"):
        obj = {f"module.{k}": v for k, v in obj.items()}
    if wrap in ("state_dict", "both"):
        obj = {"state_dict": obj, "epoch": 140, "perf": 0.7}
    _assert_holds(from_official_checkpoint(obj), sd_w8)
    path = tmp_path / "checkpoint.pth"
    torch.save(obj, path)
    _assert_holds(from_official_checkpoint(path), sd_w8)


def test_checkpoint_without_num_batches_tracked_loads(sd_w8):
    """Checkpoints from before PyTorch 0.4.1 have no num_batches_tracked; output is unaffected."""
    sd = {k: v for k, v in sd_w8.items() if not k.endswith("num_batches_tracked")}
    model = from_official_checkpoint(sd)
    assert _max_diff_to_official(model, sd) <= 1e-5


# --- perturbed state_dicts fail and name the key --------------------------------------------------


def test_renamed_key_names_missing_and_unexpected(sd_w8):
    sd = dict(sd_w8)
    sd["layer1.2.conv_two.weight"] = sd.pop("layer1.2.conv2.weight")
    with pytest.raises(CheckpointError) as err:
        from_official_checkpoint(sd)
    msg = str(err.value)
    assert "layer1.2.conv2.weight" in msg and "layer1.2.conv_two.weight" in msg
    assert "missing" in msg and "unexpected" in msg


def test_removed_key_is_named(sd_w8):
    sd = dict(sd_w8)
    del sd["stage3.1.fuse_layers.2.0.1.1.running_var"]
    with pytest.raises(CheckpointError, match=r"stage3\.1\.fuse_layers\.2\.0\.1\.1\.running_var"):
        from_official_checkpoint(sd)


def test_wrong_shape_names_key_and_both_shapes(sd_w8):
    sd = dict(sd_w8)
    key = "stage2.0.fuse_layers.0.1.0.weight"
    assert sd[key].shape == (8, 16, 1, 1)
    sd[key] = torch.zeros(8, 12, 1, 1)
    with pytest.raises(CheckpointError) as err:
        from_official_checkpoint(sd)
    msg = str(err.value)
    assert key in msg and "(8, 12, 1, 1)" in msg and "(8, 16, 1, 1)" in msg


def test_extra_key_is_named(sd_w8):
    sd = dict(sd_w8)
    sd["stage2.0.fuse_layers.0.1.2.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"stage2\.0\.fuse_layers\.0\.1\.2\.weight"):
        from_official_checkpoint(sd)


@pytest.mark.parametrize("key", ["final_layer.weight", "stage4.0.branches.3.0.conv1.weight"])
def test_missing_head_or_width_key_is_named(sd_w8, key):
    sd = dict(sd_w8)
    del sd[key]
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        from_official_checkpoint(sd)


def test_error_from_a_file_names_the_file(sd_w8, tmp_path):
    sd = dict(sd_w8)
    del sd["conv1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        from_official_checkpoint(path)
    assert str(path) in str(err.value) and "conv1.weight" in str(err.value)


# --- files that are not checkpoints ---------------------------------------------------------------


def _write(path: Path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(
            bytes(torch.randint(0, 256, (4096,), generator=torch.Generator()).tolist())
        )
    elif kind == "text":
        path.write_text("MODEL:\n  NAME: pose_hrnet\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled list (torch.save)":
        torch.save([1, 2, 3], path)
    elif kind == "pickled list (pickle)":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "dict of non-tensors":
        torch.save({"epoch": 3, "lr": 0.001}, path)
    elif kind == "empty dict":
        torch.save({}, path)


@pytest.mark.parametrize(
    "kind",
    [
        "random bytes",
        "text",
        "empty",
        "pickled list (torch.save)",
        pytest.param(
            "pickled list (pickle)",
            marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
        ),
        "tensor",
        "dict of non-tensors",
        "empty dict",
    ],
)
def test_non_checkpoint_file_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "weights.pth"
    _write(path, kind)
    for load in (read_state_dict, from_official_checkpoint):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match=str(path)):
        load_pretrained(PoseHRNet(W8, "psm", 2), path)


class _Opens:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_is_weights_only(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "malicious.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Opens(str(marker))}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=str(path)):
        from_official_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_pretrained(build_model(ModelConfig(width=8, input_size=(64, 64))), path)


def test_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        read_state_dict(tmp_path)


# --- ImageNet backbones (load_pretrained) ---------------------------------------------------------


def _add(sd: dict, g: torch.Generator, key: str, *shape: int) -> None:
    sd[key] = torch.randn(*shape, generator=g)


def _add_bn(sd: dict, g: torch.Generator, key: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean"):
        _add(sd, g, f"{key}.{name}", c)
    sd[f"{key}.running_var"] = torch.rand(c, generator=g) + 0.5
    sd[f"{key}.num_batches_tracked"] = torch.tensor(0)


CLASSIFIER_HEAD_KEYS = {
    "incre_modules.0.0.conv1.weight",
    "incre_modules.0.0.bn1.weight",
    "downsamp_modules.0.0.weight",
    "downsamp_modules.0.0.bias",
    "final_layer.0.weight",
    "final_layer.0.bias",
    "final_layer.1.weight",
    "classifier.weight",
    "classifier.bias",
}


def imagenet_state_dict(widths: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """An HRNet ImageNet classification checkpoint in the official layout (hrnet_cls).

    The pose backbone's keys, plus stage 4's last module keeping all four outputs (its
    fuse_layers.1-3 rows), plus (a sample of) the classifier heads; no pose final_layer.
    """
    sd = {k: v for k, v in official_state_dict(widths, seed=seed).items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("final_layer.")}
    g = torch.Generator().manual_seed(seed + 100)
    for i in range(1, 4):
        for j in range(4):
            q = f"stage4.2.fuse_layers.{i}.{j}"
            if j > i:
                _add(sd, g, f"{q}.0.weight", widths[i], widths[j], 1, 1)
                _add_bn(sd, g, f"{q}.1", widths[i])
            elif j < i:
                for k in range(i - j):
                    cout = widths[i] if k == i - j - 1 else widths[j]
                    _add(sd, g, f"{q}.{k}.0.weight", cout, widths[j], 3, 3)
                    _add_bn(sd, g, f"{q}.{k}.1", cout)
    _add(sd, g, "incre_modules.0.0.conv1.weight", 32, widths[0], 1, 1)
    _add(sd, g, "incre_modules.0.0.bn1.weight", 32)
    _add(sd, g, "downsamp_modules.0.0.weight", 256, 128, 3, 3)
    _add(sd, g, "downsamp_modules.0.0.bias", 256)
    _add(sd, g, "final_layer.0.weight", 2048, 1024, 1, 1)
    _add(sd, g, "final_layer.0.bias", 2048)
    _add(sd, g, "final_layer.1.weight", 2048)
    _add(sd, g, "classifier.weight", 1000, 2048)
    _add(sd, g, "classifier.bias", 1000)
    return sd


@pytest.fixture(scope="module")
def imagenet_w8() -> dict[str, torch.Tensor]:
    return imagenet_state_dict(W8)


def _is_upward_fusion(key: str) -> bool:
    parts = key.split(".")
    return (
        len(parts) > 4
        and parts[2] == "fuse_layers"
        and int(parts[4]) > int(parts[3])
        and parts[5] in ("0", "1")
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pretrained_backbone_into_psm_model(imagenet_w8):
    ckpt = imagenet_w8
    torch.manual_seed(0)
    model = PoseHRNet(W8, "psm", 2)
    fresh = _snapshot(model)
    report = load_pretrained(model, ckpt)
    own = model.state_dict()

    loaded, skipped, missing = set(report.loaded), set(report.skipped), set(report.missing)
    assert len(loaded) == len(report.loaded)
    assert all(k.split(".")[0] in BACKBONE_PREFIXES for k in loaded)
    for k in loaded:
        assert torch.equal(own[k], ckpt[k]), k
    # every checkpoint key is either loaded or reported as skipped
    assert loaded | skipped == set(ckpt) and not loaded & skipped
    assert CLASSIFIER_HEAD_KEYS <= skipped
    upward = {k for k in ckpt if _is_upward_fusion(k)}
    assert "stage2.0.fuse_layers.0.1.0.weight" in upward
    assert upward <= skipped  # HRNet's upsampling fusion: PSM has pixel shuffles instead
    # stage 4's last module: the classifier keeps all four outputs, the pose network only branch 0
    extra_rows = {k for k in ckpt if re.match(r"stage4\.2\.fuse_layers\.[123]\.", k)}
    assert extra_rows <= skipped
    assert skipped == CLASSIFIER_HEAD_KEYS | upward | extra_rows
    # the backbone keys shared with the official layout are all loaded
    assert loaded == {k for k in set(ckpt) & set(own)}

    # the PSM layers and the pose head stay as initialised, and are reported
    for k in (
        "stage2.0.fuse_layers.0.1.conv.weight",
        "stage2.0.fuse_layers.0.0.conv.weight",
        "stage4.2.fuse_layers.0.3.bn.weight",
        "head_up.conv.weight",
        "head_stem.conv.weight",
        "final_layer.weight",
        "final_layer.bias",
    ):
        assert k in missing, k
    assert missing == {k for k in own if k not in ckpt and not k.endswith("num_batches_tracked")}
    assert not any(k.endswith("num_batches_tracked") for k in missing)
    for k in missing:
        assert torch.equal(own[k], fresh[k]), k
    assert loaded | missing >= {k for k in own if not k.endswith("num_batches_tracked")}


def test_pretrained_backbone_into_hrnet_model(imagenet_w8):
    model = PoseHRNet(W8, "hrnet", 4)
    report = load_pretrained(model, imagenet_w8)
    assert set(report.missing) == {"final_layer.weight", "final_layer.bias"}
    stage4_extra = {k for k in imagenet_w8 if k.startswith("stage4.2.fuse_layers.")} - set(
        model.state_dict()
    )
    assert set(report.skipped) == CLASSIFIER_HEAD_KEYS | stage4_extra
    assert len(stage4_extra) > 0
    own = model.state_dict()
    for k in report.loaded:
        assert torch.equal(own[k], imagenet_w8[k]), k


def test_pretrained_from_file_and_module_prefix(imagenet_w8, tmp_path):
    path = tmp_path / "hrnet_w8_imagenet.pth"
    torch.save({f"module.{k}": v for k, v in imagenet_w8.items()}, path)
    model = PoseHRNet(W8, "psm", 2)
    report = load_pretrained(model, path)
    assert "conv1.weight" in report.loaded
    assert torch.equal(model.conv1.weight, imagenet_w8["conv1.weight"])


def test_pretrained_report_covers_every_model_key_for_a_pose_checkpoint(sd_w8):
    model = PoseHRNet(W8, "hrnet", 4)
    report = load_pretrained(model, sd_w8)
    assert "final_layer.weight" in report.skipped

    def no_counters(keys):
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    covered = no_counters(report.loaded) | no_counters(report.missing)
    assert covered == no_counters(model.state_dict())


def test_pretrained_wrong_width_names_key_and_shapes_and_loads_nothing():
    ckpt = imagenet_state_dict(W16)
    model = PoseHRNet(W8, "psm", 2)
    before = _snapshot(model)
    own = model.state_dict()
    first_bad = next(
        k
        for k in ckpt
        if k in own and k.split(".")[0] in BACKBONE_PREFIXES and own[k].shape != ckpt[k].shape
    )
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, ckpt)
    msg = str(err.value)
    assert first_bad in msg
    assert str(tuple(ckpt[first_bad].shape)) in msg and str(tuple(own[first_bad].shape)) in msg
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # no partial load


def test_pretrained_without_backbone_keys_is_an_error():
    model = PoseHRNet(W8, "psm", 2)
    with pytest.raises(CheckpointError, match="backbone"):
        load_pretrained(model, {"classifier.weight": torch.zeros(1000, 2048)})
    with pytest.raises(CheckpointError, match="backbone"):
        load_pretrained(model, {"final_layer.weight": torch.zeros(17, 8, 1, 1)})


def test_build_model_only_builds_and_training_loads_the_pretrained_path(imagenet_w8, tmp_path):
    path = tmp_path / "hrnet_w8_imagenet.pth"
    torch.save(imagenet_w8, path)
    cfg = ModelConfig(width=8, input_size=(64, 64), pretrained=str(path))
    torch.manual_seed(5)
    plain = build_model(ModelConfig(width=8, input_size=(64, 64)))
    torch.manual_seed(5)
    model = build_model(cfg)  # evaluation, export, checkpoint loads: no file read
    plain_weights = plain.state_dict()  # once, not per key
    assert all(torch.equal(v, plain_weights[k]) for k, v in model.state_dict().items())
    load_pretrained(model, cfg.pretrained)  # what jobs.train_loop does
    assert torch.equal(model.conv1.weight, imagenet_w8["conv1.weight"])
    key = "stage3.2.branches.2.1.conv2.weight"
    assert torch.equal(model.state_dict()[key], imagenet_w8[key])
    # the PSM layers stay as initialised
    assert torch.equal(model.head_up.conv.weight, plain.head_up.conv.weight)
    assert torch.equal(
        model.stage2[0].fuse_layers[0][1].conv.weight, plain.stage2[0].fuse_layers[0][1].conv.weight
    )
