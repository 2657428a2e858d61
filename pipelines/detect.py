"""The person detector stage of `psm infer` (infer.boxes=detector): an ONNX detector on ONNX
Runtime, letterboxed input, boxes mapped back through the exact inverse of the letterbox.

Two output layouts, read from the model (`read_layout`):
  * "end2end": mmdeploy / rtmlib exports of YOLOX and RTMDet: `dets` (1, N, 5) x1, y1, x2, y2,
    score and `labels` (1, N), NMS already inside the graph (we apply ours as configured too);
  * "raw": ultralytics YOLOv8 / YOLO11: one output (1, 4 + classes, anchors) of cx, cy, w, h and
    per-class scores; score filtering and NMS are ours.
Everything but `Detector` (the Ray Data callable class) is plain numpy a unit test can call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import cv2
import numpy as np

from pipelines.actors import keep_freed_memory
from pipelines.augment import rows_to_columns
from pipelines.coco import DataError
from pipelines.eval_crops import eval_batch
from pipelines.images import ImageError, decode_image
from psm_model.config_inference import DetectorConfig
from psm_model.geometry import box_to_center_scale
from psm_model.recipe import CropSpec

log = logging.getLogger(__name__)

Layout = Literal["end2end", "raw"]

# exporter defaults per layout: (channel order, mean, std, letterbox placement)
DEFAULTS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], str]] = {
    # rtmlib's YOLOX: the cv2 BGR image, 0-255, padded with 114 at the bottom right
    "end2end": ("bgr", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "top_left"),
    # ultralytics LetterBox(center=True), RGB / 255
    "raw": ("rgb", (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), "center"),
}


class DetectorError(DataError):
    """A detector model that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """How an image of (height, width) was put in the model input: x_in = x * sx + pad_x.

    sx, sy are the resized size over the image size per axis (a rounded size makes them differ
    slightly from the one scale factor: the inverse uses what was done, not the factor)."""

    sx: float
    sy: float
    pad_x: int
    pad_y: int
    height: int
    width: int

    def to_image(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(N, 4) x1, y1, x2, y2 in model input pixels -> image pixels, clipped to the image."""
        out = np.empty_like(boxes_xyxy, dtype=np.float64)
        out[:, 0::2] = (boxes_xyxy[:, 0::2] - self.pad_x) / self.sx
        out[:, 1::2] = (boxes_xyxy[:, 1::2] - self.pad_y) / self.sy
        out[:, 0::2] = out[:, 0::2].clip(0, self.width)
        out[:, 1::2] = out[:, 1::2].clip(0, self.height)
        return out


def fit(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """The image resized to fit `size_hw` keeping its aspect: the letterbox's resize, apart so
    that `psm serve`'s HTTP replica sends the detector replica this, not the whole image (a
    480x640 image fitted to 160x160 is 58 KB against 922 KB: a call took 1.2 against 4.8 ms of
    the machine's CPU, docs/benchmarks.md)."""
    h, w = image.shape[:2]
    out_h, out_w = size_hw
    scale = min(out_h / h, out_w / w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def letterbox(
    image: np.ndarray,
    size_hw: tuple[int, int],
    pad_value: float,
    center: bool,
    image_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, Letterbox]:
    """The image fitted to `size_hw` (`fit`; already fitted when `image_hw`, the original's
    height and width, is given) on a `pad_value` canvas (top left, or centred as ultralytics),
    and the map between the original and the canvas."""
    h, w = image_hw or image.shape[:2]
    resized = image if image_hw else fit(image, size_hw)
    new_h, new_w = resized.shape[:2]
    out_h, out_w = size_hw
    pad_x, pad_y = ((out_w - new_w) // 2, (out_h - new_h) // 2) if center else (0, 0)
    canvas = np.full((out_h, out_w, 3), pad_value, np.uint8)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    return canvas, Letterbox(new_w / w, new_h / h, pad_x, pad_y, h, w)


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou: float, keep_max: int) -> np.ndarray:
    """Greedy NMS: indices of the kept boxes, highest score first (at most `keep_max`)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes_xyxy.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep: list[int] = []
    while order.size and len(keep) < keep_max:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.array(keep, np.int64)


def read_layout(inputs: Sequence, outputs: Sequence, source: str) -> Layout:
    """The output layout from ONNX Runtime's input / output descriptions (name, shape); a
    DetectorError naming `source` and what was found otherwise."""
    found = ", ".join(f"{o.name} {list(o.shape)}" for o in outputs)
    what = f"inputs {', '.join(f'{i.name} {list(i.shape)}' for i in inputs)}; outputs {found}"
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise DetectorError(f"{source}: expected one image input (1, 3, H, W); found {what}")
    ranks = sorted(len(o.shape) for o in outputs)
    if len(outputs) == 2 and ranks == [2, 3]:
        dets = next(o for o in outputs if len(o.shape) == 3)
        if dets.shape[-1] == 5:
            return "end2end"
    if len(outputs) == 1 and len(outputs[0].shape) == 3:
        channels = outputs[0].shape[1]
        if isinstance(channels, int) and channels >= 5:
            return "raw"
    raise DetectorError(
        f"{source}: unknown detector output layout ({what}); supported: dets (1, N, 5) + labels "
        "(1, N) (mmdeploy / rtmlib YOLOX, RTMDet) or one (1, 4 + classes, anchors) output "
        "(ultralytics YOLOv8 / YOLO11)"
    )


def decode_outputs(
    outputs: Sequence[np.ndarray], layout: Layout, det: DetectorConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One image's model outputs -> person boxes (N, 4) x1, y1, x2, y2 in model input pixels and
    scores (N,), above the score threshold, after NMS, at most max_persons."""
    if layout == "end2end":
        dets_out, labels = (outputs if outputs[0].ndim == 3 else outputs[::-1])[:2]
        dets, labels = dets_out[0], labels[0]
        person = (labels == det.person_class) & (dets[:, 4] >= det.score_threshold)
        boxes, scores = dets[person, :4].astype(np.float64), dets[person, 4].astype(np.float64)
    else:
        pred = outputs[0][0].T  # (anchors, 4 + classes)
        if det.person_class >= pred.shape[1] - 4:
            raise DetectorError(
                f"detector.person_class {det.person_class}: the model has {pred.shape[1] - 4} "
                "classes"
            )
        scores = pred[:, 4 + det.person_class].astype(np.float64)
        keep = scores >= det.score_threshold
        cx, cy, w, h = pred[keep, :4].astype(np.float64).T
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        scores = scores[keep]
    kept = nms(boxes, scores, det.nms_iou, det.max_persons)
    return boxes[kept].reshape(-1, 4), scores[kept]


def preprocess(
    image_rgb: np.ndarray,
    layout: Layout,
    det: DetectorConfig,
    image_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, Letterbox]:
    """RGB uint8 image (already `fit` when `image_hw` is given) -> the model input (1, 3, H, W)
    float32 and its letterbox."""
    order, mean, std, placement = DEFAULTS[layout]
    order = order if det.channel_order == "auto" else det.channel_order
    placement = placement if det.letterbox == "auto" else det.letterbox
    center = placement == "center"
    canvas, box = letterbox(image_rgb, det.input_size, det.pad_value, center, image_hw)
    if order == "bgr":
        canvas = canvas[..., ::-1]
    x = (canvas.astype(np.float32) - np.float32(det.mean or mean)) / np.float32(det.std or std)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), box


def detect_people(
    session,
    layout: Layout,
    image_rgb: np.ndarray,
    det: DetectorConfig,
    image_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> person boxes (N, 4) COCO x, y, w, h in image pixels (clipped; boxes below
    min_box_size dropped) and their scores. With `image_hw`, `image_rgb` is the image already
    `fit` to det.input_size and `image_hw` the original's size, which the boxes are in."""
    x, box = preprocess(image_rgb, layout, det, image_hw)
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    boxes, scores = decode_outputs(outputs, layout, det)
    xyxy = box.to_image(boxes)
    wh = xyxy[:, 2:] - xyxy[:, :2]
    big = (wh >= det.min_box_size).all(1) & (wh > 0).all(1)
    return np.concatenate([xyxy[big, :2], wh[big]], 1), scores[big]


def load_detector(uri: str) -> tuple[bytes, str]:
    """The detector file's bytes (a local path or a pyarrow URI) and their sha256."""
    from pipelines.uris import filesystem

    if not uri:
        raise DetectorError("infer.detector.model: required with infer.boxes=detector")
    fs, where = filesystem(uri)
    try:
        with fs.open_input_stream(where) as f:
            data = f.read()
    except (FileNotFoundError, OSError) as e:
        raise DetectorError(f"{uri}: infer.detector.model: cannot read: {e}") from e
    return data, hashlib.sha256(data).hexdigest()


def detector_session(model: bytes, source: str, threads: int = 1):
    """An ONNX Runtime session of a detector and its output layout (DetectorError if unknown)."""
    from pipelines.actors import make_session

    try:
        session = make_session(model, source, threads)
    except ValueError as e:
        raise DetectorError(str(e)) from e
    return session, read_layout(session.get_inputs(), session.get_outputs(), source)


def box_row(
    image_id: int, path: str, boxes: np.ndarray, scores: np.ndarray, crop: CropSpec
) -> dict:
    """One image's row for the crops (`pipelines.augment.image_rows`' columns) from person
    boxes (N, 4) COCO x, y, w, h and their scores; `boxes` kept for the boxes file."""
    h, w = crop.input_size
    cs = [box_to_center_scale(b, w / h, crop.box_padding) for b in boxes]
    n = len(boxes)
    return {
        "image_id": image_id,
        "path": path,
        "ann_ids": np.arange(n, dtype=np.int64),
        "keypoints": np.zeros((n, 17, 3), np.float32),
        "centers": np.array([c for c, _ in cs], np.float32).reshape(n, 2),
        "scales": np.array([s for _, s in cs], np.float32).reshape(n, 2),
        "scores": np.asarray(scores, np.float32),
        "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
    }


def detect_and_crop(
    images: Mapping[str, Sequence], session, layout: Layout, crop: CropSpec, det: DetectorConfig
) -> dict[str, np.ndarray]:
    """A batch of image rows (image_id, path) -> the crops of every person the detector finds
    (`pipelines.eval_crops.eval_batch` columns), plus each crop's detector box (`box`, COCO x, y,
    w, h) and its image's box count (`image_boxes`), which tell the driver when an image (and
    so its part) is complete. An image without a person gives a "no_person" skip row, one that
    cannot be decoded a skip row with the reason.

    Each image is decoded once, for the detector and the crops both (docs/benchmarks.md)."""
    rows, decoded = [], []
    for image_id, path in zip(images["image_id"], images["path"], strict=True):
        try:
            image = decode_image(path, crop.max_pixels)
            boxes, scores = detect_people(session, layout, image, det)
        except ImageError as e:
            image, boxes, scores = e, np.zeros((0, 4)), np.zeros(0)
        rows.append(box_row(int(image_id), str(path), boxes, scores, crop))
        decoded.append(image)
    out = eval_batch(
        rows_to_columns(rows),
        input_size=crop.input_size,
        max_pixels=crop.max_pixels,
        no_person_rows=True,
        decoded=decoded,
    )
    posed = out["skip"] == ""
    box = np.zeros((len(posed), 4), np.float32)
    image_boxes = np.zeros(len(posed), np.int64)
    index = {int(r["image_id"]): r for r in rows}
    for i in np.flatnonzero(posed):
        row = index[int(out["image_id"][i])]
        box[i], image_boxes[i] = row["boxes"][out["ann_id"][i]], len(row["boxes"])
    return {**out, "box": box, "image_boxes": image_boxes}


class Detector:
    """Ray Data callable class: the detector session built once per actor (`model` is an object
    ref of `det.model`'s .onnx bytes), then `detect_and_crop` per batch of image rows."""

    def __init__(self, crop: CropSpec, det: DetectorConfig, model) -> None:
        import ray

        data = ray.get(model)  # Ray call: Ray Data passes constructor kwargs unresolved
        keep_freed_memory()  # decoded images and crops: no page faults for each
        cv2.setNumThreads(1)  # the resize threads would fight the session's for the actor's CPUs
        threads = max(1, int(det.cpus_per_worker))
        self.session, self.layout = detector_session(data, det.model, threads)
        self.crop, self.det = crop, det

    def __call__(self, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return detect_and_crop(images, self.session, self.layout, self.crop, self.det)
