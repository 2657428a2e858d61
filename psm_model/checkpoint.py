"""Checkpoints as directories, one format for every reader:

    model.pt        unwrapped model state_dict (no `module.` / `_orig_mod.` prefixes)
    config.yaml     the full config the run was started with
    optimizer.pt    (training only) optimiser, lr scheduler and AMP scaler states, torch RNG state
    train_state.json  (training only) next epoch, step, best AP, and the training job's own state
    checksums.json  sha256 of each file above, written last: verified on load

`save_model` writes the first two (the best model training logs to MLflow), `save_checkpoint` all
of them (Ray's checkpoints, the run folder's best_checkpoint). `load_checkpoint_model` reads the
model of either (tune's registration, the registered model's code); `load_model` reads any local
checkpoint a command is given (such a folder, a kept-best folder, a registry copy, an official HRNet
.pth or a state_dict file: eval, infer, serve, export, through `jobs/checkpoints.py`, which first
fetches a URI or a registered model to a local folder); `load_checkpoint` resumes training.

Everything is read back with `torch.load(weights_only=True)`. Each file is written atomically
(`psm_model.files`); a checkpoint whose bytes changed since (a bad disk, a copy cut short) or
whose pieces are malformed raises CheckpointError naming the file, and `load_first_good` falls
back to an older checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from psm_model.config import Config, ConfigError
from psm_model.config_yaml import load_config
from psm_model.errors import redact_secrets
from psm_model.files import sha256, write_atomic
from psm_model.hrnet import PoseHRNet, build_model
from psm_model.weights import (
    CheckpointError,
    from_official_checkpoint,
    load_strict,
    read_state_dict,
)

log = logging.getLogger(__name__)
CHECKSUMS = "checksums.json"
# a kept-best folder (jobs/run_folder.keep_best) holds whole checkpoints under new names and this
# file naming the current one: replacing one small file is atomic on a disk and on object stores
CURRENT = "CURRENT"
GENERATION = re.compile(r"gen-[0-9]{4}-[0-9a-f]{8}")
# what checksums.json may name: a checkpoint's own files, never a path to elsewhere
FILES = ("model.pt", "config.yaml", "optimizer.pt", "train_state.json")


@dataclass
class TrainState:
    epoch: int = 0  # the next epoch to run
    step: int = 0
    best_ap: float = -1.0
    best_epoch: int = -1
    skipped_steps: int = 0  # steps without an update because the loss was not finite
    # what the job that trains keeps with each checkpoint, not read here (jobs/train_loop.py: its
    # MLflow run and the metric batches MLflow has not confirmed, sent again until it has)
    job: dict = field(default_factory=dict)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_model(directory: str | Path, model: torch.nn.Module, cfg: Config) -> Path:
    """The model part of a checkpoint alone: enough to evaluate, infer, export or register."""
    return _write(directory, _model_files(model, cfg))


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    cfg: Config,
) -> Path:
    training = {
        "optimizer.pt": _torch_bytes(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
        ),
        "train_state.json": json.dumps(asdict(state), indent=1).encode(),
    }
    return _write(directory, {**_model_files(model, cfg), **training})


def _model_files(model: torch.nn.Module, cfg: Config) -> dict[str, bytes]:
    return {
        "model.pt": _torch_bytes(unwrap(model).state_dict()),
        "config.yaml": redact_secrets(cfg.to_yaml()).encode(),
    }


def _write(directory: str | Path, files: dict[str, bytes]) -> Path:
    d = Path(directory)
    for name, data in files.items():
        write_atomic(d / name, data)
    write_atomic(d / CHECKSUMS, json.dumps({k: sha256(v) for k, v in files.items()}, indent=1))
    return d


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def current(directory: str | Path) -> Path:
    """The checkpoint a folder holds: itself, or in a kept-best folder the generation its
    CURRENT file names (one of its own subfolders, nothing else)."""
    d = Path(directory)
    pointer = d / CURRENT
    if not pointer.is_file():
        return d
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot read: {e}") from e
    if not GENERATION.fullmatch(name):
        raise CheckpointError(f"{pointer}: {name[:80]!r} is not a generation of {d.name}")
    return d / name


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file against checksums.json (checkpoints written before it have none)."""
    d = Path(directory)
    if not (d / CHECKSUMS).exists():
        return
    try:
        expected = json.loads((d / CHECKSUMS).read_text())
        assert isinstance(expected, dict)
    except (OSError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{d / CHECKSUMS}: unreadable or not a JSON object") from e
    for name, digest in expected.items():
        if name not in FILES:
            raise CheckpointError(
                f"{d / CHECKSUMS}: {name!r} is not a checkpoint file (one of {', '.join(FILES)})"
            )
        try:
            if not stat.S_ISREG((d / name).stat().st_mode):  # a FIFO would block the read
                raise CheckpointError(f"{d / name}: not a regular file")
            data = (d / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"{d / name}: cannot read: {e.strerror or e}") from e
        if sha256(data) != digest:
            raise CheckpointError(f"{d / name}: sha256 differs from {CHECKSUMS} (corrupt file)")


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState:
    """Restore what is given (the model at least) and return the train state."""
    d = current(directory)
    verify_checkpoint(d)
    _load_weights(d, model)
    if optimizer is not None:
        _load_training_pieces(d / "optimizer.pt", optimizer, scheduler, scaler)
    return _train_state(d)


def read_train_state(directory: str | Path) -> TrainState:
    """The train state alone, checked against checksums.json like the rest."""
    d = current(directory)
    verify_checkpoint(d)
    return _train_state(d)


def _train_state(d: Path) -> TrainState:
    try:
        data = json.loads((d / "train_state.json").read_text())
        # keys of ours it does not know are the job's: checkpoints written before it had its own
        known = {f.name for f in fields(TrainState)}
        job = {k: data.pop(k) for k in list(data) if k not in known} | data.pop("job", {})
        return TrainState(**data, job=job)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{d / 'train_state.json'}: not a train state: {e}") from e


def load_checkpoint_model(directory: str | Path) -> tuple[PoseHRNet, Config]:
    """The model of a checkpoint folder (training's or `save_model`'s), built from its own
    config.yaml and loaded strictly, and that config."""
    d = current(directory)
    verify_checkpoint(d)
    cfg = checkpoint_config(d)
    model = build_model(cfg.model)
    _load_weights(d, model)
    return model, cfg


def load_model(path: str | Path, cfg: Config) -> tuple[PoseHRNet, Config]:
    """The model of any local checkpoint and `cfg` with its model config: a checkpoint folder
    (training's, `save_model`'s, a kept-best folder, a registry copy: its own config.yaml wins), an
    official HRNet pose .pth (its widths, HRNet fusion, stride 4), or a state_dict file of
    `cfg.model`."""
    path = Path(path)
    if path.is_dir():
        model, own = load_checkpoint_model(path)
        return model, replace(cfg, model=own.model)
    state, name = read_state_dict(path)
    # PSM layers and the stride-2 head carry names the official layout never uses
    if not any(k.startswith("head_") or ".conv.weight" in k for k in state):
        model = from_official_checkpoint(state)
        official = replace(cfg.model, widths=model.widths, fusion="hrnet", heatmap_stride=4)
        return model, replace(cfg, model=official)
    model = build_model(cfg.model)
    load_strict(model, state, name)
    return model, cfg


def _load_weights(d: Path, model: torch.nn.Module) -> None:
    weights, name = read_state_dict(d / "model.pt")
    try:
        unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        raise CheckpointError(f"{name}: does not fit the model: {e}") from e


def _load_training_pieces(path: Path, optimizer, scheduler, scaler) -> None:
    try:
        extra = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    pieces = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(extra).__name__}")
    for key, target in pieces.items():
        if target is None:
            continue
        if not isinstance(extra.get(key), dict):
            raise CheckpointError(f"{path}: {key}: missing or not a state dict")
        try:  # a malformed state raises KeyError / ValueError / TypeError naming nothing
            target.load_state_dict(extra[key])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(
                f"{path}: {key}: malformed state ({type(e).__name__}: {e})"
            ) from e
    rng = extra.get("torch_rng")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise CheckpointError(f"{path}: torch_rng: missing or not a uint8 tensor")
    torch.set_rng_state(rng)


def load_first_good(
    directories: Iterable[str | Path],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[TrainState, Path]:
    """`load_checkpoint` of the first directory (newest first) that loads; each one that does not
    is logged as a warning naming the file. Raises the newest one's error if none loads."""
    errors = []
    for directory in directories:
        try:
            return load_checkpoint(directory, model, optimizer, scheduler, scaler), Path(directory)
        except (CheckpointError, ConfigError) as e:
            log.warning("checkpoint %s unusable, trying the previous one: %s", directory, e)
            errors.append(e)
    if not errors:
        raise CheckpointError("no checkpoint to load")
    raise errors[0]


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """One hash of a state_dict's keys and values, whatever the file it came from: what a job's
    results (infer's manifest) and a service's answers (`psm serve`) name as their model."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_config(directory: str | Path) -> Config:
    """The config a checkpoint folder (or a kept-best folder's current one) was written with."""
    return load_config(current(directory) / "config.yaml")
