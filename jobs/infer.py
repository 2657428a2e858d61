"""`psm infer CONFIG --checkpoint CKPT`: poses for every image of infer.image_info, with the person
boxes of infer.boxes (a detections file, the ONNX detector of infer.detector run as a stage of the
same Ray Data graph, or the annotations), written as a COCO keypoint results JSON (the test-dev
submission format) once it passes `check_submission`.

A Ray job: the model runs on eval.workers Ray Data actors (one GPU each on a GPU cluster) with the
eval.* test recipe (flip test, decode, rescoring, OKS-NMS); only poses come back to this driver,
which writes them in parts beside the output (`pipelines.inference`). Run again with the same
arguments, a killed job resumes after its last finished part. infer.output may be a pyarrow URI
(s3://...): a cluster job's working directory is a temporary copy. The job is an MLflow run of its
own (tag psm.kind = infer) with the results file and a few images drawn with their poses; when
the image list is an annotation file with keypoints (val2017), the results are also scored.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.infer \
        configs/psm_w48_384x288.yaml --checkpoint s3://BUCKET/runs/NAME/checkpoint_X \
        data.root=/data/coco \
        infer.detections=/data/coco/person_detection_results/DETS.json \
        infer.output=s3://BUCKET/results/person_keypoints_test-dev2017_psm_results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from jobs import command, provenance, storage
from jobs.checkpoint_uri import load_model
from jobs.tracking import Tracker
from pipelines import uris
from pipelines.coco import DataError, load_images
from psm_model.checkpoint import weights_sha256
from psm_model.coco_eval import (
    check_submission,
    coco_eval,
    load_gt,
    metrics_table,
)
from psm_model.config import Config
from psm_model.config_yaml import flag_overrides
from psm_model.decode import flip_shift
from psm_model.errors import redact_secrets
from psm_model.recipe import EvalRecipe, PoseActors

if TYPE_CHECKING:  # imported where used: `psm infer --help` loads no Ray
    from pipelines.box_sources import BoxSource, Tally

log = logging.getLogger(__name__)


def _under_root(cfg: Config, path: str) -> str:
    return (
        uris.join(cfg.data.root, path)
        if "://" in cfg.data.root
        else str(Path(cfg.data.root, path).resolve())
    )


def _image_list(cfg: Config) -> tuple[str, str]:
    """infer.images and infer.image_info under data.root (unless absolute); the folder checked."""
    images, info = _under_root(cfg, cfg.infer.images), _under_root(cfg, cfg.infer.image_info)
    fs, where = uris.filesystem(images)
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        raise DataError(f"{redact_secrets(images)}: infer.images: not a folder")
    return images, info


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(
    cfg: Config, weights: dict, rows: list[dict], images: str, info: str, source: BoxSource
) -> dict:
    """What the parts of one output are the results of: a resume with any of it changed is
    refused (mixing two models' or two detectors' poses in one file would go unnoticed)."""
    ids = ",".join(str(r["image_id"]) for r in rows)
    return {
        "weights_sha256": weights_sha256(weights),
        "model": cfg.to_dict()["model"],
        "recipe": {
            k: getattr(cfg.eval, k)
            for k in (
                "flip_test",
                "decode",
                "keypoint_score_threshold",
                "oks_nms_threshold",
                "box_score_threshold",
            )
        },
        "box_padding": cfg.data.box_padding,
        "pose_runtime": cfg.infer.pose_runtime,
        "images": redact_secrets(images),
        "image_info": redact_secrets(info),
        "image_ids_sha256": _sha256(ids.encode()),
        **source.manifest(),
        "part_images": cfg.infer.part_images,
    }


def _weights(checkpoint: str, cfg: Config, tracker: Tracker) -> tuple[dict, Config]:
    """The checkpoint's weights (CPU tensors; the model is not kept) and cfg with the
    checkpoint's model config."""
    model, cfg = load_model(checkpoint, cfg, tracker)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg


def _start_run(
    cfg: Config,
    tracker: Tracker,
    checkpoint: str,
    source: BoxSource,
    resumed: bool,
    info: str,
    images: str,
    records: list,
) -> str:
    """One MLflow run per output file: a resumed job carries on the run it started. Its params
    (the box source's included) and dataset inputs (the image list and the boxes, by digest)."""
    fs, where = uris.filesystem(cfg.infer.output)
    stem = PurePosixPath(where).stem
    name = f"infer-{stem}-{_sha256(f'{fs.type_name}:{where}'.encode())[:8]}"
    run_id = tracker.start_or_resume_run(name, cfg, kind="infer")
    if not resumed:  # a resumed job keeps the params it started with (MLflow refuses changes)
        params = {
            "infer.checkpoint": checkpoint,
            **tracking_flat("infer.box_source", source.params()),
        }
        params["infer.flip_shift"] = (
            flip_shift(cfg.model.heatmap_stride) if cfg.eval.flip_test else 0
        )
        tracker.log_params(run_id, params)
    datasets = [provenance.annotation_dataset(info, images, records, "inference")]
    datasets += [provenance.file_dataset(at, "boxes", sha) for at, sha in source.inputs()]
    tracker.log_datasets(run_id, datasets)
    return run_id


def tracking_flat(prefix: str, values: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def run_inference(cfg: Config, checkpoint: str) -> dict[str, float]:
    """Writes cfg.infer.output and returns the job's metrics (with COCO AP when scorable)."""
    import ray

    from pipelines.box_sources import Tally, box_source
    from pipelines.inference import PartStore, infer_parts, split_parts

    source = box_source(cfg)  # the one place infer.boxes is read
    storage.require_output_file(cfg.infer.output, "infer.output (--output)")
    tracker = Tracker.of(cfg)
    storage.require_persistent_tracking(tracker.uri)
    images, info = _image_list(cfg)
    source.check()  # the detector read and loaded before any work: a clear error first
    records, image_skips = load_images(images, info)
    weights, cfg = _weights(checkpoint, cfg, tracker)  # the checkpoint's own model config wins
    # the specs the pipelines take, once the model config is the checkpoint's
    recipe, actors = EvalRecipe.of(cfg), PoseActors.of(cfg, cfg.infer.pose_runtime)
    rows = source.rows(records, images, info, recipe.crop)
    parts = split_parts(rows, cfg.infer.part_images)
    output = cfg.infer.output  # a local path or a pyarrow URI (s3://...)
    store = PartStore(output + ".parts", _manifest(cfg, weights, rows, images, info, source))
    done = store.done(len(parts))
    todo = sorted(set(range(len(parts))) - set(done))
    if done:
        log.info("%s: %d of %d parts done already; resuming", store.folder, len(done), len(parts))
    run_id = _start_run(cfg, tracker, checkpoint, source, bool(done), info, images, records)
    try:
        if not ray.is_initialized():  # Ray: the cluster (RAY_ADDRESS) or a local instance
            ray.init()
        started = time.perf_counter()
        with tracker.system_metrics(run_id):
            sent = infer_parts(parts, todo, recipe, actors, weights, store, source)
        seconds = time.perf_counter() - started
        tally = Tally.of([store.read(k) for k in range(len(parts))])
        data = _submit(output, tally, records, rows, source)
        metrics = {
            **_counts(source, rows, tally, image_skips),
            "parts_resumed": float(len(done)),
            "seconds": seconds,
            "images_per_s": sum(len(parts[k]) for k in todo) / max(seconds, 1e-9),
            "images_with_boxes_sent": float(sent),
            **_scores(info, source, tally),
        }
        _log(cfg, recipe, tracker, run_id, metrics, data, records, tally.results)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    finally:
        store.release()  # the next job on this output may start
    tracker.end_run(run_id)
    _report(cfg, tracker, run_id, metrics, rows, info, source, tally)
    return metrics


def _report(
    cfg: Config,
    tracker: Tracker,
    run_id: str,
    metrics: dict,
    rows: list[dict],
    info: str,
    source: BoxSource,
    tally: Tally,
) -> None:
    """The job's summary on stdout: what was posed with which boxes, AP, the MLflow run."""
    print(
        f"{cfg.infer.output}: {len(tally.results)} poses for {len(rows)} images ({info}) with the "
        f"boxes of {source.label}; {int(metrics['skipped_images'])} images skipped"
        + source.summary_tail(tally)
    )
    if "AP" in metrics:
        print(metrics_table(metrics))
    print(f"MLflow run {run_id} ({redact_secrets(tracker.uri)})")


def _submit(output: str, tally: Tally, records: list, rows: list[dict], source: BoxSource) -> bytes:
    """The results file, written only once it passes the submission check (a submission that
    checks itself: nothing is written as final unless it passes), and the source's boxes file."""
    accounted = {"no_person": tally.no_person, **tally.skipped, **source.without_boxes(rows)}
    sizes = {r.image_id: (r.width, r.height) for r in records}
    check_submission(tally.results, sizes, accounted, output)
    data = json.dumps(tally.results).encode()
    uris.write_bytes(output, data)
    source.write_boxes(tally)
    return data


def _counts(source: BoxSource, rows: list[dict], tally: Tally, image_skips: dict) -> dict:
    """Where every image of the list went: boxes, poses, skips."""
    with_boxes, boxes = source.box_counts(rows, tally)
    return {
        "images": float(len(rows)),
        "images_with_boxes": float(with_boxes),
        "images_no_person": float(tally.no_person),
        "boxes": float(boxes),
        "poses": float(len(tally.results)),
        "skipped_images": float(sum(tally.skipped.values())),
        "skipped_image_entries": float(sum(image_skips.values())),
    }


def _scores(info: str, source: BoxSource, tally: Tally) -> dict[str, float]:
    """COCO AP of the poses (and of the detector's boxes) when the image list is an annotation
    file; none for a test-dev image list."""
    info_data = uris.read_json_at(info, DataError)
    if not (isinstance(info_data, dict) and "annotations" in info_data):
        return {}
    gt = load_gt(redact_secrets(info), info_data)
    return {**coco_eval(gt, tally.results), **source.box_metrics(gt, tally)}


def _log(
    cfg: Config,
    recipe: EvalRecipe,
    tracker: Tracker,
    run_id: str,
    metrics: dict,
    data: bytes,
    records: list,
    results: list[dict],
) -> None:
    """The metrics, the results file and a few images drawn with their poses, to MLflow."""
    from pipelines.validate import draw_results

    tracker.log_metrics(run_id, metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:  # MLflow logs local files
        _, where = uris.filesystem(cfg.infer.output)
        local = Path(tmp) / PurePosixPath(where).name
        local.write_bytes(data)
        tracker.log_artifact(run_id, local, "results")
    if cfg.eval.visualize:
        draw_results(
            records[: cfg.eval.visualize],
            results,
            recipe,
            tracker.save_pose_drawings(run_id),
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Poses for every image of infer.image_info (a COCO JSON with an images list: "
        "the test-dev image info, or an annotation file) in infer.images, with the person boxes "
        "of infer.boxes: a detections file (infer.detections, COCO results format), an ONNX "
        "detector run in the job on its own actors (infer.detector.model) or the annotations "
        "(gt), by the eval.* test recipe on eval.workers "
        "Ray Data actors. Writes infer.output (the test-dev submission format) in parts: run "
        "again with the same arguments, a killed job resumes after its last finished part. "
        "Logs an MLflow run; an annotation file with keypoints is also scored (COCO AP)."
    )
    command.add_config_arguments(p)
    p.add_argument(
        "--checkpoint", required=True, help="a training checkpoint folder or a weights file (.pth)"
    )
    p.add_argument(
        "--dets",
        help="person detections, COCO results format (infer.boxes=file infer.detections=FILE)",
    )
    p.add_argument("--output", help="results JSON to write (infer.output)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    flags = flag_overrides("infer", dets=args.dets, output=args.output)
    run_inference(command.load(args, *flags), args.checkpoint)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.infer CONFIG --checkpoint CKPT [...]` (what `ray job submit` runs)."""
    return command.job_main("jobs.infer", "psm infer", argv)


if __name__ == "__main__":
    sys.exit(main())
