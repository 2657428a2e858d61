"""`psm tune CONFIG --space SPACE.yaml`: a Ray Tune sweep; every trial is a full Ray Train run.

Each trial is a small Tune function (0.1 CPU) that builds the trial's config and runs
`jobs.training.run_training` with its own TorchTrainer, named after the trial id (so a resumed sweep
resumes the trial's training from its last checkpoint) and reporting every epoch to Tune. The
metric is `val_AP` (validation every epoch), which ASHA stops trials on; trials are ranked by
`best_AP`. MLflow: the sweep is a parent run, each trial a child run (MLflow's parent tag, plus
`psm.trial_id`); the best trial's best weights are registered; the comparison table (best first),
a best-AP heatmap and the trials' val-AP curves are logged to the parent (`jobs.sweep_pictures`).
A trial's epoch lines on the console start with its params (`w48 σ2.5`). (Ray 2.60:
`Tuner(TorchTrainer)` itself is not accepted, hence the function trainable.)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from jobs import command, provenance, tracking
from jobs.comparison import comparison, format_table, sort_rows, sweep_files
from jobs.storage import resolve_paths
from jobs.sweep_pictures import trial_label
from jobs.sweep_space import SweepSpace, validate, yaml_value
from jobs.tracking import Tracker
from jobs.training import keep_data_actors_here, run_training
from psm_model.checkpoint import load_checkpoint_model
from psm_model.config import Config, ConfigError, check_run_name
from psm_model.config_yaml import parse_config
from psm_model.errors import PsmError, redact_secrets

log = logging.getLogger(__name__)
TRIAL_CPUS = 0.1  # the trial function only drives its TorchTrainer; 0 is refused by Tune
METRIC = "val_AP"  # reported every epoch: what ASHA and the searchers optimise
RANK_METRIC = "best_AP"  # best so far: what the sweep ranks trials by
CONCURRENCY = "sweep.max_concurrent"  # the parent's param: trials at once asked (0: all that fit)


def run_sweep(
    base: Config,
    space: SweepSpace,
    name: str,
    *,
    resume: bool = False,
    max_concurrent: int = 0,
    wait_s: float = 0.0,
) -> dict[str, Any]:
    """Run (or `resume`) the sweep `name`; returns the best trial and the comparison rows.
    `max_concurrent` 0: the space's max_concurrent_trials, else as many as fit."""
    check_run_name(name, "sweep name (--name, default: the space file's stem)")
    max_concurrent = max_concurrent or space.max_concurrent_trials
    base = resolve_paths(base)
    storage = base.train.storage_path
    experiment_path = f"{storage}/{name}"
    exists = tune.Tuner.can_restore(experiment_path)
    if exists and not resume:
        raise ConfigError(
            f"sweep {name!r} exists at {experiment_path}: pass --resume to continue it, or "
            "--name for a new sweep"
        )
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {name!r} at {experiment_path}")
    configs = validate(space, base)

    tracker = Tracker.of(base)  # the sweep's and, shipped to them, every trial's
    parent = tracker.start_or_resume_run(name, base, kind="sweep")
    if resume:
        _check_same_inputs(tracker, base, space, name, parent)
        _check_same_concurrency(tracker, name, parent, max_concurrent)
    else:
        tracker.log_params(parent, {**_sweep_params(space), CONCURRENCY: max_concurrent})
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "space.yaml").write_text(space.text)
            (Path(d) / "base_config.yaml").write_text(redact_secrets(base.to_yaml()))
            tracker.log_artifact(parent, d, "sweep")

    if not ray.is_initialized():  # Ray: the cluster in RAY_ADDRESS, or a local one
        ray.init()
    keep_data_actors_here()  # on this driver's node, not the trials' (their nodes may go)
    resources = _wait_for_resources(configs, wait_s, trials=max(1, max_concurrent))
    concurrency = _concurrency(configs, resources, max_concurrent)
    trial_info = {"sweep": name, "parent_run_id": parent, "storage": f"{storage}/{name}.trials"}
    trainable = tune.with_resources(  # Ray
        tune.with_parameters(
            _trial, base_yaml=base.to_yaml(), space=space, info=trial_info, tracker=tracker
        ),
        {"CPU": TRIAL_CPUS},
    )
    if resume:
        log.info("resuming sweep %s from %s", name, experiment_path)
        tuner = tune.Tuner.restore(  # Ray: finished trials keep their results
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        max_epochs = max(c.train.epochs for c in configs)
        tuner = tune.Tuner(  # Ray
            trainable,
            param_space=_tune_space(space),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=space.num_samples,
                search_alg=_searcher(space),
                scheduler=_scheduler(space, max_epochs),
                max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(storage_path=storage, name=name),
        )
    if not resume:  # a resumed sweep runs as many at once as it started with (Tune keeps it)
        log.info("sweep %s: up to %d trials at once, parent run %s", name, concurrency, parent)
    grid = tuner.fit()
    _check_complete(grid, space, name)
    return _finish(tracker, space, name, parent, grid)


class SweepInterrupted(PsmError, RuntimeError):
    """Tune returned before every trial ended (Ctrl-C, SIGTERM): nothing is final yet."""


def _check_complete(grid, space: SweepSpace, name: str) -> None:
    """An interrupted sweep ends here, its runs as they are: `_finish` would take its unfinished
    trials for ASHA's stops, tag and close them so, and register a best of half-trained ones."""
    ended, trials = grid.num_terminated + grid.num_errors, space.num_trials()
    if ended < trials:
        raise SweepInterrupted(
            f"sweep {name}: interrupted with {ended} of {trials} trials ended; "
            "nothing registered. Continue it with the same command and --resume"
        )


def _check_same_inputs(
    tracker: Tracker, base: Config, space: SweepSpace, name: str, parent: str
) -> None:
    """A resumed sweep must run the config and space it started with (the trials already run
    used them); keys added to the config since are ignored."""
    with tempfile.TemporaryDirectory() as d:
        folder = tracker.download_artifacts(parent, "sweep", d)
        first_space = yaml.safe_load((folder / "space.yaml").read_text())
        first = parse_config((folder / "base_config.yaml").read_text(), "sweep base").flat()
    if yaml.safe_load(space.text) != first_space:
        raise ConfigError(f"--resume: {space.source} differs from the space sweep {name!r} ran")
    now = base.flat()
    changed = [f"{k}: {first[k]!r} -> {now[k]!r}" for k in first if k in now and now[k] != first[k]]
    if changed:
        raise ConfigError(
            f"--resume: sweep {name!r} started with other config values: {'; '.join(changed)}"
        )


def _check_same_concurrency(tracker: Tracker, name: str, parent: str, requested: int) -> None:
    """Tune restores a sweep with the concurrency it started with, whatever is asked now: a
    different --max-concurrent on --resume is refused, not silently ignored."""
    started = tracker.get_run(parent).data.params.get(CONCURRENCY)
    if started is not None and int(started) != requested:
        was = f"up to {started}" if int(started) else "as many trials as fit"
        raise ConfigError(
            f"--resume: sweep {name!r} started with --max-concurrent {started} ({was} at once) "
            f"and Tune resumes it so; {requested} cannot apply. Resume without --max-concurrent, "
            "or start a new sweep (--name)"
        )


def _trial(
    params: dict, *, base_yaml: str, space: SweepSpace, info: dict, tracker: Tracker
) -> None:
    """One trial, in its Tune actor: a training run whose epochs report to Tune, tracked by the
    sweep's `tracker` (its store, experiment and model name)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()  # Ray: stable across a sweep's resume
    cfg = space.trial_config(parse_config(base_yaml, "<sweep base config>"), params)
    train = dataclasses.replace(
        cfg.train, name=f"{info['sweep']}-{trial_id}", storage_path=info["storage"], val_every=1
    )
    run_training(
        dataclasses.replace(cfg, train=train),
        tracker,
        callbacks=[TuneReportCallback()],  # Ray: each ray.train.report -> one Tune result
        mlflow_tags={
            tracking.PARENT_TAG: info["parent_run_id"],
            "psm.sweep": info["sweep"],
            "psm.trial_id": trial_id,
        },
        register=False,
        label=trial_label({k: params[k] for k in space.swept_keys() if k in params}),
        in_sweep=True,
    )


def _tune_space(space: SweepSpace) -> dict[str, Any]:
    """Tune's param_space. Lists (explicit widths) travel as their YAML text: searchers such as
    Optuna take only scalars as categories."""
    out: dict[str, Any] = {}
    for p in space.params:
        scalar = [yaml_value(v) if isinstance(v, (list, dict)) else v for v in p.values]
        if p.kind == "grid":
            out[p.key] = tune.grid_search(scalar)
        elif p.kind == "choice":
            out[p.key] = tune.choice(scalar)
        elif p.kind == "uniform":
            out[p.key] = tune.uniform(*p.values)
        elif p.kind == "loguniform":
            out[p.key] = tune.loguniform(*p.values)
        else:  # randint: both ends included in the space file, Tune's high is exclusive
            out[p.key] = tune.randint(p.values[0], p.values[1] + 1)
    return out


def _searcher(space: SweepSpace):
    if space.searcher != "optuna":
        return None  # Tune's basic generator: the grid, random draws, or both
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:  # pragma: no cover - optuna is a dependency
        raise ConfigError(f"{space.source}: searcher optuna: {e}") from e
    return OptunaSearch(seed=0)


def _scheduler(space: SweepSpace, max_epochs: int):
    if space.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epochs_done",  # epochs, not Tune iterations: a resumed trial keeps counting
        max_t=max_epochs,
        grace_period=space.asha.grace_period,
        reduction_factor=space.asha.reduction_factor,
    )


def _trial_fit(configs: list[Config], resources: dict[str, float]) -> tuple[int, float, int]:
    """(trials that fit in `resources`, CPUs a trial needs, GPUs a trial needs). Each trial holds
    its 0.1-CPU driver, its training workers and room for one Ray Data task; more than fit would
    starve the data tasks, and Train retries its worker startup forever."""
    cpus = max(
        TRIAL_CPUS + c.train.num_workers * c.train.cpus_per_worker + c.data.cpus_per_task
        for c in configs
    )
    fit = math.floor(resources.get("CPU", 0.0) / cpus + 1e-9)
    gpu_workers = max((c.train.num_workers for c in configs if c.train.use_gpu), default=0)
    if gpu_workers:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / gpu_workers + 1e-9))
    return fit, cpus, gpu_workers


def _concurrency(configs: list[Config], resources: dict[str, float], requested: int) -> int:
    fit, cpus, gpu_workers = _trial_fit(configs, resources)
    if fit < 1:
        raise ConfigError(
            f"a trial needs {cpus:g} CPUs and {gpu_workers} GPUs (train.num_workers, "
            f"train.cpus_per_worker, data.cpus_per_task), the cluster has "
            f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs"
        )
    if requested > fit:
        log.warning("max_concurrent_trials %d > %d that fit now: trials will wait", requested, fit)
    return requested or fit


def _wait_for_resources(
    configs: list[Config],
    wait_s: float,
    resources: Callable[[], dict[str, float]] = ray.cluster_resources,
    request: Callable[..., None] | None = None,
    poll_s: float = 10.0,
    trials: int = 1,
) -> dict[str, float]:
    """The cluster's resources once one trial fits. An autoscaling cluster starts with no GPU
    nodes: ask the autoscaler for the bundles of `trials` trials (the ones to run at once) and
    wait up to `wait_s` for the first trial's nodes to join; Tune starts the others as theirs
    come."""
    have = resources()
    fit, cpus, gpus = _trial_fit(configs, have)
    if fit >= 1 or wait_s <= 0:
        return have
    c = max(configs, key=lambda c: c.train.num_workers)
    worker = {"CPU": c.train.cpus_per_worker} | ({"GPU": 1} if gpus else {})
    bundles = (
        [worker] * c.train.num_workers + [{"CPU": TRIAL_CPUS + c.data.cpus_per_task}]
    ) * trials
    if request is None:
        from ray.autoscaler.sdk import request_resources as request
    request(bundles=bundles)  # Ray: the autoscaler starts nodes for them (no-op on a fixed cluster)
    log.info("a trial needs %g CPUs, %d GPUs: waiting up to %.0f s for nodes", cpus, gpus, wait_s)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            have = resources()
            if _trial_fit(configs, have)[0] >= 1:
                return have
        log.warning("no trial fits after waiting %.0f s (--wait-resources)", wait_s)
        return have
    finally:  # a standing request would keep the nodes after the sweep; trials ask for their own
        request(bundles=[])


def _sweep_params(space: SweepSpace) -> dict[str, Any]:
    params = {f"sweep.{p.key}": f"{p.kind} {list(p.values)}" for p in space.params}
    asha = dataclasses.asdict(space.asha) if space.asha else "none"
    return {
        **params,
        "sweep.searcher": space.searcher,
        "sweep.num_samples": space.num_samples,
        "sweep.sigma_units": space.sigma_units,
        "sweep.asha": asha,
    }


def _finish(tracker: Tracker, space: SweepSpace, name: str, parent: str, grid) -> dict[str, Any]:
    """Close the trials' MLflow runs Tune stopped, register the best, log the comparison."""
    _deliver_held_metrics(tracker, grid)
    errored = {r.metrics.get("trial_id") for r in grid if r.error and r.metrics}
    for run in tracker.child_runs(parent):
        # a trial that failed before its first report has no metrics in `grid` to match, and
        # ASHA stops only trials that reported: no epochs_done means it failed
        if run.data.tags.get("psm.trial_id") in errored or "epochs_done" not in run.data.metrics:
            tracker.end_run(run.info.run_id, "FAILED")
            continue
        # ASHA stops trials at its rungs and also at max_t, the last epoch: a stopped trial's
        # run may still be RUNNING (its actor went first) or FINISHED (Train returned first)
        if run.data.metrics.get("epochs_done", 0) >= int(run.data.params["train.epochs"]):
            if run.info.status != "FINISHED":  # RUNNING, or FAILED by the stop's interruption
                tracker.end_run(run.info.run_id, "FINISHED")
        else:
            tracker.set_tags(run.info.run_id, {"psm.stopped_early": "true"})
            tracker.end_run(run.info.run_id, "KILLED")

    rows, params = comparison(tracker.uri, tracker.experiment, sweep=name)
    rows = sort_rows(rows, RANK_METRIC)
    summary: dict[str, Any] = {"sweep": name, "trials": len(rows), "parent_run_id": parent}
    summary["errors"] = sum(1 for r in grid if r.error)
    ranked = [r for r in rows if isinstance(r.get(RANK_METRIC), float) and r[RANK_METRIC] >= 0]
    if ranked:
        best = max(ranked, key=lambda r: r[RANK_METRIC])
        version = _register_best(tracker, best["run_id"])
        tracker.set_tags(
            parent, {"psm.best_trial": best["trial"], "psm.best_run_id": best["run_id"]}
        )
        tracker.log_metrics(parent, {RANK_METRIC: best[RANK_METRIC]}, step=0)
        summary |= {
            "best_trial": best["trial"],
            "best_run_id": best["run_id"],
            RANK_METRIC: best[RANK_METRIC],
            "model_version": version,
        }
    # read again: registering reopened and closed the best trial's run (its wall time)
    rows, params = comparison(tracker.uri, tracker.experiment, sweep=name)
    rows = sort_rows(rows, RANK_METRIC)
    with tempfile.TemporaryDirectory() as d:
        sweep_files(tracker.uri, rows, params, d)  # the table, best first, the heatmap, curves
        tracker.log_artifact(parent, d, "sweep")
    tracker.end_run(parent, "FINISHED" if not summary["errors"] else "FAILED")
    summary["table"] = format_table(rows, params)
    return summary


def _deliver_held_metrics(tracker: Tracker, grid) -> None:
    """Rank 0 sends an epoch's metrics after reporting its checkpoint; Tune may stop a trial in
    between. What it had not sent is in the train state of the trial's last checkpoint, read
    past its checksum check (a corrupt one delivers nothing, and says so)."""
    from pipelines.uris import copy_to_local
    from psm_model.checkpoint import read_train_state
    from psm_model.weights import CheckpointError

    for result in grid:
        path = (result.metrics or {}).get("checkpoint_path")  # set by TuneReportCallback
        if not path:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = copy_to_local(path, tmp, "checkpoint", CheckpointError)
                state = read_train_state(local)
            except CheckpointError as e:
                log.warning("held metrics not delivered: %s", e)
                continue
        tracker.deliver(state.job.get(tracking.RUN_ID, ""), state.job.get(tracking.HELD, []))


def _register_best(tracker: Tracker, run_id: str) -> str:
    """Register the best weights of the best trial (its `best_checkpoint` artifact), once: a
    `--resume` after a driver died while registering finds the version it made."""
    if versions := tracker.registered_versions(run_id):
        log.info("run %s: already registered as version %s", run_id, versions[-1])
        return versions[-1]
    run = tracker.get_run(run_id)
    with tempfile.TemporaryDirectory() as d:
        folder = tracker.download_artifacts(run_id, "best_checkpoint", d)
        model, cfg = load_checkpoint_model(folder)  # the trial's model: the signature's shapes
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **_registry(tracker)))
    best = run.data.metrics.get(RANK_METRIC, -1.0)  # the best weights scored the trial's best AP
    about = provenance.model_description(cfg, run_id, run.info.run_name, {"val_AP": best})
    version = tracker.register_model(run_id, model, cfg, about)
    tracker.end_run(run_id, run.info.status)  # logging the model reopened the run
    return version


def _registry(tracker: Tracker) -> dict:
    """Where a registration goes, as the registered model's config.yaml names it: the sweep's
    store and name, not the checkpoint's saved config (its URI is masked there, and the space
    may not change them)."""
    return {
        "mlflow_uri": tracker.uri,
        "experiment": tracker.experiment,
        "registered_model": tracker.registered_model,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "A Ray Tune sweep over the parameters of a search-space YAML (see "
        "configs/sweeps/demo.yaml and jobs/sweep_space.py): grid, random or optuna search, ASHA "
        "early stopping on val AP (validated every epoch). Every trial is a Ray Train run of "
        "CONFIG with its own workers; the sweep is an MLflow parent run with one child run per "
        "trial, and the best trial's model is registered. The space is checked against CONFIG "
        "before any trial starts. A sweep killed midway continues with --resume (same "
        "arguments): finished trials are kept, unfinished ones resume from their checkpoints."
    )
    command.add_config_arguments(p)
    p.add_argument("--space", required=True, help="search-space YAML file")
    p.add_argument("--num-samples", type=int, default=0, help="override the space's num_samples")
    p.add_argument(
        "--name", help="sweep name (default: the space file's stem); storage_path/NAME on disk"
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep NAME")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="trials at once (default: the space's value, else as many as the cluster holds); "
        "a resumed sweep keeps what it started with",
    )
    p.add_argument(
        "--wait-resources",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="when no trial fits yet (an autoscaling cluster starts without GPU nodes), ask the "
        "autoscaler for the resources of the trials to run at once and wait this long for the "
        "first one's (default 900)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from jobs.sweep_space import load_space
    from psm_model.config import DataConfig

    base = command.load(args)
    space = load_space(args.space, base)
    if base.data.root == DataConfig().root:  # the demo's synthetic data, written if absent
        from pipelines.synthetic import ensure_demo_data

        ensure_demo_data(base)
    if args.num_samples:
        space = dataclasses.replace(space, num_samples=args.num_samples)
    name = args.name or Path(args.space).stem
    summary = run_sweep(
        base,
        space,
        name,
        resume=args.resume,
        max_concurrent=args.max_concurrent,
        wait_s=args.wait_resources,
    )
    print(summary.pop("table"))
    for key, value in summary.items():
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.tune ARGS` (what `ray job submit` runs) is `psm tune ARGS`."""
    return command.job_main("jobs.tune", "psm tune", argv)


if __name__ == "__main__":
    sys.exit(main())
