"""One typed config tree (`Config`): frozen dataclasses with their range checks, read from YAML
with `section.key=value` overrides by `psm_model.config_yaml`. The training sections are here, those
of a trained model's use in `psm_model.config_inference`; the rest (branch widths, heatmap size) is
derived. Errors name the file and the dotted key, e.g. `configs/x.yaml: model.fusion: 'pms' is not
one of ('hrnet', 'psm')`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from psm_model.coco_keypoints import NUM_JOINTS
from psm_model.config_fields import (
    FREE_ON_RESUME,
    SWEEP_OWNED,
    at_least,
    finite_floats,
    positive,
    tagged,
    within,
)
from psm_model.config_inference import EvalConfig, InferConfig, ServeConfig
from psm_model.errors import PsmError


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
    # exchange modules in stages 2, 3, 4 (HRNet's); fewer: a shallower net, same resolutions
    stage_modules: tuple[int, int, int] = (1, 4, 3)
    pretrained: str = ""  # ImageNet HRNet classification checkpoint (official key layout)

    def __post_init__(self) -> None:
        if self.num_joints != NUM_JOINTS:
            raise ValueError(
                f"num_joints: {self.num_joints}, but the data (COCO person keypoints) has "
                f"{NUM_JOINTS} joints per person"
            )
        if self.widths is not None and len(self.widths) != 4:
            raise ValueError(f"widths: expected 4 branch widths, got {len(self.widths)}")
        if len(self.stage_modules) != 3 or min(self.stage_modules) < 1:
            raise ValueError(f"stage_modules: expected 3 counts >= 1, got {self.stage_modules}")
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
        h, w = self.input_size
        return (h // self.heatmap_stride, w // self.heatmap_stride)


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
    # CPUs each Ray Data decode/augment/crop task reserves (training, evaluation and inference)
    cpus_per_task: float = tagged(1.0, FREE_ON_RESUME)
    chunk_images: int = 256  # images per materialised Ray Data chunk (next one made ahead)
    channels_last: bool = False  # batches (and the model) in channels-last memory format

    def __post_init__(self) -> None:
        finite_floats(self)
        positive(self, "sigma", "box_padding", "max_image_pixels", "cpus_per_task", "chunk_images")
        at_least(self, 0, "half_body_min_joints")
        within(self, 0.0, 180.0, "rotation")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"scale_min/scale_max: need 0 < min <= max, got {self.scale_min}, {self.scale_max}"
            )
        within(self, 0.0, 1.0, "rotation_prob", "half_body_prob")


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
    val_every: int = tagged(10, SWEEP_OWNED)  # val AP every K epochs, and after the last; 0: never
    storage_path: str = tagged("runs", SWEEP_OWNED)  # checkpoints: a folder or a URI (s3://...)
    # run name; an existing name resumes that run. Empty: a new timestamped name
    name: str = tagged("", SWEEP_OWNED)
    keep_checkpoints: int = tagged(2, FREE_ON_RESUME)  # the newest; the best by val AP kept besides
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
    # keys (section.key) a resumed run may change besides the FREE_ON_RESUME ones; any other
    # difference from the config it started with is refused, naming the keys (jobs/run_folder.py)
    resume_changes: tuple[str, ...] = tagged((), FREE_ON_RESUME)

    def __post_init__(self) -> None:
        finite_floats(self)
        positive(self, "epochs", "batch_size", "num_workers", "cpus_per_worker")
        positive(self, "lr", "lr_factor", "keep_checkpoints")
        at_least(self, 0, "weight_decay", "warmup_epochs", "grad_clip", "ohkm_topk", "seed")
        at_least(self, 0, "images_per_epoch", "val_every", "max_skipped_steps")
        at_least(self, -1, "max_failures")  # -1: Ray Train retries without limit
        if any(s < 0 for s in self.lr_steps):
            raise ValueError(f"lr_steps: epochs must be >= 0, got {self.lr_steps}")
        if self.name:
            check_run_name(self.name, "name")


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


# a run or sweep name is one folder under train.storage_path (and a Ray run name, an MLflow tag
# value in search filters): no separator, no leading dot, no quote
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")


def check_run_name(name: str, key: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"{key}: {name!r} must be one folder name: letters, digits and _ . = + - "
            "(starting with a letter, digit or _)"
        )


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
