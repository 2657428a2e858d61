"""A model on a batch of crops -> poses in image pixels, in process and on Ray Data actor pools.

`predict_poses` is the one function every evaluation calls on each batch of crops: in process
(`pipelines.validate.evaluate_model`, validation inside training; Serve's pose replica) and on
Ray Data actors (`PosePredictor`). Heatmaps never leave it: a pose row is 17 x 3 numbers plus
ids, centre, scale and box score, where one person's stride-2 heatmaps at 384x288 are 1.9 MB.

The graphs that run it on actors: `pose_predictions` (crops of given boxes -> poses: `psm eval`,
`psm infer` from a file or the annotations) and `detected_pose_predictions` (image rows ->
detector actors -> pose actors: `psm infer` with infer.boxes=detector).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import ray
import torch

from pipelines.actors import OnnxPoseModel, keep_freed_memory, model_actors
from pipelines.datasets import image_dataset
from pipelines.detect import Detector
from pipelines.eval_crops import eval_crops
from psm_model.config import ModelConfig
from psm_model.config_inference import DetectorConfig, PoseRuntime
from psm_model.export import export_onnx
from psm_model.hrnet import build_model, normalize_images
from psm_model.recipe import EvalRecipe, PoseActors
from psm_model.weights import load_strict

log = logging.getLogger(__name__)

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
    model: torch.nn.Module | OnnxPoseModel, images: np.ndarray, recipe: EvalRecipe, device
) -> torch.Tensor:
    """uint8 crops (B, H, W, 3) -> heatmaps (B, J, h, w), flip-averaged with the flip test."""
    x = normalize_images(torch.from_numpy(images).to(device), recipe.channels_last)
    heatmaps = model(x).float()
    if recipe.flip_test:
        heatmaps = recipe.codec.flip_average(heatmaps, model(x.flip(-1)).float())
    return heatmaps


def predict_poses(
    model: torch.nn.Module | OnnxPoseModel,
    batch: dict[str, np.ndarray],
    recipe: EvalRecipe,
    device,
) -> dict[str, np.ndarray]:
    """A numpy batch of eval crops (pipelines.augment.SAMPLE_COLUMNS) -> its poses (POSE_COLUMNS).

    Flip test, decode ("quarter" or "dark") and the map back to the image. Skip rows (an
    image that gave no crop) stay, with zero poses, so the caller can count them; the model
    never sees them.
    """
    keep = batch["skip"] == ""
    n, joints = len(keep), recipe.model.num_joints
    coords = np.zeros((n, joints, 2), np.float64)
    maxvals = np.zeros((n, joints, 1), np.float32)
    if keep.any():
        heatmaps = predict(model, batch["image"][keep], recipe, device)
        coords[keep], maxvals[keep] = recipe.codec.decode(
            heatmaps, batch["center"][keep], batch["scale"][keep], recipe.decode
        )
    passed = {k: batch[k] for k in (*_PASSED_THROUGH, *_OPTIONAL) if k in batch}
    return {**passed, "coords": coords, "maxvals": maxvals}


def pose_model(
    network: ModelConfig,
    state: dict[str, torch.Tensor] | bytes,
    runtime: PoseRuntime = "torch",
    cpus: float = 1.0,
) -> tuple[torch.nn.Module | OnnxPoseModel, str]:
    """The pose model of `network` ready for `predict_poses`, and its device: `state` is a CPU
    state_dict (runtime "torch") or the model's ONNX bytes (runtime "onnxruntime", on as many
    threads as the process reserved `cpus`). A process that reserved a GPU sees it (Ray sets
    CUDA_VISIBLE_DEVICES) and runs the model there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if runtime == "onnxruntime":
        return OnnxPoseModel(state, "pose model (ONNX)", max(1, int(cpus))), device
    model = build_model(network)
    load_strict(model, state, "predictor weights")
    return model.to(device).eval(), device


class PosePredictor:
    """Ray Data callable class (see `pose_predictions`): builds the model once
    per actor, then maps batches of crops to poses with `predict_poses`.

    `weights` is an object ref of a CPU state_dict for `recipe.model` (runtime "torch") or of the
    model's ONNX bytes (runtime "onnxruntime", psm_model.export): unlike a file path, it reaches
    actors on every node without shared storage.
    """

    def __init__(self, recipe: EvalRecipe, actors: PoseActors, weights) -> None:
        state = ray.get(weights)  # Ray call: Ray Data passes constructor kwargs unresolved
        keep_freed_memory()  # no page faults for each batch's activations
        self.recipe = recipe
        self.model, self.device = pose_model(
            recipe.model, state, actors.runtime, actors.cpus_per_worker
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict_poses(self.model, batch, self.recipe, self.device)


def pose_predictions(
    rows: Sequence[dict],
    recipe: EvalRecipe,
    actors: PoseActors,
    weights: dict[str, torch.Tensor],
) -> ray.data.Dataset:
    """`eval_crops` -> poses (pipelines.predict.POSE_COLUMNS) on a pool of `actors.workers`
    `PosePredictor` actors, each holding the model with these (CPU) weights for `recipe.model`,
    run by `actors.runtime` (onnxruntime: exported here once, the ONNX bytes shipped to them).

    Each actor reserves one GPU when the cluster has any, and eval.cpus_per_worker CPUs; the crop
    tasks reserve data.cpus_per_task besides. Except where both steps ask for the same resources (no
    GPU and data.cpus_per_task == eval.cpus_per_worker): then Ray fuses the crop step into the
    actors, which decode and crop their own batches (fusion follows equal resource requests,
    ray-project/ray#54433).
    """
    total = ray.cluster_resources()  # Ray call
    gpus = 1 if total.get("GPU", 0) > 0 else 0
    fused = not gpus and actors.crop_cpus == actors.cpus_per_worker
    need = {"GPU": actors.workers * gpus}
    need["CPU"] = actors.workers * actors.cpus_per_worker + (0 if fused else actors.crop_cpus)
    _warn_short(
        need,
        total,
        f"eval.workers={actors.workers} actors (eval.cpus_per_worker="
        f"{actors.cpus_per_worker}) and a crop task (data.cpus_per_task="
        f"{actors.crop_cpus})",
    )
    crops = eval_crops(rows, recipe.crop, actors.crop_cpus)
    return pose_actors(crops, recipe, actors, weights, gpus)


def _warn_short(need: dict[str, float], total: dict[str, float], what: str) -> None:
    short = {k: (v, total.get(k, 0)) for k, v in need.items() if v > total.get(k, 0)}
    if short:  # a fixed actor pool that cannot start waits silently (an autoscaler may add nodes)
        log.warning("%s need more than the cluster has now (need, have): %s", what, short)


def pose_actors(
    crops: ray.data.Dataset,
    recipe: EvalRecipe,
    actors: PoseActors,
    weights: dict[str, torch.Tensor],
    gpus: int,
) -> ray.data.Dataset:
    model = weights
    if actors.runtime == "onnxruntime":
        model = onnx_pose_model(recipe.model, weights)
    # Ray calls: the weights go to the object store once, and each actor fetches them from there
    return crops.map_batches(
        PosePredictor,
        fn_constructor_kwargs={"recipe": recipe, "actors": actors, "weights": ray.put(model)},
        batch_size=recipe.batch_size,
        batch_format="numpy",
        compute=model_actors(actors.workers),
        num_cpus=actors.cpus_per_worker,
        num_gpus=gpus,
    )


def detected_pose_predictions(
    rows: Sequence[dict],
    recipe: EvalRecipe,
    actors: PoseActors,
    weights: dict[str, torch.Tensor],
    det: DetectorConfig,
    detector: bytes,
) -> ray.data.Dataset:
    """Image rows (image_id, path) -> person crops on `det.workers` `Detector` actors (decode,
    detect, crop: one decode per image) -> poses on the pose actors, one streaming graph: the two
    actor pools are separate, so detection and pose overlap.

    `detector` is the .onnx bytes of `det.model` (object store, as the pose weights). Every image
    gives at least one row (a "no_person" or decode skip row), with its box count, so the driver
    knows when an image is complete.
    """
    total = ray.cluster_resources()  # Ray call
    gpus = 1 if total.get("GPU", 0) > 0 else 0
    need = {"GPU": (actors.workers + det.workers) * gpus}
    need["CPU"] = actors.workers * actors.cpus_per_worker + det.workers * det.cpus_per_worker
    _warn_short(
        need,
        total,
        f"eval.workers={actors.workers} pose actors (eval.cpus_per_worker="
        f"{actors.cpus_per_worker}) and infer.detector.workers={det.workers} detector actors "
        f"(infer.detector.cpus_per_worker={det.cpus_per_worker})",
    )
    # Ray calls: blocks of detector.batch_images image rows through the detector actors
    crops = image_dataset(rows, None, det.batch_images).map_batches(
        Detector,
        fn_constructor_kwargs={"crop": recipe.crop, "det": det, "model": ray.put(detector)},
        batch_size=det.batch_images,
        batch_format="numpy",
        compute=model_actors(det.workers),
        num_cpus=det.cpus_per_worker,
        num_gpus=gpus,
    )
    return pose_actors(crops, recipe, actors, weights, gpus)


def onnx_pose_model(network: ModelConfig, weights: dict[str, torch.Tensor]) -> bytes:
    """The ONNX bytes of `network` with these weights (psm_model.export)."""
    model = build_model(network)
    load_strict(model, weights, "pose weights")
    return export_onnx(model, network.input_size)
