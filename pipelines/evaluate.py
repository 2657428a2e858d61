"""The test recipe on the val set: `evaluate_model` (a model in this process on Ray Data crops),
`evaluate_on_actors` (the model on Ray Data actors; both share `pipelines.predict.predict_poses`)
and `oracle_eval`, the ground-truth round trip without a model and without images.

Oracle: each person's GT keypoints go through the crop affine, the training target renderer
(and, with the flip test, the renderer on the mirrored crop followed by `flip_back`), the decoder,
the map back to the image, rescoring, OKS-NMS and COCOeval. A network that predicted its
training targets perfectly would score this: what is lost here (heatmap quantisation, flip shift,
decode) is the chain's own error, a check of crop -> heatmap -> decode -> image -> COCOeval.

With a detections file, each box gets the keypoints of the GT person it overlaps most (box IoU
>= 0.5) or none (all-zero heatmaps, score 0): a check of box reading, crops from detector boxes,
rescoring with real box scores and OKS-NMS of duplicate detections.
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
from pycocotools.coco import COCO

from pipelines.augment import count_skips, image_rows
from pipelines.coco import load_split
from pipelines.datasets import eval_crops, iter_chunked
from pipelines.detect import box_row
from pipelines.images import ImageError, decode_image
from pipelines.predict import pose_predictions, predict_poses
from pipelines.uris import join, read_json_at, write_bytes
from psm_model.coco_keypoints import NUM_JOINTS, SKELETON
from psm_model.codec import HeatmapCodec
from psm_model.config import Config
from psm_model.errors import redact_secrets
from psm_model.evaluation import (
    EvalError,
    coco_eval,
    load_gt,
    make_results,
    read_detections,
)
from psm_model.geometry import (
    PIXEL_STD,
    affine_matrix,
    box_to_center_scale,
    flip_keypoints,
    transform_points,
)

log = logging.getLogger(__name__)

# what a job does with a folder of drawn val images (jobs.tracking.save_pose_drawings: log it)
SaveDrawings = Callable[[str], object]
MATCH_IOU = 0.5  # a detection inherits a GT person's keypoints from this box IoU on


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xywh box with each of (M, 4) xywh boxes."""
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y2 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter)


def _crop_keypoints(
    keypoints: np.ndarray, centers: np.ndarray, scales: np.ndarray, input_size_hw: tuple[int, int]
) -> np.ndarray:
    """(N, J, 2) image keypoints -> input-crop pixels, through each person's test-time crop."""
    out = np.empty((len(keypoints), keypoints.shape[1], 2))
    for i, (c, s) in enumerate(zip(centers, scales, strict=True)):
        out[i] = transform_points(keypoints[i, :, :2], affine_matrix(c, s, 0.0, input_size_hw))
    return out


def _oracle_heatmaps(
    crop_xy: np.ndarray, visible: np.ndarray, codec: HeatmapCodec, input_width: int, flip: bool
) -> torch.Tensor:
    """(N, 17, h, w) heatmaps a perfect network would output for these crops' keypoints."""
    heatmaps, _ = codec.encode(torch.from_numpy(crop_xy), torch.from_numpy(visible))
    if not flip:
        return heatmaps
    # what the network sees on the mirrored crop: mirrored joints, left and right swapped
    mirrored = flip_keypoints(np.concatenate([crop_xy, visible[..., None]], -1), input_width)
    heatmaps_flipped, _ = codec.encode(
        torch.from_numpy(mirrored[..., :2]), torch.from_numpy(mirrored[..., 2] > 0)
    )
    return codec.flip_average(heatmaps, heatmaps_flipped)


def _drop_joints_outside_crops(coco: COCO, ann_ids: list[int], outside: np.ndarray) -> int:
    """Unlabel (v = 0) the GT joints that lie outside their person's crop; returns how many."""
    dropped = 0
    for ann_id, out in zip(ann_ids, outside, strict=True):
        ann = coco.anns[ann_id]  # the same dict as in coco.dataset: COCOeval sees the change
        kpts = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        hit = out & (kpts[:, 2] > 0)
        kpts[hit] = 0.0
        dropped += int(hit.sum())
        ann["keypoints"] = kpts.reshape(-1).tolist()
        ann["num_keypoints"] = int((kpts[:, 2] > 0).sum())
    return dropped


def oracle_eval(
    cfg: Config,
    *,
    results_file: str | os.PathLike | None = None,
    gt_in_crop_only: bool = False,
) -> dict[str, float]:
    """COCO keypoint metrics of the GT round trip on the val set (GT boxes, or eval.detections)
    with the test recipe of `cfg` (flip test, decode, rescoring, OKS-NMS).

    `gt_in_crop_only` (GT boxes only) also unlabels, for COCOeval, the GT joints that lie outside
    their person's crop: no heatmap can hold them, so this isolates the chain's own error from
    annotations that reach beyond the padded box (the recipe's ceiling, not a chain error).
    """
    detections = cfg.eval.detections
    if gt_in_crop_only and detections:
        raise ValueError("gt_in_crop_only: only defined with GT boxes (eval.detections is set)")
    records = _val_records(cfg)
    ann_file = join(cfg.data.root, cfg.data.val_annotations)
    h, w = cfg.model.input_size
    codec = HeatmapCodec.from_config(cfg)

    # one row per crop: (image id, centre, scale, GT keypoints (17, 3), box score, GT ann id)
    if not detections:  # GT boxes, box score 1 (the official GT-box validation)
        persons = [
            (r.image_id, p.center, p.scale, p.keypoints, 1.0, p.ann_id)
            for r in records
            for p in r.persons
        ]
    else:
        by_image = {r.image_id: r for r in records}
        sizes = {i: (r.width, r.height) for i, r in by_image.items()}
        dets, skips = read_detections_at(detections, sizes, cfg.eval.box_score_threshold)
        log.info("%s: %d detections; skipped: %s", detections, len(dets), dict(skips) or "none")
        persons = []
        for image_id, box, score in zip(dets.image_ids, dets.boxes, dets.scores, strict=True):
            gt = by_image[int(image_id)].persons
            kpts = np.zeros((NUM_JOINTS, 3), np.float32)  # no GT match: all-zero maps, score 0
            if gt:
                iou = _box_iou(box, np.array([p.box for p in gt]))
                if iou.max() >= MATCH_IOU:
                    kpts = gt[int(iou.argmax())].keypoints
            center, scale = box_to_center_scale(box, aspect=w / h, padding=cfg.data.box_padding)
            persons.append((int(image_id), center, scale, kpts, float(score), -1))

    coco = load_gt_at(ann_file)
    results: list[dict] = []
    if persons:
        image_ids = np.array([p[0] for p in persons], dtype=np.int64)
        centers = np.stack([p[1] for p in persons]).astype(np.float64)
        scales = np.stack([p[2] for p in persons]).astype(np.float64)
        keypoints = np.stack([p[3] for p in persons]).astype(np.float64)
        box_scores = np.array([p[4] for p in persons])
        crop_xy = _crop_keypoints(keypoints, centers, scales, cfg.model.input_size)
        visible = keypoints[..., 2] > 0
        if gt_in_crop_only:
            x, y = crop_xy[..., 0], crop_xy[..., 1]
            outside = (x < 0) | (x >= w) | (y < 0) | (y >= h)
            n = _drop_joints_outside_crops(coco, [p[5] for p in persons], outside)
            log.info("%s: %d labelled joints outside their crop left out of COCOeval", ann_file, n)
        coords, maxvals, batch = [], [], cfg.eval.batch_size
        for i in range(0, len(persons), batch):  # bounded memory: 17 maps per person
            sl = slice(i, i + batch)
            hm = _oracle_heatmaps(crop_xy[sl], visible[sl], codec, w, cfg.eval.flip_test)
            c, m = codec.decode(hm, centers[sl], scales[sl], method=cfg.eval.decode)
            coords.append(c)
            maxvals.append(m)
        areas = np.prod(scales * PIXEL_STD, axis=1)  # the official NMS area: the crop box
        results = make_results(
            image_ids,
            np.concatenate(coords),
            np.concatenate(maxvals),
            box_scores,
            areas,
            cfg.eval.keypoint_score_threshold,
            cfg.eval.oks_nms_threshold,
        )
    if results_file is not None:
        _write_results(results, results_file)
    return coco_eval(coco, results)


# ----------------------------------------------------------------------------------------------
# A model on the val set: Ray Data crops -> poses (predict_poses) -> results -> COCOeval
# ----------------------------------------------------------------------------------------------


def detection_rows(records: list, detections: str, cfg: Config) -> list[dict]:
    """Image rows whose boxes are a detector's (COCO results format), with their scores."""
    dets, skips = read_detections_at(
        detections, {r.image_id: (r.width, r.height) for r in records}, cfg.eval.box_score_threshold
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
        rows.append(box_row(rec.image_id, rec.path, dets.boxes[mine], dets.scores[mine], cfg))
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


def _val_records(cfg: Config) -> list:
    return load_split(cfg, "val")[0]


def _val_rows(cfg: Config) -> tuple[list, list[dict]]:
    """The val records and their image rows: ground-truth boxes, or eval.detections."""
    records = _val_records(cfg)
    if cfg.eval.detections:
        return records, detection_rows(records, cfg.eval.detections, cfg)
    return records, image_rows(records)


def evaluate_model(
    model: torch.nn.Module,
    cfg: Config,
    *,
    device: str | torch.device = "cpu",
    results_file: str | os.PathLike | None = None,
    save_drawings: SaveDrawings | None = None,
) -> dict[str, float]:
    """COCO keypoint metrics of `model` on the val set (GT boxes, or eval.detections), the model
    running in this process (validation inside training: rank 0 of a Ray Train worker).

    Crops come from the Ray Data graph; with `save_drawings`, it gets a folder of eval.visualize
    val images with the predicted poses drawn on them (jobs log it to their MLflow run).
    """
    records, rows = _val_rows(cfg)
    was_training = model.training
    model.eval()
    batches = iter_chunked(
        lambda chunk: eval_crops(chunk, cfg, num_cpus=cfg.data.cpus_per_task),
        rows,
        cfg.data.chunk_images,
        cfg.eval.batch_size,
    )
    try:
        codec = HeatmapCodec.from_config(cfg)
        poses = (predict_poses(model, batch, cfg, device, codec) for batch in batches)
        return _score(poses, records, cfg, results_file, save_drawings)
    finally:
        model.train(was_training)


def evaluate_on_actors(
    weights: dict[str, torch.Tensor],
    cfg: Config,
    *,
    results_file: str | os.PathLike | None = None,
    save_drawings: SaveDrawings | None = None,
) -> dict[str, float]:
    """`evaluate_model` with the model on eval.workers Ray Data actors (`psm eval`): `weights` is
    a CPU state_dict for `cfg.model`. Only pose rows come back; scoring stays here."""
    records, rows = _val_rows(cfg)
    poses = pose_predictions(rows, cfg, weights, cfg.eval.pose_runtime).iter_batches(
        batch_size=None, batch_format="numpy"
    )
    return _score(poses, records, cfg, results_file, save_drawings)


def _write_results(results: list[dict], location: str | os.PathLike) -> None:
    """The results JSON to a local path or a URI (s3://...: `--results` takes either, as the
    infer job's `--output`), atomically: the old file or none after a crash, never half."""
    write_bytes(os.fspath(location), json.dumps(results).encode())


def pose_results(poses: Iterable[dict[str, np.ndarray]], cfg: Config) -> list[dict]:
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
        cfg.eval.keypoint_score_threshold,
        cfg.eval.oks_nms_threshold,
    )


def _score(
    poses: Iterable[dict[str, np.ndarray]],
    records: list,
    cfg: Config,
    results_file: str | os.PathLike | None,
    save_drawings: SaveDrawings | None,
) -> dict[str, float]:
    """Batches of pose rows (POSE_COLUMNS) -> rescoring, OKS-NMS, results JSON, COCOeval."""
    batches, skipped = [], Counter()
    for batch in poses:
        skipped += count_skips(batch["skip"])
        batches.append(batch)
    results = pose_results(batches, cfg)
    if results_file is not None:
        _write_results(results, results_file)
    metrics = coco_eval(load_gt_at(join(cfg.data.root, cfg.data.val_annotations)), results)
    metrics["skipped_images"] = float(sum(skipped.values()))
    if save_drawings and cfg.eval.visualize:
        draw_results(records[: cfg.eval.visualize], results, cfg, save_drawings)
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
    records: list, results: list[dict], cfg: Config, save_drawings: SaveDrawings
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
                image = decode_image(rec.path, cfg.data.max_image_pixels)
            except ImageError:
                continue
            drawn = draw_poses(image, poses, cfg.eval.keypoint_score_threshold)
            cv2.imwrite(f"{d}/{rec.image_id}.jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        save_drawings(d)
