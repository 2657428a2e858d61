"""A person "detector" whose boxes are a known function of the image, exported to ONNX in either
output layout `pipelines.detect` reads: the box around the pixels that differ from a plain
background. A test double, with the benchmarks: for tests, `psm bench infer`/`serve` and trying
the detector stage without a real model (none can be downloaded here); a real detector is
exported from mmdeploy / rtmlib / ultralytics (README).

Besides the true box it emits decoys that the job's post-processing must remove: a copy shifted by
`shift` pixels at a lower score (NMS at the configured IoU), a box at score 0.05 (the score
threshold) and, in the raw layout, a box of class 1 (not a person).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

TRUE_SCORE, SHIFTED_SCORE, LOW_SCORE = 0.9, 0.8, 0.05


class BoxFromPixels(torch.nn.Module):
    """(1, 3, H, W) model input -> the box (x1, y1, x2, y2) around the pixels whose mean absolute
    difference from `background` exceeds `threshold` (all in model input units), in the end2end
    (dets, labels) or raw (1, 4 + 2 classes, anchors) layout."""

    def __init__(self, layout: str, background: float, threshold: float, shift: float) -> None:
        super().__init__()
        self.layout, self.background, self.threshold, self.shift = (
            layout,
            background,
            threshold,
            shift,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = (x[0] - self.background).abs().mean(0) > self.threshold  # (H, W)
        h, w = mask.shape
        rows, cols = mask.any(1), mask.any(0)
        ys = torch.arange(h, dtype=torch.float32)
        xs = torch.arange(w, dtype=torch.float32)
        y1 = torch.where(rows, ys, torch.full_like(ys, h)).min()
        y2 = torch.where(rows, ys, torch.full_like(ys, -1)).max() + 1  # pixel edges, exclusive
        x1 = torch.where(cols, xs, torch.full_like(xs, w)).min()
        x2 = torch.where(cols, xs, torch.full_like(xs, -1)).max() + 1
        found = rows.any().float()  # no foreground: every score 0
        box = torch.stack([x1, y1, x2, y2]) * found
        shifted = box + self.shift
        low = box * 0.5
        scores = torch.stack([found * TRUE_SCORE, found * SHIFTED_SCORE, found * LOW_SCORE])
        boxes = torch.stack([box, shifted, low])  # (3, 4)
        if self.layout == "end2end":
            dets = torch.cat([boxes, scores[:, None]], 1)[None]  # (1, 3, 5)
            labels = torch.zeros(1, 3, dtype=torch.int64)
            return dets, labels
        # raw: cx, cy, w, h + scores of classes 0 (person) and 1; a 4th anchor is class 1 only
        all_boxes = torch.cat([boxes, box[None]], 0)  # (4, 4)
        cxcywh = torch.stack(
            [
                (all_boxes[:, 0] + all_boxes[:, 2]) / 2,
                (all_boxes[:, 1] + all_boxes[:, 3]) / 2,
                all_boxes[:, 2] - all_boxes[:, 0],
                all_boxes[:, 3] - all_boxes[:, 1],
            ],
            1,
        )
        person = torch.cat([scores, torch.zeros(1)])
        other = torch.cat([torch.zeros(3), found[None] * 0.95])
        return torch.cat([cxcywh, person[:, None], other[:, None]], 1).T[None]  # (1, 6, 4)


def export_toy_detector(
    layout: str,
    input_size: tuple[int, int],
    background: float = 20.0,
    threshold: float = 30.0,
    shift: float = 2.0,
) -> bytes:
    """ONNX bytes of `BoxFromPixels` for a (1, 3, H, W) input. `background` and `threshold` are
    in 0-255 pixel levels; the raw layout's model reads RGB / 255 as ultralytics exports do."""
    unit = 1.0 if layout == "end2end" else 1 / 255
    model = BoxFromPixels(layout, background * unit, threshold * unit, shift).eval()
    names = ["dets", "labels"] if layout == "end2end" else ["output0"]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, *input_size),),
            buffer,
            input_names=["input" if layout == "end2end" else "images"],
            output_names=names,
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def plain_image(
    size_hw: tuple[int, int], box_xyxy: tuple[int, int, int, int] | None, background: int = 20
) -> np.ndarray:
    """An RGB image of `background` with a bright figure filling the integer box (exclusive end),
    an ellipse and a bar inside it so that its bounding box is the box exactly."""
    image = np.full((*size_hw, 3), background, np.uint8)
    if box_xyxy is not None:
        x1, y1, x2, y2 = box_xyxy
        image[y1:y2, (x1 + x2) // 2 - 1 : (x1 + x2) // 2 + 1] = (200, 180, 160)  # full height
        image[(y1 + y2) // 2 - 1 : (y1 + y2) // 2 + 1, x1:x2] = (160, 200, 180)  # full width
        yy, xx = np.mgrid[y1:y2, x1:x2]
        cy, cx, ry, rx = (y1 + y2 - 1) / 2, (x1 + x2 - 1) / 2, (y2 - y1) / 2, (x2 - x1) / 2
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[yy[inside], xx[inside]] = (220, 120, 90)
    return image


def write_plain_people(
    root, images: int, seed: int = 0, size_hw: tuple[int, int] = (120, 160)
) -> list[tuple[int, int, int, int] | None]:
    """A COCO root of `images` PNG images, each one figure (`plain_image`) on a plain background,
    the last one empty: root/images/*.png and root/annotations.json (boxes = the figures, 17
    keypoints inside each). Returns each image's box (x1, y1, x2, y2), None for the empty one."""
    import json
    from pathlib import Path

    import cv2

    from pipelines.synthetic import PERSON_CATEGORY
    from psm_model.files import write_atomic

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    h, w = size_hw
    entries, anns, boxes = [], [], []
    for i in range(images):
        box = None
        if i < images - 1:
            bw, bh = int(rng.integers(20, w // 2)), int(rng.integers(40, h - 10))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            box = (x1, y1, x1 + bw, y1 + bh)
            kpts = np.column_stack(
                [rng.uniform(x1, x1 + bw, 17), rng.uniform(y1, y1 + bh, 17), np.full(17, 2)]
            )
            anns.append(
                {
                    "id": i + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x1, y1, bw, bh],
                    "area": float(bw * bh),
                    "num_keypoints": 17,
                    "keypoints": kpts.round(2).reshape(-1).tolist(),
                }
            )
        name = f"{i + 1:06d}.png"
        cv2.imwrite(str(root / "images" / name), plain_image(size_hw, box)[..., ::-1])
        entries.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        boxes.append(box)
    data = {"images": entries, "annotations": anns, "categories": [PERSON_CATEGORY]}
    write_atomic(root / "annotations.json", json.dumps(data))
    return boxes
