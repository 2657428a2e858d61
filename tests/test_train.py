"""End-to-end Ray Train runs on the local Ray: 2 gloo workers, tiny model, synthetic data."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from jobs import provenance
from jobs.checkpoint_uri import load_model
from jobs.tracking import Tracker
from jobs.training import run_training
from pipelines.coco import load_split
from psm_model.checkpoint import load_checkpoint
from psm_model.config import ConfigError
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model
from tests.local_cluster import SHALLOW

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
    SHALLOW,
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
        "fused_optimizer": True,  # resumes restore the fused kernel's state exactly too
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


@pytest.fixture(scope="module")
def people(synthetic_root, tmp_path_factory) -> Path:
    """The session's synthetic data with one truncated and one missing train image: every run of
    this module skips and counts both, the interrupted ones as the uninterrupted one."""
    import shutil

    root = tmp_path_factory.mktemp("train_data") / "coco"
    shutil.copytree(synthetic_root, root)
    images = sorted((root / "train2017").glob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:300])  # truncated
    images[1].unlink()  # missing
    return root


@pytest.fixture(scope="module")
def straight(ray_local, people, tmp_path_factory):
    """The module's one uninterrupted 3-epoch run: what every interrupted one must reproduce
    exactly, and what the MLflow and bad-image assertions read."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = _cfg(tmp, people, "straight", epochs=3)
    return {"summary": run_training(cfg, Tracker.of(cfg)), "cfg": cfg, "tmp": tmp}


def test_two_worker_run_logs_everything_to_mlflow(straight):
    summary, cfg = straight["summary"], straight["cfg"]
    assert summary["epochs_done"] == 3
    assert sorted(p.name for p in (straight["tmp"] / "runs" / "straight").glob("checkpoint_*"))

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
    uri = f"models:/{cfg.train.registered_model}/{version.version}"
    model = mlflow.pyfunc.load_model(uri)
    assert model.predict(np.zeros((1, 3, 96, 64), np.float32)).shape == (1, 17, 48, 32)


def test_the_run_names_its_code_data_machine_and_model(straight, tmp_path):
    """Issue 26: the commit (or the source digest) and versions, the train and val annotation
    files as dataset inputs, system metrics, an experiment that opens on its runs, and a
    registered model with a signature and a description."""
    summary, cfg = straight["summary"], straight["cfg"]
    client = mlflow.MlflowClient(cfg.train.mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    tags = run.data.tags
    assert tags["psm.source.digest"] == provenance.source_digest()
    assert tags.get("mlflow.source.git.commit") == provenance.git_state().get("commit")
    assert tags["psm.version.torch"] == torch.__version__ and tags["psm.version.ray"]
    assert tags["mlflow.source.name"] == "psm train"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training"}  # train.val_every=0: no validation (ray jobs: both)
    for context, split in (("training", "train"),):
        path = Path(cfg.data.root) / getattr(cfg.data, f"{split}_annotations")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        records = load_split(cfg, split)[0]
        assert inputs[context].digest == digest[:16]
        assert json.loads(inputs[context].source)["uri"] == str(path)
        profile = json.loads(inputs[context].profile)
        assert profile["images"] == len(records) > 0
        assert profile["persons"] == sum(len(r.persons) for r in records)

    # MLflow's own monitor, from rank 0: a sample each second here (tests/conftest.py: ray_local)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )

    version = client.get_latest_versions(cfg.train.registered_model)[0]
    assert run.info.run_id in version.description and "not validated" in version.description
    uri = f"models:/{cfg.train.registered_model}/{version.version}"
    assert f"--checkpoint {uri}," in version.description  # how to load this very version
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 96, 64)
    assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 17, 48, 32)

    # issue 25, 8a: nothing in the registry copy is a pickle; its weights load with
    # weights_only and equal the run's last checkpoint (before: a pickled PoseHRNet)
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"python_function"}
    assert "model_code_path" in mlmodel["flavors"]["python_function"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickles = [p for p in files if p.suffix == ".pkl" or p.read_bytes()[:1] == b"\x80"]
    assert not pickles  # a pickle starts with its PROTO opcode
    weights = [p for p in files if p.suffix in (".pt", ".pth")]
    assert [p.relative_to(folder).as_posix() for p in weights] == ["artifacts/checkpoint/model.pt"]
    registered = torch.load(weights[0], weights_only=True)
    expected, _ = _weights(summary, cfg)
    assert registered.keys() == expected.keys()
    assert all(torch.equal(registered[k], expected[k]) for k in expected)
    # what `psm eval --checkpoint models:/...` reads
    loaded, _ = load_model(uri, cfg, Tracker.of(cfg))
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_bad_images_are_skipped_and_counted(straight):
    # the truncated and the missing image, in every epoch, counted across both ranks
    assert straight["summary"]["skipped_images"] == 2
    client = mlflow.MlflowClient(straight["cfg"].train.mlflow_uri)
    history = client.get_metric_history(straight["summary"]["mlflow_run_id"], "skipped_images")
    assert [m.value for m in history] == [2, 2, 2]


def _same_weights(run_a, run_b, cfg):
    a, state_a = _weights(run_a, cfg)
    b, state_b = _weights(run_b, cfg)
    assert (state_a.epoch, state_a.step) == (state_b.epoch, state_b.step) == (3, state_a.step)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train_workers(ray_local) -> dict[str, tuple[int, str]]:
    """Ray Train workers of this session's Ray (no other Ray on the machine): actor id ->
    (pid, state), dead ones included."""
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker")], limit=10_000, raise_on_missing_output=False
    )
    return {a.actor_id: (a.pid, a.state) for a in actors}


@pytest.mark.parametrize(
    ("config", "recipe"),
    [
        ("hrnet_w32_256x192.yaml", ["train.images_per_epoch=16"]),
        ("psm_w48_384x288.yaml", ["train.images_per_epoch=8", "eval.flip_test=false"]),
    ],
)
def test_trains_and_validates_on_the_real_coco_layout(
    ray_local, coco_root, tmp_path, config, recipe
):
    """The shipped 256x192 / 384x288 configs on the official COCO layout (width cut to 8, the
    stages to a module each, the epoch to 16 or 8 of the 80 train images, so it fits a 2-core
    machine): train, validate, log the pose drawings. At 256x192 with the full recipe (flip
    test) on the whole val sample; at 384x288, where each crop costs 2.25 times as much, without
    the flip test on 20 val images (their annotations in a file of their own, as
    `data.val_annotations` may name one)."""
    if config.startswith("psm"):
        val = json.loads((coco_root / "annotations/person_keypoints_val2017.json").read_text())
        val["images"] = sorted(val["images"], key=lambda i: i["id"])[:20]
        kept = {i["id"] for i in val["images"]}
        val["annotations"] = [a for a in val["annotations"] if a["image_id"] in kept]
        (tmp_path / "val20.json").write_text(json.dumps(val))
        recipe = [*recipe, f"data.val_annotations={tmp_path / 'val20.json'}"]
    cfg = load_config(
        TINY.parent / config,
        [
            f"data.root={coco_root}",
            "model.width=8",
            SHALLOW,
            "train.epochs=1",
            "train.batch_size=8",
            "train.num_workers=1",
            "train.val_every=1",
            f"train.storage_path={tmp_path / 'runs'}",
            f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.name=coco",
            "eval.visualize=2",
            *recipe,
        ],
    )
    summary = run_training(cfg, Tracker.of(cfg))
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


def _recorded_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints Ray Train has recorded in its run state, oldest first: a folder written
    but not yet recorded is not what a restart resumes from."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        recorded = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return []
    return [run_dir / r["checkpoint_dir_name"] for r in recorded]


def test_a_run_that_loses_a_worker_then_its_driver_reaches_the_weights_of_an_uninterrupted_run(
    ray_local, people, tmp_path, straight
):
    """Real kills, one after the other, of `psm train` (4 epochs) in a subprocess on this
    session's Ray: once Ray Train has recorded the first checkpoint, one of the run's own workers
    is SIGKILLed (Ray Train restarts the worker group from that checkpoint); once the restarted
    group has recorded another, the driver. Its newest checkpoint is then cut short, and the run
    is resubmitted shortened to 3 epochs: a changed config is refused unless named in
    train.resume_changes, and the resume falls back past the corrupt checkpoint, replays the
    epochs after it and reaches the uninterrupted run's weights exactly."""
    argv = ["train", str(TINY), *_overrides(tmp_path, people, "driver", epochs=4, max_failures=2)]
    env = dict(
        os.environ,
        PYTHONPATH=str(TINY.parents[1]),
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
    )
    code = f"import sys; from jobs.cli import main; sys.exit(main({argv!r}))"
    before = _train_workers(ray_local)  # earlier runs' workers: not this run's

    def ours() -> dict[str, tuple[int, str]]:
        return {k: v for k, v in _train_workers(ray_local).items() if k not in before}

    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    run_dir = tmp_path / "runs" / "driver"

    def wait_for(condition, what: str):
        deadline = time.time() + 600
        while not condition():
            assert proc.poll() is None, f"the driver ended before {what}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    wait_for(lambda: _recorded_checkpoints(run_dir), "its first checkpoint")
    recorded = len(_recorded_checkpoints(run_dir))
    alive = {k: pid for k, (pid, state) in ours().items() if state == "ALIVE"}
    killed = list(alive)[-1]
    os.kill(alive[killed], signal.SIGKILL)
    # the recovery happens: Ray Train starts a second group of 2 workers, which trains on
    wait_for(lambda: len(_recorded_checkpoints(run_dir)) > recorded, "a checkpoint after the kill")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # 4 epochs never end before then + ~0.05 s
    workers = ours()
    assert len(workers) == 4 and workers[killed][1] == "DEAD"
    # Ray ends the dead driver's job and its workers: none may write a checkpoint after this
    deadline = time.time() + 120
    while any(state != "DEAD" for _, state in ours().values()):
        assert time.time() < deadline, "the killed driver's train workers are still alive"
        time.sleep(0.2)

    first = _cfg(tmp_path, people, "driver", epochs=3, max_failures=2)
    with pytest.raises(ConfigError, match=r"train\.epochs: 4 -> 3"):
        run_training(first, Tracker.of(first))
    newest = _recorded_checkpoints(run_dir)[-1] / "model.pt"  # what Ray hands the restart
    newest.write_bytes(newest.read_bytes()[:1000])
    cfg = _cfg(
        tmp_path, people, "driver", epochs=3, max_failures=2, resume_changes="[train.epochs]"
    )
    resumed = run_training(cfg, Tracker.of(cfg))
    _same_weights(straight["summary"], resumed, cfg)
    assert resumed["mlflow_run_id"] != straight["summary"]["mlflow_run_id"]


def test_a_diverging_run_stops_naming_epoch_and_step(ray_local, synthetic_root, tmp_path):
    # lr 1e30: the first Adam step blows the weights up, and the second loss is NaN. Before, the
    # run trained on to its last epoch at a NaN loss and checkpointed NaN weights.
    cfg = _cfg(tmp_path, synthetic_root, "diverged", epochs=2, lr=1e30, max_failures=0)
    with pytest.raises(Exception, match=r"epoch 0, step 1: the training loss is not finite"):
        run_training(cfg, Tracker.of(cfg))
    run_dir = tmp_path / "runs" / "diverged"
    assert not [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]  # nothing NaN was saved
    runs = mlflow.MlflowClient(cfg.train.mlflow_uri).search_runs(
        [mlflow.get_experiment_by_name(cfg.train.experiment).experiment_id]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
