"""The steps of one `psm serve` request, as plain functions (no Ray Serve: jobs/serve.py holds the
deployments that call them): the body -> the image and any boxes -> person crops -> poses ->
the JSON persons. The recipe is `psm infer`'s, step for step: the guarded decoder, the
detector's boxes (`pipelines.detect.detect_people`), `box_row` + `eval_batch` crops,
`predict_poses` (flip test, decode), rescoring and OKS-NMS; so an image gives the poses
`psm infer` writes for it.

Bad input raises `RequestError` with the HTTP status to answer: the service turns it into a 4xx
JSON error, and the replica goes on.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.augment import rows_to_columns
from pipelines.detect import box_row
from pipelines.eval_crops import eval_batch
from pipelines.images import ImageError, decode_image_bytes
from psm_model.coco_eval import kept_poses
from psm_model.errors import PsmError
from psm_model.geometry import PIXEL_STD, box_problem
from psm_model.recipe import CropSpec, Rescoring

IMAGE_FIELD, BOXES_FIELD = "image", "boxes"  # the multipart fields (and the query parameter)


class RequestError(PsmError, ValueError):
    """A request the service refuses: `status` is the HTTP status (4xx) to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PoseRequest:
    """What a request asks: the image's bytes and, optionally, the person boxes to pose (COCO
    x, y, w, h in image pixels, with a score each) instead of the detector's."""

    image: bytes
    boxes: np.ndarray | None = None  # (N, 4) float64
    scores: np.ndarray | None = None  # (N,) float64


def parse_request(content_type: str, body: bytes, query_boxes: str | None) -> PoseRequest:
    """The body is the image itself (any content type but multipart), or multipart/form-data
    with an `image` file and an optional `boxes` field; boxes may also come as the `boxes` query
    parameter. Boxes are JSON: [[x, y, w, h], ...] or [[x, y, w, h, score], ...]."""
    boxes_text = query_boxes
    if content_type.lower().startswith("multipart/"):
        parts = _multipart(content_type, body)
        if IMAGE_FIELD not in parts:
            raise RequestError(
                f"multipart body without an {IMAGE_FIELD!r} field (found: "
                f"{', '.join(sorted(parts)) or 'none'})"
            )
        body = parts[IMAGE_FIELD]
        if BOXES_FIELD in parts:
            boxes_text = parts[BOXES_FIELD].decode("utf-8", "replace")
    if not body:
        raise RequestError("empty body: send a JPEG or PNG image (or multipart with 'image')")
    if boxes_text is None or not boxes_text.strip():
        return PoseRequest(body)
    boxes, scores = parse_boxes(boxes_text)
    return PoseRequest(body, boxes, scores)


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """The named parts of a multipart/form-data body (the stdlib's MIME parser: the body's size
    is already bounded by serve.max_body_bytes)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise RequestError("multipart body that cannot be parsed (boundary missing or wrong)")
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[str(name)] = part.get_payload(decode=True) or b""
    return parts


def parse_boxes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """JSON boxes -> (N, 4) x, y, w, h and (N,) scores (1 where not given); 422 when malformed."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise RequestError(f"boxes: not JSON: {e}", 422) from None
    if not isinstance(value, list):
        raise RequestError("boxes: expected a list of [x, y, w, h] or [x, y, w, h, score]", 422)
    boxes, scores = np.zeros((len(value), 4)), np.ones(len(value))
    for i, box in enumerate(value):
        numbers = isinstance(box, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box
        )
        if not numbers or len(box) not in (4, 5) or not all(math.isfinite(v) for v in box):
            raise RequestError(
                f"boxes[{i}]: expected [x, y, w, h] or [x, y, w, h, score] of finite numbers, "
                f"got {json.dumps(box)[:100]}",
                422,
            )
        boxes[i] = box[:4]
        scores[i] = box[4] if len(box) == 5 else 1.0
    return boxes, scores


def check_boxes(boxes: np.ndarray, scores: np.ndarray, width: int, height: int, most: int) -> None:
    """Boxes a request gives must lie in its image (width x height), be croppable, score in
    [0, 1], and be at most `most`; else 422 naming the box."""
    if len(boxes) > most:
        raise RequestError(f"boxes: {len(boxes)} given, at most {most} (serve.max_boxes)", 422)
    for i, ((x, y, w, h), score) in enumerate(zip(boxes, scores, strict=True)):
        problem = box_problem((x, y, w, h))
        if not problem and (x < 0 or y < 0 or x + w > width or y + h > height):
            problem = f"outside the image of {width}x{height} pixels"
        if not problem and not 0.0 <= score <= 1.0:
            problem = f"score {score} not in [0, 1]"
        if problem:
            box = [round(float(v), 2) for v in (x, y, w, h)]
            raise RequestError(f"boxes[{i}] {box}: {problem}", 422)


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """The guarded decoder on a request body: RGB pixels, or 413 (more pixels than
    data.max_image_pixels) / 400 (not a JPEG or PNG, truncated, corrupt, empty)."""
    try:
        return decode_image_bytes(data, max_pixels, "image")
    except ImageError as e:
        raise RequestError(str(e), 413 if e.reason == "too_large" else 400) from None


def crop_persons(
    image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, crop: CropSpec
) -> dict[str, np.ndarray]:
    """One image's person crops, exactly as `psm infer` cuts them (`box_row`, then `eval_batch`
    on the decoded image): the sample columns (pipelines.augment.SAMPLE_COLUMNS)."""
    row = box_row(0, "request", boxes, scores, crop)
    return eval_batch(
        rows_to_columns([row]),
        input_size=crop.input_size,
        max_pixels=crop.max_pixels,
        decoded=[image],
    )


def stack_crops(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The crops of several requests as one batch (the pose deployment's `@serve.batch`)."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def split_poses(poses: Mapping[str, np.ndarray], counts: Sequence[int]) -> list[dict]:
    """`stack_crops`' inverse on the pose columns: one dict per request, `counts` rows each."""
    ends = np.cumsum(counts)[:-1]
    pieces = {k: np.split(v, ends) for k, v in poses.items()}
    return [{k: pieces[k][i] for k in pieces} for i in range(len(counts))]


def persons(
    boxes: np.ndarray,
    crops: Mapping[str, np.ndarray],
    poses: Mapping[str, np.ndarray],
    rescoring: Rescoring,
) -> list[dict]:
    """One image's poses (POSE_COLUMNS rows of its crops, in box order) -> the response's persons:
    rescored and OKS-NMS'd as `psm infer`'s results, best first, each with its box."""
    if not len(boxes):
        return []
    areas = np.prod(crops["scale"] * PIXEL_STD, axis=1)
    keep, scores = kept_poses(
        np.zeros(len(boxes), np.int64),
        poses["coords"],
        poses["maxvals"],
        crops["score"],
        areas,
        rescoring.keypoint_score_threshold,
        rescoring.oks_nms_threshold,
    )
    out = []
    for i, score in sorted(zip(keep, scores, strict=True), key=lambda p: -p[1]):
        keypoints = np.concatenate([poses["coords"][i], poses["maxvals"][i].reshape(-1, 1)], 1)
        keypoints[:, 2] = np.nan_to_num(keypoints[:, 2], nan=0.0)
        out.append(
            {
                "box": [round(float(v), 2) for v in boxes[i]],
                "box_score": round(float(crops["score"][i]), 5),
                "score": float(score),
                "keypoints": keypoints.tolist(),
            }
        )
    return out
