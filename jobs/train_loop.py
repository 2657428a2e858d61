"""The Ray Train worker loop of HRNet-PSM training: what every worker of the TorchTrainer that
`jobs/training.py` launches runs, and all a training sample crosses of the Ray plumbing.

Every epoch each worker builds the Ray Data graph of its share of the images (new augmentation
draws per epoch, the same draws when an epoch is replayed), trains on it, and rank 0 validates,
writes the checkpoint and logs to MLflow through the driver's `Tracker`. Ray calls are marked
`# Ray`, all in `train_loop`; the rest is plain PyTorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.torch import get_device, prepare_model

from jobs import console, run_folder, tracking
from jobs.tracking import Tracker
from pipelines.augment import ImageTable, count_skips
from pipelines.datasets import FeedStats, iter_chunked, train_crops
from pipelines.leases import check_held
from psm_model.checkpoint import TrainState, save_checkpoint, save_model, unwrap
from psm_model.compiling import compile_model, eager
from psm_model.config import Config
from psm_model.errors import PsmError
from psm_model.hrnet import build_model
from psm_model.loss import adam, train_step
from psm_model.weights import load_pretrained

log = logging.getLogger(__name__)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: `_setup`, then per epoch `_train_epoch` over this rank's
    crops and `_end_epoch`. Every Ray call of the worker is in this function, marked `# Ray`."""
    cfg: Config = loop_config["config"]  # the driver's, as it resolved it: not parsed again
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ray.data.DataContext.get_current().enable_progress_bars = False  # Ray: no bars in workers
    # parsed once by the driver; read here from the object store without a copy
    rows: ImageTable = ray.get(loop_config["train_rows"])  # Ray
    device = get_device()  # Ray: this worker's GPU, or the CPU
    checkpoint = ray.train.get_checkpoint()  # Ray: the newest checkpoint after a restart
    tracker: Tracker = loop_config["tracker"]  # the driver's: its URI as the driver resolved it
    run = _setup(cfg, tracker, device, rank, world, rows, loop_config["mlflow_run_id"], checkpoint)
    run.lease_token = loop_config["lease_token"]
    run.model = prepare_model(run.model, move_to_device=False)  # Ray: DDP over gloo or NCCL
    # "model": a wrapper around the DDP model; "blocks": the regions compiled in place, same keys
    run.step_model = (
        compile_model(run.model, cfg.train.compile_scope, mode=cfg.train.compile_mode)
        if cfg.train.compile
        else run.model
    )
    run.label = loop_config.get("label", "")  # a sweep trial's params, on its epoch lines
    # MLflow's system metrics from the first worker of each node: CPU, memory, GPUs of that machine
    several_nodes = world > ctx.get_local_world_size()  # Ray
    node = f"node{ctx.get_node_rank()}" if several_nodes else None  # Ray
    monitor = (
        tracker.system_metrics(run.run_id, node)
        if ctx.get_local_rank() == 0  # Ray
        else contextlib.nullcontext()
    )

    with monitor:
        for epoch in range(run.state.epoch, cfg.train.epochs):
            # the same image order on every rank, a new one every epoch; each rank takes every
            # world-th
            order = np.random.default_rng([cfg.train.seed, epoch]).permutation(len(rows))
            order = order[: cfg.train.images_per_epoch or None]
            feed = FeedStats()  # which side bounds the run: the epoch's waits and data rate
            make = functools.partial(train_crops, cfg=cfg, epoch=epoch)
            batches = iter_chunked(  # Ray Data: this rank's crops, made chunk by chunk
                make,
                rows.view(order[rank::world]),
                cfg.data.chunk_images,
                cfg.train.batch_size,
                feed,
            )
            metrics = _train_epoch(run, batches, feed, epoch)
            with tempfile.TemporaryDirectory() as d:
                written = _end_epoch(run, metrics, epoch, d)  # rank 0: validation, checkpoint in d
                checkpoint = Checkpoint.from_directory(d) if written else None  # Ray
                ray.train.report(metrics, checkpoint=checkpoint)  # Ray: rank 0 writes, all report
            if rank == 0:  # after the checkpoint: a tracking outage must not cost the epoch
                run.held = tracker.deliver(run.run_id, run.held)


@dataclasses.dataclass
class _Run:
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
    step_model: torch.nn.Module | None = None  # what the train step runs: the model, or compiled
    lease_token: str = ""  # the driver's lease on the run folder (pipelines/leases.py)
    label: str = ""  # names the run on its epoch lines (a sweep trial's params)


def _setup(
    cfg: Config,
    tracker: Tracker,
    device,
    rank: int,
    world: int,
    rows: ImageTable,
    run_id: str,
    checkpoint,
) -> _Run:
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
    return _Run(
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
    )


def _train_epoch(
    run: _Run, batches: Iterator[dict], feed: FeedStats, epoch: int
) -> dict[str, float]:
    """One pass over this rank's batches; the epoch's metrics, summed over the ranks. `feed`
    (filled by the batches' maker) gets the seconds spent waiting for a batch and computing."""
    cfg, state, device, world = run.cfg, run.state, run.device, run.world
    t0 = time.perf_counter()
    run.model.train()
    loss_sum, samples, skips = 0.0, 0, Counter()
    while True:
        batch = feed.next(batches)
        # DDP needs the same number of steps everywhere: stop when any rank runs dry
        if not _all_ranks_have(batch is not None, device, world):
            break
        skips += count_skips(batch["skip"])
        keep = batch["skip"] == ""
        if keep.any():  # skip rows carry zero weights; dropping them keeps BN statistics clean
            batch = {k: v[keep] for k, v in batch.items()}
        _set_warmup_lr(run.optimizer, cfg, state.step, run.warmup_steps, run.scheduler)
        t_step = time.perf_counter()
        loss = train_step(run.step_model, batch, cfg, run.optimizer, run.scaler, device, world)
        feed.compute_s += time.perf_counter() - t_step
        if loss is None:  # not finite on some rank: no rank updated
            skip_nonfinite_step(cfg, state, epoch)  # raises unless skipping
        else:
            loss_sum += loss * int(keep.sum())
            samples += int(keep.sum())
        state.step += 1
    batches.close()  # a rank stopped early by the others drops its prefetched chunk here
    run.scheduler.step()  # after the epoch; the official code steps first (pre-1.1 PyTorch order)
    state.epoch = epoch + 1

    totals = _all_reduce_sum(
        [loss_sum, samples, sum(skips.values()), feed.wait_s, feed.compute_s, feed.data_rate()],
        device,
        world,
    )
    seconds = time.perf_counter() - t0
    wait_s, compute_s = totals[3] / world, totals[4] / world  # per rank
    return {
        "epoch": epoch,
        "epochs_done": epoch + 1,  # what Tune's ASHA counts (a resumed trial resumes it)
        "train_loss": totals[0] / max(totals[1], 1),
        "lr": run.optimizer.param_groups[0]["lr"],
        "samples_per_s": totals[1] / seconds,
        "skipped_images": totals[2],
        "epoch_seconds": seconds,
        # which side bounds the run: the share of step time spent waiting for the next batch,
        # and the samples/s the data side makes while busy (all ranks) next to samples_per_s
        "data_wait_frac": wait_s / max(wait_s + compute_s, 1e-9),
        "data_wait_s": wait_s,
        "compute_s": compute_s,
        "data_samples_per_s": totals[5],
    }


def _end_epoch(run: _Run, metrics: dict, epoch: int, directory: str) -> bool:
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


def _set_warmup_lr(optimizer, cfg: Config, step: int, warmup_steps: int, scheduler) -> None:
    if step < warmup_steps:
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * (step + 1) / warmup_steps
    elif step == warmup_steps and warmup_steps:
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


def _all_ranks_have(has: bool, device, world: int) -> bool:
    if world == 1:
        return has
    flag = torch.tensor([int(has)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _all_reduce_sum(values: list[float], device, world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _validate(model, run: _Run, epoch: int) -> dict[str, float]:
    """Rank 0: the val metrics of the plain `model`; a new best is kept and logged to MLflow."""
    from pipelines.validate import evaluate_model

    cfg, state = run.cfg, run.state
    drawings = run.tracker.save_pose_drawings(run.run_id)
    metrics = evaluate_model(model, cfg, device=run.device, save_drawings=drawings)
    ap = metrics.get("AP", -1.0)
    if ap > state.best_ap:
        state.best_ap, state.best_epoch = ap, epoch
        with tempfile.TemporaryDirectory() as d:
            save_model(d, model, cfg)  # the model part of a checkpoint: what eval/infer read
            run.tracker.try_log_artifact(run.run_id, d, "best_checkpoint")
    return {**{f"val_{k}": v for k, v in metrics.items()}, "best_AP": state.best_ap}
