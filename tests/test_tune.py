"""Ray Tune sweeps on the local Ray: trials are Ray Train runs, nested in MLflow, stopped by ASHA,
resumable after the sweep's process is killed; `psm compare` reads them back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from test_train import STILL, TINY  # the same still, small training

from jobs.cli import main as psm
from jobs.compare import comparison
from jobs.sweep_space import parse_space
from jobs.tune import run_sweep
from psm_model.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# one trial at a time: ASHA's decisions then follow the grid order, not process timing
SPACE = """
searcher: grid
max_concurrent_trials: 1
asha: {{grace_period: 1, reduction_factor: 2}}
overrides:
  train.epochs: {epochs}
  train.batch_size: 8
  train.num_workers: 1
  train.cpus_per_worker: 1
  data.cpus_per_task: 0.5
  eval.visualize: 0
params:
  train.lr: {{grid: [5.0e-3, 1.0e-7]}}
  data.sigma: {{grid: [2.0, 3.0]}}
"""


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """Enough synthetic people (~370) for one epoch to lift val AP above zero."""
    from pipelines.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("people")
    make_synthetic(root, train_images=150, val_images=12, seed=5)
    return root


def _overrides(tmp_path, root):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [
        f"data.root={root}",
        *STILL,
        f"train.storage_path={tmp_path / 'runs'}",
        f"train.mlflow_uri={db}",
        "train.experiment=sweeps",
    ]


def _base(tmp_path, root):
    return load_config(TINY, _overrides(tmp_path, root))


def test_sweep_nests_trials_in_mlflow_stops_early_and_registers_the_best(
    ray_local, people, tmp_path, capsys
):
    base = _base(tmp_path, people)
    space = parse_space(SPACE.format(epochs=2), base, "space.yaml")
    summary = run_sweep(base, space, "grid")
    assert summary["trials"] == 4 and summary["errors"] == 0

    client = mlflow.MlflowClient(base.train.mlflow_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["psm.kind"] == "sweep"
    assert parent.data.params["sweep.train.lr"] == "grid [0.005, 1e-07]"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/space.yaml",
        "sweep/base_config.yaml",
        "sweep/trials.csv",
        "sweep/ap_vs_params.png",
    }

    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    assert len({c.data.tags["psm.trial_id"] for c in children}) == 4
    by_params = {(c.data.params["train.lr"], c.data.params["data.sigma"]): c for c in children}
    assert set(by_params) == {
        ("0.005", "2.0"),
        ("0.005", "3.0"),
        ("1e-07", "2.0"),
        ("1e-07", "3.0"),
    }
    epochs = {}
    for key, child in by_params.items():
        history = client.get_metric_history(child.info.run_id, "val_AP")
        epochs[key] = [m.step for m in history]
        assert child.data.params["train.val_every"] == "1"  # ASHA needs val AP every epoch
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == len(history)
    # one epoch lifts the lr-5e-3 trials' AP above zero, the lr-1e-7 trials learn nothing; the
    # first trial reaches each ASHA rung first and goes on, the ones at zero are stopped there
    first_ap = client.get_metric_history(by_params[("0.005", "2.0")].info.run_id, "val_AP")
    assert first_ap[0].value > 0
    stopped = [k for k, steps in epochs.items() if steps == [0]]
    assert {("1e-07", "2.0"), ("1e-07", "3.0")} <= set(stopped)
    for key in stopped:
        assert by_params[key].info.status == "KILLED"
        assert by_params[key].data.tags["psm.stopped_early"] == "true"
    assert epochs[("0.005", "2.0")] == [0, 1]  # the first trial always runs to the end

    # the best trial (by best AP) has its best weights registered
    best = max(children, key=lambda c: c.data.metrics["best_AP"])
    assert summary["best_run_id"] == best.info.run_id
    version = client.get_latest_versions(base.train.registered_model)[0]
    assert version.run_id == best.info.run_id
    assert str(version.version) == str(summary["model_version"])
    assert best.info.status == "FINISHED"

    # psm compare lists every trial with the values MLflow holds
    rows, params = comparison(base.train.mlflow_uri, "sweeps", sweep="grid")
    assert set(params) >= {"train.lr", "data.sigma"} and len(rows) == 4
    for row in rows:
        child = client.get_run(row["run_id"])
        assert row["AP"] == child.data.metrics["val_AP"]
        assert row["epochs"] == int(child.data.metrics["epochs_done"])
        assert row["train.lr"] == child.data.params["train.lr"]
    capsys.readouterr()
    argv = ["compare", "sweeps", "--sweep", "grid", "--tracking-uri", base.train.mlflow_uri]
    assert psm([*argv, "--sort", "best_AP", "--csv", "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 5 and header[:3] == ["run", "trial", "status"]
    best_col = [float(line.split(",")[header.index("best_AP")]) for line in lines[1:]]
    assert best_col == sorted(best_col, reverse=True)  # sorted, best first
    with pytest.raises(SystemExit, match="not a column"):
        psm([*argv, "--sort", "nope"])


RESUME_SPACE = """
searcher: grid
max_concurrent_trials: 1
overrides: {train.epochs: 2, train.batch_size: 4, train.num_workers: 1, train.cpus_per_worker: 1,
            data.cpus_per_task: 0.5, eval.visualize: 0}
params:
  data.sigma: {grid: [2.0, 2.5, 3.0]}
"""


def test_killed_sweep_resumes_without_rerunning_finished_trials(
    ray_local, synthetic_root, tmp_path
):
    base = _base(tmp_path, synthetic_root)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(RESUME_SPACE)
    argv = [
        sys.executable,
        "-m",
        "jobs.cli",
        "tune",
        str(TINY),
        *_overrides(tmp_path, synthetic_root),
        "--space",
        str(space_file),
        "--name",
        "killed",
    ]
    # the sweep's own driver process, on the test session's Ray, killed with SIGKILL below
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = mlflow.MlflowClient(base.train.mlflow_uri)
    try:
        logged = tmp_path / "sweep.log"
        first = _wait_for(lambda: _finished_children(client), proc, logged, timeout=300)
        # kill the sweep once Tune's saved state has the first trial finished and the next one
        # running: what a restore reads
        experiment = tmp_path / "runs" / "killed"

        def recorded() -> bool:
            statuses = _tune_statuses(experiment)
            return "TERMINATED" in statuses and "RUNNING" in statuses

        _wait_for(recorded, proc, logged, timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = first[0]
    before = client.get_metric_history(done.info.run_id, "train_loss")

    space = parse_space(space_file.read_text(), base, str(space_file))
    summary = run_sweep(base, space, "killed", resume=True)
    assert summary["trials"] == 3 and summary["errors"] == 0
    children = _children(client)
    assert len(children) == 3  # no trial started twice
    assert all(c.info.status == "FINISHED" for c in children)
    after = client.get_metric_history(done.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in after] == [(m.step, m.value) for m in before]  # not rerun
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "epochs_done")]
        assert sorted(set(steps)) == [0, 1]  # every trial completed both epochs


def _tune_statuses(experiment: Path) -> list[str]:
    """The trial statuses in Tune's newest saved experiment state (empty before the first save,
    or while one is being written)."""
    saved = sorted(experiment.glob("experiment_state-*.json"))
    try:
        trials = json.loads(saved[-1].read_text())["trial_data"] if saved else []
    except (OSError, ValueError):
        return []
    return [json.loads(state)["status"] for state, _ in trials]


def _children(client):
    experiment = client.get_experiment_by_name("sweeps")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.`psm.kind` = 'train'")


def _finished_children(client):
    return [c for c in _children(client) if c.info.status == "FINISHED"]


def _wait_for(condition, proc, logged: Path, timeout: float):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(
                f"the sweep exited early with code {proc.returncode}: {logged.read_text()[-2000:]}"
            )
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s")
