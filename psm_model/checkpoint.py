"""Training checkpoints as directories: weights, optimiser state, a JSON train state, the config.

    model.pt        unwrapped model state_dict (no `module.` / `_orig_mod.` prefixes)
    optimizer.pt    optimiser, lr scheduler and AMP scaler states, torch RNG state
    train_state.json  next epoch, global step, best AP so far, MLflow run id, unsent metrics
    config.yaml     the full config the run was started with

Everything is read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from psm_model.config import Config, load_config, redact_secrets
from psm_model.weights import CheckpointError, read_state_dict


@dataclass
class TrainState:
    epoch: int = 0  # the next epoch to run
    step: int = 0
    best_ap: float = -1.0
    best_epoch: int = -1
    mlflow_run_id: str = ""
    # metric batches MLflow has not confirmed: saved with the checkpoint, sent again until it has
    held_metrics: list = field(default_factory=list)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    cfg: Config,
) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), d / "model.pt")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        d / "optimizer.pt",
    )
    (d / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
    (d / "config.yaml").write_text(redact_secrets(cfg.to_yaml()))
    return d


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState:
    """Restore what is given (the model at least) and return the train state."""
    d = Path(directory)
    weights, name = read_state_dict(d / "model.pt")
    unwrap(model).load_state_dict(weights, strict=True)
    if optimizer is not None:
        try:
            extra = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{d / 'optimizer.pt'}: cannot read: {e}") from e
        optimizer.load_state_dict(extra["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["torch_rng"])
    try:
        return TrainState(**json.loads((d / "train_state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{d / 'train_state.json'}: not a train state: {e}") from e


def checkpoint_config(directory: str | Path) -> Config:
    return load_config(Path(directory) / "config.yaml")
