"""`psm serve CONFIG --checkpoint CKPT [--port P] [infer.detector.model=DET.onnx ...]`: the pose
service on Ray Serve. `POST /pose` with a JPEG or PNG (the body, or multipart with `image` and
optional `boxes`) -> the persons `psm infer` finds in it; `GET /healthz`; `GET /` a page to drop
an image on and see the skeletons.

Three deployments (jobs/deployments.py), composed through deployment handles: `PoseService`
(HTTP: body limits, the guarded decoder, crops, OKS-NMS, JSON; answers every bad input with a
4xx JSON error and a lost replica with 503), `Detector` (the ONNX person detector,
infer.detector.*) and `PoseModel` (the checkpoint's model, one GPU each where the cluster has
them); the two models batch requests (`@serve.batch`, serve.detector / serve.pose) and scale
between their min and max replicas. The steps themselves are plain functions in
`pipelines/serving.py`; here are the checks before any replica starts, the MLflow run, the
deployment and the command.

Every replica loads the checkpoint (a folder, a URI or models:/NAME/VERSION) and the detector
itself: a replica restarted after a crash needs nothing from this process. Each deployment is
an MLflow run (psm.kind = serve) naming the model, its weights' sha256, the training run it
came from (psm.source_run) and the whole config. On a cluster: `ray job submit ... -- python -m
jobs.serve CONFIG --checkpoint s3://... --detach`, or a Serve config file whose import_path is
`jobs.serve:app` (README, "Serving").
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import uuid
from pathlib import Path

from ray import serve

from jobs import command
from jobs.deployments import application
from jobs.tracking import SOURCE_RUN_TAG, Tracker
from psm_model.config import Config
from psm_model.config_yaml import flag_overrides
from psm_model.errors import redact_secrets

log = logging.getLogger(__name__)

APP_NAME = "psm-pose"


def prepare(cfg: Config, checkpoint: str, tracker: Tracker) -> tuple[Config, str, dict]:
    """Everything checked before any replica starts, each failure a `psm: error:` line: the
    checkpoint loads, the detector loads and has a known layout. Local paths made absolute and
    the config's tracking URI the tracker's, resolved (replicas do not start in this directory).
    Returns the config, the checkpoint as the replicas will read it, and what the service names
    as its model."""
    from jobs.checkpoint_uri import load_model
    from psm_model.checkpoint import checkpoint_config, weights_sha256

    if "://" not in checkpoint and not checkpoint.startswith("models:/"):
        checkpoint = str(Path(checkpoint).resolve())
    det = cfg.infer.detector
    if det.model and "://" not in det.model:
        det = dataclasses.replace(det, model=str(Path(det.model).resolve()))
    cfg = dataclasses.replace(
        cfg,
        infer=dataclasses.replace(cfg.infer, detector=det),
        train=dataclasses.replace(cfg.train, mlflow_uri=tracker.uri),
    )
    detector_sha = ""
    if det.model:
        from pipelines.detect import detector_session, load_detector

        data, detector_sha = load_detector(det.model)
        detector_session(data, det.model)  # DetectorError: unreadable, unknown layout
    model, cfg = load_model(checkpoint, cfg, tracker)
    train_name = ""
    if Path(checkpoint).is_dir():
        train_name = checkpoint_config(checkpoint).train.name
    name, version = "", ""
    if checkpoint.startswith("models:/"):
        name, _, version = checkpoint.removeprefix("models:/").rpartition("/")
    info = {
        "checkpoint": redact_secrets(checkpoint),
        "name": name,
        "version": version,
        "weights_sha256": weights_sha256(model.state_dict()),
        "detector_sha256": detector_sha,
        "train_name": train_name,
    }
    return cfg, checkpoint, info


def log_service(cfg: Config, tracker: Tracker, info: dict) -> str:
    """The deployment as an MLflow run (psm.kind = serve): the config (params, config.yaml), the
    model's name, version and weights, and the training run it came from (psm.source_run)."""
    name = f"serve-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    source = tracker.source_run(info["checkpoint"], info["train_name"])
    run_id = tracker.start_or_resume_run(name, cfg, kind="serve", tags={SOURCE_RUN_TAG: source})
    tracker.log_params(run_id, {f"served.{k}": v for k, v in info.items()})
    return run_id


def serve_app(cfg: Config, checkpoint: str, blocking: bool = True) -> tuple[str, dict]:
    """Check, log, deploy (on the Ray of RAY_ADDRESS, else a local one) and, if `blocking`, serve
    until interrupted, then take the application down. Returns the URL and the model info."""
    import ray

    tracker = Tracker.of(cfg)
    cfg, checkpoint, info = prepare(cfg, checkpoint, tracker)
    run_id = log_service(cfg, tracker, info)
    info["run_id"] = run_id
    try:
        if not ray.is_initialized():
            ray.init()
        # Ray calls: the HTTP proxy on serve.host:serve.port, then the application behind it
        serve.start(
            http_options={
                "host": cfg.serve.host,
                "port": cfg.serve.port,
                "request_timeout_s": cfg.serve.request_timeout_s + 5,  # ours answers first
            }
        )
        serve.run(application(cfg, checkpoint, info, tracker), name=APP_NAME, route_prefix="/")
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/"
    print(f"serving {info['checkpoint']} at {url} (POST /pose, GET /healthz); MLflow run {run_id}")
    if not blocking:
        tracker.end_run(run_id)
        return url, info
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the service")
    finally:
        serve.delete(APP_NAME)
        tracker.end_run(run_id)
    return url, info


def app(args: dict) -> serve.Application:
    """The application builder of a Serve config file (`import_path: jobs.serve:app`), args:
    config (a YAML file in the working dir), checkpoint (a URI or models:/...), overrides (a
    list of section.key=value). The HTTP host and port are the config file's http_options."""
    from psm_model.config_yaml import load_config

    cfg = load_config(args["config"], list(args.get("overrides", [])))
    tracker = Tracker.of(cfg)
    cfg, checkpoint, info = prepare(cfg, str(args["checkpoint"]), tracker)
    run_id = log_service(cfg, tracker, info)
    tracker.end_run(run_id)
    return application(cfg, checkpoint, {**info, "run_id": run_id}, tracker)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The pose service on Ray Serve: POST /pose with a JPEG or PNG (the body, or multipart "
        "with 'image' and optional 'boxes' [[x, y, w, h], ...]) answers the persons psm infer "
        "finds in it (box, score, 17 keypoints); GET /healthz; GET / a page to try it. The "
        "detector (infer.detector.model, optional when requests give boxes) and the pose model "
        "batch requests and scale within serve.detector.* / serve.pose.*. Logs an MLflow run "
        "(psm.kind=serve). Serves until Ctrl-C."
    )
    command.add_config_arguments(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a training checkpoint folder, a weights file, a URI (s3://...) or "
        "models:/NAME/VERSION",
    )
    p.add_argument("--port", type=int, help="HTTP port (serve.port; host: serve.host)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="deploy and return, leaving the service running (a `ray job submit` on a cluster)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg = command.load(args, *flag_overrides("serve", port=args.port))
    serve_app(cfg, args.checkpoint, blocking=not args.detach)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.serve CONFIG --checkpoint CKPT [...]` (what `ray job submit` runs)."""
    return command.job_main("jobs.serve", "psm serve", argv)


if __name__ == "__main__":
    sys.exit(main())
