"""Where a job's outputs may go.

Under `ray job submit --working-dir .` the job runs in a temporary copy of the submitter's folder,
which Ray deletes when the job ends. A relative checkpoint folder, results file or the default
sqlite MLflow store would land there and be lost silently, so a submitted job refuses any output
location inside its working directory, naming the key; absolute paths on shared storage and URIs
(s3://, gs://, http:// for MLflow) pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from jobs import tracking
from psm_model.config import Config, ConfigError
from psm_model.errors import redact_secrets

log = logging.getLogger(__name__)


def submitted_job() -> str:
    """The submission id when this process is a `ray job submit` entrypoint, else ''."""
    # Ray's job supervisor passes the job's config to the entrypoint in this variable
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    try:
        return str(json.loads(raw).get("metadata", {}).get("job_submission_id", "")) if raw else ""
    except (ValueError, AttributeError):
        return ""


def local_path(location: str) -> Path | None:
    """The local file a location names (a plain path, file:// or sqlite:///), else None."""
    for prefix in ("sqlite:///", "file://"):
        if location.startswith(prefix):
            return Path(location[len(prefix) :]).resolve()
    return None if "://" in location else Path(location).resolve()


def require_persistent(location: str, key: str) -> None:
    """Refuse an output location that a submitted job's clean-up would delete."""
    if not submitted_job():
        return
    path = local_path(location)
    workdir = Path.cwd().resolve()
    if path is not None and (path == workdir or workdir in path.parents):
        raise ConfigError(
            f"{key}: {location!r} is inside this job's working directory ({workdir}), a "
            "temporary copy that Ray deletes when the job ends: give an absolute path on "
            "storage that outlives the job (shared by every node) or a URI such as "
            "s3://BUCKET/... (MLflow: a tracking server, http://HOST:5000)"
        )


def require_output_file(location: str, key: str) -> None:
    """Check an output file's location before the work that fills it, naming the key: outside a
    submitted job's working dir, not an existing folder, under folders (not files) this process
    may write in. On an object store a folder is a key prefix, made by the write itself."""
    require_persistent(location, key)
    shown = redact_secrets(location)
    path = local_path(location)
    if path is None:
        import pyarrow as pa
        import pyarrow.fs as pafs

        from pipelines.uris import filesystem

        try:
            fs, where = filesystem(location)
            kind = fs.get_file_info(where).type
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"{key}: {shown}: cannot reach: {redact_secrets(str(e))}") from e
        if kind == pafs.FileType.Directory:
            raise ConfigError(f"{key}: {shown} is a folder; give the file to write")
        return
    if path.is_dir():
        raise ConfigError(f"{key}: {shown} is a folder; give the file to write")
    folder = path.parent
    while not folder.exists():  # the write makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}: {shown}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {shown}: cannot write in {folder}")


def require_persistent_tracking(uri: str) -> None:
    require_persistent(uri, "train.mlflow_uri (or $MLFLOW_TRACKING_URI)")


def warn_if_node_local(tracking_uri: str, nodes: int) -> None:
    """A sqlite store is a file on one node: rank 0 may log from another node."""
    if nodes > 1 and tracking_uri.startswith("sqlite:"):
        log.warning(
            "MLflow store %s is a sqlite file on this node, and the cluster has %d nodes: "
            "training ranks on other nodes write to their own copy. Use a tracking server "
            "(train.mlflow_uri=http://HOST:5000) on a cluster.",
            tracking_uri,
            nodes,
        )


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths and the MLflow URI: workers (and Tune trials) run in other folders and on
    other nodes."""
    require_persistent(cfg.train.storage_path, "train.storage_path")
    train = dataclasses.replace(
        cfg.train,
        storage_path=_absolute(cfg.train.storage_path),
        mlflow_uri=tracking.resolve_uri(cfg.train.mlflow_uri),
    )
    require_persistent_tracking(train.mlflow_uri)
    data = dataclasses.replace(cfg.data, root=_absolute(cfg.data.root))
    detections = _absolute(cfg.eval.detections) if cfg.eval.detections else ""
    return dataclasses.replace(
        cfg, train=train, data=data, eval=dataclasses.replace(cfg.eval, detections=detections)
    )


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())
