"""Training checkpoints: verified against their checksums on load, malformed pieces named, and a
corrupt newest checkpoint replaced by the previous one."""

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from official_reference import official_state_dict

from psm_model.checkpoint import (
    TrainState,
    _train_state,
    checkpoint_config,
    load_checkpoint,
    load_checkpoint_model,
    load_first_good,
    load_model,
    save_checkpoint,
    save_model,
)
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model
from psm_model.weights import CheckpointError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _pieces(cfg):
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, sched, scaler


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY, ["model.width=4", "model.input_size=[64,32]"])


def _save(path, cfg, epoch):
    model, opt, sched, scaler = _pieces(cfg)
    with torch.no_grad():
        next(model.parameters()).fill_(float(epoch))  # tells the checkpoints apart
    save_checkpoint(path, model, opt, sched, scaler, TrainState(epoch=epoch, step=10 * epoch), cfg)
    return model


def test_round_trip_writes_checksums(tmp_path, cfg):
    saved = _save(tmp_path / "c", cfg, 3)
    model, opt, sched, scaler = _pieces(cfg)
    state = load_checkpoint(tmp_path / "c", model, opt, sched, scaler)
    assert (state.epoch, state.step, state.skipped_steps) == (3, 30, 0)
    loaded = model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in saved.state_dict().items())
    names = set(json.loads((tmp_path / "c" / "checksums.json").read_text()))
    assert names == {"model.pt", "optimizer.pt", "train_state.json", "config.yaml"}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([*names, "checksums.json"])


def test_changed_bytes_are_an_error_naming_the_file(tmp_path, cfg):
    _save(tmp_path / "c", cfg, 3)
    state_file = tmp_path / "c" / "train_state.json"
    # still valid JSON, so the old loader resumed at the wrong epoch without a word
    state_file.write_text(state_file.read_text().replace('"epoch": 3', '"epoch": 7'))
    with pytest.raises(CheckpointError, match=rf"{state_file}: sha256 differs"):
        load_checkpoint(tmp_path / "c", _pieces(cfg)[0])


@pytest.mark.parametrize("entry", ["/etc/hostname", "../model.pt", "notes.txt"])
def test_checksum_entries_name_only_the_checkpoints_own_files(tmp_path, cfg, entry):
    _save(tmp_path / "c", cfg, 3)
    sums = tmp_path / "c" / "checksums.json"
    sums.write_text(json.dumps({**json.loads(sums.read_text()), entry: "0" * 64}))
    with pytest.raises(CheckpointError, match=rf"{sums}: '{re.escape(entry)}' is not a checkpoint"):
        load_checkpoint(tmp_path / "c", _pieces(cfg)[0])


def test_a_checkpoint_file_that_is_a_fifo_is_an_error_not_a_hang(tmp_path, cfg):
    _save(tmp_path / "c", cfg, 3)
    (tmp_path / "c" / "optimizer.pt").unlink()
    os.mkfifo(tmp_path / "c" / "optimizer.pt")  # reading it would wait for a writer forever
    with pytest.raises(CheckpointError, match="optimizer.pt: not a regular file"):
        load_checkpoint(tmp_path / "c", _pieces(cfg)[0])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda extra: extra["optimizer"].pop("param_groups"), r"optimizer: malformed state"),
        (lambda extra: extra.pop("scheduler"), r"scheduler: missing"),
        (lambda extra: extra.update(torch_rng=[1, 2]), r"torch_rng: missing or not a uint8"),
    ],
)
def test_malformed_optimizer_pieces_name_the_file(tmp_path, cfg, change, match):
    _save(tmp_path / "c", cfg, 1)
    path = tmp_path / "c" / "optimizer.pt"
    extra = torch.load(path, weights_only=True)
    change(extra)
    torch.save(extra, path)
    (tmp_path / "c" / "checksums.json").unlink()  # as a checkpoint written before checksums
    with pytest.raises(CheckpointError, match=rf"{path}: {match}"):  # before: a bare KeyError
        load_checkpoint(tmp_path / "c", *_pieces(cfg))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, cfg, caplog):
    _save(tmp_path / "epoch2", cfg, 2)
    _save(tmp_path / "epoch3", cfg, 3)
    model_file = tmp_path / "epoch3" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # a copy cut short
    model, opt, sched, scaler = _pieces(cfg)
    with caplog.at_level(logging.WARNING):
        state, used = load_first_good(
            [tmp_path / "epoch3", tmp_path / "epoch2"], model, opt, sched, scaler
        )
    assert used == tmp_path / "epoch2" and state.epoch == 2
    assert float(next(model.parameters()).detach().flatten()[0]) == 2.0
    assert f"{model_file}: sha256 differs" in caplog.text
    with pytest.raises(CheckpointError, match="sha256 differs"):  # none usable: the newest's error
        load_first_good([tmp_path / "epoch3"], model)


def test_one_format_the_model_part_alone_loads_as_any_checkpoint_does(tmp_path, cfg):
    # the best model training logs to MLflow: model.pt + config.yaml (+ checksums), no
    # optimiser and no train state; every model reader takes it like a training checkpoint
    trained = _save(tmp_path / "full", cfg, 3)
    save_model(tmp_path / "best", trained, cfg)
    names = set(json.loads((tmp_path / "best" / "checksums.json").read_text()))
    assert names == {"model.pt", "config.yaml"}
    for folder in ("full", "best"):
        model, got = load_checkpoint_model(tmp_path / folder)
        assert got == cfg
        loaded = model.state_dict()  # once: a state_dict per key made this test take 40 s
        assert all(torch.equal(v, loaded[k]) for k, v in trained.state_dict().items())
    # and it is verified as they are
    (tmp_path / "best" / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="model.pt: sha256 differs"):
        load_checkpoint_model(tmp_path / "best")


def _equal(model, expected) -> bool:
    loaded = model.state_dict()  # once, not per key
    return all(torch.equal(v, loaded[k]) for k, v in expected.items())


def test_the_best_checkpoint_training_logs_to_mlflow_loads_as_a_checkpoint(tmp_path):
    # the MLflow artifact `best_checkpoint` holds the model and config only (no optimiser, no
    # train state); `psm eval/infer/export --checkpoint` and tune's registration read it
    cfg = load_config(TINY, ["model.fusion=hrnet"])
    model = build_model(cfg.model)
    with torch.no_grad():
        next(model.parameters()).fill_(0.5)
    (tmp_path / "best").mkdir()
    torch.save(model.state_dict(), tmp_path / "best" / "model.pt")
    (tmp_path / "best" / "config.yaml").write_text(cfg.to_yaml())
    loaded, got = load_model(str(tmp_path / "best"), load_config(TINY))
    assert got.model.fusion == "hrnet"
    assert _equal(loaded, model.state_dict())


def test_load_model_reads_every_local_kind(tmp_path, cfg):
    given = load_config(TINY, ["model.fusion=hrnet"])  # what the command line says
    trained = _save(tmp_path / "train" / "gen-0003-0123abcd", cfg, 3)
    # a kept-best folder: the generation its CURRENT names (run_folder.keep_best)
    (tmp_path / "train" / "CURRENT").write_text("gen-0003-0123abcd")
    for folder in ("train/gen-0003-0123abcd", "train"):
        model, got = load_model(tmp_path / folder, given)
        assert got.model == cfg.model and got.data == given.data  # the folder's model config
        assert _equal(model, trained.state_dict())
    assert checkpoint_config(tmp_path / "train") == cfg
    # a state_dict file: the given model config
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    model, got = load_model(tmp_path / "weights.pt", cfg)
    assert got == cfg and _equal(model, trained.state_dict())
    # an official HRNet pose .pth: its widths, HRNet fusion, stride 4
    official = official_state_dict((8, 16, 32, 64))
    torch.save(official, tmp_path / "pose_hrnet_w8.pth")
    model, got = load_model(tmp_path / "pose_hrnet_w8.pth", load_config(TINY))
    assert (got.model.widths, got.model.fusion, got.model.heatmap_stride) == (
        (8, 16, 32, 64),
        "hrnet",
        4,
    )
    assert model.widths == (8, 16, 32, 64)
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_model(tmp_path / "missing.pt", cfg)


def test_a_train_state_of_before_the_job_field_gives_its_mlflow_keys_to_the_job(tmp_path):
    # checkpoints written before session 15 hold the MLflow run and unsent metrics at the top
    old = {"epoch": 3, "step": 30, "best_ap": 0.5, "best_epoch": 2, "skipped_steps": 0}
    old |= {"mlflow_run_id": "abc", "held_metrics": [{"step": 2, "time_ms": 1, "metrics": {}}]}
    (tmp_path / "train_state.json").write_text(json.dumps(old))
    state = _train_state(tmp_path)
    assert (state.epoch, state.step, state.best_ap) == (3, 30, 0.5)
    assert state.job == {"mlflow_run_id": "abc", "held_metrics": old["held_metrics"]}
    (tmp_path / "train_state.json").write_text(json.dumps({**old, "job": {"x": 1}}))
    assert _train_state(tmp_path).job == {
        "mlflow_run_id": "abc",
        "held_metrics": old["held_metrics"],
        "x": 1,
    }
