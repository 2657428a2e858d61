"""A run's folder and what it keeps: the resume config check, unique run names, the best checkpoint
kept beside the newest ones; and the training loop's non-finite loss guard (no Ray needed)."""

import os

import numpy as np
import pytest
import torch

from jobs import run_folder, train_worker
from psm_model.checkpoint import TrainState, load_checkpoint
from psm_model.config import ConfigError
from psm_model.config_yaml import load_config
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
    return train_step(model, batch, cfg, optimizer, scaler, torch.device("cpu"))


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
        train_worker.NonFiniteLossError,
        match=r"epoch 50, step 1234: the training "
        r"loss is not finite",
    ):
        train_worker.skip_nonfinite_step(cfg, state, 50)


def test_skip_policy_has_a_budget_for_the_whole_run(tmp_path):
    cfg = _cfg(tmp_path, "train.nonfinite_loss=skip", "train.max_skipped_steps=2")
    state = TrainState(skipped_steps=1)  # one skipped before a resume: it counts
    train_worker.skip_nonfinite_step(cfg, state, 3)
    assert state.skipped_steps == 2
    with pytest.raises(train_worker.NonFiniteLossError, match="3 steps with a non-finite loss"):
        train_worker.skip_nonfinite_step(cfg, state, 3)


def _check_and_save(cfg) -> None:
    run_folder.check_resume_config(cfg)
    run_folder.save_run_config(cfg)  # as run_training, once the data and MLflow run are in hand


def test_a_resumed_run_with_other_values_is_refused_naming_the_keys(tmp_path):
    _check_and_save(_cfg(tmp_path, "train.lr=0.001", "train.epochs=10"))
    assert (tmp_path / "r" / "psm_config.yaml").exists()
    run_folder.check_resume_config(_cfg(tmp_path, "train.lr=0.001", "train.epochs=10"))  # same
    # before: resumed silently as a mixed run, MLflow showing the old params
    other = _cfg(tmp_path, "train.lr=0.002", "train.epochs=20", "train.max_failures=5")
    with pytest.raises(ConfigError) as error:
        run_folder.check_resume_config(other)
    message = str(error.value)
    assert "train.epochs: 10 -> 20; train.lr: 0.001 -> 0.002" in message
    assert "max_failures" not in message  # changes how failures are handled, not what is trained
    accepted = _cfg(
        tmp_path, "train.lr=0.001", "train.epochs=20", "train.resume_changes=[train.epochs]"
    )
    _check_and_save(accepted)  # explicit, and saved: the next resume compares to it
    with pytest.raises(ConfigError, match="train.epochs: 20 -> 10"):
        run_folder.check_resume_config(_cfg(tmp_path, "train.lr=0.001", "train.epochs=10"))
    with pytest.raises(ConfigError, match=r"train.resume_changes: unknown keys \['train.epoch'\]"):
        run_folder.check_resume_config(_cfg(tmp_path, "train.resume_changes=[train.epoch]"))


def test_a_start_that_fails_on_its_data_leaves_nothing_that_refuses_the_corrected_one(tmp_path):
    """Before: the wrong data.root's config was saved first, and the retry with the right root
    was refused as a changed config."""
    from jobs.tracking import Tracker
    from jobs.training import run_training
    from pipelines.coco import DataError

    wrong = _cfg(tmp_path, f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="nowhere"):
        run_training(wrong, Tracker.of(wrong))
    assert not (tmp_path / "r" / "psm_config.yaml").exists()
    run_folder.check_resume_config(_cfg(tmp_path, f"data.root={tmp_path / 'coco'}"))


def test_default_run_names_are_unique_within_a_second(tmp_path):
    cfg = _cfg(tmp_path)
    names = {run_folder.default_run_name(cfg) for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("psm-w4-") for n in names)


def _checkpoint(folder, epoch: int, cfg):
    """A real checkpoint (checksums verified on load) whose train state names `epoch`."""
    from psm_model.checkpoint import save_checkpoint

    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState(epoch=epoch, best_ap=epoch / 100)
    save_checkpoint(folder, model, optimizer, scheduler, scaler, state, cfg)
    return folder


def test_keep_best_makes_each_new_best_current_and_removes_the_old(tmp_path):
    cfg = _cfg(tmp_path)
    for epoch in (3, 7):
        run_folder.keep_best(cfg, _checkpoint(tmp_path / f"ckpt{epoch}", epoch, cfg), epoch)
    best = tmp_path / "r" / "best_checkpoint"
    assert load_checkpoint(best, build_model(cfg.model)).epoch == 7
    [generation] = [p.name for p in best.iterdir() if p.is_dir()]
    assert (best / "CURRENT").read_text() == generation and generation.startswith("gen-0007-")
    assert sorted(p.name for p in best.iterdir()) == ["CURRENT", generation]


KEEPER = """
import sys, torch
from jobs import run_folder
from psm_model.config_yaml import load_config
cfg = load_config(None, sys.argv[3:])
torch.set_num_threads(1)
print("ready", flush=True)
epoch = 0
while True:  # a new best every round, as fast as it can: killed at some point of one
    epoch += 1
    run_folder.keep_best(cfg, sys.argv[1 + epoch % 2], epoch)
"""


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_kill_at_any_point_of_keep_best_leaves_a_verifiable_best(
    tmp_path, store, request, monkeypatch
):
    # before: on S3 the best was overwritten in place (checksums first), so a kill part-way left
    # a folder that failed verification and the previous best was gone; locally the old best
    # was moved aside before the new one took its name
    import random
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipelines.uris import filesystem

    if store == "s3":
        from tests.local_cluster import S3Server

        server = S3Server(tmp_path / "moto").start("best")
        request.addfinalizer(server.stop)
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)  # this process reads the best back from it too
        storage = f"s3://best/{tmp_path.name}"
    else:
        storage = str(tmp_path / "runs")
    overrides = [*SMALL, f"train.storage_path={storage}", "train.name=r"]
    cfg = load_config(None, overrides)
    sources = [str(_checkpoint(tmp_path / f"ckpt{k}", k, cfg)) for k in (1, 2)]
    run_folder.keep_best(cfg, sources[0], 0)  # the best before the killed job's
    repo = str(Path(__file__).resolve().parents[1])
    rng = random.Random(5)
    for round_ in range(4):
        keeper = subprocess.Popen(
            [sys.executable, "-c", KEEPER, *sources, *overrides],
            stdout=subprocess.PIPE, text=True,
            env=os.environ | {"PYTHONPATH": repo},
        )  # fmt: skip
        assert keeper.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside some keep_best
        keeper.kill()
        keeper.wait()
        fs, root = filesystem(f"{storage}/r/best_checkpoint")
        local = tmp_path / f"best{round_}"
        import pyarrow.fs as pafs

        pafs.copy_files(root, str(local), source_filesystem=fs)
        state = load_checkpoint(local, build_model(cfg.model))  # verified against its checksums
        assert state.epoch in (1, 2)
