"""A run's good work kept: the non-finite loss guard, the resume config check, unique run names,
and the best checkpoint kept beside the newest ones (no Ray needed for these)."""

import numpy as np
import pytest
import torch

from jobs import run_safety
from psm_model.checkpoint import TrainState
from psm_model.codec import HeatmapCodec
from psm_model.config import ConfigError, load_config
from psm_model.hrnet import build_model
from psm_model.loss import train_step

SMALL = ["model.width=4", "model.input_size=[64,32]", "train.batch_size=2"]


def _cfg(tmp_path, *more):
    return load_config(None, [*SMALL, f"train.storage_path={tmp_path}", "train.name=r", *more])


def _batch(cfg, rng):
    h, w = cfg.model.input_size
    return {
        "image": rng.integers(0, 255, (2, h, w, 3), dtype=np.uint8),
        "keypoints": rng.uniform(4, 28, (2, 17, 2)).astype(np.float32),
        "visible": np.ones((2, 17), np.float32),
    }


def _step(cfg, model, batch):
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    codec = HeatmapCodec.from_config(cfg)
    return train_step(model, batch, codec, cfg, optimizer, scaler, torch.device("cpu"))


def test_a_nan_loss_updates_nothing_and_stops_naming_epoch_and_step(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model(cfg.model)
    batch = _batch(cfg, np.random.default_rng(0))
    assert np.isfinite(_step(cfg, model, batch))  # a finite step updates as before
    with torch.no_grad():
        model.final_layer.bias[0] = float("nan")  # every later loss is NaN
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert _step(cfg, model, batch) is None  # before: NaN, and Adam wrote NaN into every weight
    after = dict(model.named_parameters())  # (BatchNorm statistics saw the forward pass)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "final_layer.bias")
    assert all(torch.isfinite(v).all() for k, v in after.items() if k != "final_layer.bias")
    state = TrainState(epoch=50, step=1234)
    with pytest.raises(
        run_safety.NonFiniteLossError,
        match=r"epoch 50, step 1234: the training "
        r"loss is not finite",
    ):
        run_safety.skip_nonfinite_step(cfg, state, 50)


def test_skip_policy_has_a_budget_for_the_whole_run(tmp_path):
    cfg = _cfg(tmp_path, "train.nonfinite_loss=skip", "train.max_skipped_steps=2")
    state = TrainState(skipped_steps=1)  # one skipped before a resume: it counts
    run_safety.skip_nonfinite_step(cfg, state, 3)
    assert state.skipped_steps == 2
    with pytest.raises(run_safety.NonFiniteLossError, match="3 steps with a non-finite loss"):
        run_safety.skip_nonfinite_step(cfg, state, 3)


def _check_and_save(cfg) -> None:
    run_safety.check_resume_config(cfg)
    run_safety.save_run_config(cfg)  # as run_training, once the data and MLflow run are in hand


def test_a_resumed_run_with_other_values_is_refused_naming_the_keys(tmp_path):
    _check_and_save(_cfg(tmp_path, "train.lr=0.001", "train.epochs=10"))
    assert (tmp_path / "r" / "psm_config.yaml").exists()
    run_safety.check_resume_config(_cfg(tmp_path, "train.lr=0.001", "train.epochs=10"))  # same
    # before: resumed silently as a mixed run, MLflow showing the old params
    other = _cfg(tmp_path, "train.lr=0.002", "train.epochs=20", "train.max_failures=5")
    with pytest.raises(ConfigError) as error:
        run_safety.check_resume_config(other)
    message = str(error.value)
    assert "train.epochs: 10 -> 20; train.lr: 0.001 -> 0.002" in message
    assert "max_failures" not in message  # changes how failures are handled, not what is trained
    accepted = _cfg(
        tmp_path, "train.lr=0.001", "train.epochs=20", "train.resume_changes=[train.epochs]"
    )
    _check_and_save(accepted)  # explicit, and saved: the next resume compares to it
    with pytest.raises(ConfigError, match="train.epochs: 20 -> 10"):
        run_safety.check_resume_config(_cfg(tmp_path, "train.lr=0.001", "train.epochs=10"))
    with pytest.raises(ConfigError, match=r"train.resume_changes: unknown keys \['train.epoch'\]"):
        run_safety.check_resume_config(_cfg(tmp_path, "train.resume_changes=[train.epoch]"))


def test_a_start_that_fails_on_its_data_leaves_nothing_that_refuses_the_corrected_one(tmp_path):
    """Before: the wrong data.root's config was saved first, and the retry with the right root
    was refused as a changed config."""
    from jobs.train import run_training
    from pipelines.coco import DataError

    wrong = _cfg(tmp_path, f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="nowhere"):
        run_training(wrong)
    assert not (tmp_path / "r" / "psm_config.yaml").exists()
    run_safety.check_resume_config(_cfg(tmp_path, f"data.root={tmp_path / 'coco'}"))


def test_default_run_names_are_unique_within_a_second(tmp_path):
    cfg = _cfg(tmp_path)
    names = {run_safety.default_run_name(cfg) for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("psm-w4-") for n in names)


def test_keep_best_replaces_the_best_folder_whole(tmp_path):
    cfg = _cfg(tmp_path)
    for epoch in (3, 7):
        source = tmp_path / f"ckpt{epoch}"
        source.mkdir()
        (source / "train_state.json").write_text(f'{{"epoch": {epoch}}}')
        run_safety.keep_best(cfg, source)
    best = tmp_path / "r" / "best_checkpoint"
    assert (best / "train_state.json").read_text() == '{"epoch": 7}'
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["best_checkpoint"]
