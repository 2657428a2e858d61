"""One typed config tree: frozen dataclasses with their range checks, read from YAML with
`section.key=value` overrides by `psm_model.config_yaml`.

Every value has one home here; everything else (branch widths, heatmap size) is derived from it.
Errors name the file and the dotted key, e.g. `configs/x.yaml: model.fusion: 'pms' is not one of
('hrnet', 'psm')`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from psm_model.coco_keypoints import NUM_JOINTS
from psm_model.errors import PsmError

# where the pose model runs in `psm eval` / `psm infer`: PyTorch eager, or its ONNX export
# (psm_model.export) on ONNX Runtime
PoseRuntime = Literal["torch", "onnxruntime"]

# What the jobs ask of a key, said on the field itself (`tagged`, read back by `keys_tagged`):
# FREE_ON_RESUME: changes where or how fast a run trains, or how it reacts to failures, not what
#   it trains: a resumed run may change it freely (jobs/run_folder.py: check_resume_config)
# SWEEP_OWNED: set per trial by the sweep itself: a search space that set it would break resume
#   or the MLflow tree (jobs/sweep_space.py)
FREE_ON_RESUME = "free_on_resume"
SWEEP_OWNED = "sweep_owned"


def tagged(default: Any, *tags: str) -> Any:
    return field(default=default, metadata={tag: True for tag in tags})


def keys_tagged(tag: str) -> frozenset[str]:
    """Every `section.key` whose field carries `tag`."""
    cfg = Config()
    return frozenset(
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
        if f.metadata.get(tag)
    )


class ConfigError(PsmError, ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelConfig:
    width: int = 32  # base width C: branches are C, 2C, 4C, 8C (HRNet-W32, -W48, ...)
    widths: tuple[int, ...] | None = None  # explicit four branch widths; overrides `width`
    fusion: Literal["hrnet", "psm"] = "psm"  # upward fusion: HRNet's upsample or Pixel Shuffle
    heatmap_stride: Literal[2, 4] = 2  # 4 = HRNet's final 1x1 conv, 2 = the PSM head
    input_size: tuple[int, int] = (384, 288)  # (height, width) of the person crop
    num_joints: int = NUM_JOINTS  # the data side reads COCO's 17 person keypoints: only 17 fits
    final_conv_kernel: Literal[1, 3] = 1
    pretrained: str = ""  # ImageNet HRNet classification checkpoint (official key layout)

    def __post_init__(self) -> None:
        if self.num_joints != NUM_JOINTS:
            raise ValueError(
                f"num_joints: {self.num_joints}, but the data (COCO person keypoints) has "
                f"{NUM_JOINTS} joints per person"
            )
        if self.widths is not None and len(self.widths) != 4:
            raise ValueError(f"widths: expected 4 branch widths, got {len(self.widths)}")
        if any(w <= 0 for w in self.branch_widths):
            raise ValueError(f"width(s): must be positive, got {self.branch_widths}")
        h, w = self.input_size
        # four branches down to 1/32, and every fusion must land on the exact shape of its target
        if h <= 0 or w <= 0 or h % 32 or w % 32:
            raise ValueError(f"input_size: {self.input_size} must be positive multiples of 32")

    @property
    def branch_widths(self) -> tuple[int, int, int, int]:
        if self.widths is not None:
            return tuple(self.widths)  # type: ignore[return-value]
        return (self.width, 2 * self.width, 4 * self.width, 8 * self.width)

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(height, width) of the predicted heatmaps."""
        return (
            self.input_size[0] // self.heatmap_stride,
            self.input_size[1] // self.heatmap_stride,
        )


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/synthetic"  # a COCO-style root: image folders + annotations/
    train_images: str = "train2017"
    train_annotations: str = "annotations/person_keypoints_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/person_keypoints_val2017.json"
    sigma: float = 2.0  # Gaussian target std in heatmap pixels (HRNet: 2 at 64x48, 3 at 96x72)
    box_padding: float = 1.25  # person box grown to the input aspect, then times this
    flip: bool = True
    rotation: float = 45.0  # max degrees; applied with rotation_prob
    rotation_prob: float = 0.6  # as HRNet
    scale_min: float = 0.7
    scale_max: float = 1.35
    half_body_prob: float = 0.3  # for persons with more than half_body_min_joints visible joints
    half_body_min_joints: int = 8
    max_image_pixels: int = 89_478_485  # decompression-bomb guard (PIL's default limit)
    # the Ray Data pipeline of training, evaluation and inference alike
    # CPUs each Ray Data decode/augment/crop task reserves
    cpus_per_task: float = tagged(1.0, FREE_ON_RESUME)
    chunk_images: int = 256  # images per materialised Ray Data chunk (next one made ahead)
    channels_last: bool = False  # batches (and the model) in channels-last memory format

    def __post_init__(self) -> None:
        _finite_floats(self)
        _positive(self, "sigma", "box_padding", "max_image_pixels", "cpus_per_task", "chunk_images")
        _at_least(self, 0, "half_body_min_joints")
        _within(self, 0.0, 180.0, "rotation")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"scale_min/scale_max: need 0 < min <= max, got {self.scale_min}, {self.scale_max}"
            )
        _within(self, 0.0, 1.0, "rotation_prob", "half_body_prob")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 210
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    lr_steps: tuple[int, ...] = (170, 200)  # epochs at which lr is multiplied by lr_factor
    lr_factor: float = 0.1
    weight_decay: float = 0.0  # the recipe uses Adam without weight decay
    warmup_epochs: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    ohkm_topk: int = 0  # online hard keypoint mining: keep the k hardest joints; 0 disables
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    # what train.compile compiles (psm_model/compiling.py): "blocks" = each residual block in place
    # (regional compilation: a fraction of the compile time, same state_dict keys), "exchange" =
    # each exchange module in place (fusion sums included), "model" = the whole model
    compile_scope: Literal["model", "blocks", "exchange"] = "blocks"
    # torch.compile's mode: "reduce-overhead" replays CUDA graphs (fewer kernel launches for the
    # many small convolutions of the low-resolution branches); on a CPU it compiles as "default"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    fused_optimizer: bool = False  # Adam's fused kernel: one launch for all parameters
    sync_bn: bool = False
    num_workers: int = 1  # Ray Train workers (one per GPU when use_gpu)
    use_gpu: bool = False
    cpus_per_worker: float = tagged(1.0, FREE_ON_RESUME)  # CPUs each training worker reserves
    images_per_epoch: int = 0  # train images drawn (anew) each epoch; 0 = all (quick sweeps)
    seed: int = 0
    # validate (COCO AP) every K epochs and after the last one; 0 = never
    val_every: int = tagged(10, SWEEP_OWNED)
    # checkpoints: a local folder or a pyarrow URI (s3://...)
    storage_path: str = tagged("runs", SWEEP_OWNED)
    # run name; an existing name resumes that run. Empty: a new timestamped name
    name: str = tagged("", SWEEP_OWNED)
    # the newest ones; the best by val AP is kept besides them
    keep_checkpoints: int = tagged(2, FREE_ON_RESUME)
    # worker failures Ray Train recovers from (restart from checkpoint)
    max_failures: int = tagged(2, FREE_ON_RESUME)
    # empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    mlflow_uri: str = tagged("", FREE_ON_RESUME, SWEEP_OWNED)
    experiment: str = tagged("psm-pose", SWEEP_OWNED)
    # MLflow model registry name of the final model
    registered_model: str = tagged("psm_model", FREE_ON_RESUME, SWEEP_OWNED)
    # a NaN or infinite loss: "stop" fails the run naming epoch and step (its checkpoints stay
    # good), "skip" drops that step's update, up to max_skipped_steps in the whole run
    nonfinite_loss: Literal["stop", "skip"] = tagged("stop", FREE_ON_RESUME)
    max_skipped_steps: int = tagged(10, FREE_ON_RESUME)
    # keys (section.key) a resumed run may change from the config it was started with, besides
    # the FREE_ON_RESUME ones; any other difference is refused, naming the keys
    # (jobs/run_folder.py)
    resume_changes: tuple[str, ...] = tagged((), FREE_ON_RESUME)

    def __post_init__(self) -> None:
        _finite_floats(self)
        _positive(self, "epochs", "batch_size", "num_workers", "cpus_per_worker")
        _positive(self, "lr", "lr_factor", "keep_checkpoints")
        _at_least(self, 0, "weight_decay", "warmup_epochs", "grad_clip", "ohkm_topk", "seed")
        _at_least(self, 0, "images_per_epoch", "val_every", "max_skipped_steps")
        _at_least(self, -1, "max_failures")  # -1: Ray Train retries without limit
        if any(s < 0 for s in self.lr_steps):
            raise ValueError(f"lr_steps: epochs must be >= 0, got {self.lr_steps}")
        if self.name:
            check_run_name(self.name, "name")


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
        _finite_floats(self)
        _positive(self, "workers", "cpus_per_worker", "batch_size")
        _within(self, 0.0, 1.0, "keypoint_score_threshold", "oks_nms_threshold")
        _at_least(self, 0, "box_score_threshold", "visualize")


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
        _positive(self, "part_images")


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
    max_ongoing: int = 32  # requests a replica takes at once (>= max_batch_size to fill one)
    cpus: float = 1.0  # CPUs each replica reserves (the pose model: a GPU too where there is one)

    def __post_init__(self) -> None:
        _finite_floats(self)
        _positive(self, "max_batch_size", "max_replicas", "target_ongoing", "max_ongoing")
        _at_least(self, 0, "batch_wait_s", "min_replicas", "cpus")
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
        _finite_floats(self)
        _positive(self, "max_body_bytes", "max_boxes", "request_timeout_s", "ingress_replicas")
        _positive(self, "ingress_max_ongoing", "pose_chunk")
        _at_least(self, 0, "ingress_cpus")
        _within(self, 1, 65535, "port")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            f.name: _plain(dataclasses.asdict(getattr(self, f.name)))
            for f in dataclasses.fields(self)
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, e.g. for MLflow params."""
        return _flat("", self.to_dict())


# Range checks of the sections' __post_init__. They raise ValueError("key: ..."), which `_build`
# prefixes with the file and the section.


def _finite_floats(section: object) -> None:
    """NaN passes every `x <= 0` check (comparisons with NaN are false), so refuse it, and the
    infinities, before any range check."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}: must be a finite number, got {value}")


# a run or sweep name is one folder under train.storage_path (and a Ray run name, an MLflow tag
# value in search filters): no separator, no leading dot, no quote
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")


def check_run_name(name: str, key: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"{key}: {name!r} must be one folder name: letters, digits and _ . = + - "
            "(starting with a letter, digit or _)"
        )


def _positive(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:  # written so that NaN fails too
            raise ValueError(f"{name}: must be positive, got {value}")


def _at_least(section: object, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value >= minimum:
            raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _within(section: object, low: float, high: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not low <= value <= high:
            raise ValueError(f"{name}: must be within [{low}, {high}], got {value}")


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else _plain(v) if isinstance(v, dict) else v
        for k, v in d.items()
    }


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(f"{prefix}{k}.", v) if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
