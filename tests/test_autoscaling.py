"""Autoscaling as on cluster.yaml's cluster, on this machine: a head without CPUs for tasks, whose
autoscaler (Ray's fake multi-node provider) starts worker nodes of cluster.yaml's types, each a
raylet on 127.0.0.1, for pending work, and removes them once idle. A submitted training job
brings up the nodes it needs and finishes; a sweep of two concurrent trials, submitted beside
it, asks the autoscaler for both (`request_resources`) and runs them on the nodes that come;
the nodes go after the idle timeout.

The jobs are submitted without `--working-dir`: the provider's nodes share the head's session
folder (one machine), so a node removed while idle takes its copy of a job's working dir with
it, from under the head's driver; cluster.yaml's nodes have the package installed
(setup_commands), as the nodes here have the venv's. `--working-dir .` is exercised by
test_ray_jobs and test_node_loss.

Slow (a few minutes on 2 cores): one cluster for the module, stopped exactly at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.local_cluster import REPO, SHALLOW, RayCluster, wait_until

pytestmark = pytest.mark.slow

CONFIG = "configs/demo.yaml"
# cluster.yaml's worker types at this machine's size: CPUs for Ray Data, and the type the
# training workers go to (no GPU here: a bigger CPU node); min_workers 0, as there
NODE_TYPES = {
    "cpu_worker": {"resources": {"CPU": 1}, "max_workers": 2},
    "gpu_worker": {"resources": {"CPU": 2}, "max_workers": 3},  # a training job + 2 trials
}
IDLE_TIMEOUT_S = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from pipelines.synthetic import make_synthetic

    work = tmp_path_factory.mktemp("autoscaling")
    make_synthetic(work / "data", train_images=16, val_images=4, seed=3)
    autoscaling = {"idle_timeout_minutes": IDLE_TIMEOUT_S / 60, "node_types": NODE_TYPES}
    # cluster.yaml's head has CPUs for the job and trial drivers (and Ray Data's detached
    # actors: jobs.training.keep_data_actors_here), one here
    head = RayCluster(work / "cluster", cpus=1, autoscaling=autoscaling)
    try:
        head.start()
        yield {"work": work, "head": head}
    finally:
        head.stop()


def _common(work: Path) -> list[str]:
    # one machine: every node reaches the same sqlite store and run folders
    return [
        f"data.root={work / 'data'}",
        f"train.mlflow_uri=sqlite:///{work / 'mlflow.db'}",
        f"train.storage_path={work / 'runs'}",
        "train.epochs=1",
        "eval.visualize=0",
        SHALLOW,
    ]


def _run(head: RayCluster, jobs: list[str], timeout: float) -> list[float]:
    """Waits for the jobs to end, SUCCEEDED; returns the worker nodes' CPUs seen on the way."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while running := [j for j in jobs if head.job(j)["status"] in ("PENDING", "RUNNING")]:
        assert time.monotonic() < deadline, f"jobs still running after {timeout} s\n" + "\n".join(
            head.diagnose(j) for j in running
        )
        seen.append(sum(head.worker_nodes()))
        time.sleep(1)
    for job in jobs:
        assert head.job(job)["status"] == "SUCCEEDED", head.diagnose(job)
    return seen


def _runs(values: list[float]) -> str:
    """[0, 0, 2, 2, 2] -> "0 x2, 2 x3": a long sample in a short failure line."""
    runs: list[list] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ", ".join(f"{v:g} x{k}" for v, k in runs)


def _wait_for_no_workers(head: RayCluster, timeout: float) -> float:
    started = time.monotonic()
    while head.worker_nodes():
        if time.monotonic() - started > timeout:
            actors = head._api("/api/v0/actors?limit=100&detail=true")["data"]["result"]["result"]
            alive = [(a["class_name"], a["node_id"][-5:]) for a in actors if a["state"] == "ALIVE"]
            raise AssertionError(f"idle nodes {head.worker_nodes()} stayed; actors: {alive}")
        time.sleep(1)
    return time.monotonic() - started


def test_the_node_types_are_cluster_yamls():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    assert NODE_TYPES.keys() == types.keys() - {config["head_node_type"]}
    assert all(types[name].get("min_workers", 0) == 0 for name in NODE_TYPES)


def test_a_training_job_and_a_sweep_bring_up_their_nodes_which_go_once_idle(cluster):
    """Both submitted to a cluster of a head alone (one autoscaling run serves both): the sweep
    asks for its two concurrent trials' nodes, the training job's worker needs a gpu_worker
    node; both finish, then every node goes after the idle timeout. The training job goes in
    once the sweep has asked: a sweep that finds a node big enough for a trial (the training
    job's, had it come first) asks for none."""
    import mlflow

    head, work = cluster["head"], cluster["work"]
    assert head.worker_nodes() == []  # min_workers 0: the head alone
    space = work / "space.yaml"
    space.write_text(
        "searcher: grid\n"
        "max_concurrent_trials: 2\n"
        "overrides:\n"
        "  train.num_workers: 1\n"
        "  train.cpus_per_worker: 1\n"
        "  data.cpus_per_task: 0.4\n"
        "params:\n"
        "  data.sigma: {grid: [1.5, 2.5]}\n"
    )
    argv = ["python", "-m", "jobs.tune", CONFIG, "--space", str(space), "--name", "scaled"]
    sweep = head.submit(
        *argv, *_common(work), "--wait-resources", "300", wait=False, working_dir=False
    )
    sweep = head.job_id(sweep)
    asked = "waiting up to 300 s for nodes"
    wait_until(lambda: asked in head.logs(sweep), 300, "the sweep's request for nodes", head, sweep)
    train = head.submit(
        "python",
        "-m",
        "jobs.train",
        CONFIG,
        *_common(work),
        "train.name=autoscaled",
        "train.num_workers=1",
        "train.cpus_per_worker=2",  # more than the head has: a gpu_worker node's
        wait=False,
        working_dir=False,
    )
    train = head.job_id(train)
    seen = _run(head, [train, sweep], 540)
    # nodes that were not there: the training worker's 2 CPUs fit no 1-CPU head. How many at
    # once depends on how the autoscaler packs the trials' bundles and on timing (under the
    # suite's load, once, 3 at most; alone, 4 or more): the trials' overlap is asserted below
    assert max(seen) >= 2, f"worker CPUs, once a second: {_runs(seen)}"
    (saved,) = (work / "runs" / "autoscaled").glob("checkpoint_*/train_state.json")
    assert json.loads(saved.read_text())["epoch"] == 1

    logs = head.logs(sweep)
    # the head's 1 CPU holds no trial: the sweep asked for two trials' bundles, each of
    # 0.1 + 1 + 0.4 CPUs
    assert "a trial needs 1.5 CPUs, 0 GPUs: waiting up to 300 s for nodes" in logs, logs[-3000:]
    assert "up to 2 trials at once" in logs
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("psm-demo")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`psm.kind` = 'sweep'")
    trials = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(t.data.params["data.sigma"] for t in trials) == ["1.5", "2.5"]
    assert all(t.info.status == "FINISHED" for t in trials)
    first, second = sorted(trials, key=lambda t: t.info.start_time)
    assert second.info.start_time < first.info.end_time  # the two ran at once

    # idle_timeout_minutes: the nodes go once idle (the autoscaler looks every second)
    assert _wait_for_no_workers(head, IDLE_TIMEOUT_S + 60) <= IDLE_TIMEOUT_S + 60
