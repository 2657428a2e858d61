"""The test recipe after decoding: rescoring, OKS-NMS, COCO results JSON, detections, COCOeval.

Semantics are the official HRNet's (`lib/dataset/coco.py` evaluate, `lib/nms/nms.py`): pose score =
box score x mean of the keypoint scores above a threshold (0 when none is); greedy OKS-NMS per
image over all 17 joints, with area = the crop box area (scale x 200)^2; metrics from
pycocotools' COCOeval `stats`. numpy and pycocotools only: no Ray, no model.

Bad input: a detections file that is not a JSON list raises `EvalError` naming the file and the
field; a bad entry in it is skipped and counted by reason (`DETECTION_SKIPS`). A results file is
our output or a submission, so any bad entry in it raises (a skipped pose would change the AP).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from psm_model.coco_keypoints import COCO_SIGMAS, NUM_JOINTS, PERSON_CATEGORY_ID
from psm_model.errors import PsmError
from psm_model.files import read_json
from psm_model.geometry import box_problem

if TYPE_CHECKING:  # imported where used: a bare GPU box can still run `psm bench` without it
    from pycocotools.coco import COCO

log = logging.getLogger(__name__)

# names of COCOeval.stats[0..9] for iouType "keypoints" (maxDets 20; M = medium, L = large)
METRIC_NAMES = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")


def metrics_table(metrics: dict[str, float]) -> str:
    """The COCO keypoint metrics as a markdown table (nan where one is missing)."""
    values = (f"{metrics.get(k, float('nan')):.4f}" for k in METRIC_NAMES)
    return "\n".join(
        [
            "| " + " | ".join(METRIC_NAMES) + " |",
            "|" + "---:|" * len(METRIC_NAMES),
            "| " + " | ".join(values) + " |",
        ]
    )


DETECTION_SKIPS = {
    "bad_entry": "not an object, or image_id / category_id / bbox / score missing",
    "bad_image_id": "image_id not an integer",
    "unknown_image": "image_id not in the ground-truth file",
    "not_person": "category_id is not 1",
    "bad_box": "bbox not 4 finite numbers, a side under 1 pixel, a value beyond 1e6 pixels, or "
    "outside its image",
    "bad_score": "score not a finite number",
    "low_score": "score below the box score threshold",
}


class EvalError(PsmError, ValueError):
    """A results, detections or ground-truth file that cannot be used; names the file and field."""


# ----------------------------------------------------------------------------------------------
# Rescoring and OKS-NMS
# ----------------------------------------------------------------------------------------------


def rescore(box_scores: np.ndarray, maxvals: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """(N,) pose scores: box score x mean of the keypoint scores > threshold (0 if none is)."""
    kpt = np.asarray(maxvals, dtype=np.float64)
    kpt = kpt.reshape(kpt.shape[:2])  # (N, J, 1) -> (N, J)
    above = kpt > threshold  # NaN compares False: a NaN joint never counts
    count = above.sum(axis=1)
    mean = np.where(above, kpt, 0.0).sum(axis=1) / np.maximum(count, 1)
    return np.asarray(box_scores, dtype=np.float64) * mean


def oks_iou(
    pose: np.ndarray,
    others: np.ndarray,
    area: float,
    other_areas: np.ndarray,
    sigmas: np.ndarray = COCO_SIGMAS,
) -> np.ndarray:
    """OKS of `pose` (J, 2+) with each of `others` (M, J, 2+), over all joints (official oks_iou
    without a visibility threshold); the scale is the mean of the two areas."""
    d2 = ((np.asarray(others)[..., :2] - np.asarray(pose)[None, :, :2]) ** 2).sum(-1)  # (M, J)
    scale = (area + np.asarray(other_areas, dtype=np.float64)) / 2 + np.spacing(1)
    e = d2 / (2 * sigmas) ** 2 / scale[:, None] / 2
    return np.exp(-e).mean(axis=1)


def oks_nms(
    keypoints: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    threshold: float = 0.9,
    sigmas: np.ndarray = COCO_SIGMAS,
) -> np.ndarray:
    """Indices of the poses kept, best first: take the best remaining pose, drop every pose whose
    OKS with it is > threshold, repeat. Ties in score keep the input order (stable sort; the
    official argsort leaves that order unspecified)."""
    keypoints, areas = np.asarray(keypoints), np.asarray(areas, dtype=np.float64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(best)
        oks = oks_iou(keypoints[best], keypoints[rest], areas[best], areas[rest], sigmas)
        order = rest[oks <= threshold]
    return np.asarray(keep, dtype=np.int64)


def nms_per_image(
    image_ids: np.ndarray,
    keypoints: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    threshold: float = 0.9,
) -> np.ndarray:
    """Indices kept by `oks_nms` run separately on each image's poses, in input order."""
    image_ids = np.asarray(image_ids)
    kept = []
    for image_id in np.unique(image_ids):
        idx = np.flatnonzero(image_ids == image_id)
        kept.append(idx[oks_nms(keypoints[idx], scores[idx], areas[idx], threshold)])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def to_coco_results(
    image_ids: np.ndarray, coords: np.ndarray, maxvals: np.ndarray, scores: np.ndarray
) -> list[dict]:
    """COCO keypoint results (test-dev submission format): keypoints = [x, y, maxval] x 17."""
    kpts = np.concatenate(
        [
            np.asarray(coords, np.float64),
            np.asarray(maxvals, np.float64).reshape(*np.shape(coords)[:2], 1),
        ],
        axis=2,
    )
    # a NaN map (a diverged model) must not write invalid JSON: score it 0 and keep the pose
    kpts[..., 2] = np.nan_to_num(kpts[..., 2], nan=0.0)
    if not np.isfinite(kpts).all() or not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(kpts).all(axis=(1, 2)) | ~np.isfinite(scores))[0])
        raise ValueError(
            f"pose {bad} (image {int(image_ids[bad])}): non-finite coordinates or score"
        )
    return [
        {
            "image_id": int(i),
            "category_id": PERSON_CATEGORY_ID,
            "keypoints": [float(v) for v in k.reshape(-1)],
            "score": float(s),
        }
        for i, k, s in zip(image_ids, kpts, scores, strict=True)
    ]


def make_results(
    image_ids: np.ndarray,
    coords: np.ndarray,
    maxvals: np.ndarray,
    box_scores: np.ndarray,
    areas: np.ndarray,
    keypoint_threshold: float = 0.2,
    oks_threshold: float = 0.9,
) -> list[dict]:
    """Decoded poses -> COCO results: rescoring, OKS-NMS per image, JSON records.

    `areas` are the crop boxes' areas in image pixels, prod(scale * 200), as the official code.
    """
    image_ids, coords, maxvals = np.asarray(image_ids), np.asarray(coords), np.asarray(maxvals)
    keep, scores = kept_poses(
        image_ids, coords, maxvals, box_scores, areas, keypoint_threshold, oks_threshold
    )
    return to_coco_results(image_ids[keep], coords[keep], maxvals[keep], scores)


def kept_poses(
    image_ids: np.ndarray,
    coords: np.ndarray,
    maxvals: np.ndarray,
    box_scores: np.ndarray,
    areas: np.ndarray,
    keypoint_threshold: float = 0.2,
    oks_threshold: float = 0.9,
) -> tuple[np.ndarray, np.ndarray]:
    """What `make_results` keeps: the indices of the poses OKS-NMS keeps (in input order) and
    their rescored scores, for a caller that carries more per pose (the service's boxes)."""
    scores = rescore(box_scores, maxvals, keypoint_threshold)
    keep = nms_per_image(
        np.asarray(image_ids), np.asarray(coords), scores, np.asarray(areas), oks_threshold
    )
    return keep, scores[keep]


# ----------------------------------------------------------------------------------------------
# Reading detections and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """Person boxes, one row each: COCO xywh in image pixels."""

    image_ids: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) float64
    scores: np.ndarray  # (M,) float64

    def __len__(self) -> int:
        return len(self.image_ids)


def _read_json(path: Path) -> object:
    return read_json(path, EvalError)


def json_int(value: object) -> int | None:
    """A JSON integer (also 3.0), else None (booleans, fractions, strings, null)."""
    if isinstance(value, bool):  # JSON true/false are not ids or sizes
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(value: object) -> float | None:
    """A finite JSON number, else None (NaN, infinities, strings, booleans, null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _parse_detection(
    entry: object, image_sizes: Collection[int] | Mapping[int, tuple[int, int]] | None
) -> tuple | str:
    """(image id, box, score) or (skip reason, field)."""
    if not isinstance(entry, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(
        entry
    ):
        return "bad_entry", "entry"
    image_id = json_int(entry["image_id"])
    if image_id is None:
        return "bad_image_id", "image_id"
    if image_sizes is not None and image_id not in image_sizes:
        return "unknown_image", "image_id"
    if json_int(entry["category_id"]) != PERSON_CATEGORY_ID:
        return "not_person", "category_id"
    box = entry["bbox"]
    if not isinstance(box, list) or len(box) != 4 or any(_number(v) is None for v in box):
        return "bad_box", "bbox"
    if box_problem(box, image_sizes.get(image_id) if isinstance(image_sizes, Mapping) else None):
        return "bad_box", "bbox"
    score = _number(entry["score"])
    if score is None:
        return "bad_score", "score"
    return image_id, [float(v) for v in box], score


def read_detections(
    path: str | os.PathLike,
    image_ids: Collection[int] | Mapping[int, tuple[int, int]] | None = None,
    score_threshold: float = 0.0,
    data: object = None,
) -> tuple[Detections, Counter]:
    """Person detections (COCO results format: image_id, category_id, bbox xywh, score) and the
    entries skipped, by reason (`DETECTION_SKIPS`). With `image_ids`, ids outside it are skipped;
    given as a mapping id -> (width, height), boxes that miss their image are skipped too.

    An empty list is valid: every image then yields no poses. `data`: the file's value, read
    elsewhere (an object store); `path` then names it.
    """
    path = Path(path) if data is None else path
    data = _read_json(path) if data is None else data
    if not isinstance(data, list):
        raise EvalError(
            f"{path}: top level: expected a list of detections (COCO results format), "
            f"got {type(data).__name__}"
        )
    skips: Counter = Counter()
    first: dict[str, str] = {}  # reason -> where it first happened, for the log
    rows = []
    for i, entry in enumerate(data):
        parsed = _parse_detection(entry, image_ids)
        if isinstance(parsed[0], str):
            reason, field = parsed
            skips[reason] += 1
            first.setdefault(reason, f"[{i}].{field}")
        elif parsed[2] < score_threshold:
            skips["low_score"] += 1
        else:
            rows.append(parsed)
    for reason, where in first.items():
        log.warning(
            "%s: %s: %s; %d entries skipped", path, where, DETECTION_SKIPS[reason], skips[reason]
        )
    if not rows:
        log.warning(
            "%s: no usable detections (%d entries): no poses will be produced", path, len(data)
        )
    detections = Detections(
        image_ids=np.array([r[0] for r in rows], dtype=np.int64),
        boxes=np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 4),
        scores=np.array([r[2] for r in rows], dtype=np.float64),
    )
    return detections, skips


def validate_results(results: object, gt_image_ids: set[int], source: str) -> list[dict]:
    """Clean copies of COCO keypoint results; raises EvalError naming `source`, index and field."""
    if not isinstance(results, list):
        raise EvalError(f"{source}: top level: expected a list of results, got {type(results)}")
    clean = []
    for i, r in enumerate(results):
        where = f"{source}: [{i}]"
        if not isinstance(r, dict):
            raise EvalError(f"{where}: expected an object, got {type(r).__name__}")
        for field in ("image_id", "category_id", "keypoints", "score"):
            if field not in r:
                raise EvalError(f"{where}.{field}: missing")
        image_id = json_int(r["image_id"])
        if image_id is None or image_id not in gt_image_ids:
            raise EvalError(f"{where}.image_id: {r['image_id']!r} is not an image of the GT file")
        if json_int(r["category_id"]) != PERSON_CATEGORY_ID:
            raise EvalError(f"{where}.category_id: expected 1 (person), got {r['category_id']!r}")
        kpts = r["keypoints"]
        if not (isinstance(kpts, list) and len(kpts) == 3 * NUM_JOINTS) or any(
            _number(v) is None for v in kpts
        ):
            n = len(kpts) if isinstance(kpts, list) else type(kpts).__name__
            raise EvalError(f"{where}.keypoints: expected 51 finite numbers, got {n}")
        score = _number(r["score"])
        if score is None:
            raise EvalError(f"{where}.score: expected a finite number, got {r['score']!r}")
        clean.append(
            {
                "image_id": image_id,
                "category_id": PERSON_CATEGORY_ID,
                "keypoints": [float(v) for v in kpts],
                "score": score,
            }
        )
    return clean


# ----------------------------------------------------------------------------------------------
# COCOeval
# ----------------------------------------------------------------------------------------------


def load_gt(gt_file: str | os.PathLike, data: object = None) -> COCO:
    """pycocotools COCO of a keypoint annotation file (or of its `data`, read elsewhere, e.g.
    from an object store; `gt_file` then names it), checked enough for COCOeval and loadRes."""
    path = Path(gt_file) if data is None else gt_file
    data = _read_json(path) if data is None else data
    if not isinstance(data, dict):
        raise EvalError(f"{path}: top level: expected a JSON object, got {type(data).__name__}")
    for field in ("images", "annotations", "categories"):
        if not isinstance(data.get(field), list):
            raise EvalError(f"{path}: {field}: missing or not a list (not a COCO annotation file?)")
    _check_gt(data, path)
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _check_gt(data: dict, path: Path) -> None:
    """What pycocotools and COCOeval read of the ground truth, checked with the file and field
    named: pycocotools raises a bare KeyError on a missing field, and of two annotations with one
    id it keeps the last and returns it for both, so AP is computed on corrupted ground truth."""
    image_ids = set()
    for i, image in enumerate(data["images"]):
        image_id = json_int(image.get("id")) if isinstance(image, dict) else None
        if image_id is None:
            raise EvalError(f"{path}: images[{i}].id: missing or not an integer")
        image_ids.add(image_id)
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or json_int(category.get("id")) is None:
            raise EvalError(f"{path}: categories[{i}].id: missing or not an integer")
    seen: dict[int, int] = {}  # annotation id -> index of its first entry
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise EvalError(f"{where}: expected an object, got {type(ann).__name__}")
        for field in ("id", "image_id", "category_id"):
            if json_int(ann.get(field)) is None:
                raise EvalError(f"{where}.{field}: missing or not an integer")
        ann_id = json_int(ann["id"])
        if ann_id in seen:
            raise EvalError(
                f"{where}.id: duplicate annotation id {ann_id} "
                f"(first at annotations[{seen[ann_id]}])"
            )
        seen[ann_id] = i
        if json_int(ann["image_id"]) not in image_ids:
            raise EvalError(f"{where}.image_id: {ann['image_id']} is not an image of the file")
        if json_int(ann["category_id"]) != PERSON_CATEGORY_ID:
            continue  # COCOeval of keypoints reads only persons
        kpts = ann.get("keypoints")
        if (
            not isinstance(kpts, list)
            or len(kpts) != 3 * NUM_JOINTS
            or any(_number(v) is None for v in kpts)
        ):
            raise EvalError(f"{where}.keypoints: expected 51 finite numbers")
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or any(_number(v) is None for v in box):
            raise EvalError(f"{where}.bbox: expected 4 finite numbers")
        if _number(ann.get("area")) is None:
            raise EvalError(f"{where}.area: expected a finite number")
        if json_int(ann.get("num_keypoints")) is None:
            raise EvalError(f"{where}.num_keypoints: missing or not an integer")


def coco_eval(
    gt: str | os.PathLike | COCO, results: list[dict] | str | os.PathLike
) -> dict[str, float]:
    """COCOeval (keypoints) of `results` (a list, or a results JSON file) against `gt`:
    {AP, AP50, AP75, APM, APL, AR, AR50, AR75, ARM, ARL} from `COCOeval.stats` (-1: no GT)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = gt if isinstance(gt, COCO) else load_gt(gt)
    if isinstance(results, (str, os.PathLike)):
        source = str(results)
        results = _read_json(Path(results))
    else:
        source = "<results>"
    clean = validate_results(results, set(coco.getImgIds()), source)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if clean:
            coco_dt = coco.loadRes(clean)  # adds area, bbox, id to `clean`, a copy
        else:  # loadRes cannot take an empty list; an empty result set still scores (0)
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": coco.dataset["images"],
                "annotations": [],
                "categories": coco.dataset["categories"],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco, coco_dt, "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCOeval of %s:\n%s", source, buffer.getvalue())
    return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats, strict=True)}


def coco_box_eval(gt: COCO, boxes: list[dict]) -> dict[str, float]:
    """COCOeval (bbox, person) of detector boxes (COCO results format) against `gt`'s person
    boxes: box_AP, box_AP50, box_AP75 and box_AR (100 detections per image); 0 when empty."""
    from pycocotools.cocoeval import COCOeval

    if not boxes:  # loadRes cannot take an empty list; no boxes score 0
        return {"box_AP": 0.0, "box_AP50": 0.0, "box_AP75": 0.0, "box_AR": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(boxes)), "bbox")
        evaluator.params.catIds = [PERSON_CATEGORY_ID]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    names = {"box_AP": 0, "box_AP50": 1, "box_AP75": 2, "box_AR": 8}
    return {name: float(stats[i]) for name, i in names.items()}


def check_submission(
    results: list[dict],
    images: dict[int, tuple[int, int]],
    accounted: dict[str, int],
    source: str,
) -> None:
    """Refuse a results file that is not a complete, valid submission; EvalError naming `source`,
    the entry and the field.

    `images` maps every image id of the image list to its (width, height); `accounted` counts the
    images that rightly have no pose (no_person, no_boxes, and each skip reason): with the images
    that have poses they must add up to the whole list. Each entry: an image of the list,
    category 1, 51 finite keypoint values in image coordinates (within the image grown by its own
    size on each side: a crop may reach past the border, crop or heatmap coordinates would not
    fit every image), a finite score; and pycocotools' loadRes must accept the file.
    """
    clean = validate_results(results, set(images), source)
    for i, r in enumerate(clean):
        width, height = images[r["image_id"]]
        xy = np.asarray(r["keypoints"], np.float64).reshape(NUM_JOINTS, 3)[:, :2]
        out = (xy < [-width, -height]) | (xy > [2 * width, 2 * height])
        if out.any():
            j = int(np.flatnonzero(out.any(1))[0])
            raise EvalError(
                f"{source}: [{i}].keypoints: joint {j} at ({xy[j, 0]:.1f}, {xy[j, 1]:.1f}) is far "
                f"outside image {r['image_id']} ({width}x{height}): not image coordinates?"
            )
    posed = {r["image_id"] for r in clean}
    if len(posed) + sum(accounted.values()) != len(images):
        missing = sorted(set(images) - posed)[:10]
        raise EvalError(
            f"{source}: {len(images)} images in the list, {len(posed)} with poses and "
            f"{sum(accounted.values())} accounted for ({accounted}): images unaccounted for "
            f"among those without poses: {missing}"
        )
    if clean:
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = {
            "images": [{"id": i, "width": w, "height": h} for i, (w, h) in images.items()],
            "annotations": [],
            "categories": [{"id": PERSON_CATEGORY_ID, "name": "person"}],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
            try:
                coco.loadRes(copy.deepcopy(clean))
            except Exception as e:  # pycocotools raises AssertionError / KeyError / ...
                raise EvalError(f"{source}: pycocotools loadRes refuses it: {e!r}") from e
