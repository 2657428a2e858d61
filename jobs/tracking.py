"""The one module that talks to MLflow. Training calls it from the driver and from rank 0 only.

A job builds one `Tracker` (`Tracker.of(cfg)`: the resolved store URI, the experiment, the
registered model's name) where it starts and hands it down; every call that reaches MLflow is one
of its methods. Only `start_or_resume_run` and `register_model` take a `Config`: what they log.
The run listings of `psm compare` (`train_runs`, `named_run`, `metric_histories`) take a URI, as
that command has no config.

MLflow is imported where it is used, not here: every process that unpickles
`jobs.train_loop.train_loop` (Ray Train's controller, each worker, a Tune trial) imports this
module, and `mlflow` costs ~1 s of CPU to import that only the driver and rank 0 spend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from psm_model.config import Config, ConfigError
from psm_model.errors import PsmError, redact_secrets

log = logging.getLogger(__name__)


class TrackingError(PsmError, RuntimeError):
    """The MLflow tracking server cannot be reached when a job must talk to it."""


RUN_NAME_TAG = "psm.run_name"  # the Ray Train run name, so a resumed run finds its MLflow run
KIND_TAG = "psm.kind"  # train | eval | infer | sweep | serve: what `psm compare` lists
SOURCE_RUN_TAG = "psm.source_run"  # a service's run: the training run its model came from
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: sweep trials under their sweep
# the UI opens a "custom model development" experiment on its runs table, not on GenAI traces
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def resolve_uri(uri: str = "") -> str:
    """The given URI, then $MLFLOW_TRACKING_URI, then a sqlite store in the working directory.

    sqlite rather than ./mlruns: MLflow 3 refuses the file store, and the registry needs a DB.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@functools.cache
def _create_store_once(mlflow, uri: str) -> None:
    """A new sqlite store is made (its tables created and migrated) by one process at a time: two
    jobs starting at once on one file both ran the migrations, and the second failed on "table
    scorers already exists". The lock is the database file's own (BSD flock: sqlite locks with
    fcntl, which it does not see)."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db, "ab") as f:  # an empty file is a new, empty sqlite database
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates or migrates
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _quiet() -> None:
    """No progress bar per artifact download (a checkpoint's few files in milliseconds, on the
    console of every eval, infer and serve): MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings it
    back."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def literal(value: str) -> str:
    """`value` as a string literal of an MLflow search filter: MLflow has no escapes, so in the
    quotes it does not hold; a value with both kinds is refused, never spliced in."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ConfigError(f"{value!r}: a name with both ' and \" cannot be searched for in MLflow")


@dataclasses.dataclass(frozen=True)
class Tracker:
    """Where a job's runs go: a store, an experiment, a registered model name. Built once per job
    by `Tracker.of` and passed down; plain strings, so it pickles to Ray Train workers, Tune
    trials and Serve replicas, which then use the URI the job resolved, not their own cwd's."""

    uri: str  # resolved: never "" (see `resolve_uri`)
    experiment: str
    registered_model: str

    @classmethod
    def of(cls, cfg: Config) -> Tracker:
        """The job's tracker: train.mlflow_uri (resolved here, once), experiment, model name."""
        t = cfg.train
        return cls(resolve_uri(t.mlflow_uri), t.experiment, t.registered_model)

    def _mlflow(self):
        import mlflow

        _quiet()
        _create_store_once(mlflow, self.uri)
        mlflow.set_tracking_uri(self.uri)
        return mlflow

    def _experiment(self, mlflow):
        """The experiment, created if new. In a sqlite store its artifacts go beside the
        database: MLflow's default, ./mlruns, is relative to wherever the first run started
        (inside a Ray job, a working-dir copy that Ray deletes)."""
        name, uri = self.experiment, self.uri
        if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
            db = Path(uri.removeprefix("sqlite:///")).resolve()
            try:
                location = (db.parent / "mlartifacts").as_uri()
                mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            except mlflow.exceptions.MlflowException:  # another worker created it first
                pass
        experiment = mlflow.set_experiment(name)
        for key, value in EXPERIMENT_KIND.items():  # also on experiments made before, or elsewhere
            if experiment.tags.get(key) != value:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment

    def start_or_resume_run(
        self, run_name: str, cfg: Config, kind: str = "train", tags: dict[str, str] | None = None
    ) -> str:
        """The MLflow run of this run name (found by its run-name tag), created if new with `tags`
        (e.g. PARENT_TAG to nest it under a sweep), the tags naming its code (`jobs.provenance`),
        and `cfg` as its params and config.yaml. A run resumed by other code keeps its first
        source tags and gets `psm.resumed_with.*`."""
        from jobs import provenance

        mlflow = self._mlflow()
        experiment = self._experiment(mlflow)
        found = mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string=f"tags.`{RUN_NAME_TAG}` = {literal(run_name)}",
            output_format="list",
        )
        client = mlflow.MlflowClient()
        source = provenance.source_tags(f"psm {kind}")
        if found:
            run = found[0]
            log.info("resuming MLflow run %s (%s)", run.info.run_id, run_name)
            client.update_run(run.info.run_id, status="RUNNING")
            keys = {"digest": provenance.DIGEST_TAG, "commit": provenance.GIT_COMMIT_TAG}
            changed = {
                f"psm.resumed_with.{short}": source[k]
                for short, k in keys.items()
                if k in source and run.data.tags.get(k) != source[k]
            }
            self.set_tags(run.info.run_id, changed)
            return run.info.run_id
        # RUNNING until end_run: the UI shows live runs, and the end time gives the wall time
        tags = _masked({RUN_NAME_TAG: run_name, KIND_TAG: kind, **source, **(tags or {})})
        experiment_id = experiment.experiment_id
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [mlflow.entities.Param(k, v) for k, v in _masked(cfg.flat()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i : i + 100])
        client.log_text(run_id, redact_secrets(cfg.to_yaml()), "config.yaml")
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self._mlflow().MlflowClient().log_batch(
            run_id, metrics=[_metric(k, v, step) for k, v in metrics.items()]
        )

    def deliver(self, run_id: str, held: list[dict]) -> list[dict]:
        """Send held metric batches in order; returns those MLflow could not take (after its own
        retries), to be sent again later. Sending a batch twice stores it once: same stamps."""
        client = self._mlflow().MlflowClient()
        for k, batch in enumerate(held):
            metrics = [
                _metric(n, v, batch["step"], batch["time_ms"]) for n, v in batch["metrics"].items()
            ]
            try:
                client.log_batch(run_id, metrics=metrics)
            except Exception as e:  # not reached, or busy: keep the batch, retry later
                self._raise_if_refused(e, f"the metrics of step {batch['step']}")
                log.warning(
                    "MLflow %s unreachable (%s: %s): %d metric batches held (steps %s), sent later",
                    redact_secrets(self.uri),
                    type(e).__name__,
                    str(e)[:200],
                    len(held) - k,
                    [b["step"] for b in held[k:]],
                )
                return held[k:]
        return []

    def _raise_if_refused(self, error: Exception, what: str) -> None:
        """A rejection that sending again cannot change fails now, with the server's words: 400
        (an invalid value), 401/403 (no or wrong credentials), 404 (no such run). A server that
        is away, times out, is rate-limited (429) or fails (5xx) is worth waiting for."""
        from mlflow.exceptions import MlflowException

        refused = (400, 401, 403, 404)
        if isinstance(error, MlflowException) and error.get_http_status_code() in refused:
            raise TrackingError(
                f"MLflow {redact_secrets(self.uri)} refused {what}: "
                f"{redact_secrets(error.message)[:500]}"
            ) from None

    def wait_until_reachable(self, timeout_s: float = 900.0, poll_s: float = 5.0) -> bool:
        """Before a run's closing calls (held metrics, model registration, status): a tracking
        server that is restarting gets `timeout_s` to come back rather than failing a finished
        training."""
        client = self._mlflow().MlflowClient()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.search_experiments(max_results=1)
                return True
            except Exception as e:  # unreachable: wait and ask again
                self._raise_if_refused(e, "a search")
                if time.monotonic() > deadline:
                    return False
                log.warning(
                    "MLflow %s unreachable (%s); retrying",
                    redact_secrets(self.uri),
                    type(e).__name__,
                )
                time.sleep(poll_s)

    def try_log_artifact(self, run_id: str, path: str | Path, artifact_path: str) -> bool:
        """`log_artifact` for what a run can do without (drawings, the best weights' copy; the
        checkpoints themselves are in train.storage_path): a tracking outage only warns."""
        try:
            self.log_artifact(run_id, path, artifact_path)
            return True
        except Exception as e:  # the run goes on without it
            log.warning("MLflow: %s/ not logged (%s: %s)", artifact_path, type(e).__name__, e)
            return False

    def save_pose_drawings(self, run_id: str) -> Callable[[str], bool]:
        """Where evaluation hands its folder of drawn val images: the run's poses/ artifacts."""
        return functools.partial(self.try_log_artifact, run_id, artifact_path="poses")

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None):
        """A file, or a folder's contents, under `artifact_path` of the run."""
        client = self._mlflow().MlflowClient()
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)

    def log_params(self, run_id: str, params: dict) -> None:
        client = self._mlflow().MlflowClient()
        for k, v in _masked(params).items():
            client.log_param(run_id, k, v)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        client = self._mlflow().MlflowClient()
        for k, v in _masked(tags).items():
            client.set_tag(run_id, k, v)

    def get_run(self, run_id: str):
        return self._mlflow().MlflowClient().get_run(run_id)

    def child_runs(self, parent_run_id: str) -> list:
        """The runs nested under `parent_run_id` (a sweep's trials)."""
        mlflow = self._mlflow()
        parent = mlflow.MlflowClient().get_run(parent_run_id)
        return mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = {literal(parent_run_id)}",
            output_format="list",
        )

    def download_artifacts(self, run_id: str, path: str, dst: str | Path) -> Path:
        client = self._mlflow().MlflowClient()
        return Path(client.download_artifacts(run_id, path, str(dst)))

    def log_datasets(self, run_id: str, datasets: list[dict]) -> None:
        """MLflow dataset inputs (`jobs.provenance`'s dicts): the UI's Datasets column, so runs
        on other data show it. Source URIs are masked like every param; logged again on a
        resume, MLflow keeps one input per dataset."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for d in datasets:
            source = {k: redact_secrets(v) for k, v in d["source"].items()}
            kind = source["uri"].split("://")[0] if "://" in source["uri"] else "local"
            dataset = Dataset(
                name=d["name"],
                digest=d["digest"],
                source_type=kind,
                source=json.dumps(source),
                profile=json.dumps(d["profile"]),
            )
            context = [InputTag("mlflow.data.context", d["context"])]
            inputs.append(DatasetInput(dataset, tags=context))
        self._mlflow().MlflowClient().log_inputs(run_id, datasets=inputs)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, node: str | None = None) -> Iterator[None]:
        """While the block runs, MLflow's own monitor logs this machine's CPU, memory, disk and
        network (and each GPU's utilisation and memory where nvidia-ml-py finds one) every 10 s
        ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) as `system/[node/]...`; a resumed run goes on
        from its last step. It stops by itself when the run ends or the server is away."""
        monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id, resume_logging=True, node_id=node, tracking_uri=self.uri
            )
            monitor.start()
        except Exception as e:  # psutil missing, the server away: the run goes on without them
            log.warning("no system metrics for run %s (%s: %s)", run_id, type(e).__name__, e)
            monitor = None
        try:
            yield
        finally:
            if monitor is not None:  # its last flush may wait on a server that is away: briefly
                stopper = threading.Thread(target=monitor.finish, daemon=True)
                stopper.start()
                stopper.join(timeout=30)

    def register_model(self, run_id: str, model, cfg: Config, description: str = "") -> str:
        """Log the model and register it as `registered_model`: a checkpoint folder (state dict,
        read back with weights_only=True, and `cfg` as config.yaml) loaded by
        `jobs/registered_model.py` as MLflow "models from code", so loading it unpickles
        nothing. Signature N x 3 x H x W float32 crops -> N x 17 x H/s x W/s heatmaps (cfg.model),
        a one-crop input example, `description` on the version."""
        import tempfile

        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from jobs import registered_model
        from psm_model.checkpoint import save_model

        mlflow = self._mlflow()
        h, w = cfg.model.input_size
        # unnamed: a named tensor reaches `predict` as a dict from a serving request
        crops = TensorSpec(np.dtype(np.float32), (-1, 3, h, w))
        shape = (-1, cfg.model.num_joints, *cfg.model.heatmap_size)
        heatmaps = TensorSpec(np.dtype(np.float32), shape)
        signature = ModelSignature(inputs=Schema([crops]), outputs=Schema([heatmaps]))
        example = np.zeros((1, 3, h, w), np.float32)
        with tempfile.TemporaryDirectory() as d, mlflow.start_run(run_id=run_id):
            folder = save_model(Path(d) / registered_model.CHECKPOINT, model.cpu().eval(), cfg)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=registered_model.__file__,
                artifacts={registered_model.CHECKPOINT: str(folder)},
                code_paths=[str(Path(__file__).resolve().parents[1] / "psm_model")],
                signature=signature,
                input_example=example,
                pip_requirements=model_requirements(),
            )
        name = self.registered_model
        version = mlflow.register_model(info.model_uri, name)
        if description:  # the version's own URI: known only now
            uri = f"models:/{name}/{version.version}"
            load = (
                f"\nLoad: psm eval CONFIG --checkpoint {uri}, or mlflow.pyfunc.load_model({uri!r})."
            )
            mlflow.MlflowClient().update_model_version(
                name, version.version, description=redact_secrets(description + load)
            )
        log.info("registered %s version %s", name, version.version)
        return version.version

    def download_model(self, uri: str, dst: str | Path) -> Path:
        """The checkpoint folder of a registered model (`models:/NAME/VERSION`,
        `models:/NAME@ALIAS`) as `register_model` logged it, downloaded into `dst`."""
        from mlflow import artifacts

        from jobs import registered_model
        from psm_model.weights import CheckpointError

        try:
            local = artifacts.download_artifacts(uri, dst_path=str(dst), tracking_uri=self.uri)
        except Exception as e:  # no such model or version, the server away
            shown = redact_secrets(str(e))[:500]
            raise CheckpointError(f"{uri}: cannot download from MLflow: {shown}") from e
        folder = Path(local) / "artifacts" / registered_model.CHECKPOINT
        if not folder.is_dir():
            raise CheckpointError(
                f"{uri}: no artifacts/{registered_model.CHECKPOINT}/ in the model (registered by "
                "an older version, as a pickle: not loaded)"
            )
        return folder

    def source_run(self, checkpoint: str, train_name: str = "") -> str:
        """The training run a served model came from, "" if unknown: the run that logged a
        registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`), else the training
        run named `train_name` (a checkpoint folder's train.name, psm.run_name)."""
        client = self._mlflow().MlflowClient()
        if checkpoint.startswith("models:/"):
            name, at, alias = checkpoint.removeprefix("models:/").partition("@")
            try:
                if at:
                    return client.get_model_version_by_alias(name, alias).run_id or ""
                name, _, version = name.rpartition("/")
                return client.get_model_version(name, version).run_id or ""
            except Exception as e:  # no such model or version: the run is logged without a source
                log.warning("MLflow: %s not found in the registry (%s)", checkpoint, e)
                return ""
        if not train_name:
            return ""
        found = self._mlflow().search_runs(
            experiment_names=[self.experiment],
            filter_string=f"tags.`{RUN_NAME_TAG}` = {literal(train_name)} and "
            f"tags.`{KIND_TAG}` = 'train'",
            output_format="list",
        )
        return found[0].info.run_id if found else ""

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._mlflow().MlflowClient().set_terminated(run_id, status)

    def registered_versions(self, run_id: str) -> list:
        """The versions of `registered_model` registered from `run_id`, oldest first."""
        client = self._mlflow().MlflowClient()
        found = client.search_model_versions(
            f"name = {literal(self.registered_model)} and run_id = {literal(run_id)}"
        )
        return sorted((v.version for v in found), key=int)


def _metric(key: str, value: float, step: int, timestamp: int | None = None):
    from mlflow.entities import Metric

    return Metric(key, float(value), timestamp or int(time.time() * 1000), step)


# where a training run keeps, in each checkpoint's train state (`TrainState.job`), its MLflow
# run and the metric batches MLflow has not confirmed: a tracking outage loses nothing
RUN_ID, HELD = "mlflow_run_id", "held_metrics"


def held_metrics(metrics: dict[str, float], step: int) -> dict:
    """One batch of metrics, stamped now, for `Tracker.deliver`: kept in the train state (so in
    the checkpoint) until MLflow has it, so a tracking server that is down loses nothing."""
    return {"step": step, "time_ms": int(time.time() * 1000), "metrics": dict(metrics)}


def _masked(values: dict) -> dict[str, str]:
    """Every param and tag value as MLflow stores it, credentials masked, whatever key carries a
    URI (a checkpoint, a detector model, a data root)."""
    return {k: redact_secrets(str(v)) for k, v in values.items()}


def model_requirements() -> list[str]:
    """What the logged model needs to load, pinned to this process's versions: torch and what
    `psm_model` imports. Given, not inferred: MLflow's inference loads the model in a subprocess
    to see what it imports (~4 s of every registration). A local build label (torch's +cpu) is
    dropped, as MLflow does: PyPI has none."""
    from importlib.metadata import version

    names = ("torch", "numpy", "pyyaml", "opencv-python-headless")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def train_runs(uri: str, experiment: str, sweep: str | None = None) -> list:
    """The training runs of `experiment`, or only the trials of the sweep named `sweep` (what
    `psm compare` lists); LookupError when the experiment or the sweep is not there."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise LookupError(f"{uri}: no MLflow experiment {experiment!r}")
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{KIND_TAG}` = 'train'",
        output_format="list",
    )
    if sweep is None:
        return runs
    parents = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{KIND_TAG}` = 'sweep' and tags.`{RUN_NAME_TAG}` = {literal(sweep)}",
        output_format="list",
    )
    if not parents:
        raise LookupError(f"{uri}: experiment {experiment!r} has no sweep {sweep!r}")
    ids = {p.info.run_id for p in parents}
    return [r for r in runs if r.data.tags.get(PARENT_TAG) in ids]


def named_run(uri: str, experiment: str, run_name: str):
    """The run of `experiment` whose run-name tag is `run_name`; None when there is none."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = exp and client.search_runs(
        [exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = {literal(run_name)}"
    )
    return found[0] if found else None


def metric_histories(uri: str, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
    """run id -> [(step, value), ...] of one metric, by step (a sweep's val-AP curves)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    return {
        r: sorted((m.step, m.value) for m in client.get_metric_history(r, key)) for r in run_ids
    }
