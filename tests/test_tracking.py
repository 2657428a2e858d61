"""jobs/tracking.py: a job's `Tracker` resolves its store once, where the job builds it, and
reaches Ray workers, Tune trials and Serve replicas (pickled) with that URI, not theirs; the
processes that unpickle the train loop import no MLflow."""

import pickle
import subprocess
import sys
from pathlib import Path

from jobs.tracking import Tracker
from psm_model.config import Config, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_uri_is_resolved_once_where_the_tracker_is_built(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    driver, worker = tmp_path / "driver", tmp_path / "worker"
    driver.mkdir()
    worker.mkdir()
    monkeypatch.chdir(driver)
    tracker = Tracker.of(Config(train=TrainConfig(experiment="e", registered_model="m")))
    assert tracker == Tracker(f"sqlite:///{driver / 'mlflow.db'}", "e", "m")
    monkeypatch.chdir(worker)  # a Ray worker's own directory: the driver's store all the same
    assert pickle.loads(pickle.dumps(tracker)) == tracker
    # the order: the config's URI, then $MLFLOW_TRACKING_URI, then sqlite in the directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert Tracker.of(Config()).uri == "http://env:5000"
    given = Config(train=TrainConfig(mlflow_uri="http://given:5000"))
    assert Tracker.of(given).uri == "http://given:5000"


def test_the_worker_side_imports_no_mlflow():
    """~1 s of CPU in every process that unpickles the train loop, spent only where it logs."""
    code = "import sys, jobs.train_loop; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
