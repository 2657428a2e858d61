"""The config sections of a trained model's use: `eval` (the test recipe: `psm eval` and the
validation inside training), `infer` (`psm infer`, its `detector`) and `serve` (`psm serve`, a
`ReplicaConfig` per model). No training sample reads them; `psm_model.config.Config` holds them
beside the training sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from psm_model.config_fields import (
    FREE_ON_RESUME,
    at_least,
    finite_floats,
    positive,
    tagged,
    within,
)

# where the pose model runs in `psm eval` / `psm infer`: PyTorch eager, or its ONNX export
# (psm_model.export) on ONNX Runtime
PoseRuntime = Literal["torch", "onnxruntime"]


@dataclass(frozen=True)
class EvalConfig:
    flip_test: bool = True
    decode: Literal["quarter", "dark"] = "quarter"
    keypoint_score_threshold: float = 0.2  # keypoints above this enter the pose score
    oks_nms_threshold: float = 0.9
    box_score_threshold: float = 0.0
    batch_size: int = tagged(32, FREE_ON_RESUME)
    detections: str = ""  # person boxes (COCO results format) for validation; empty: GT boxes
    # val images drawn with predicted poses and logged to MLflow
    visualize: int = tagged(4, FREE_ON_RESUME)
    # `psm eval --checkpoint`: the model runs on this many Ray Data actors (one GPU each on a GPU
    # cluster). Validation inside training runs in its rank-0 worker instead.
    workers: int = tagged(1, FREE_ON_RESUME)
    # CPUs each actor reserves (crop tasks: data.cpus_per_task)
    cpus_per_worker: float = tagged(1.0, FREE_ON_RESUME)
    pose_runtime: PoseRuntime = "torch"  # `psm eval --checkpoint`: the pose model's runtime

    def __post_init__(self) -> None:
        finite_floats(self)
        positive(self, "workers", "cpus_per_worker", "batch_size")
        within(self, 0.0, 1.0, "keypoint_score_threshold", "oks_nms_threshold")
        at_least(self, 0, "box_score_threshold", "visualize")


@dataclass(frozen=True)
class DetectorConfig:
    """`infer.boxes=detector`: a person detector in ONNX format on ONNX Runtime actors
    (pipelines.detect). The output layout is read from the model; `auto` values are the layout's
    exporter defaults: mmdeploy / rtmlib end-to-end YOLOX (BGR, no normalisation, image at the
    top left of the letterbox), ultralytics YOLOv8 / YOLO11 raw (RGB / 255, image centred)."""

    model: str = ""  # the .onnx file: a local path or a pyarrow URI (s3://...)
    input_size: tuple[int, int] = (640, 640)  # (height, width) the model takes
    channel_order: Literal["auto", "rgb", "bgr"] = "auto"
    mean: tuple[float, float, float] | None = None  # in channel_order; None: the layout's default
    std: tuple[float, float, float] | None = None
    letterbox: Literal["auto", "top_left", "center"] = "auto"  # where the resized image sits
    pad_value: float = 114.0  # letterbox padding, as both exporters
    person_class: int = 0  # the person class index (COCO-trained detectors: 0)
    score_threshold: float = 0.1  # low: keypoint AP ranks by score, extra low boxes cost little
    nms_iou: float = 0.65  # class-wise NMS on our side (YOLOX's test setting)
    max_persons: int = 100  # highest-scoring boxes kept per image
    min_box_size: float = 2.0  # boxes narrower or lower than this (image pixels) are dropped
    workers: int = 1  # detector actors (a GPU each where the cluster has GPUs), apart from pose
    cpus_per_worker: float = 1.0
    batch_images: int = 8  # images per actor call (exports take one image per run)

    def __post_init__(self) -> None:
        h, w = self.input_size
        if h <= 0 or w <= 0:
            raise ValueError(f"input_size: must be positive, got {self.input_size}")
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(
                "score_threshold, nms_iou: need 0 <= threshold <= 1 and 0 < iou <= 1, "
                f"got {self.score_threshold}, {self.nms_iou}"
            )
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError(f"std: must not be 0, got {self.std}")
        if self.person_class < 0 or self.max_persons <= 0 or self.min_box_size < 0:
            raise ValueError("person_class, max_persons, min_box_size: out of range")
        if self.workers <= 0 or self.cpus_per_worker <= 0 or self.batch_images <= 0:
            raise ValueError("workers, cpus_per_worker, batch_images: must be positive")


@dataclass(frozen=True)
class InferConfig:
    """`psm infer`: poses for every image of an image list, on the eval.* recipe and actors."""

    images: str = "test2017"  # image folder (under data.root unless absolute)
    # a COCO JSON with an "images" list (the test-dev image info, or an annotation file, whose
    # keypoints then also score the results); under data.root unless absolute
    image_info: str = "annotations/image_info_test-dev2017.json"
    # where the person boxes come from: `file` = infer.detections, `detector` = infer.detector
    # run in the job, `gt` = the boxes of infer.image_info's annotations (val checks)
    boxes: Literal["file", "detector", "gt"] = "file"
    detections: str = ""  # boxes=file: a detector's boxes, COCO results format
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    # the boxes the job used, COCO results format (what boxes=file reads); empty: beside output
    boxes_output: str = ""
    output: str = "results/person_keypoints_test-dev2017_psm_results.json"
    part_images: int = 512  # images per part file: a killed job resumes after its last part
    pose_runtime: PoseRuntime = "torch"  # the pose model's runtime (same poses within 1e-4)

    def __post_init__(self) -> None:
        positive(self, "part_images")


@dataclass(frozen=True)
class ReplicaConfig:
    """One deployment of `psm serve` (the detector, the pose model): its request batching
    (`@serve.batch`: a batch closes at max_batch_size calls or batch_wait_s after its first) and
    its replicas (Serve's autoscaler keeps between min and max, aiming at target_ongoing
    requests each)."""

    max_batch_size: int = 8  # requests (images) per batch; their persons run together
    batch_wait_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing: float = 2.0  # the autoscaler's target of ongoing requests per replica
    # how long the load must stay above / below target before the autoscaler adds / removes a
    # replica (Serve's defaults); a burst shorter than the upscale delay meets min_replicas only
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    max_ongoing: int = 32  # requests a replica takes at once (>= max_batch_size to fill one)
    cpus: float = 1.0  # CPUs each replica reserves (the pose model: a GPU too where there is one)

    def __post_init__(self) -> None:
        finite_floats(self)
        positive(self, "max_batch_size", "max_replicas", "target_ongoing", "max_ongoing")
        at_least(self, 0, "batch_wait_s", "min_replicas", "cpus")
        at_least(self, 0, "upscale_delay_s", "downscale_delay_s")
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas/max_replicas: need min <= max, got {self.min_replicas}, "
                f"{self.max_replicas}"
            )
        if self.max_ongoing < self.max_batch_size:
            raise ValueError(
                f"max_ongoing: {self.max_ongoing} is below max_batch_size {self.max_batch_size}: "
                "a batch could never fill"
            )


@dataclass(frozen=True)
class ServeConfig:
    """`psm serve`: the pose service on Ray Serve (jobs/serve.py). The recipe is `psm infer`'s
    (eval.*, infer.detector.*, infer.pose_runtime); these are the service's own values."""

    host: str = "127.0.0.1"  # where the HTTP proxy listens (0.0.0.0: every interface)
    port: int = 8000
    max_body_bytes: int = 20 << 20  # a larger request is refused (413) before it is read
    max_boxes: int = 100  # person boxes one request may give
    request_timeout_s: float = 30.0  # a request not answered by then gets 503, never hangs
    detector: ReplicaConfig = field(default_factory=ReplicaConfig)
    pose: ReplicaConfig = field(default_factory=ReplicaConfig)
    # the HTTP side (body, decode, crops, OKS-NMS, JSON): light, and it waits on the two models
    ingress_replicas: int = 1
    ingress_cpus: float = 0.0  # 0: no reservation, as Serve's proxy (the two models' fit 2 CPUs)
    ingress_max_ongoing: int = 64  # requests an HTTP replica holds at once; more queue at Serve
    # crops per forward pass of the pose replica, whatever its request batch holds: few shapes
    # keep its memory flat (chunks of eval.batch_size 32 grew it by ~700 MB; docs/benchmarks.md)
    pose_chunk: int = 8

    def __post_init__(self) -> None:
        finite_floats(self)
        positive(self, "max_body_bytes", "max_boxes", "request_timeout_s", "ingress_replicas")
        positive(self, "ingress_max_ongoing", "pose_chunk")
        at_least(self, 0, "ingress_cpus")
        within(self, 1, 65535, "port")
