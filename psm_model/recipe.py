"""The few typed values each layer of evaluation and inference needs, read from `Config` once by
the job (or once per actor or replica where the model config comes from a checkpoint) and passed
down, so that the pipelines never read the config tree: one value, one door.

- `CropSpec`: how a person box becomes a model input (the crop tasks, the detector stage, Serve).
- `Rescoring`: how pose rows become results (rescoring, OKS-NMS): also Serve's ingress, which
  so unpickles no codec and imports no torch.
- `EvalRecipe`: the test-time recipe of `psm eval`, validation inside training, `psm infer`,
  the oracle and `psm serve`, its heatmap codec built once.
- `PoseActors`: how many pose actors, what each reserves, and the runtime that runs the model.
- `ValSet`: where the val set and its boxes are (`psm eval`, the oracle, validation).

Nothing here imports torch at module level: the detector actors unpickle a `CropSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from psm_model.config import Config, ModelConfig
from psm_model.config_inference import PoseRuntime

if TYPE_CHECKING:
    from psm_model.codec import HeatmapCodec
    from psm_model.decode import DecodeMethod


@dataclass(frozen=True)
class CropSpec:
    input_size: tuple[int, int]  # model.input_size: (height, width) of the crop
    box_padding: float  # data.box_padding: the box grown to the input aspect, then times this
    max_pixels: int  # data.max_image_pixels: the decoder's decompression-bomb guard

    @classmethod
    def of(cls, cfg: Config) -> CropSpec:
        return cls(cfg.model.input_size, cfg.data.box_padding, cfg.data.max_image_pixels)


@dataclass(frozen=True)
class Rescoring:
    keypoint_score_threshold: float  # keypoints above this enter the pose score
    oks_nms_threshold: float

    @classmethod
    def of(cls, cfg: Config) -> Rescoring:
        return cls(cfg.eval.keypoint_score_threshold, cfg.eval.oks_nms_threshold)


@dataclass(frozen=True)
class EvalRecipe:
    model: ModelConfig  # the network (a checkpoint's own, where the job read one)
    crop: CropSpec
    codec: HeatmapCodec
    flip_test: bool
    decode: DecodeMethod
    channels_last: bool  # data.channels_last: the batches' memory format
    rescoring: Rescoring
    box_score_threshold: float  # detections below this are not posed
    batch_size: int  # crops per model call (eval.batch_size)

    @classmethod
    def of(cls, cfg: Config) -> EvalRecipe:
        from psm_model.codec import HeatmapCodec  # torch: not for the detector actors

        e = cfg.eval
        return cls(
            model=cfg.model,
            crop=CropSpec.of(cfg),
            codec=HeatmapCodec.from_config(cfg),
            flip_test=e.flip_test,
            decode=e.decode,
            channels_last=cfg.data.channels_last,
            rescoring=Rescoring.of(cfg),
            box_score_threshold=e.box_score_threshold,
            batch_size=e.batch_size,
        )


@dataclass(frozen=True)
class PoseActors:
    workers: int  # eval.workers: the actor pool's size
    cpus_per_worker: float  # eval.cpus_per_worker: each actor's (and its ONNX Runtime threads)
    crop_cpus: float  # data.cpus_per_task: each crop task's
    runtime: PoseRuntime  # eval.pose_runtime for `psm eval`, infer.pose_runtime for the others

    @classmethod
    def of(cls, cfg: Config, runtime: PoseRuntime) -> PoseActors:
        e = cfg.eval
        return cls(e.workers, e.cpus_per_worker, cfg.data.cpus_per_task, runtime)


@dataclass(frozen=True)
class ValSet:
    root: str  # data.root: a folder or a URI (s3://...)
    images: str  # data.val_images, under root unless absolute or a URI
    annotations: str  # data.val_annotations, as images
    detections: str  # eval.detections: a detector's boxes; empty: the ground-truth boxes
    chunk_images: int  # data.chunk_images: images per Ray Data chunk (in-process evaluation)
    visualize: int  # eval.visualize: val images drawn with their poses

    @classmethod
    def of(cls, cfg: Config) -> ValSet:
        d = cfg.data
        return cls(
            d.root,
            d.val_images,
            d.val_annotations,
            cfg.eval.detections,
            d.chunk_images,
            cfg.eval.visualize,
        )
