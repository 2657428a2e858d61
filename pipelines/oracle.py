"""`oracle_eval`: the ground-truth round trip on the val set, without a model and without images.

Each person's GT keypoints go through the crop affine, the training target renderer
(and, with the flip test, the renderer on the mirrored crop followed by `flip_back`), the decoder,
the map back to the image, rescoring, OKS-NMS and COCOeval. A network that predicted its
training targets perfectly would score this: what is lost here (heatmap quantisation, flip shift,
decode) is the chain's own error, a check of crop -> heatmap -> decode -> image -> COCOeval.

With a detections file, each box gets the keypoints of the GT person it overlaps most (box IoU
>= 0.5) or none (all-zero heatmaps, score 0): a check of box reading, crops from detector boxes,
rescoring with real box scores and OKS-NMS of duplicate detections.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from pycocotools.coco import COCO

from pipelines.uris import join
from pipelines.validate import load_gt_at, read_detections_at, val_records, write_results
from psm_model.coco_eval import coco_eval, make_results
from psm_model.coco_keypoints import NUM_JOINTS
from psm_model.codec import HeatmapCodec
from psm_model.geometry import (
    PIXEL_STD,
    affine_matrix,
    box_to_center_scale,
    flip_keypoints,
    transform_points,
)
from psm_model.recipe import EvalRecipe, ValSet

log = logging.getLogger(__name__)

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
    recipe: EvalRecipe,
    val: ValSet,
    *,
    results_file: str | os.PathLike | None = None,
    gt_in_crop_only: bool = False,
) -> dict[str, float]:
    """COCO keypoint metrics of the GT round trip on the val set (GT boxes, or eval.detections)
    with the test `recipe` (flip test, decode, rescoring, OKS-NMS).

    `gt_in_crop_only` (GT boxes only) also unlabels, for COCOeval, the GT joints that lie outside
    their person's crop: no heatmap can hold them, so this isolates the chain's own error from
    annotations that reach beyond the padded box (the recipe's ceiling, not a chain error).
    """
    detections, codec = val.detections, recipe.codec
    if gt_in_crop_only and detections:
        raise ValueError("gt_in_crop_only: only defined with GT boxes (eval.detections is set)")
    records = val_records(val, recipe.crop)
    ann_file = join(val.root, val.annotations)
    h, w = recipe.crop.input_size

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
        dets, skips = read_detections_at(detections, sizes, recipe.box_score_threshold)
        log.info("%s: %d detections; skipped: %s", detections, len(dets), dict(skips) or "none")
        persons = []
        for image_id, box, score in zip(dets.image_ids, dets.boxes, dets.scores, strict=True):
            gt = by_image[int(image_id)].persons
            kpts = np.zeros((NUM_JOINTS, 3), np.float32)  # no GT match: all-zero maps, score 0
            if gt:
                iou = _box_iou(box, np.array([p.box for p in gt]))
                if iou.max() >= MATCH_IOU:
                    kpts = gt[int(iou.argmax())].keypoints
            center, scale = box_to_center_scale(box, aspect=w / h, padding=recipe.crop.box_padding)
            persons.append((int(image_id), center, scale, kpts, float(score), -1))

    coco = load_gt_at(ann_file)
    results: list[dict] = []
    if persons:
        image_ids = np.array([p[0] for p in persons], dtype=np.int64)
        centers = np.stack([p[1] for p in persons]).astype(np.float64)
        scales = np.stack([p[2] for p in persons]).astype(np.float64)
        keypoints = np.stack([p[3] for p in persons]).astype(np.float64)
        box_scores = np.array([p[4] for p in persons])
        crop_xy = _crop_keypoints(keypoints, centers, scales, recipe.crop.input_size)
        visible = keypoints[..., 2] > 0
        if gt_in_crop_only:
            x, y = crop_xy[..., 0], crop_xy[..., 1]
            outside = (x < 0) | (x >= w) | (y < 0) | (y >= h)
            n = _drop_joints_outside_crops(coco, [p[5] for p in persons], outside)
            log.info("%s: %d labelled joints outside their crop left out of COCOeval", ann_file, n)
        coords, maxvals, batch = [], [], recipe.batch_size
        for i in range(0, len(persons), batch):  # bounded memory: 17 maps per person
            sl = slice(i, i + batch)
            hm = _oracle_heatmaps(crop_xy[sl], visible[sl], codec, w, recipe.flip_test)
            c, m = codec.decode(hm, centers[sl], scales[sl], method=recipe.decode)
            coords.append(c)
            maxvals.append(m)
        areas = np.prod(scales * PIXEL_STD, axis=1)  # the official NMS area: the crop box
        results = make_results(
            image_ids,
            np.concatenate(coords),
            np.concatenate(maxvals),
            box_scores,
            areas,
            recipe.rescoring.keypoint_score_threshold,
            recipe.rescoring.oks_nms_threshold,
        )
    if results_file is not None:
        write_results(results, results_file)
    return coco_eval(coco, results)
