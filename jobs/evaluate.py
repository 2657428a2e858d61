"""`psm eval CONFIG --checkpoint CKPT [--dets FILE]` and `psm eval CONFIG --oracle`.

A model checkpoint is evaluated on the val set with the test recipe (Ray Data crops, flip test,
decode, rescoring, OKS-NMS, COCOeval) and logged to MLflow as its own run, with a few val images
drawn with their poses. The model runs on eval.workers Ray Data actors (one GPU each on a GPU
cluster); only pose rows come back to this driver, which scores them. `--oracle` runs the
ground-truth round trip instead: no model, the whole crop -> heatmap -> decode -> COCOeval chain.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid

from jobs import command, provenance, storage
from jobs.checkpoint_uri import load_model
from jobs.tracking import Tracker
from pipelines.uris import join, read_bytes
from psm_model.coco_eval import metrics_table
from psm_model.config import Config, ConfigError
from psm_model.config_yaml import flag_overrides
from psm_model.errors import redact_secrets
from psm_model.recipe import EvalRecipe, PoseActors, ValSet

log = logging.getLogger(__name__)


def run_eval(
    cfg: Config,
    checkpoint: str | None,
    oracle: bool = False,
    results_file: str | None = None,
) -> dict[str, float]:
    if not oracle and not checkpoint:
        raise ConfigError("psm eval: give --checkpoint CKPT, or --oracle for the GT round trip")
    tracker = Tracker.of(cfg)
    storage.require_persistent_tracking(tracker.uri)
    if results_file:
        storage.require_output_file(results_file, "--results")
    kind = "oracle" if oracle else "model"
    weights = None
    if not oracle:
        model, cfg = load_model(checkpoint, cfg, tracker)  # the checkpoint's model config wins
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        del model
    boxes = cfg.eval.detections or "ground-truth boxes"
    # the MLflow run first: evaluation draws poses on a few val images and logs them to it
    # a run name is also the key that resumes an MLflow run: two evaluations in the same second
    # must not share one
    name = f"eval-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_id = tracker.start_or_resume_run(name, cfg, kind="eval")
    params = {"eval.kind": kind, "eval.checkpoint": checkpoint or "", "eval.boxes": boxes}
    tracker.log_params(run_id, params)
    tracker.log_datasets(run_id, eval_datasets(cfg))
    try:
        with tracker.system_metrics(run_id):
            metrics = _score(cfg, weights, results_file, tracker.save_pose_drawings(run_id))
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.end_run(run_id)
    val = redact_secrets(join(cfg.data.root, cfg.data.val_annotations))
    print(f"{kind} evaluation on {val} with {boxes}:")
    print(metrics_table(metrics))
    print(f"MLflow run {run_id} ({redact_secrets(tracker.uri)})")
    return metrics


def _score(cfg: Config, weights: dict | None, results_file: str | None, drawings) -> dict:
    """The metrics of `weights` on actors, or of the ground-truth round trip (no weights)."""
    recipe, val = EvalRecipe.of(cfg), ValSet.of(cfg)  # the pipelines read no config
    if weights is None:
        from pipelines.oracle import oracle_eval

        return oracle_eval(recipe, val, results_file=results_file)
    import ray

    from pipelines.validate import evaluate_on_actors

    if not ray.is_initialized():  # Ray: the cluster (RAY_ADDRESS) or a local instance
        ray.init()
    actors = PoseActors.of(cfg, cfg.eval.pose_runtime)
    return evaluate_on_actors(
        weights, recipe, val, actors, results_file=results_file, save_drawings=drawings
    )


def eval_datasets(cfg: Config) -> list[dict]:
    """The val annotations as evaluated, and the boxes: a detections file (its digest and box
    count) when given, else the annotations' own."""
    from pipelines.coco import load_split

    root = cfg.data.root  # a folder or a URI
    val = provenance.annotation_dataset(
        join(root, cfg.data.val_annotations),
        join(root, cfg.data.val_images),
        load_split(cfg, "val")[0],
        "evaluation",
    )
    if not cfg.eval.detections:
        return [val]
    boxes = provenance.file_dataset(cfg.eval.detections, "boxes", boxes=_count(cfg.eval.detections))
    return [val, boxes]


def _count(path: str) -> int:
    """Entries of a JSON list file (detections): -1 when it is not one."""
    import json

    try:
        value = json.loads(read_bytes(path))
    except (OSError, ValueError):
        return -1
    return len(value) if isinstance(value, list) else -1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Evaluates a checkpoint with the test recipe (flip test, decode, rescoring, "
        "OKS-NMS, COCOeval) on data.val_annotations, with ground-truth boxes or --dets, and logs "
        "the metrics to MLflow. --oracle evaluates the ground truth rendered to heatmaps and "
        "decoded again instead of a model."
    )
    command.add_config_arguments(p)
    p.add_argument(
        "--checkpoint",
        help="a training checkpoint folder, a weights file (.pth) or a registered model "
        "(models:/NAME/VERSION)",
    )
    p.add_argument("--dets", help="person detections, COCO results format (default: GT boxes)")
    p.add_argument("--oracle", action="store_true", help="GT round trip instead of a model")
    p.add_argument(
        "--results", help="also write the keypoint results JSON here (a path, or a URI: s3://...)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if not args.checkpoint and not args.oracle:
        raise SystemExit(
            "psm eval: error: give --checkpoint CKPT, or --oracle for the GT round trip"
        )
    cfg = command.load(args, *flag_overrides("eval", dets=args.dets))
    run_eval(cfg, args.checkpoint, args.oracle, args.results)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.evaluate ARGS` (what `ray job submit` runs) is `psm eval ARGS`."""
    return command.job_main("jobs.evaluate", "psm eval", argv)


if __name__ == "__main__":
    sys.exit(main())
