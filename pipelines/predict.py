"""A model on a batch of crops -> poses in image pixels: the per-batch step of every evaluation.

`predict_poses` is the one function both evaluation paths call on each batch of crops: in process
(`pipelines.evaluate.evaluate_model`, validation inside training) and on Ray Data actors
(`PosePredictor`, `psm eval --checkpoint`). Heatmaps never leave it: a pose row is 17 x 3 numbers
plus ids, centre, scale and box score, where one person's stride-2 heatmaps at 384x288 are 1.9 MB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.malloc import keep_freed_memory
from psm_model.codec import HeatmapCodec
from psm_model.config import Config, PoseRuntime
from psm_model.hrnet import build_model, normalize_images
from psm_model.weights import load_strict

if TYPE_CHECKING:
    from pipelines.onnx_runtime import OnnxPoseModel

# The one place that names the pose columns (per-row shapes / dtypes): what predict_poses returns.
POSE_COLUMNS = {
    "image_id": "int64",
    "ann_id": "int64 (annotation id, or the detection's index in its image)",
    "center": "float32 (2,) crop centre in image pixels",
    "scale": "float32 (2,) crop size / 200 (pixel_std), padding included",
    "score": "float32 box score (1 for ground-truth boxes)",
    "skip": "str: '' for a pose, else why this image gave none (its coords/maxvals are 0)",
    "coords": "float64 (17, 2) decoded keypoints x, y in image pixels",
    "maxvals": "float32 (17, 1) heatmap maxima (keypoint confidences)",
    # only behind the detector stage of `psm infer` (pipelines.detect.detect_and_crop):
    "box": "float32 (4,) the detector's box, COCO x, y, w, h (optional)",
    "image_boxes": "int64 boxes the detector found in this row's image (optional)",
}
_PASSED_THROUGH = ("image_id", "ann_id", "center", "scale", "score", "skip")
_OPTIONAL = ("box", "image_boxes")


@torch.no_grad()
def predict(
    model: torch.nn.Module | OnnxPoseModel,
    images: np.ndarray,
    cfg: Config,
    device,
    codec: HeatmapCodec | None = None,
) -> torch.Tensor:
    """uint8 crops (B, H, W, 3) -> heatmaps (B, J, h, w), flip-averaged when eval.flip_test."""
    x = normalize_images(torch.from_numpy(images).to(device), cfg.data.channels_last)
    heatmaps = model(x).float()
    if cfg.eval.flip_test:
        codec = codec or HeatmapCodec.from_config(cfg)
        heatmaps = codec.flip_average(heatmaps, model(x.flip(-1)).float())
    return heatmaps


def predict_poses(
    model: torch.nn.Module | OnnxPoseModel,
    batch: dict[str, np.ndarray],
    cfg: Config,
    device,
    codec: HeatmapCodec | None = None,
) -> dict[str, np.ndarray]:
    """A numpy batch of eval crops (pipelines.augment.SAMPLE_COLUMNS) -> its poses (POSE_COLUMNS).

    Flip test, eval.decode ("quarter" or "dark") and the map back to the image. Skip rows (an
    image that gave no crop) stay, with zero poses, so the caller can count them; the model
    never sees them. `codec`: the caller's, built once (else built here, once per batch).
    """
    keep = batch["skip"] == ""
    n, joints = len(keep), cfg.model.num_joints
    coords = np.zeros((n, joints, 2), np.float64)
    maxvals = np.zeros((n, joints, 1), np.float32)
    if keep.any():
        codec = codec or HeatmapCodec.from_config(cfg)
        heatmaps = predict(model, batch["image"][keep], cfg, device, codec)
        coords[keep], maxvals[keep] = codec.decode(
            heatmaps, batch["center"][keep], batch["scale"][keep], cfg.eval.decode
        )
    passed = {k: batch[k] for k in (*_PASSED_THROUGH, *_OPTIONAL) if k in batch}
    return {**passed, "coords": coords, "maxvals": maxvals}


def pose_model(
    cfg: Config, state: dict[str, torch.Tensor] | bytes, runtime: PoseRuntime = "torch"
) -> tuple[torch.nn.Module | OnnxPoseModel, str]:
    """The pose model of `cfg.model` ready for `predict_poses`, and its device: `state` is a CPU
    state_dict (runtime "torch") or the model's ONNX bytes (runtime "onnxruntime"). A process
    that reserved a GPU sees it (Ray sets CUDA_VISIBLE_DEVICES) and runs the model there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if runtime == "onnxruntime":
        from pipelines.onnx_runtime import OnnxPoseModel

        threads = max(1, int(cfg.eval.cpus_per_worker))
        return OnnxPoseModel(state, "pose model (ONNX)", threads), device
    model = build_model(cfg.model)
    load_strict(model, state, "predictor weights")
    return model.to(device).eval(), device


class PosePredictor:
    """Ray Data callable class (see `pipelines.datasets.pose_predictions`): builds the model once
    per actor, then maps batches of crops to poses with `predict_poses`.

    `weights` is an object ref of a CPU state_dict for `cfg.model` (runtime "torch") or of the
    model's ONNX bytes (runtime "onnxruntime", psm_model.export): unlike a file path, it reaches
    actors on every node without shared storage.
    """

    def __init__(self, cfg: Config, weights, runtime: PoseRuntime = "torch") -> None:
        import ray

        state = ray.get(weights)  # Ray call: Ray Data passes constructor kwargs unresolved
        keep_freed_memory()  # no page faults for each batch's activations
        self.cfg = cfg
        self.codec = HeatmapCodec.from_config(cfg)
        self.model, self.device = pose_model(cfg, state, runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict_poses(self.model, batch, self.cfg, self.device, self.codec)
