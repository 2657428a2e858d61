"""The epochs of every Ray Train worker that `jobs/training.py` launches: each builds the Ray Data
graph of its share of the images (new draws per epoch, the same when an epoch is replayed) and
trains on it; `jobs/train_worker.py` holds what surrounds the epochs. Ray calls are marked `# Ray`.
"""

from __future__ import annotations

import contextlib
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

from jobs import train_worker
from jobs.tracking import Tracker
from jobs.train_worker import WorkerRun
from pipelines.augment import ImageTable, count_skips
from pipelines.datasets import FeedStats, iter_chunked, train_crops
from psm_model.compiling import compile_model
from psm_model.config import Config
from psm_model.loss import train_step

log = logging.getLogger(__name__)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: `train_worker.setup`, then per epoch `_train_epoch` over
    this rank's crops and `train_worker.end_epoch`. Every Ray call of the worker is here, marked
    `# Ray`."""
    cfg: Config = loop_config["config"]  # the driver's, as it resolved it: not parsed again
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ray.data.DataContext.get_current().enable_progress_bars = False  # Ray: no bars in workers
    # parsed once by the driver; read here from the object store without a copy
    rows: ImageTable = ray.get(loop_config["train_rows"])  # Ray
    device = get_device()  # Ray: this worker's GPU, or the CPU
    checkpoint = ray.train.get_checkpoint()  # Ray: the newest checkpoint after a restart
    tracker: Tracker = loop_config["tracker"]  # the driver's: its URI as the driver resolved it
    run = train_worker.setup(
        cfg, tracker, device, rank, world, rows, loop_config["mlflow_run_id"], checkpoint
    )
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
            # one image order on every rank, new each epoch; rank r takes every world-th from r
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
                # rank 0: validation, the checkpoint in d
                written = train_worker.end_epoch(run, metrics, epoch, d)
                checkpoint = Checkpoint.from_directory(d) if written else None  # Ray
                ray.train.report(metrics, checkpoint=checkpoint)  # Ray: rank 0 writes, all report
            if rank == 0:  # after the checkpoint: a tracking outage must not cost the epoch
                run.held = tracker.deliver(run.run_id, run.held)


def _train_epoch(
    run: WorkerRun, batches: Iterator[dict], feed: FeedStats, epoch: int
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
            train_worker.skip_nonfinite_step(cfg, state, epoch)  # raises unless skipping
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
