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
from collections import Counter
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from jobs import command, provenance, storage, tracking
from jobs.checkpoint_uri import load_model
from pipelines import uris
from pipelines.augment import image_rows
from pipelines.coco import DataError, load_coco_persons, load_images
from pipelines.detect import detector_session, load_detector
from psm_model.checkpoint import weights_sha256
from psm_model.config import Config, ConfigError, flag_overrides, redact_secrets
from psm_model.decode import flip_shift
from psm_model.evaluation import (
    check_submission,
    coco_box_eval,
    coco_eval,
    load_gt,
    metrics_table,
)

log = logging.getLogger(__name__)


def _under_root(cfg: Config, path: str) -> str:
    return (
        uris.join(cfg.data.root, path)
        if "://" in cfg.data.root
        else str(Path(cfg.data.root, path).resolve())
    )


def _read(location: str, key: str) -> bytes:
    try:
        return uris.read_bytes(location)
    except OSError as e:  # FileNotFoundError included
        raise DataError(
            f"{key}: {redact_secrets(location)}: cannot read: {redact_secrets(str(e))}"
        ) from e


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _box_source(cfg: Config, detector_sha: str) -> dict:
    """What the boxes are (manifest and MLflow params): the file and its sha256, the detector
    model, its sha256 and every threshold, or the annotations."""
    if cfg.infer.boxes == "file":
        data = _read(cfg.infer.detections, "infer.detections (--dets)")
        return {
            "boxes": "file",
            "detections": cfg.infer.detections,
            "detections_sha256": _sha256(data),
            "box_score_threshold": cfg.eval.box_score_threshold,
        }
    if cfg.infer.boxes == "detector":
        return {
            "boxes": "detector",
            "detector_sha256": detector_sha,
            **tracking_flat("detector", cfg.to_dict()["infer"]["detector"]),
        }
    return {"boxes": "gt", "gt": cfg.infer.image_info}


def _datasets(cfg: Config, info: str, images: str, records: list, boxes: dict) -> list[dict]:
    """The image list and the boxes (the detections file or the detector model, by digest)."""
    out = [provenance.annotation_dataset(info, images, records, "inference")]
    if boxes["boxes"] == "file":
        digest = boxes["detections_sha256"]
        out.append(provenance.file_dataset(cfg.infer.detections, "boxes", digest))
    elif boxes["boxes"] == "detector":
        digest = boxes["detector_sha256"]
        out.append(provenance.file_dataset(cfg.infer.detector.model, "boxes", digest))
    return out


def tracking_flat(prefix: str, values: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def _manifest(
    cfg: Config, weights: dict, rows: list[dict], images: str, info: str, boxes: dict
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
        **{k: v for k, v in boxes.items() if k not in ("detections", "detector.model")},
        "part_images": cfg.infer.part_images,
    }


def run_inference(cfg: Config, checkpoint: str) -> dict[str, float]:
    """Writes cfg.infer.output and returns the job's metrics (with COCO AP when scorable)."""
    import ray

    from pipelines.evaluate import detection_rows, draw_results
    from pipelines.inference import PartStore, infer_parts, split_parts
    from pipelines.uris import filesystem, write_bytes

    if cfg.infer.boxes == "file" and not cfg.infer.detections:
        raise ConfigError(
            "infer.detections: required with infer.boxes=file: the person detector's boxes in "
            "COCO results format (e.g. the HRNet release's "
            "COCO_test-dev2017_detections_AP_H_609_person.json), or set infer.boxes=detector"
        )
    storage.require_output_file(cfg.infer.output, "infer.output (--output)")
    storage.require_persistent_tracking(tracking.tracking_uri(cfg))
    images, info = _under_root(cfg, cfg.infer.images), _under_root(cfg, cfg.infer.image_info)
    fs, where = uris.filesystem(images)
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        raise DataError(f"{redact_secrets(images)}: infer.images: not a folder")
    detector, detector_sha = None, ""
    if cfg.infer.boxes == "detector":  # read and checked before any work: a clear error first
        data, detector_sha = load_detector(cfg.infer.detector.model)
        detector_session(data, cfg.infer.detector.model)  # DetectorError: unknown layout
        detector = (data, cfg.infer.detector.model)
    records, image_skips = load_images(images, info)
    model, cfg = load_model(checkpoint, cfg)  # the checkpoint's own model config wins
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    del model
    if cfg.infer.boxes == "file":
        rows = detection_rows(records, cfg.infer.detections, cfg)
    elif cfg.infer.boxes == "gt":
        gt_records, _ = load_coco_persons(
            images, info, cfg.model.input_size, cfg.data.box_padding, False
        )
        rows = image_rows(sorted(gt_records, key=lambda r: r.image_id))
    else:  # the detector stage makes each row's boxes
        rows = [{"image_id": r.image_id, "path": r.path} for r in records]
    parts = split_parts(rows, cfg.infer.part_images)
    output = cfg.infer.output  # a local path or a pyarrow URI (s3://...)
    box_source = _box_source(cfg, detector_sha)
    store = PartStore(output + ".parts", _manifest(cfg, weights, rows, images, info, box_source))
    done = store.done(len(parts))
    todo = sorted(set(range(len(parts))) - set(done))
    if done:
        log.info("%s: %d of %d parts done already; resuming", store.folder, len(done), len(parts))

    # one MLflow run per output file: a resumed job carries on the run it started
    fs, where = filesystem(output)
    stem = PurePosixPath(where).stem
    name = f"infer-{stem}-{_sha256(f'{fs.type_name}:{where}'.encode())[:8]}"
    run_id = tracking.start_or_resume_run(cfg, name, kind="infer")
    if not done:  # a resumed job keeps the params it started with (MLflow refuses changes)
        params = {"infer.checkpoint": checkpoint, **tracking_flat("infer.box_source", box_source)}
        params["infer.flip_shift"] = (
            flip_shift(cfg.model.heatmap_stride) if cfg.eval.flip_test else 0
        )
        tracking.log_params(cfg, run_id, params)
    tracking.log_datasets(cfg, run_id, _datasets(cfg, info, images, records, box_source))
    try:
        if not ray.is_initialized():  # Ray: the cluster (RAY_ADDRESS) or a local instance
            ray.init()
        started = time.perf_counter()
        with tracking.system_metrics(cfg, run_id):
            sent = infer_parts(parts, todo, cfg, weights, store, detector)
        seconds = time.perf_counter() - started
        written = [store.read(k) for k in range(len(parts))]
        results = [r for part in written for r in part["results"]]
        no_person = sum(p.get("no_person", 0) for p in written)
        skips: Counter = Counter()
        for part in written:
            skips.update(part["skipped"])
        accounted = {"no_person": no_person, **skips}
        if not detector:
            accounted["no_boxes"] = sum(len(r["ann_ids"]) == 0 for r in rows)
        # a submission that checks itself: nothing is written as final unless it passes
        sizes = {r.image_id: (r.width, r.height) for r in records}
        check_submission(results, sizes, accounted, output)
        data = json.dumps(results).encode()
        write_bytes(output, data)
        posed = sum(p["persons"] for p in written)
        metrics = {
            "images": float(len(rows)),
            "images_with_boxes": float(
                len(rows) - no_person - sum(sum(p["skipped"].values()) for p in written)
                if detector
                else sum(len(r["ann_ids"]) > 0 for r in rows)
            ),
            "images_no_person": float(no_person),
            "boxes": float(posed if detector else sum(len(r["ann_ids"]) for r in rows)),
            "poses": float(len(results)),
            "skipped_images": float(sum(sum(p["skipped"].values()) for p in written)),
            "skipped_image_entries": float(sum(image_skips.values())),
            "parts_resumed": float(len(done)),
            "seconds": seconds,
            "images_per_s": sum(len(parts[k]) for k in todo) / max(seconds, 1e-9),
            "images_with_boxes_sent": float(sent),
        }
        boxes_file = ""
        if detector:  # the boxes the job used, for a later run (infer.boxes=file) or a tool
            boxes = [b for part in written for b in part["boxes"]]
            boxes_file = cfg.infer.boxes_output or _beside(output, "_person_boxes.json")
            write_bytes(boxes_file, json.dumps(boxes).encode())
        info_data = uris.read_json_at(info, DataError)
        if isinstance(info_data, dict) and "annotations" in info_data:  # score it too
            gt = load_gt(redact_secrets(info), info_data)
            metrics.update(coco_eval(gt, results))
            if detector:
                metrics.update(coco_box_eval(gt, boxes))
        tracking.log_metrics(cfg, run_id, metrics, step=0)
        with tempfile.TemporaryDirectory() as tmp:  # MLflow logs local files
            local = Path(tmp) / PurePosixPath(where).name
            local.write_bytes(data)
            tracking.log_artifact(cfg, run_id, local, "results")
        if cfg.eval.visualize:
            draw_results(
                records[: cfg.eval.visualize],
                results,
                cfg,
                tracking.save_pose_drawings(cfg, run_id),
            )
    except BaseException:
        tracking.end_run(cfg, run_id, "FAILED")
        raise
    finally:
        store.release()  # the next job on this output may start
    tracking.end_run(cfg, run_id)
    source = {"file": cfg.infer.detections, "detector": cfg.infer.detector.model}
    print(
        f"{output}: {len(results)} poses for {len(rows)} images ({info}) with the boxes of "
        f"{source.get(cfg.infer.boxes, 'the annotations')}; "
        f"{int(metrics['skipped_images'])} images skipped"
        + (f", {no_person} without a person; boxes in {boxes_file}" if detector else "")
    )
    if "AP" in metrics:
        print(metrics_table(metrics))
    print(f"MLflow run {run_id} ({redact_secrets(tracking.tracking_uri(cfg))})")
    return metrics


def _beside(output: str, suffix: str) -> str:
    """OUTPUT's folder, its stem + suffix (a local path or a URI)."""
    stem, dot, ext = output.rpartition(".")
    return f"{stem if dot and '/' not in ext else output}{suffix}"


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
