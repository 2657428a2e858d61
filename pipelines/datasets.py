"""Ray Data graphs: image rows -> person crops, sharded by image across CPU workers, and crops ->
poses on an actor pool that holds the model (`psm eval`).

The Ray calls of the data side live here. A graph is built per epoch (the epoch is part of every
sample's seed), so each epoch draws new augmentations and a resumed epoch redraws exactly the same.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from pipelines.predict import PosePredictor
from pipelines.samples import eval_samples, train_samples
from psm_model.config import Config

log = logging.getLogger(__name__)


def _dataset(rows: Sequence[dict], num_blocks: int | None) -> ray.data.Dataset:
    # Ray call: keep block order, so the sample order is fixed whatever the worker count
    DataContext.get_current().execution_options.preserve_order = True
    blocks = num_blocks or max(1, min(len(rows), 64))
    return ray.data.from_items(list(rows), override_num_blocks=blocks)


def train_crops(
    rows: Sequence[dict],
    cfg: Config,
    epoch: int,
    *,
    num_blocks: int | None = None,
    concurrency: int | None = None,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Augmented person crops of one epoch (columns: pipelines.samples.SAMPLE_COLUMNS).

    `concurrency` caps the decode/augment tasks running at once (None: as many as CPUs allow);
    `num_cpus` is what each task reserves (below 1 when training workers hold the cores).
    """
    fn = functools.partial(
        train_samples,
        data=cfg.data,
        input_size=cfg.model.input_size,
        seed=cfg.train.seed,
        epoch=epoch,
    )
    compute = TaskPoolStrategy(size=concurrency) if concurrency else None
    return _dataset(rows, num_blocks).flat_map(fn, compute=compute, num_cpus=num_cpus)


def eval_crops(
    rows: Sequence[dict],
    cfg: Config,
    *,
    num_blocks: int | None = None,
    concurrency: int | None = None,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Unaugmented crops of every box (ground truth or detections) for evaluation and inference."""
    fn = functools.partial(
        eval_samples, input_size=cfg.model.input_size, max_pixels=cfg.data.max_image_pixels
    )
    compute = TaskPoolStrategy(size=concurrency) if concurrency else None
    return _dataset(rows, num_blocks).flat_map(fn, compute=compute, num_cpus=num_cpus)


def pose_predictions(
    rows: Sequence[dict], cfg: Config, weights: dict[str, torch.Tensor]
) -> ray.data.Dataset:
    """`eval_crops` -> poses (pipelines.predict.POSE_COLUMNS) on a pool of eval.workers
    `PosePredictor` actors, each holding the model with these (CPU) weights for `cfg.model`.

    Each actor reserves one GPU when the cluster has any, and eval.cpus_per_worker CPUs; the crop
    tasks reserve train.data_cpus besides (Ray does not fuse a flat_map into a batched map).
    """
    total = ray.cluster_resources()  # Ray call
    gpus = 1 if total.get("GPU", 0) > 0 else 0
    need = {"GPU": cfg.eval.workers * gpus}
    need["CPU"] = cfg.eval.workers * cfg.eval.cpus_per_worker + cfg.train.data_cpus
    short = {k: (v, total.get(k, 0)) for k, v in need.items() if v > total.get(k, 0)}
    if short:  # a fixed actor pool that cannot start waits silently (an autoscaler may add nodes)
        log.warning(
            "eval.workers=%d actors (eval.cpus_per_worker=%s) and a crop task "
            "(train.data_cpus=%s) need more than the cluster has now (need, have): %s",
            cfg.eval.workers, cfg.eval.cpus_per_worker, cfg.train.data_cpus, short,
        )  # fmt: skip
    # Ray calls: the weights go to the object store once, and each actor fetches them from there
    return eval_crops(rows, cfg, num_cpus=cfg.train.data_cpus).map_batches(
        PosePredictor,
        fn_constructor_kwargs={"cfg": cfg, "weights": ray.put(weights)},
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.eval.workers),
        num_cpus=cfg.eval.cpus_per_worker,
        num_gpus=gpus,
    )


def iter_chunked(
    make: Callable[[Sequence[dict]], ray.data.Dataset],
    rows: Sequence[dict],
    chunk_rows: int,
    batch_size: int,
) -> Iterator[dict]:
    """Numpy batches of `make(chunk)` over chunks of `rows`, each chunk materialised while the
    previous one is consumed (order kept).

    Why not stream: a streaming executor whose output is backpressured by a slower consumer (a
    train step, a model) has no task to wait on and spins; on 2 cores it took a third of the
    training thread's time (GIL), 12 instead of 32 samples/s.
    """
    chunks = [rows[i : i + chunk_rows] for i in range(0, len(rows), chunk_rows)]
    with ThreadPoolExecutor(max_workers=1) as ahead:
        future = ahead.submit(lambda c: make(c).materialize(), chunks[0]) if chunks else None
        for k in range(len(chunks)):
            dataset = future.result()
            if k + 1 < len(chunks):
                future = ahead.submit(lambda c: make(c).materialize(), chunks[k + 1])
            yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy")
