"""`psm bench train-start`: where a short Ray Train run's wall time goes, ours and Ray's.

Runs `jobs.training.run_training` a few times on a local Ray (the first run pays Ray's cold start,
the later ones what every run of a warm cluster pays) and prints, per run, the driver's phases
(opening the MLflow run, `TorchTrainer.fit`, closing: held metrics, registration, status) and,
from Ray Train's controller log, its own phases inside `fit` (controller start, worker actors,
train context, launching the train function, training, shutdown).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

from jobs import command

# Ray Train's fixed costs that the tests cut (tests/local_cluster.py): no preemption watcher actor
# per run (it follows spot-node drains: a process start and Ray Train's imports), and the
# controller polls its workers every 0.5 s, not 2 s, so a run's end is seen sooner
LEAN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
SMALL = ["model.width=16", "model.input_size=[96,64]"]  # the end-to-end tests' model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Times short Ray Train runs of the config (default configs/tiny.yaml at 96x64, width 16, "
        "2 CPU workers, 12 synthetic images unless data.root is given) on a local Ray: the "
        "driver's phases and Ray Train's own, from its controller log."
    )
    command.add_config_arguments(p, default="configs/tiny.yaml")
    p.add_argument("--runs", type=int, default=3, help="runs in one Ray instance (first: cold)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run")
    p.add_argument(
        "--lean",
        action="store_true",
        help="without Ray Train's preemption watcher and with a 0.5 s controller poll (the tests')",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.lean:
        os.environ.update(LEAN_ENV)
    import ray
    from ray.train.torch import TorchTrainer

    from jobs.tracking import Tracker
    from jobs.training import run_training
    from pipelines.synthetic import make_synthetic
    from psm_model.config_yaml import load_config

    times: dict[str, float] = {}  # label -> seconds in this run
    started: dict[str, float] = {}  # label -> when it last started (epoch s)
    for owner, name, label in (
        (Tracker, "start_or_resume_run", "open MLflow run"),
        (TorchTrainer, "fit", "TorchTrainer.fit"),
        (Tracker, "register_model", "register model"),
    ):
        setattr(owner, name, _timed(getattr(owner, name), label, times, started))
    given = any(o.startswith("data.root=") for o in args.overrides)
    with tempfile.TemporaryDirectory(prefix="psm-train-start-") as tmp:
        work = Path(tmp)
        if not given:
            make_synthetic(work / "data", train_images=12, val_images=4, seed=3)
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
        try:
            for k in range(args.runs):
                overrides = [
                    *([] if given else [f"data.root={work / 'data'}", *SMALL]),
                    "data.cpus_per_task=0.5",
                    f"train.epochs={args.epochs}",
                    "train.batch_size=4",
                    "train.num_workers=2",
                    "train.cpus_per_worker=0.5",
                    "train.val_every=0",
                    f"train.storage_path={work / 'runs'}",
                    f"train.mlflow_uri=sqlite:///{work / 'mlflow.db'}",
                    f"train.name=run{k}",
                    *args.overrides,
                ]
                cfg = load_config(args.config or "configs/tiny.yaml", overrides)
                times.clear()
                t0 = time.perf_counter()
                run_training(cfg, Tracker.of(cfg))
                total = time.perf_counter() - t0
                print(f"run {k} ({'cold' if k == 0 else 'warm'} Ray): {total:.1f} s")
                for label, seconds in times.items():
                    print(f"  {label:<20} {seconds:6.2f} s")
                for label, seconds in _controller_phases(started["TorchTrainer.fit"]):
                    print(f"    {label:<44} {seconds:6.2f} s")
        finally:
            ray.shutdown()


def _timed(fn, label: str, times: dict, started: dict):
    """`fn`, adding its seconds to `times[label]` and noting its start in `started[label]`."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        started[label] = time.time()
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - t0

    return wrapper


PHASE = re.compile(r"\[Worker Group Initialization\] (.+?) in ([\d.]+)s")


def _controller_phases(fit_started: float) -> list[tuple[str, float]]:
    """Ray Train's own phases of the newest run, from its controller's structured log."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "train"
    newest = max(logs.glob("ray-train-sys-controller-*.log"), key=lambda p: p.stat().st_mtime)
    lines = [json.loads(line) for line in newest.read_text().splitlines() if line.startswith("{")]

    def stamp(line: dict) -> float:
        return datetime.strptime(line["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    phases = [("fit() to the controller's first log line", stamp(lines[0]) - fit_started)]
    for line in lines:
        found = PHASE.search(line.get("message", ""))
        if found and "callbacks" not in found.group(1) and "completed" not in found.group(1):
            phases.append((found.group(1), float(found.group(2))))
    started = [stamp(x) for x in lines if "Started training worker group" in x["message"]]
    if started:
        phases.append(("training, to the workers' shutdown", stamp(lines[-1]) - started[0]))
    return phases


def main(argv: list[str] | None = None) -> int:
    return command.job_main("benchmarks.train_start", "psm bench train-start", argv)
