"""The test recipe on the val set: `evaluate_model` (a model in this process on Ray Data crops:
validation inside training) and `evaluate_on_actors` (the model on Ray Data actors: `psm eval`),
both through `pipelines.predict.predict_poses`; the poses -> COCO results (`pose_results`:
rescoring, OKS-NMS) -> COCOeval, the results file, drawings of the val images; and the readers
of annotation and detection files wherever they live (`load_gt_at`, `read_detections_at`).
The ground-truth round trip without a model is `pipelines.oracle`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable

import cv2
import numpy as np
import torch

from pipelines.augment import count_skips, image_rows
from pipelines.coco import load_coco_persons
from pipelines.datasets import iter_chunked
from pipelines.detect import box_row
from pipelines.eval_crops import eval_crops
from pipelines.images import ImageError, decode_image
from pipelines.predict import pose_predictions, predict_poses
from pipelines.uris import join, read_json_at, write_bytes
from psm_model.coco_eval import (
    EvalError,
    coco_eval,
    load_gt,
    make_results,
    read_detections,
)
from psm_model.coco_keypoints import NUM_JOINTS, SKELETON
from psm_model.errors import redact_secrets
from psm_model.geometry import PIXEL_STD
from psm_model.recipe import CropSpec, EvalRecipe, PoseActors, Rescoring, ValSet

log = logging.getLogger(__name__)

# what a job does with a folder of drawn val images (`Tracker.save_pose_drawings`: log it)
SaveDrawings = Callable[[str], object]
# ----------------------------------------------------------------------------------------------
# A model on the val set: Ray Data crops -> poses (predict_poses) -> results -> COCOeval
# ----------------------------------------------------------------------------------------------


def detection_rows(
    records: list, detections: str, score_threshold: float, crop: CropSpec
) -> list[dict]:
    """Image rows whose boxes are a detector's (COCO results format), with their scores."""
    dets, skips = read_detections_at(
        detections, {r.image_id: (r.width, r.height) for r in records}, score_threshold
    )
    log.info("%s: %d person boxes; skipped: %s", detections, len(dets), dict(skips) or "none")
    # the box indices of each image, grouped once (a scan per image is quadratic: test-dev has
    # 20k images and ~10^5 boxes)
    order = np.argsort(dets.image_ids, kind="stable")
    ids, starts = np.unique(dets.image_ids[order], return_index=True)
    groups = dict(zip(ids.tolist(), np.split(order, starts[1:]) if len(ids) else [], strict=True))
    rows = []
    for rec in records:
        mine = groups.get(rec.image_id, np.zeros(0, np.int64))
        rows.append(box_row(rec.image_id, rec.path, dets.boxes[mine], dets.scores[mine], crop))
    return rows


def load_gt_at(location: str):
    """`load_gt` of a local annotation file or one on an object store (data.root=s3://...)."""
    return load_gt(redact_secrets(location), read_json_at(location, EvalError))


def read_detections_at(location: str, image_sizes: dict, score_threshold: float):
    """`read_detections` of a local file or an object (--dets s3://...)."""
    if "://" not in str(location):
        return read_detections(location, image_sizes, score_threshold)
    data = read_json_at(location, EvalError)
    return read_detections(redact_secrets(location), image_sizes, score_threshold, data)


def val_records(val: ValSet, crop: CropSpec) -> list:
    """The val split's image records (`pipelines.coco.load_split`'s, images without persons
    kept) for this crop."""
    images, annotations = join(val.root, val.images), join(val.root, val.annotations)
    return load_coco_persons(images, annotations, crop.input_size, crop.box_padding, False)[0]


def _val_rows(val: ValSet, recipe: EvalRecipe) -> tuple[list, list[dict]]:
    """The val records and their image rows: ground-truth boxes, or eval.detections."""
    records = val_records(val, recipe.crop)
    if val.detections:
        rows = detection_rows(records, val.detections, recipe.box_score_threshold, recipe.crop)
        return records, rows
    return records, image_rows(records)


def evaluate_model(
    model: torch.nn.Module,
    recipe: EvalRecipe,
    val: ValSet,
    crop_cpus: float,
    *,
    device: str | torch.device = "cpu",
    results_file: str | os.PathLike | None = None,
    save_drawings: SaveDrawings | None = None,
) -> dict[str, float]:
    """COCO keypoint metrics of `model` on the val set (GT boxes, or eval.detections), the model
    running in this process (validation inside training: rank 0 of a Ray Train worker).

    Crops come from the Ray Data graph, `crop_cpus` per task (data.cpus_per_task); with
    `save_drawings`, it gets a folder of eval.visualize
    val images with the predicted poses drawn on them (jobs log it to their MLflow run).
    """
    records, rows = _val_rows(val, recipe)
    was_training = model.training
    model.eval()
    batches = iter_chunked(
        lambda chunk: eval_crops(chunk, recipe.crop, crop_cpus),
        rows,
        val.chunk_images,
        recipe.batch_size,
    )
    try:
        poses = (predict_poses(model, batch, recipe, device) for batch in batches)
        return _score(poses, records, recipe, val, results_file, save_drawings)
    finally:
        model.train(was_training)


def evaluate_on_actors(
    weights: dict[str, torch.Tensor],
    recipe: EvalRecipe,
    val: ValSet,
    actors: PoseActors,
    *,
    results_file: str | os.PathLike | None = None,
    save_drawings: SaveDrawings | None = None,
) -> dict[str, float]:
    """`evaluate_model` with the model on `actors` (`psm eval`): `weights` is a CPU state_dict
    for `recipe.model`. Only pose rows come back; scoring stays here."""
    records, rows = _val_rows(val, recipe)
    poses = pose_predictions(rows, recipe, actors, weights).iter_batches(
        batch_size=None, batch_format="numpy"
    )
    return _score(poses, records, recipe, val, results_file, save_drawings)


def write_results(results: list[dict], location: str | os.PathLike) -> None:
    """The results JSON to a local path or a URI (s3://...: `--results` takes either, as the
    infer job's `--output`), atomically: the old file or none after a crash, never half."""
    write_bytes(os.fspath(location), json.dumps(results).encode())


def pose_results(poses: Iterable[dict[str, np.ndarray]], rescoring: Rescoring) -> list[dict]:
    """Batches of pose rows (POSE_COLUMNS; skip rows are left out) -> COCO results: rescoring
    and OKS-NMS per image, with the crop box as the NMS area (as the official code)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("image_id", "coords", "maxvals", "score")}
    areas = []
    for batch in poses:
        keep = batch["skip"] == ""
        for k, values in cols.items():
            values.append(batch[k][keep])
        areas.append(np.prod(batch["scale"][keep] * PIXEL_STD, axis=1))
    if not sum(map(len, areas)):
        return []
    image_ids, coords, maxvals, scores = (np.concatenate(v) for v in cols.values())
    return make_results(
        image_ids,
        coords,
        maxvals,
        scores,
        np.concatenate(areas),
        rescoring.keypoint_score_threshold,
        rescoring.oks_nms_threshold,
    )


def _score(
    poses: Iterable[dict[str, np.ndarray]],
    records: list,
    recipe: EvalRecipe,
    val: ValSet,
    results_file: str | os.PathLike | None,
    save_drawings: SaveDrawings | None,
) -> dict[str, float]:
    """Batches of pose rows (POSE_COLUMNS) -> rescoring, OKS-NMS, results JSON, COCOeval."""
    batches, skipped = [], Counter()
    for batch in poses:
        skipped += count_skips(batch["skip"])
        batches.append(batch)
    results = pose_results(batches, recipe.rescoring)
    if results_file is not None:
        write_results(results, results_file)
    metrics = coco_eval(load_gt_at(join(val.root, val.annotations)), results)
    metrics["skipped_images"] = float(sum(skipped.values()))
    if save_drawings and val.visualize:
        draw_results(records[: val.visualize], results, recipe, save_drawings)
    return metrics


def draw_poses(image: np.ndarray, poses: list[np.ndarray], threshold: float = 0.2) -> np.ndarray:
    """RGB image with each (17, 3) pose's skeleton and keypoints above `threshold` drawn on it."""
    out = image.copy()
    for pose in poses:
        ok = pose[:, 2] > threshold
        for a, b in SKELETON:  # 1-based COCO skeleton
            if ok[a - 1] and ok[b - 1]:
                pa, pb = pose[a - 1, :2].round().astype(int), pose[b - 1, :2].round().astype(int)
                cv2.line(out, tuple(int(v) for v in pa), tuple(int(v) for v in pb), (0, 255, 0), 2)
        for x, y in pose[ok, :2].round().astype(int):
            cv2.circle(out, (int(x), int(y)), 3, (255, 0, 0), -1)
    return out


def draw_results(
    records: list, results: list[dict], recipe: EvalRecipe, save_drawings: SaveDrawings
) -> None:
    """The images of `records` with their poses from `results` drawn, as JPEGs in a temporary
    folder handed to `save_drawings` (an image that does not decode is left out)."""
    with tempfile.TemporaryDirectory() as d:
        for rec in records:
            poses = [
                np.array(r["keypoints"], np.float32).reshape(NUM_JOINTS, 3)
                for r in results
                if r["image_id"] == rec.image_id
            ]
            try:
                image = decode_image(rec.path, recipe.crop.max_pixels)
            except ImageError:
                continue
            drawn = draw_poses(image, poses, recipe.rescoring.keypoint_score_threshold)
            cv2.imwrite(f"{d}/{rec.image_id}.jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        save_drawings(d)
