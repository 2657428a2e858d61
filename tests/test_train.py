"""End-to-end Ray Train runs on the local Ray: 2 gloo workers, tiny model, synthetic data."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from jobs.train import run_training
from psm_model.checkpoint import load_checkpoint
from psm_model.config import ConfigError, load_config
from psm_model.hrnet import build_model

pytestmark = pytest.mark.slow
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


# no augmentation: the same crops every epoch, so a few steps are enough for the loss to fall
STILL = [
    "data.flip=false",
    "data.rotation=0",
    "data.scale_min=1",
    "data.scale_max=1",
    "data.half_body_prob=0",
    "model.width=16",
    "model.input_size=[96,64]",
]


def _cfg(tmp_path, root, name, **train):
    return load_config(TINY, _overrides(tmp_path, root, name, **train))


def _overrides(tmp_path, root, name, **train) -> list[str]:
    overrides = {
        "epochs": 2,
        "batch_size": 4,
        "lr": 5e-3,
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "val_every": 0,
        "storage_path": str(tmp_path / "runs"),
        "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "name": name,
        **train,
    }
    train_overrides = [f"train.{k}={v}" for k, v in overrides.items()]
    return [f"data.root={root}", "data.cpus_per_task=0.5", *STILL, *train_overrides]


def _weights(summary, cfg):
    model = build_model(cfg.model)
    state = load_checkpoint(summary["checkpoint"], model)
    return model.state_dict(), state


def test_two_worker_run_logs_everything_to_mlflow(ray_local, synthetic_root, tmp_path):
    cfg = _cfg(tmp_path, synthetic_root, "logged", epochs=3, fused_optimizer=True)
    summary = run_training(cfg)
    assert summary["epochs_done"] == 3
    assert sorted(p.name for p in (tmp_path / "runs" / "logged").glob("checkpoint_*"))  # written

    mlflow.set_tracking_uri(cfg.train.mlflow_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.fusion"] == "psm" and run.data.params["train.epochs"] == "3"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(losses) == 3  # one value per epoch, falling every epoch (CPU runs are deterministic)
    assert losses[2] < losses[1] < losses[0]
    assert len(client.get_metric_history(run.info.run_id, "samples_per_s")) == 3
    # which side bounds the run, every epoch: step time split into waiting and computing
    last = run.data.metrics
    assert 0.0 <= last["data_wait_frac"] <= 1.0 and last["data_samples_per_s"] > 0
    wait, compute = last["data_wait_s"], last["compute_s"]
    assert compute > 0 and last["data_wait_frac"] == pytest.approx(wait / (wait + compute))
    assert len(client.get_metric_history(run.info.run_id, "data_wait_frac")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    version = client.get_latest_versions(cfg.train.registered_model)[0]
    assert version.run_id == run.info.run_id
    model = mlflow.pytorch.load_model(f"models:/{cfg.train.registered_model}/{version.version}")
    assert model(torch.zeros(1, 3, 96, 64)).shape == (1, 17, 48, 32)


@pytest.fixture(scope="module")
def straight(ray_local, synthetic_root, tmp_path_factory):
    """An uninterrupted 3-epoch run: what every interrupted one must reproduce exactly."""
    return run_training(
        _cfg(tmp_path_factory.mktemp("straight"), synthetic_root, "straight", epochs=3)
    )


def _same_weights(run_a, run_b, cfg):
    a, state_a = _weights(run_a, cfg)
    b, state_b = _weights(run_b, cfg)
    assert (state_a.epoch, state_a.step) == (state_b.epoch, state_b.step) == (3, state_a.step)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reproduces_an_uninterrupted_run(ray_local, synthetic_root, tmp_path, straight):
    run_training(_cfg(tmp_path, synthetic_root, "resumed", epochs=2))
    # a resumed run must match the config it started with; more epochs are accepted explicitly
    with pytest.raises(ConfigError, match=r"train\.epochs: 2 -> 3"):
        run_training(_cfg(tmp_path, synthetic_root, "resumed", epochs=3))
    # the newest checkpoint is corrupt (a copy cut short): the run falls back to the previous one
    # and replays epoch 2, deterministically
    kept = sorted(p for p in (tmp_path / "runs" / "resumed").glob("checkpoint_*") if p.is_dir())
    newest = kept[-1] / "model.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    longer = _cfg(tmp_path, synthetic_root, "resumed", epochs=3, resume_changes="[train.epochs]")
    resumed = run_training(longer)  # same name
    _same_weights(straight, resumed, _cfg(tmp_path, synthetic_root, "x"))
    assert resumed["mlflow_run_id"] != straight["mlflow_run_id"]


def _train_worker_pids():
    out = os.popen("ps -eo pid,args").read().splitlines()
    return [int(line.split()[0]) for line in out if "ray::RayTrainWorker" in line]


def test_killed_worker_is_recovered(ray_local, synthetic_root, tmp_path, straight):
    cfg = _cfg(tmp_path, synthetic_root, "killed", epochs=3, max_failures=2)
    killed = []

    def kill_after_first_checkpoint():
        run_dir = tmp_path / "runs" / "killed"
        deadline = time.time() + 300
        while time.time() < deadline and not list(run_dir.glob("checkpoint_*")):
            time.sleep(0.5)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = run_training(cfg)
    killer.join(timeout=5)
    assert killed, "no train worker was found to kill"
    assert summary["epochs_done"] == 3
    _same_weights(straight, summary, cfg)  # the restart replayed the lost epoch exactly


def test_bad_images_are_skipped_and_counted(ray_local, synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(synthetic_root, root)
    images = sorted((root / "train2017").glob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:300])  # truncated
    images[1].unlink()  # missing
    summary = run_training(_cfg(tmp_path, root, "bad", epochs=1))
    assert summary["skipped_images"] == 2
    assert summary["epochs_done"] == 1


@pytest.mark.parametrize("config", ["hrnet_w32_256x192.yaml", "psm_w48_384x288.yaml"])
def test_trains_and_validates_on_the_real_coco_layout(ray_local, coco_root, tmp_path, config):
    """The shipped 256x192 / 384x288 configs on the official COCO layout (width cut to 8 so one
    epoch fits a 2-core machine): train, validate with the full recipe, log the pose drawings."""
    cfg = load_config(
        TINY.parent / config,
        [
            f"data.root={coco_root}",
            "model.width=8",
            "train.epochs=1",
            "train.batch_size=8",
            "train.num_workers=1",
            "train.val_every=1",
            f"train.storage_path={tmp_path / 'runs'}",
            f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.name=coco",
            "eval.visualize=2",
        ],
    )
    summary = run_training(cfg)
    assert summary["epochs_done"] == 1 and summary["skipped_images"] == 0
    assert 0.0 <= summary["val_AP"] <= 1.0 and summary["best_AP"] == summary["val_AP"]
    client = mlflow.MlflowClient(tracking_uri=cfg.train.mlflow_uri)
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"best_checkpoint", "poses", "config.yaml"} <= artifacts
    poses = client.list_artifacts(summary["mlflow_run_id"], "poses")
    assert len(poses) == 2 and all(p.path.endswith(".jpg") for p in poses)
    best = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "best_checkpoint")}
    assert best == {f"best_checkpoint/{n}" for n in ("model.pt", "config.yaml", "checksums.json")}
    # the best checkpoint is also kept in the run folder, whatever Ray's retention drops later
    kept = tmp_path / "runs" / "coco" / "best_checkpoint"
    assert load_checkpoint(kept, build_model(cfg.model)).best_ap == summary["best_AP"]


def test_a_killed_driver_resubmitted_reaches_the_weights_of_an_uninterrupted_run(
    ray_local, synthetic_root, tmp_path, straight
):
    """A real kill: `psm train` in a subprocess (on this session's Ray), SIGKILL mid-epoch 2 once
    epoch 1's checkpoint is written, then the same command again."""
    cfg = _cfg(tmp_path, synthetic_root, "driver", epochs=3)
    argv = ["train", str(TINY), *_overrides(tmp_path, synthetic_root, "driver", epochs=3)]
    env = dict(
        os.environ,
        PYTHONPATH=str(TINY.parents[1]),
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
    )
    code = f"import sys; from jobs.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    run_dir = tmp_path / "runs" / "driver"
    deadline = time.time() + 600
    while time.time() < deadline and not [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 1
    _same_weights(straight, run_training(cfg), cfg)  # resubmitted


def test_a_diverging_run_stops_naming_epoch_and_step(ray_local, synthetic_root, tmp_path):
    # lr 1e30: the first Adam step blows the weights up, and the second loss is NaN. Before, the
    # run trained on to its last epoch at a NaN loss and checkpointed NaN weights.
    cfg = _cfg(tmp_path, synthetic_root, "diverged", epochs=2, lr=1e30, max_failures=0)
    with pytest.raises(Exception, match=r"epoch 0, step 1: the training loss is not finite"):
        run_training(cfg)
    run_dir = tmp_path / "runs" / "diverged"
    assert not [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]  # nothing NaN was saved
    runs = mlflow.MlflowClient(cfg.train.mlflow_uri).search_runs(
        [mlflow.get_experiment_by_name(cfg.train.experiment).experiment_id]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
