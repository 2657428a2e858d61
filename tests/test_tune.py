"""Ray Tune sweeps on the local Ray: trials are Ray Train runs, nested in MLflow, stopped by ASHA;
`psm compare` reads them back. (A killed sweep's resume: tests/test_ray_jobs.py, as a Ray job.)"""

from pathlib import Path

import mlflow
import pytest
from test_train import STILL, TINY  # the same still, small training

from jobs.cli import main as psm
from jobs.comparison import comparison
from jobs.sweep_space import parse_space
from jobs.tune import run_sweep
from psm_model.config_yaml import load_config

pytestmark = pytest.mark.slow
# one trial at a time: ASHA's decisions then follow the grid order, not process timing. Two
# trials, a grid value of lr and a random choice of sigma each: the lr-5e-3 trial reaches ASHA's
# rung first and goes on, the lr-1e-7 one learns nothing and is stopped there (each trial costs
# ~40 s of Ray Train and Tune start-up on 2 cores, a 2x2 grid twice that)
SPACE = """
searcher: random  # the grid over lr, a random draw of sigma per grid point
max_concurrent_trials: 1
asha: {{grace_period: 1, reduction_factor: 2}}
overrides:
  train.epochs: {epochs}
  train.batch_size: 4
  train.num_workers: 1
  train.cpus_per_worker: 1
  data.cpus_per_task: 0.5
  eval.visualize: 0
params:
  train.lr: {{grid: [5.0e-3, 1.0e-7]}}
  data.sigma: {{choice: [2.0, 3.0]}}
"""


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """Enough synthetic people (217) for one epoch of batches of 4 to lift val AP above zero
    (0.0097 in-process at sigma 2; 150 images in batches of 8 gave 0.0024 for a third more
    compute, 75 images in batches of 4 gave 0)."""
    from pipelines.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("people")
    make_synthetic(root, train_images=90, val_images=12, seed=5)
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
    summary = run_sweep(base, space, "asha")
    assert summary["trials"] == 2 and summary["errors"] == 0

    client = mlflow.MlflowClient(base.train.mlflow_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["psm.kind"] == "sweep"
    assert parent.data.params["sweep.train.lr"] == "grid [0.005, 1e-07]"
    assert parent.data.params["sweep.max_concurrent"] == "1"  # what a --resume must keep
    assert parent.data.params["sweep.data.sigma"] == "choice [2.0, 3.0]"
    pictures = {"trials.csv", "trials.txt", "best_ap_heatmap.png", "val_ap_curves.png"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        f"sweep/{name}" for name in {"space.yaml", "base_config.yaml", *pictures}
    }

    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    assert len({c.data.tags["psm.trial_id"] for c in children}) == 2
    by_lr = {c.data.params["train.lr"]: c for c in children}
    assert set(by_lr) == {"0.005", "1e-07"}
    assert {c.data.params["data.sigma"] for c in children} <= {"2.0", "3.0"}
    epochs = {}
    for lr, child in by_lr.items():
        history = client.get_metric_history(child.info.run_id, "val_AP")
        epochs[lr] = [m.step for m in history]
        assert child.data.params["train.val_every"] == "1"  # ASHA needs val AP every epoch
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == len(history)
    # one epoch lifts the lr-5e-3 trial's AP above zero (0.014 at sigma 2, 0.010 at sigma 3
    # in-process), the lr-1e-7 trial learns nothing: the first trial reaches ASHA's rung first
    # and goes on to the end, the one at zero is stopped there
    first_ap = client.get_metric_history(by_lr["0.005"].info.run_id, "val_AP")
    assert first_ap[0].value > 0
    assert epochs == {"0.005": [0, 1], "1e-07": [0]}
    assert by_lr["1e-07"].info.status == "KILLED"
    assert by_lr["1e-07"].data.tags["psm.stopped_early"] == "true"
    assert "psm.stopped_early" not in by_lr["0.005"].data.tags

    # the best trial (by best AP) has its best weights registered
    best = max(children, key=lambda c: c.data.metrics["best_AP"])
    assert summary["best_run_id"] == best.info.run_id
    version = client.get_latest_versions(base.train.registered_model)[0]
    assert version.run_id == best.info.run_id
    assert str(version.version) == str(summary["model_version"])
    assert best.info.status == "FINISHED"
    assert f"val AP {best.data.metrics['best_AP']:.4f}" in version.description
    # the sweep's console table, best first
    table = summary["table"].splitlines()
    assert len(table) == 3 and best.info.run_name in table[1]

    # psm compare lists every trial with the values MLflow holds
    rows, params = comparison(base.train.mlflow_uri, "sweeps", sweep="asha")
    # the config keys that differ between the rows: sigma only when the two draws differed
    sigmas = {c.data.params["data.sigma"] for c in children}
    assert "train.lr" in params and ("data.sigma" in params) == (len(sigmas) == 2)
    assert len(rows) == 2
    for row in rows:
        child = client.get_run(row["run_id"])
        assert row["AP"] == child.data.metrics["val_AP"]
        assert row["epochs"] == int(child.data.metrics["epochs_done"])
        assert row["train.lr"] == child.data.params["train.lr"]
    capsys.readouterr()
    argv = ["compare", "sweeps", "--sweep", "asha", "--tracking-uri", base.train.mlflow_uri]
    assert psm([*argv, "--sort", "best_AP", "--csv", "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 3 and header[:3] == ["run", "trial", "status"]
    best_col = [float(line.split(",")[header.index("best_AP")]) for line in lines[1:]]
    assert best_col == sorted(best_col, reverse=True)  # sorted, best first
    with pytest.raises(SystemExit, match="not a column"):
        psm([*argv, "--sort", "nope"])
    # the same table and pictures the parent run holds, written here; the CSV as logged
    assert psm([*argv, "--pictures", str(tmp_path / "pictures")]) == 0
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == pictures
    logged = client.download_artifacts(parent.info.run_id, "sweep/trials.csv", str(tmp_path))
    assert Path(logged).read_text() == (tmp_path / "pictures" / "trials.csv").read_text()
