"""Ray Train DDP training of HRNet-PSM, the driver: what `psm train` (`jobs/train.py`), each
`psm tune` trial and `psm demo` run.

`run_training` reads the split once, opens the MLflow run and launches one TorchTrainer: a worker
per GPU (NCCL) or N CPU workers (gloo), each running `jobs/train_loop.py: train_loop`. Then it
sends the metrics rank 0 could not, registers the model and closes the run. Ray calls are marked
`# Ray`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Sequence

import ray
import ray.data
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs import provenance, run_folder, storage, tracking
from jobs.tracking import Tracker, TrackingError
from jobs.train_loop import train_loop
from pipelines.augment import ImageTable
from pipelines.coco import load_split
from pipelines.leases import Lease
from psm_model.checkpoint import load_checkpoint
from psm_model.config import Config
from psm_model.errors import redact_secrets
from psm_model.hrnet import build_model

log = logging.getLogger(__name__)


def run_training(
    cfg: Config,
    tracker: Tracker,
    *,
    callbacks: Sequence = (),
    mlflow_tags: dict[str, str] | None = None,
    register: bool = True,
    label: str = "",
    in_sweep: bool = False,
) -> dict:
    """Start (or resume, when `train.name` exists) a training run; returns the final metrics.
    `tracker` is the job's, used by its driver and shipped to its workers.

    A Tune trial passes its report callback, the tags that nest its MLflow run under the sweep's,
    `register=False` (the sweep registers its best trial's model), the `label` its epoch
    lines start with (its params) and `in_sweep` (its driver is a trial's actor, on any node).
    """
    name = cfg.train.name or run_folder.default_run_name(cfg)
    cfg = storage.resolve_paths(cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=name))
    # one job per run folder: a second start of the same name is refused while this one lives
    with Lease(run_folder.location(cfg), f"training run {name}") as lease:
        return _train(cfg, tracker, lease.token, callbacks, mlflow_tags, register, label, in_sweep)


def _train(
    cfg: Config,
    tracker: Tracker,
    lease_token: str,
    callbacks: Sequence,
    mlflow_tags: dict | None,
    register: bool,
    label: str,
    in_sweep: bool,
) -> dict:
    name, storage_path = cfg.train.name, cfg.train.storage_path
    run_folder.check_resume_config(cfg)  # a resumed run must train what it started with

    # read once, here: a bad file fails before any worker starts, and the workers share the rows
    records, skips = load_split(cfg, "train")
    run_id = tracker.start_or_resume_run(name, cfg, tags=mlflow_tags)
    tracker.log_metrics(run_id, {f"skipped_{k}": v for k, v in skips.items()}, step=0)
    tracker.log_datasets(run_id, provenance.training_datasets(cfg, records))
    rows = ImageTable.from_records(records)
    del records  # the table holds what the workers need, in ~5% of the records' memory
    run_folder.save_run_config(cfg)

    if not ray.is_initialized():  # Ray: join the cluster (RAY_ADDRESS) or start a local one
        ray.init()
    storage.warn_if_node_local(tracker.uri, sum(n["Alive"] for n in ray.nodes()))
    if not in_sweep:  # the sweep's driver did (jobs/tune.py); a trial's actor may be anywhere
        keep_data_actors_here()  # not on the workers' nodes, which the autoscaler can't remove
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    trainer = TorchTrainer(  # Ray
        train_loop,
        train_loop_config={
            "config": cfg,
            "tracker": tracker,
            "mlflow_run_id": run_id,
            "lease_token": lease_token,
            "train_rows": ray.put(rows),  # Ray: one copy in the object store for all workers
            "label": label,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    log.info("training %s: storage %s/%s, MLflow run %s", name, storage_path, name, run_id)
    try:
        result = trainer.fit()
    except BaseException:  # Ray Train 2.60 raises TrainingFailedError rather than set .error
        tracker.end_run(run_id, "FAILED")
        raise
    if result.error:
        tracker.end_run(run_id, "FAILED")
        raise result.error

    model = build_model(cfg.model)
    with contextlib.ExitStack() as stack:
        final = load_checkpoint(run_folder.private_copy(result.checkpoint, stack), model)
    # what rank 0 could not send while MLflow was away (sent twice, a batch is stored once)
    if not tracker.wait_until_reachable():
        raise TrackingError(
            f"MLflow {redact_secrets(tracker.uri)} unreachable: training {name} is done "
            f"and its checkpoints are in {storage_path}/{name}; run the same command again to "
            "send its metrics and register its model"
        )
    unsent = tracker.deliver(run_id, final.job.get(tracking.HELD, []))
    if unsent:
        epochs = [b["step"] for b in unsent]
        log.error("MLflow run %s lacks the metrics of epochs %s", run_id, epochs)
    version = ""
    if register:
        about = provenance.model_description(cfg, run_id, name, result.metrics or {})
        version = tracker.register_model(run_id, model, cfg, about)
    tracker.end_run(run_id)
    summary = {
        **(result.metrics or {}),
        "run_name": name,
        "mlflow_run_id": run_id,
        "checkpoint": result.checkpoint.path,
        "epochs_done": final.epoch,
        "steps": final.step,
        "model_version": version,
        "unsent_metric_epochs": [b["step"] for b in unsent],
    }
    return summary


def keep_data_actors_here() -> None:
    """Ray Data's stats and autoscaling-coordinator actors are detached: they live for the
    cluster's lifetime on the node of the cluster's first Ray Data run. Run a one-row graph here,
    on the job's driver (the head), so that they are made here and not inside a training worker:
    the autoscaler never removes a node that holds an actor, so a GPU node would stay up idle
    for good (seen with Ray's fake multi-node provider: tests/test_autoscaling.py). Once they
    exist, this is a task of a row (~1 s), which asks for no CPU: on a cluster whose CPUs are
    all taken it would otherwise wait for one. Its function is the standard library's: the
    task's worker imports the module of the function it runs, and this one would cost it torch
    and Ray Train (~1.4 s of CPU a run)."""
    ray.data.from_items([{"x": 0}]).map_batches(copy.copy, num_cpus=0).materialize()  # Ray
