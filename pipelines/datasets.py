"""Ray Data graphs of crops: image rows -> person crops, sharded by image across CPU workers
(`crops_graph`), augmented for training (`train_crops`; unaugmented: `pipelines.eval_crops`), and
the chunked feed a training loop or an evaluation reads them through.

A crop task turns a block of image rows into one batch of sample columns (numpy arrays, stacked),
which Ray stores as one Arrow block: no per-sample Python dicts to convert (with `flat_map` that
conversion cost more worker CPU than the crop itself; docs/benchmarks.md). A training graph is
built per epoch: the epoch is part of every sample's seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import ray
from ray.data import DataContext, TaskPoolStrategy

from pipelines.augment import BATCH_IMAGES, train_batch
from psm_model.config import Config


def image_dataset(
    rows: Sequence[dict], num_blocks: int | None, batch_images: int
) -> ray.data.Dataset:
    """Image rows as a dataset of blocks of `batch_images` rows (or `num_blocks` blocks)."""
    # Ray call: keep block order, so the sample order is fixed whatever the worker count
    DataContext.get_current().execution_options.preserve_order = True
    # a block is a batch: one task and one output block each (no merging of outputs)
    blocks = num_blocks or max(1, math.ceil(len(rows) / batch_images))
    return ray.data.from_items(list(rows), override_num_blocks=blocks)


def crops_task(images: dict[str, np.ndarray], *, make: Callable, threads: int) -> dict:
    """`make` (`train_batch`, `eval_batch`) on one batch of image rows, inside a Ray task, OpenCV's
    threads held to the task's CPUs (it sizes its pool by the machine: 2 threads in a 1-CPU task
    on 2 cores)."""
    if cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)
    return make(images)


def crops_graph(
    rows: Sequence[dict],
    make: Callable,
    num_blocks: int | None,
    concurrency: int | None,
    num_cpus: float,
    batch_images: int,
) -> ray.data.Dataset:
    fn = functools.partial(crops_task, make=make, threads=max(1, math.floor(num_cpus)))
    compute = TaskPoolStrategy(size=concurrency) if concurrency else None
    # Ray call: a block of image rows in as numpy columns (batch_size=None: the whole block), the
    # columns of its samples out
    return image_dataset(rows, num_blocks, batch_images).map_batches(
        fn, batch_size=None, batch_format="numpy", compute=compute, num_cpus=num_cpus
    )


def train_crops(
    rows: Sequence[dict],
    cfg: Config,
    epoch: int,
    *,
    num_blocks: int | None = None,
    concurrency: int | None = None,
    batch_images: int = BATCH_IMAGES,
) -> ray.data.Dataset:
    """Augmented person crops of one epoch (pipelines.augment.SAMPLE_COLUMNS): the rows cut into
    `num_blocks` blocks (default: of at most `batch_images` images), one `train_batch` task each,
    at most `concurrency` at once (None: as many as the CPUs allow), each reserving
    data.cpus_per_task CPUs (below 1 when training workers hold the cores)."""
    make = functools.partial(
        train_batch,
        data=cfg.data,
        input_size=cfg.model.input_size,
        seed=cfg.train.seed,
        epoch=epoch,
    )
    return crops_graph(rows, make, num_blocks, concurrency, cfg.data.cpus_per_task, batch_images)


@dataclasses.dataclass
class FeedStats:
    """How the data side fed the model in one epoch, to tell which side bounds a run: seconds the
    train loop waited for its next batch and seconds it computed; samples the data side made and
    the seconds it was busy making them (chunks are made ahead, so the two overlap)."""

    wait_s: float = 0.0
    compute_s: float = 0.0
    made_samples: int = 0
    making_s: float = 0.0

    def next(self, batches: Iterator[dict]) -> dict | None:
        t0 = time.perf_counter()
        batch = next(batches, None)
        self.wait_s += time.perf_counter() - t0
        return batch

    def data_rate(self) -> float:
        """Samples/s the data side makes when busy (what it could feed with no waiting)."""
        return self.made_samples / self.making_s if self.making_s > 0 else 0.0


def iter_chunked(
    make: Callable[[Sequence[dict]], ray.data.Dataset],
    rows: Sequence[dict],
    chunk_rows: int,
    batch_size: int,
    stats: FeedStats | None = None,
) -> Iterator[dict]:
    """Numpy batches of `make(chunk)` over chunks of `rows`, each chunk materialised while the
    previous one is consumed (order kept); `stats` counts what was made and how long it took.

    Why not stream: a streaming executor whose output is backpressured by a slower consumer (a
    train step, a model) has no task to wait on and spins, taking the training thread's time
    (GIL; docs/benchmarks.md).
    """
    stats = stats or FeedStats()

    def made(chunk: Sequence[dict]) -> ray.data.MaterializedDataset:
        t0 = time.perf_counter()
        dataset = make(chunk).materialize()  # Ray call
        stats.making_s += time.perf_counter() - t0
        stats.made_samples += dataset.count()  # from the block metadata, no data read
        return dataset

    # sliced when due: an ImageTable makes a chunk's row dicts only then (COCO-size epochs)
    starts = range(0, len(rows), chunk_rows)
    with ThreadPoolExecutor(max_workers=1) as ahead:
        future = ahead.submit(made, rows[:chunk_rows]) if starts else None
        for k, start in enumerate(starts):
            dataset = future.result()
            if k + 1 < len(starts):
                future = ahead.submit(made, rows[start + chunk_rows : start + 2 * chunk_rows])
            yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy")
