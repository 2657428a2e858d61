"""Ray Data graphs: image rows -> person crops, sharded by image across CPU workers, and crops ->
poses on an actor pool that holds the model (`psm eval`); image rows -> detector actors that
decode, detect and crop -> pose actors (`psm infer` with infer.boxes=detector).

A crop task turns a block of image rows into one batch of sample columns (numpy arrays, stacked),
which Ray stores as one Arrow block: no per-sample Python dicts to convert (with `flat_map` that
conversion cost more worker CPU than the crop itself; docs/benchmarks.md).

The Ray calls of the data side live here. A graph is built per epoch (the epoch is part of every
sample's seed), so each epoch draws new augmentations and a resumed epoch redraws exactly the same.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from pipelines.augment import BATCH_IMAGES, eval_batch, train_batch
from pipelines.detect import Detector
from pipelines.predict import PosePredictor
from psm_model.config import Config, PoseRuntime
from psm_model.export import export_onnx
from psm_model.hrnet import build_model
from psm_model.weights import load_strict

log = logging.getLogger(__name__)


def _dataset(rows: Sequence[dict], num_blocks: int | None, batch_images: int) -> ray.data.Dataset:
    # Ray call: keep block order, so the sample order is fixed whatever the worker count
    DataContext.get_current().execution_options.preserve_order = True
    # a block is a batch: one task and one output block each (no merging of outputs)
    blocks = num_blocks or max(1, math.ceil(len(rows) / batch_images))
    return ray.data.from_items(list(rows), override_num_blocks=blocks)


def keep_data_actors_here() -> None:
    """Ray Data's stats and autoscaling-coordinator actors are detached: they live for the
    cluster's lifetime on the node of the cluster's first Ray Data run. Run a one-row graph here,
    on the job's driver (the head), so that they are made here and not inside a training worker:
    the autoscaler never removes a node that holds an actor, so a GPU node would stay up idle
    for good (seen with Ray's fake multi-node provider: tests/test_autoscaling.py). Once they
    exist, this is a task of a row (~1 s), which asks for no CPU: on a cluster whose CPUs are
    all taken it would otherwise wait for one."""
    ray.data.from_items([{"x": 0}]).map_batches(_same, num_cpus=0).materialize()  # Ray


def _same(batch: dict) -> dict:
    return batch


def model_actors(size: int) -> ActorPoolStrategy:
    """A fixed pool of `size` actors that call the model in their main thread.

    By default Ray Data calls an actor's `__call__` in a second thread, where glibc serves the
    call from another malloc arena than the main one (heaps of at most 64 MB that are created and
    unmapped as the batch's activations come and go): the tiny pose model on one thread paid
    ~90k page faults per batch of 32 and ran 32 persons/s there, 40 in the main thread
    (docs/benchmarks.md). With one call at a time per actor (the default) nothing overlapped with
    the call in that thread anyway."""
    return ActorPoolStrategy(size=size, enable_true_multi_threading=True)


def crops_task(images: dict[str, np.ndarray], *, make: Callable, threads: int) -> dict:
    """`make` (train_batch or eval_batch) on one batch of image rows, inside a Ray task.

    OpenCV sizes its thread pool by the machine, not by the CPUs Ray reserved for the task (2
    threads in a 1-CPU task on 2 cores): hold it to the reservation.
    """
    if cv2.getNumThreads() != threads:
        cv2.setNumThreads(threads)
    return make(images)


def _crops(
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
    return _dataset(rows, num_blocks, batch_images).map_batches(
        fn, batch_size=None, batch_format="numpy", compute=compute, num_cpus=num_cpus
    )


def train_crops(
    rows: Sequence[dict],
    cfg: Config,
    epoch: int,
    *,
    num_blocks: int | None = None,
    concurrency: int | None = None,
    num_cpus: float = 1.0,
    batch_images: int = BATCH_IMAGES,
) -> ray.data.Dataset:
    """Augmented person crops of one epoch (columns: pipelines.augment.SAMPLE_COLUMNS).

    `concurrency` caps the decode/augment tasks running at once (None: as many as CPUs allow);
    `num_cpus` is what each task reserves (below 1 when training workers hold the cores). The
    rows are cut into `num_blocks` blocks (default: of at most `batch_images` images), and each
    task makes one block's samples in one `train_batch` call.
    """
    make = functools.partial(
        train_batch,
        data=cfg.data,
        input_size=cfg.model.input_size,
        seed=cfg.train.seed,
        epoch=epoch,
    )
    return _crops(rows, make, num_blocks, concurrency, num_cpus, batch_images)


def eval_crops(
    rows: Sequence[dict],
    cfg: Config,
    *,
    num_blocks: int | None = None,
    concurrency: int | None = None,
    num_cpus: float = 1.0,
    batch_images: int = BATCH_IMAGES,
) -> ray.data.Dataset:
    """Unaugmented crops of every box (ground truth or detections) for evaluation and inference;
    blocks and tasks as `train_crops` (`eval_batch` per block)."""
    make = functools.partial(
        eval_batch, input_size=cfg.model.input_size, max_pixels=cfg.data.max_image_pixels
    )
    return _crops(rows, make, num_blocks, concurrency, num_cpus, batch_images)


def pose_predictions(
    rows: Sequence[dict],
    cfg: Config,
    weights: dict[str, torch.Tensor],
    runtime: PoseRuntime = "torch",
) -> ray.data.Dataset:
    """`eval_crops` -> poses (pipelines.predict.POSE_COLUMNS) on a pool of eval.workers
    `PosePredictor` actors, each holding the model with these (CPU) weights for `cfg.model`, run
    by `runtime` (onnxruntime: exported here once, the ONNX bytes shipped to the actors).

    Each actor reserves one GPU when the cluster has any, and eval.cpus_per_worker CPUs; the crop
    tasks reserve data.cpus_per_task besides. Except where both steps ask for the same resources (no
    GPU and data.cpus_per_task == eval.cpus_per_worker): then Ray fuses the crop step into the
    actors, which decode and crop their own batches (fusion follows equal resource requests,
    ray-project/ray#54433).
    """
    total = ray.cluster_resources()  # Ray call
    gpus = 1 if total.get("GPU", 0) > 0 else 0
    fused = not gpus and cfg.data.cpus_per_task == cfg.eval.cpus_per_worker
    need = {"GPU": cfg.eval.workers * gpus}
    need["CPU"] = cfg.eval.workers * cfg.eval.cpus_per_worker + (
        0 if fused else cfg.data.cpus_per_task
    )
    _warn_short(
        need,
        total,
        f"eval.workers={cfg.eval.workers} actors (eval.cpus_per_worker="
        f"{cfg.eval.cpus_per_worker}) and a crop task (data.cpus_per_task="
        f"{cfg.data.cpus_per_task})",
    )
    crops = eval_crops(rows, cfg, num_cpus=cfg.data.cpus_per_task)
    return _pose_actors(crops, cfg, weights, runtime, gpus)


def _warn_short(need: dict[str, float], total: dict[str, float], what: str) -> None:
    short = {k: (v, total.get(k, 0)) for k, v in need.items() if v > total.get(k, 0)}
    if short:  # a fixed actor pool that cannot start waits silently (an autoscaler may add nodes)
        log.warning("%s need more than the cluster has now (need, have): %s", what, short)


def _pose_actors(
    crops: ray.data.Dataset,
    cfg: Config,
    weights: dict[str, torch.Tensor],
    runtime: PoseRuntime,
    gpus: int,
) -> ray.data.Dataset:
    model = weights
    if runtime == "onnxruntime":
        model = onnx_pose_model(cfg, weights)
    # Ray calls: the weights go to the object store once, and each actor fetches them from there
    return crops.map_batches(
        PosePredictor,
        fn_constructor_kwargs={"cfg": cfg, "weights": ray.put(model), "runtime": runtime},
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=model_actors(cfg.eval.workers),
        num_cpus=cfg.eval.cpus_per_worker,
        num_gpus=gpus,
    )


def detected_pose_predictions(
    rows: Sequence[dict],
    cfg: Config,
    weights: dict[str, torch.Tensor],
    runtime: PoseRuntime,
    detector: bytes,
    source: str,
) -> ray.data.Dataset:
    """Image rows (image_id, path) -> person crops on infer.detector.workers `Detector` actors
    (decode, detect, crop: one decode per image) -> poses on the eval.workers pose actors, one
    streaming graph: the two actor pools are separate, so detection and pose overlap.

    `detector` is the .onnx bytes (object store, as the pose weights). Every image gives at least
    one row (a "no_person" or decode skip row), with its box count, so the driver knows when an
    image is complete.
    """
    total = ray.cluster_resources()  # Ray call
    gpus = 1 if total.get("GPU", 0) > 0 else 0
    det = cfg.infer.detector
    need = {"GPU": (cfg.eval.workers + det.workers) * gpus}
    need["CPU"] = cfg.eval.workers * cfg.eval.cpus_per_worker + det.workers * det.cpus_per_worker
    _warn_short(
        need,
        total,
        f"eval.workers={cfg.eval.workers} pose actors (eval.cpus_per_worker="
        f"{cfg.eval.cpus_per_worker}) and infer.detector.workers={det.workers} detector actors "
        f"(infer.detector.cpus_per_worker={det.cpus_per_worker})",
    )
    # Ray calls: blocks of detector.batch_images image rows through the detector actors
    crops = _dataset(rows, None, det.batch_images).map_batches(
        Detector,
        fn_constructor_kwargs={"cfg": cfg, "model": ray.put(detector), "source": source},
        batch_size=det.batch_images,
        batch_format="numpy",
        compute=model_actors(det.workers),
        num_cpus=det.cpus_per_worker,
        num_gpus=gpus,
    )
    return _pose_actors(crops, cfg, weights, runtime, gpus)


def onnx_pose_model(cfg: Config, weights: dict[str, torch.Tensor]) -> bytes:
    """The ONNX bytes of `cfg.model` with these weights (psm_model.export)."""
    model = build_model(cfg.model)
    load_strict(model, weights, "pose weights")
    return export_onnx(model, cfg.model.input_size)


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
