"""The end of a sweep without Ray: its trials' MLflow runs closed with the right status, and the
best model registered once even when a resumed sweep finishes a second time."""

import tempfile
from pathlib import Path

import mlflow
import pytest

from jobs import tracking
from jobs.comparison import comparison
from jobs.sweep_space import parse_space
from jobs.tracking import Tracker
from jobs.tune import _finish, run_sweep
from psm_model.checkpoint import save_model
from psm_model.config import ConfigError
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SPACE = "searcher: grid\nparams:\n  train.lr: {grid: [1.0e-3, 2.0e-3]}\n"


def _trial(tracker, parent, name, lr, epochs_done=None):
    cfg = load_config(
        TINY,
        [
            f"train.mlflow_uri={tracker.uri}",
            f"train.lr={lr}",
            f"train.name={name}",
            "train.epochs=2",
        ],
    )
    tags = {tracking.PARENT_TAG: parent, "psm.trial_id": name}
    run_id = tracker.start_or_resume_run(name, cfg, tags=tags)
    if epochs_done is not None:
        metrics = {"epochs_done": epochs_done, "best_AP": 0.1 * lr * 1000}
        tracker.log_metrics(run_id, metrics, step=0)
        with tempfile.TemporaryDirectory() as d:  # what a training run logs as its best weights
            save_model(d, build_model(cfg.model), cfg)
            tracker.log_artifact(run_id, d, "best_checkpoint")
    return run_id


def test_finish_marks_unreported_trials_failed_and_registers_once(tmp_path):
    base = load_config(TINY, [f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    space = parse_space(SPACE, base)
    tracker = Tracker.of(base)
    parent = tracker.start_or_resume_run("sweep1", base, kind="sweep")
    done = _trial(tracker, parent, "t1", 1e-3, epochs_done=2)
    failed = _trial(tracker, parent, "t2", 2e-3)  # died before its first report
    summary = _finish(tracker, space, "sweep1", parent, grid=[])
    client = mlflow.MlflowClient(base.train.mlflow_uri)
    assert client.get_run(done).info.status == "FINISHED"
    # before: KILLED and tagged psm.stopped_early, as if ASHA had stopped it
    assert client.get_run(failed).info.status == "FAILED"
    assert "psm.stopped_early" not in client.get_run(failed).data.tags
    assert summary["best_run_id"] == done and str(summary["model_version"]) == "1"
    # a --resume after the driver died while registering: no second version
    again = _finish(tracker, space, "sweep1", parent, grid=[])
    assert str(again["model_version"]) == "1"
    versions = client.search_model_versions(f"name = '{base.train.registered_model}'")
    assert [str(v.version) for v in versions] == ["1"]


def test_names_reach_mlflow_filters_as_literals_never_as_filter_text(tmp_path):
    """A name with a quote is searched for as itself (MLflow's filters have no escapes: the other
    quote kind is used); one with both kinds is refused, as is a sweep name that is no folder."""
    base = load_config(TINY, [f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = Tracker.of(base)
    parent = tracker.start_or_resume_run("sweep1", base, kind="sweep")
    assert tracker.start_or_resume_run("sweep1", base, kind="sweep") == parent  # found again
    with pytest.raises(LookupError, match="has no sweep \"x' or '1'='1\""):
        comparison(base.train.mlflow_uri, base.train.experiment, sweep="x' or '1'='1")
    uri = f"train.mlflow_uri={base.train.mlflow_uri}"
    quoted = load_config(TINY, [uri, 'train.registered_model=Ann\'s "best" model'])
    with pytest.raises(ConfigError, match="both ' and \" cannot be searched for"):
        Tracker.of(quoted).registered_versions(parent)
    assert tracking.literal("it's") == '"it\'s"' and tracking.literal("plain") == "'plain'"
    with pytest.raises(ConfigError, match=r"sweep name .*'\.\./up' must be one folder"):
        run_sweep(base, parse_space(SPACE, base), "../up")


def test_held_metrics_are_sent_from_a_verified_checkpoint_and_a_corrupt_one_is_skipped(
    tmp_path, caplog
):
    """What a stopped trial's rank 0 had not sent is in its last checkpoint's train state; a
    checkpoint whose train state fails its checksum sends nothing and says so."""
    import torch

    from jobs.tune import _deliver_held_metrics
    from psm_model.checkpoint import TrainState, save_checkpoint

    base = load_config(TINY, [f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = Tracker.of(base)
    model = build_model(base.model)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    grid, runs = [], {}
    for name in ("good", "corrupt"):
        run_id = runs[name] = tracker.start_or_resume_run(name, base)
        held = [{"step": 1, "time_ms": 1_000, "metrics": {"val_AP": 0.25}}]
        state = TrainState(epoch=2, job={tracking.RUN_ID: run_id, tracking.HELD: held})
        folder = save_checkpoint(
            tmp_path / name, model, opt, sched, torch.amp.GradScaler("cpu"), state, base
        )
        grid.append(type("Result", (), {"metrics": {"checkpoint_path": str(folder)}})())
    train_state = tmp_path / "corrupt" / "train_state.json"
    train_state.write_text(train_state.read_text().replace("0.25", "0.99"))
    _deliver_held_metrics(tracker, grid)
    client = mlflow.MlflowClient(base.train.mlflow_uri)
    sent = client.get_metric_history(runs["good"], "val_AP")
    assert [(m.step, m.value, m.timestamp) for m in sent] == [(1, 0.25, 1_000)]
    assert client.get_metric_history(runs["corrupt"], "val_AP") == []
    assert "held metrics not delivered" in caplog.text and "sha256 differs" in caplog.text


def test_an_interrupted_sweep_ends_before_its_trials_are_taken_for_stopped_ones(tmp_path):
    """Tune returns from a Ctrl-C with trials unfinished: the sweep stops there (nothing tagged
    stopped early, nothing registered) and says how to continue."""
    from jobs.tune import SweepInterrupted, _check_complete

    base = load_config(TINY, [f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    space = parse_space(
        "searcher: random\nnum_samples: 2\nparams:\n  train.lr: {grid: [1.0e-3, 2.0e-3]}\n"
        "  data.sigma: {choice: [2.0, 3.0]}\n",
        base,
    )
    assert space.num_trials() == 4  # num_samples x the grid; a choice is drawn per trial
    interrupted = type("Grid", (), {"num_terminated": 2, "num_errors": 1})()
    with pytest.raises(SweepInterrupted, match="3 of 4 trials ended.*--resume"):
        _check_complete(interrupted, space, "s")
    done = type("Grid", (), {"num_terminated": 3, "num_errors": 1})()  # ASHA's stops included
    _check_complete(done, space, "s")


def test_a_resume_asking_for_another_concurrency_is_refused_not_ignored(tmp_path):
    """Tune restores a sweep with the max_concurrent_trials it started with: `--resume
    --max-concurrent N` with another N would be silently ignored, so it is refused."""
    from jobs.tune import CONCURRENCY, _check_same_concurrency

    base = load_config(TINY, [f"train.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = Tracker.of(base)
    parent = tracker.start_or_resume_run("sweep1", base, kind="sweep")
    _check_same_concurrency(tracker, "sweep1", parent, 1)  # a sweep from before the param: no check
    tracker.log_params(parent, {CONCURRENCY: 2})
    _check_same_concurrency(tracker, "sweep1", parent, 2)
    with pytest.raises(ConfigError, match=r"started with --max-concurrent 2 \(up to 2 at once\)"):
        _check_same_concurrency(tracker, "sweep1", parent, 1)


def test_jobs_starting_at_once_on_a_new_sqlite_store_all_get_it(tmp_path):
    """Two jobs submitted together to a fresh sqlite store (the autoscaling test's training job
    and sweep) both created its tables; the second failed on "table scorers already exists"."""
    import subprocess
    import sys

    start = (
        "import sys; from jobs.tracking import Tracker; "
        "from psm_model.config_yaml import load_config; "
        f"cfg = load_config({str(TINY)!r}, ['train.mlflow_uri=' + sys.argv[1]]); "
        "print(Tracker.of(cfg).start_or_resume_run(sys.argv[2], cfg))"
    )
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    jobs = [
        subprocess.Popen([sys.executable, "-c", start, uri, f"run{i}"], stdout=subprocess.PIPE)
        for i in range(3)
    ]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0, 0]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(load_config(TINY).train.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 3
