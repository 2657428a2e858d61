"""A Ray Train worker's run around its epochs (`jobs/train_loop.py` runs the epochs): what they
share (`WorkerRun`), the model, optimiser, schedule and scaler restored from the newest checkpoint
(`setup`), and rank 0's work after each epoch (`end_epoch`: validation, the metrics held for
MLflow, the checkpoint, keep-best), and the policy on a non-finite loss. Plain PyTorch: the Ray
calls are the loop's.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time

import torch

from jobs import console, run_folder, tracking
from jobs.tracking import Tracker
from pipelines.augment import ImageTable
from pipelines.leases import check_held
from psm_model.checkpoint import TrainState, save_checkpoint, save_model, unwrap
from psm_model.compiling import eager
from psm_model.config import Config
from psm_model.errors import PsmError
from psm_model.hrnet import build_model
from psm_model.loss import adam
from psm_model.recipe import EvalRecipe, ValSet
from psm_model.weights import load_pretrained

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerRun:
    """What a worker's epochs share."""

    cfg: Config
    tracker: Tracker
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module  # DDP-wrapped once prepared; `unwrap` gives the plain model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: torch.amp.GradScaler
    state: TrainState
    run_id: str  # the run's MLflow run
    held: list  # metric batches MLflow has not confirmed (Tracker.deliver sends them)
    warmup_steps: int
    recipe: EvalRecipe  # rank 0's validation: the test recipe and the val set, built once
    val: ValSet
    step_model: torch.nn.Module | None = None  # what the train step runs: the model, or compiled
    lease_token: str = ""  # the driver's lease on the run folder (pipelines/leases.py)
    label: str = ""  # names the run on its epoch lines (a sweep trial's params)


def setup(
    cfg: Config,
    tracker: Tracker,
    device,
    rank: int,
    world: int,
    rows: ImageTable,
    run_id: str,
    checkpoint,
) -> WorkerRun:
    """Model, optimiser, schedule and AMP scaler on `device`, restored from `checkpoint` if any,
    and the warm-up length in steps for the image `rows` shared by `world` ranks."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    else:  # fixed input shapes: let cuDNN time its algorithms once (the official CUDNN.BENCHMARK)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if cfg.model.pretrained:  # ImageNet backbone; a resumed run overwrites it below
        load_pretrained(model, cfg.model.pretrained)
    if cfg.train.sync_bn and device.type == "cuda" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.data.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = adam(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(cfg.train.lr_steps), cfg.train.lr_factor
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    state = TrainState()
    if checkpoint:  # a corrupt newest checkpoint falls back to an older one
        state = run_folder.restore(checkpoint, model, optimizer, scheduler, scaler)
        log.info("rank %d resumes at epoch %d (step %d)", rank, state.epoch, state.step)
    run_id = state.job.get(tracking.RUN_ID) or run_id
    persons = rows.persons
    if cfg.train.images_per_epoch:
        persons = persons * min(cfg.train.images_per_epoch, len(rows)) // len(rows)
    warmup_steps = cfg.train.warmup_epochs * max(1, persons // (world * cfg.train.batch_size))
    held = list(state.job.get(tracking.HELD, []))
    return WorkerRun(
        cfg,
        tracker,
        device,
        rank,
        world,
        model,
        optimizer,
        scheduler,
        scaler,
        state,
        run_id,
        held,
        warmup_steps,
        EvalRecipe.of(cfg),
        ValSet.of(cfg),
    )


def end_epoch(run: WorkerRun, metrics: dict, epoch: int, directory: str) -> bool:
    """Rank 0: validate when due (adding to `metrics`), hold the metrics for MLflow and write the
    checkpoint into `directory` (kept as the best too when the AP rose); whether it wrote one."""
    cfg, state = run.cfg, run.state
    if run.rank != 0:
        return False
    t0 = time.perf_counter()
    best_before = state.best_ap
    last = epoch == cfg.train.epochs - 1
    if cfg.train.val_every and ((epoch + 1) % cfg.train.val_every == 0 or last):
        with eager():  # as with scope "model": validation runs the eager model, no recompiles
            metrics |= _validate(unwrap(run.model), run, epoch)
    run.held.append(tracking.held_metrics(metrics, epoch))
    state.job = {tracking.RUN_ID: run.run_id, tracking.HELD: run.held}  # saved with the checkpoint
    elapsed = metrics["epoch_seconds"] + time.perf_counter() - t0  # with the validation
    console.progress(console.epoch_line(metrics, cfg.train.epochs, elapsed, label=run.label))
    # fencing: a run taken over by another job (a second start of this name) writes nothing more
    check_held(run_folder.location(cfg), run.lease_token, f"training run {cfg.train.name}")
    save_checkpoint(directory, run.model, run.optimizer, run.scheduler, run.scaler, state, cfg)
    if state.best_ap > best_before:  # kept whatever happens to the later epochs
        run_folder.keep_best(cfg, directory, epoch)
    return True


def _validate(model, run: WorkerRun, epoch: int) -> dict[str, float]:
    """Rank 0: the val metrics of the plain `model`; a new best is kept and logged to MLflow."""
    from pipelines.validate import evaluate_model

    cfg, state = run.cfg, run.state
    drawings = run.tracker.save_pose_drawings(run.run_id)
    crop_cpus = cfg.data.cpus_per_task
    metrics = evaluate_model(
        model, run.recipe, run.val, crop_cpus, device=run.device, save_drawings=drawings
    )
    ap = metrics.get("AP", -1.0)
    if ap > state.best_ap:
        state.best_ap, state.best_epoch = ap, epoch
        with tempfile.TemporaryDirectory() as d:
            save_model(d, model, cfg)  # the model part of a checkpoint: what eval/infer read
            run.tracker.try_log_artifact(run.run_id, d, "best_checkpoint")
    return {**{f"val_{k}": v for k, v in metrics.items()}, "best_AP": state.best_ap}


class NonFiniteLossError(PsmError, RuntimeError):
    """A NaN or infinite training loss the run's policy does not let it train past."""


def skip_nonfinite_step(cfg: Config, state: TrainState, epoch: int) -> None:
    """Account for a step whose loss was not finite (no rank updated); raises unless the policy
    is "skip" and the run's budget is not spent."""
    state.skipped_steps += 1
    where = f"epoch {epoch}, step {state.step}"
    if cfg.train.nonfinite_loss == "stop":
        raise NonFiniteLossError(
            f"{where}: the training loss is not finite (NaN or inf); stopped before the update, "
            f"so the checkpoints up to epoch {epoch - 1} are intact. Lower train.lr, set "
            "train.grad_clip, or let a few steps be skipped with train.nonfinite_loss=skip"
        )
    if state.skipped_steps > cfg.train.max_skipped_steps:
        raise NonFiniteLossError(
            f"{where}: {state.skipped_steps} steps with a non-finite loss in this run, more than "
            f"train.max_skipped_steps={cfg.train.max_skipped_steps}: the run diverges"
        )
    log.warning(
        "%s: non-finite loss, step skipped (%d of at most %d)",
        where,
        state.skipped_steps,
        cfg.train.max_skipped_steps,
    )
