"""A node lost mid-job, on a real multi-node Ray cluster on this machine: a head with no CPUs
(drivers only, as cluster.yaml's head) and two 1-CPU worker nodes, each a raylet of its own.
The node that runs the work is killed (its raylet and all its processes, SIGKILL) and the job
has to finish on the node that is left."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.local_cluster import SHALLOW, MlflowServer, RayCluster

pytestmark = pytest.mark.slow

CONFIG = "configs/demo.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from pipelines.synthetic import make_synthetic

    work = tmp_path_factory.mktemp("node_loss")
    make_synthetic(work / "data", train_images=24, val_images=6, seed=3)
    server = MlflowServer(work / "mlflow")
    head = RayCluster(work / "cluster", cpus=0)
    try:
        server.start()
        head.start()
        nodes = [head.add_node(cpus=1), head.add_node(cpus=1)]
        yield {"work": work, "head": head, "nodes": nodes, "mlflow": server}
    finally:
        head.stop()
        server.stop()


def _wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def _latest_epoch(run_dir: Path) -> int:
    states = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/train_state.json")]
    return max((s["epoch"] for s in states), default=0)


def test_training_resumes_on_the_remaining_node(cluster):
    head, work = cluster["head"], cluster["work"]
    run_dir = work / "runs" / "node-loss"
    submitted = head.submit(
        "python",
        "-m",
        "jobs.train",
        CONFIG,
        f"data.root={work / 'data'}",
        f"train.mlflow_uri={cluster['mlflow'].uri}",
        f"train.storage_path={run_dir.parent}",
        "train.name=node-loss",
        SHALLOW,
        "train.epochs=3",
        "train.num_workers=1",
        "train.cpus_per_worker=0.5",
        "data.cpus_per_task=0.5",
        "train.max_failures=2",
        wait=False,
    )
    job = head.job_id(submitted)
    _wait_until(lambda: _latest_epoch(run_dir) >= 1, 300, "the first checkpoint")
    lost = _wait_until(lambda: head.node_of("RayTrainWorker"), 60, "the training worker")
    assert lost in cluster["nodes"]
    assert head.remove_node(lost) > 0
    assert head.wait(job, timeout=600) == "SUCCEEDED", head.ray("job", "logs", job).stdout[-5000:]
    assert _latest_epoch(run_dir) == 3  # all epochs, on the node that is left
    logs = head.ray("job", "logs", job).stdout
    assert "RETRY" in logs  # Ray Train's failure policy restarted the worker group

    import mlflow

    client = mlflow.MlflowClient(cluster["mlflow"].uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`psm.run_name` = 'node-loss'"
    )
    assert run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == {0, 1, 2}


def test_infer_survives_the_loss_of_the_node_posing_the_images(cluster):
    """The node that runs the pose actor dies mid-job: Ray Data retries on the node that is left,
    or, if the job fails, the same command run again finishes it; the results file is the one
    an uninterrupted run writes, byte for byte."""
    import torch

    from psm_model.config_yaml import load_config
    from psm_model.hrnet import build_model

    head, work = cluster["head"], cluster["work"]
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    torch.save(build_model(cfg.model).state_dict(), work / "weights.pt")
    annotations = json.loads(
        (work / "data/annotations/person_keypoints_train2017.json").read_text()
    )
    boxes = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in annotations["annotations"]
    ]
    (work / "train_dets.json").write_text(json.dumps(boxes))
    fresh = head.add_node(cpus=1)  # the first test took one of the two

    def infer(output: str, wait: bool = True):
        return head.submit(
            "python",
            "-m",
            "jobs.infer",
            CONFIG,
            "--checkpoint",
            str(work / "weights.pt"),
            "--dets",
            str(work / "train_dets.json"),
            "--output",
            str(work / output),
            f"data.root={work / 'data'}",
            f"train.mlflow_uri={cluster['mlflow'].uri}",
            "infer.images=train2017",
            "infer.image_info=annotations/person_keypoints_train2017.json",
            "infer.part_images=2",
            "eval.batch_size=2",
            "eval.workers=1",
            "eval.visualize=0",
            wait=wait,
        )

    reference = infer("reference.json")
    assert reference.returncode == 0, reference.stdout[-4000:]
    job = head.job_id(infer("interrupted.json", wait=False))
    lost = _wait_until(lambda: head.node_of("MapWorker"), 300, "the pose actor")
    assert lost in [*cluster["nodes"], fresh]
    head.remove_node(lost)
    if head.wait(job, timeout=600) != "SUCCEEDED":  # not retried in place: resume from the parts
        again = infer("interrupted.json")
        assert again.returncode == 0, again.stdout[-4000:]
    assert (work / "interrupted.json").read_bytes() == (work / "reference.json").read_bytes()
