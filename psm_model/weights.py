"""Loading official HRNet weights: pose checkpoints (strict) and ImageNet backbones (reported).

Keys are mapped explicitly and every missing, unexpected or mis-shaped key is named; nothing is
loaded with a silent `strict=False`. Files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from psm_model.errors import PsmError
from psm_model.hrnet import PoseHRNet

log = logging.getLogger(__name__)

# Top-level modules of the official pose network that an ImageNet HRNet checkpoint initialises
# (the official PRETRAINED_LAYERS). The classifier's own heads (incre_modules, downsamp_modules,
# final_layer, classifier) have no counterpart here.
BACKBONE_PREFIXES = (
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "layer1",
    "transition1",
    "stage2",
    "transition2",
    "stage3",
    "transition3",
    "stage4",
)


class CheckpointError(PsmError, ValueError):
    """A weights file or state_dict that cannot be loaded; the message names the file and key."""


@dataclass
class LoadReport:
    loaded: list[str]  # model keys set from the checkpoint
    skipped: list[str]  # checkpoint keys this model has no place for
    missing: list[str]  # model keys left freshly initialised

    def summary(self) -> str:
        n = len(self.loaded), len(self.skipped), len(self.missing)
        return "loaded {} keys, skipped {}, left {} fresh".format(*n)


def read_state_dict(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], str]:
    """A plain state_dict from a path or a dict, with a `module.` (DataParallel) prefix removed."""
    if isinstance(source, dict):
        obj, name = source, "<state_dict>"
    else:
        name = str(source)
        try:
            obj = torch.load(name, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise CheckpointError(f"{name}: no such file") from e
        except OSError as e:  # a directory, no permission, an I/O error
            raise CheckpointError(f"{name}: cannot read: {e.strerror or e}") from e
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(
                f"{name}: not a PyTorch checkpoint ({type(e).__name__}: {e})"
            ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # official training checkpoints wrap the weights
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{name}: expected a non-empty state_dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{name}: {bad[0]!r}: not a tensor entry, so this is not a state_dict"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj, name


def official_widths(state: dict[str, torch.Tensor], name: str = "<state_dict>") -> tuple[int, ...]:
    """Branch widths of an official-layout HRNet, read from its stage-4 branch convolutions."""
    widths = []
    for b in range(4):
        key = f"stage4.0.branches.{b}.0.conv1.weight"
        if key not in state:
            raise CheckpointError(
                f"{name}: {key}: missing, so this is not an official HRNet checkpoint"
            )
        widths.append(int(state[key].shape[0]))
    return tuple(widths)


def from_official_checkpoint(source: str | Path | dict) -> PoseHRNet:
    """HRNet (fusion=hrnet, stride 4) built to the checkpoint's widths, loaded strictly, eval mode.

    Accepts the official pose checkpoints (e.g. pose_hrnet_w32_256x192.pth) or their state_dict.
    """
    state, name = read_state_dict(source)
    widths = official_widths(state, name)
    if "final_layer.weight" not in state:
        raise CheckpointError(
            f"{name}: final_layer.weight: missing, so this is not a pose checkpoint"
        )
    head = state["final_layer.weight"]  # (joints, widths[0], k, k)
    model = PoseHRNet(
        widths, "hrnet", 4, num_joints=int(head.shape[0]), final_conv_kernel=int(head.shape[-1])
    )
    load_strict(model, state, name)
    return model.eval()


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Every model key from the checkpoint with its exact shape, and no checkpoint key left over.

    BatchNorm's `num_batches_tracked` may be absent (checkpoints from before PyTorch 0.4.1): it does
    not affect the output and keeps its fresh value.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    _check_shapes(own, state, state.keys(), name)
    model.load_state_dict({**own, **state}, strict=True)


def load_pretrained(model: PoseHRNet, source: str | Path | dict) -> LoadReport:
    """Initialise the backbone from an ImageNet HRNet classification checkpoint (official layout).

    Backbone keys the model has are loaded (a shape mismatch is an error: wrong width); checkpoint
    keys with no place in this model are skipped (the classifier heads, stage 4's extra outputs,
    HRNet fusion layers a PSM model replaces); model keys not in the checkpoint stay fresh
    (the PSM layers and the pose head).
    """
    state, name = read_state_dict(source)
    own = model.state_dict()
    take = [k for k in state if k in own and k.split(".")[0] in BACKBONE_PREFIXES]
    if not take:
        raise CheckpointError(
            f"{name}: no HRNet backbone key matches this model (e.g. conv1.weight)"
        )
    _check_shapes(own, state, take, name)
    model.load_state_dict({**own, **{k: state[k] for k in take}}, strict=True)
    report = LoadReport(
        loaded=take,
        skipped=[k for k in state if k not in take],
        missing=[k for k in own if k not in take and not k.endswith("num_batches_tracked")],
    )
    log.info("%s: %s", name, report.summary())
    for label, keys in (("skipped", report.skipped), ("left fresh", report.missing)):
        if keys:
            log.info(
                "%s: %s: %s%s", name, label, ", ".join(keys[:8]), " ..." if len(keys) > 8 else ""
            )
    return report


def _check_shapes(own: dict, state: dict, keys, name: str) -> None:
    for k in keys:
        if own[k].shape != state[k].shape:
            raise CheckpointError(
                f"{name}: {k}: shape {tuple(state[k].shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the model (different widths?)"
            )
