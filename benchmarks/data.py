"""`psm bench data`: augmented person crops per second per CPU core, and what a sample weighs.

Three in-process figures on one core (no Ray, cv2 limited to one thread), over every training
person of a COCO-style root:

- ours: `pipelines.augment.train_batch` as the Ray workers run it (batches of BATCH_IMAGES image
  rows; decode each image once, `make_training_sample` per person), split into decode
  (`decode_image`), warp (`warp_crop`, i.e. the one cv2.warpAffine) and everything else
  (augmentation draws, matrices, keypoints, the output columns);
- limit: `decode_image` once per image and one cv2.warpAffine per person with a fixed matrix
  (the person's unaugmented crop, computed before timing): no draws, no keypoint maths;
- official-HRNet-style: `benchmarks.official_loader.time_official`, an emulation of the official
  `JointsDataset.__getitem__` (decode per person, float32 image and heatmaps).

Then end to end through Ray Data (`pipelines.datasets.train_crops`, iter_batches of 32) for each
worker count, after a warm-up epoch. In-process figures are CPU time of the one thread
(`time.thread_time`: what one core needs, whatever else the shared machine runs; wall-clock rates
are printed alongside); the three paths run `repeats` interleaved passes and the fastest pass of
each is kept. The load average is printed with the figures.

A URI root (`--coco-root s3://BUCKET/coco`) is read as training reads it: the annotations through
`pipelines.uris`, each image inside the Ray Data task that decodes it. Only the Ray Data part runs
there: the official-style loader opens local files, and one thread's CPU time would leave out the
S3 client's own I/O threads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow.fs as pafs

import pipelines.augment as augment_module
from benchmarks.official_loader import clock, official_nbytes, official_sigma, time_official
from jobs import command, storage
from pipelines.augment import BATCH_IMAGES, image_rows, rows_to_columns, train_batch
from pipelines.coco import load_coco_persons
from pipelines.images import decode_image
from pipelines.uris import filesystem, join, write_bytes
from psm_model.config import Config
from psm_model.config_yaml import load_config
from psm_model.errors import redact_secrets
from psm_model.geometry import affine_matrix

SIZES: tuple[tuple[int, int], ...] = ((384, 288), (256, 192))  # (height, width)
RAY_BATCH = 32
RAY_MIN_SAMPLES = 1000  # the Ray part's image rows are repeated to hold at least this many persons


def sample_nbytes(sample: dict) -> int:
    """Bytes of one sample row: every column's nbytes; a string counts its UTF-8 length."""
    total = 0
    for value in sample.values():
        if isinstance(value, str):
            total += len(value.encode())
        else:
            total += np.asarray(value).nbytes
    return total


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed_attr(module: object, name: str, totals: dict, key: str) -> Iterator[None]:
    """Replace `module.name` by a wrapper that adds its wall time to totals[key] (bench only)."""
    original: Callable = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = clock()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += clock() - t0

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _cv2_threads(n: int) -> Iterator[None]:
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _best(passes: list[dict]) -> dict:
    return min(passes, key=lambda p: p["seconds"])


def _summary(p: dict, extra: Sequence[str] = ()) -> dict:
    """crops/s and ms per crop of one timed pass; `other` = total - decode - warp - extras."""
    n, sec = p["crops"], p["seconds"]
    out = {"crops": n, "seconds": sec, "crops_per_s": n / sec, "ms_per_crop": 1e3 * sec / n}
    out["wall_crops_per_s"] = n / p["wall_seconds"]
    rest = sec
    for key in ("decode", "warp", *extra):
        out[f"{key}_ms"] = 1e3 * p[key] / n
        rest -= p[key]
    out["other_ms"] = 1e3 * rest / n
    return out


# ----------------------------------------------------------------------------------------------
# The three in-process paths
# ----------------------------------------------------------------------------------------------


def time_ours(rows: Sequence[dict], cfg: Config, size: tuple[int, int]) -> tuple[dict, int]:
    """One pass of train_batch over every row, BATCH_IMAGES rows a call; decode and warp timed by
    wrappers around the functions it calls. Returns the pass and the bytes of one sample."""
    batches = [
        rows_to_columns(rows[i : i + BATCH_IMAGES]) for i in range(0, len(rows), BATCH_IMAGES)
    ]
    totals = {"decode": 0.0, "warp": 0.0}
    crops = nbytes = 0
    wall0, t0 = time.perf_counter(), clock()
    with (
        _timed_attr(augment_module, "decode_image", totals, "decode"),
        _timed_attr(augment_module, "warp_crop", totals, "warp"),
    ):
        for images in batches:
            out = train_batch(images, data=cfg.data, input_size=size, seed=cfg.train.seed, epoch=0)
            real = out["skip"] == ""
            crops += int(real.sum())
            if not nbytes and real.any():
                nbytes = sample_nbytes({k: v[real.argmax()] for k, v in out.items()})
    sec, wall = clock() - t0, time.perf_counter() - wall0
    return {"crops": crops, "seconds": sec, "wall_seconds": wall, **totals}, nbytes


def limit_matrices(rows: Sequence[dict], size: tuple[int, int]) -> list[list[np.ndarray]]:
    """Each person's unaugmented crop matrix, for `time_limit` (computed outside the timing)."""
    return [
        [affine_matrix(c, s, 0.0, size) for c, s in zip(r["centers"], r["scales"], strict=True)]
        for r in rows
    ]


def time_limit(
    rows: Sequence[dict], mats: Sequence[Sequence[np.ndarray]], cfg: Config, size: tuple[int, int]
) -> dict:
    """One pass: decode_image once per image + one warpAffine per person with a fixed matrix."""
    dsize = (size[1], size[0])
    decode = warp = 0.0
    crops = 0
    wall0 = time.perf_counter()
    for row, row_mats in zip(rows, mats, strict=True):
        t0 = clock()
        image = decode_image(row["path"], cfg.data.max_image_pixels)
        t1 = clock()
        for m in row_mats:
            cv2.warpAffine(image, m, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        t2 = clock()
        decode += t1 - t0
        warp += t2 - t1
        crops += len(row_mats)
    return {
        "crops": crops,
        "seconds": decode + warp,
        "wall_seconds": time.perf_counter() - wall0,
        "decode": decode,
        "warp": warp,
    }


# ----------------------------------------------------------------------------------------------
# Ray Data
# ----------------------------------------------------------------------------------------------


def time_ray(
    rows: Sequence[dict],
    cfg: Config,
    size: tuple[int, int],
    workers: Sequence[int],
    epochs: int,
    min_samples: int,
) -> list[dict]:
    """Samples/s of `train_crops` iterated in batches of 32, per worker count, after a warm-up.

    The image rows are repeated until they hold at least `min_samples` persons, so the per-epoch
    start-up of a graph does not dominate a tiny sample of COCO."""
    from pipelines.datasets import train_crops  # Ray imports stay out of the in-process part

    persons = sum(len(r["ann_ids"]) for r in rows)
    repeat = max(1, math.ceil(min_samples / max(1, persons)))
    tiled = list(rows) * repeat
    size_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, input_size=size))
    out = []
    for n in workers:

        def epoch_run(epoch: int, n: int = n) -> tuple[int, float, int, float | None]:
            ds = train_crops(tiled, size_cfg, epoch, concurrency=n)
            count, nbytes = 0, 0
            t0 = time.perf_counter()
            for batch in ds.iter_batches(batch_size=RAY_BATCH, batch_format="numpy"):
                count += len(batch["skip"])
                if not nbytes:
                    nbytes = sample_nbytes({k: v[0] for k, v in batch.items()})
            return count, time.perf_counter() - t0, nbytes, _worker_cpu_seconds(ds)

        epoch_run(0)  # warm-up: worker start, imports, first graph
        count, sec, nbytes, cpu = 0, 0.0, 0, 0.0
        for e in range(1, epochs + 1):
            c, s, nbytes, cpu_e = epoch_run(e)
            count, sec = count + c, sec + s
            cpu = None if cpu is None or cpu_e is None else cpu + cpu_e
        out.append(
            {
                "workers": n,
                "images": len(tiled) * epochs,
                "samples": count,
                "seconds": sec,
                "samples_per_s": count / sec,
                "per_core": count / sec / n,
                "worker_cpu_ms_per_sample": None if cpu is None else 1e3 * cpu / count,
                "bytes_per_sample": nbytes,
            }
        )
    return out


def _worker_cpu_seconds(ds) -> float | None:
    """CPU seconds the crops tasks (train_batch) spent, from Ray Data's stats (a private API in Ray
    2.60: None if it changes). Under load, wall-clock rates also count other processes' turns."""
    try:
        ops = ds._get_stats_summary().operators_stats
        return sum(op.cpu_time.sum for op in ops if "crops_task" in op.operator_name) or None
    except Exception:  # a figure for context only
        return None


@contextlib.contextmanager
def _local_ray(num_cpus: int) -> Iterator[None]:
    import ray
    from ray.data import DataContext

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------
# The bench
# ----------------------------------------------------------------------------------------------


def machine_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} CPUs, load average (1, 5, 15 min) at start: {load}; "
        f"OpenCV {cv2.__version__}, numpy {np.__version__}"
    )


def _size_label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def bench_data(
    cfg: Config,
    images_dir: str | os.PathLike,
    annotations: str | os.PathLike,
    *,
    workers: list[int] = [1, 2],  # noqa: B006 - read only
    epochs: int = 1,
    json_out: str | None = None,
    sizes: Sequence[tuple[int, int]] = SIZES,
    repeats: int = 5,
    ray_min_samples: int = RAY_MIN_SAMPLES,
    label: str = "",
) -> dict:
    """Crops/s per core, bytes per sample and the time breakdown on one COCO-style split (module
    docstring); prints markdown tables and returns the figures (also written to `json_out`).

    `sizes` are (height, width) crops; in-process passes run `repeats` times (fastest kept), on a
    local root only; the Ray part runs a warm-up and `epochs` timed epochs per worker count (none
    if `workers` is empty).
    """
    label = label or redact_secrets(str(images_dir))
    in_process = "://" not in str(images_dir)
    result: dict = {"dataset": label, "machine": machine_line(), "in_process": in_process}
    result["sizes"] = {}
    print(f"### {label}\n\nmachine: {result['machine']}\n")
    if not in_process:
        print(
            "(a URI root: in-process passes skipped, as the official-style loader reads local "
            "files and one thread's CPU time leaves out the S3 client's threads; Ray Data reads "
            "each image in the task that decodes it, as training does)\n"
        )
    # loaded per size: the person boxes are grown to the crop aspect
    for size in sizes:
        records, skips = load_coco_persons(images_dir, annotations, size, cfg.data.box_padding)
        rows = image_rows(records)
        persons = sum(len(r.persons) for r in records)
        entry = {"images": len(records), "persons": persons, "skipped": dict(skips)}
        if in_process:
            entry.update(_in_process(records, rows, cfg, size, repeats))
            _print_in_process(size, entry)
        if workers:
            with _local_ray(max(workers)):
                entry["ray"] = time_ray(rows, cfg, size, workers, epochs, ray_min_samples)
            _print_ray(size, entry)
        result["sizes"][_size_label(size)] = entry
    if json_out:
        write_bytes(json_out, json.dumps(result, indent=1).encode())
    return result


def _in_process(
    records: Sequence, rows: Sequence[dict], cfg: Config, size: tuple[int, int], repeats: int
) -> dict:
    """The three in-process paths, `repeats` interleaved passes, the fastest of each kept."""
    mats = limit_matrices(rows, size)
    passes: dict[str, list[dict]] = {"ours": [], "limit": [], "official": []}
    with _cv2_threads(1):
        for _ in range(repeats):  # interleaved, so that a busy spell hits every path alike
            p, ours_bytes = time_ours(rows, cfg, size)
            passes["ours"].append(p)
            passes["limit"].append(time_limit(rows, mats, cfg, size))
            passes["official"].append(time_official(records, cfg, size))
    ours = _summary(_best(passes["ours"]))
    limit = _summary(_best(passes["limit"]))
    official = _summary(_best(passes["official"]), extra=("to_float", "heatmaps"))
    off_bytes = official_nbytes(size)
    return {
        "ours": {**ours, "bytes_per_sample": ours_bytes},
        "limit": limit,
        "official": {**official, "bytes_per_sample": off_bytes, "sigma": official_sigma(size)},
        "ours_vs_limit": ours["crops_per_s"] / limit["crops_per_s"],
        "ours_vs_official": ours["crops_per_s"] / official["crops_per_s"],
    }


def _print_in_process(size: tuple[int, int], e: dict) -> None:
    print(
        f"**{_size_label(size)}**, one core, in-process: {e['images']} images, "
        f"{e['persons']} persons; crops per CPU-second of the one thread (wall-clock crops/s "
        f"alongside), fastest of the interleaved passes\n"
    )
    print(
        "| path | crops/s | wall crops/s | ms/crop | decode | warp | to float | heatmaps | other "
        "| vs limit | bytes/sample |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = (
        ("ours (train_batch)", e["ours"], e["ours"]["bytes_per_sample"]),
        ("limit (decode + warpAffine)", e["limit"], None),
        ("official-HRNet-style", e["official"], e["official"]["bytes_per_sample"]),
    )
    lim = e["limit"]["crops_per_s"]
    for name, r, nbytes in rows:
        to_float = f"{r['to_float_ms']:.2f}" if "to_float_ms" in r else "-"
        heat = f"{r['heatmaps_ms']:.2f}" if "heatmaps_ms" in r else "-"
        print(
            f"| {name} | {r['crops_per_s']:.0f} | {r['wall_crops_per_s']:.0f} "
            f"| {r['ms_per_crop']:.2f} | {r['decode_ms']:.2f} "
            f"| {r['warp_ms']:.2f} | {to_float} | {heat} | {r['other_ms']:.2f} "
            f"| {r['crops_per_s'] / lim:.0%} | {'-' if nbytes is None else f'{nbytes:,}'} |"
        )
    print(
        f"\nms per crop; decode = decode time / persons. ours / limit = {e['ours_vs_limit']:.0%}, "
        f"ours / official = {e['ours_vs_official']:.2f}x; bytes: ours "
        f"{e['ours']['bytes_per_sample']:,} (uint8 crop + small columns), official "
        f"{e['official']['bytes_per_sample']:,} (float32 image + float32 heatmaps at stride 4, "
        f"sigma {e['official']['sigma']:g}, + weights) = "
        f"{e['official']['bytes_per_sample'] / max(1, e['ours']['bytes_per_sample']):.1f}x\n"
    )


def _print_ray(size: tuple[int, int], e: dict) -> None:
    """The Ray Data table; its columns against the in-process figures read "-" without them."""
    one_core = e["ours"]["crops_per_s"] if "ours" in e else math.nan
    limit = e["limit"]["crops_per_s"] if "limit" in e else math.nan
    print(f"**{_size_label(size)}**, Ray Data `train_crops`, iter_batches({RAY_BATCH})\n")
    print(
        "| workers | images | samples | s | samples/s | per core | vs 1 core in-process "
        "| vs limit | worker CPU ms/sample | per worker CPU-s vs limit | bytes |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in e["ray"]:
        cpu = r["worker_cpu_ms_per_sample"]
        print(
            f"| {r['workers']} | {r['images']} | {r['samples']} | {r['seconds']:.2f} "
            f"| {r['samples_per_s']:.0f} | {r['per_core']:.0f} | {_pct(r['per_core'], one_core)} "
            f"| {_pct(r['per_core'], limit)} | {'-' if cpu is None else f'{cpu:.2f}'} "
            f"| {'-' if cpu is None else _pct(1e3 / cpu, limit)} | {r['bytes_per_sample']:,} |"
        )
    against = (
        f", vs {e['ours']['ms_per_crop']:.2f} ms in-process; per worker CPU-s: samples per "
        f"CPU-second of the tasks, vs the limit's {limit:.0f} crops/s"
        if "ours" in e
        else " (no in-process run to compare with)"
    )
    print(
        "\nWall clock, after a warm-up epoch; the image rows are repeated to reach the samples "
        f"shown. Worker CPU: the crops tasks' CPU time (Ray Data stats) per sample{against}.\n"
    )


def _pct(value: float, reference: float) -> str:
    return "-" if math.isnan(reference) else f"{value / reference:.0%}"


def run_bench_data(
    cfg: Config,
    coco_root: str | os.PathLike | None,
    synthetic: int,
    *,
    workers: list[int],
    epochs: int = 1,
    sizes: Sequence[tuple[int, int]] = SIZES,
    repeats: int = 5,
    json_out: str | None = None,
    ray_min_samples: int = RAY_MIN_SAMPLES,
) -> dict:
    """`psm bench data`: the real COCO split under `coco_root`, a folder or a URI (skipped if
    absent), and a synthetic one of `synthetic` train images written to a temporary folder
    (skipped if 0)."""
    results: dict = {"machine": machine_line(), "datasets": []}
    kwargs = {"workers": workers, "epochs": epochs, "sizes": sizes, "repeats": repeats}
    kwargs["ray_min_samples"] = ray_min_samples
    with _local_ray(max(workers)) if workers else contextlib.nullcontext():
        _run_datasets(cfg, coco_root, synthetic, results, kwargs)
    results["load_at_end"] = list(os.getloadavg())
    print(
        "load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    if json_out:
        write_bytes(json_out, json.dumps(results, indent=1).encode())
    return results


def _run_datasets(
    cfg: Config, coco_root: str | os.PathLike | None, synthetic: int, results: dict, kwargs: dict
) -> None:
    if coco_root:
        root = str(coco_root)
        images, ann = join(root, cfg.data.train_images), join(root, cfg.data.train_annotations)
        if _split_present(images, ann):
            results["datasets"].append(bench_data(cfg, images, ann, **kwargs))
        else:
            shown = redact_secrets(f"{root}: {ann} or {images}")
            print(f"(no COCO train split at {shown} missing; skipped)\n")
    if synthetic > 0:
        from pipelines.synthetic import write_split

        print(f"(writing {synthetic} synthetic train images to a temporary folder)\n")

        with tempfile.TemporaryDirectory(prefix="psm-bench-data-") as tmp:
            write_split(tmp, "train2017", synthetic, seed=cfg.train.seed)
            label = f"synthetic, {synthetic} train images"
            results["datasets"].append(
                bench_data(
                    cfg,
                    Path(tmp) / "train2017",
                    Path(tmp) / "annotations" / "person_keypoints_train2017.json",
                    label=label,
                    **kwargs,
                )
            )


def _split_present(images: str, annotations: str) -> bool:
    """A local image folder and annotation file, or (a URI root) the annotation object: a store
    has no folders to check, and a missing image is a counted skip anyway."""
    if "://" not in annotations:
        return Path(annotations).is_file() and Path(images).is_dir()
    fs, where = filesystem(annotations)  # no access to the bucket: its OSError, before any run
    return fs.get_file_info(where).type == pafs.FileType.File


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "On one core in-process: our train_batch path (decode each image once, "
        "augment every person) with its decode / warp / other breakdown, the decode + "
        "warpAffine-only limit, and an official-HRNet-style loader (decode per person, float "
        "image and heatmaps); then end to end through Ray Data per worker count. On the COCO "
        "train split under --coco-root and on a synthetic set, at each --sizes."
    )
    command.add_config_arguments(p, default="the defaults")
    p.add_argument(
        "--coco-root",
        default=None,
        help="COCO-style root with data.train_images and data.train_annotations, a folder or "
        "a URI such as s3://BUCKET/coco (Ray Data part only) (default: data.root; skipped if "
        "absent)",
    )
    p.add_argument(
        "--synthetic",
        type=int,
        default=100,
        metavar="N",
        help="also bench N synthetic train images written to a temporary folder (0: skip)",
    )
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray worker counts")
    p.add_argument("--epochs", type=int, default=1, help="timed Ray epochs after the warm-up")
    p.add_argument(
        "--min-samples",
        type=int,
        default=RAY_MIN_SAMPLES,
        help="Ray epochs: the image rows are repeated to hold at least this many persons",
    )
    p.add_argument(
        "--sizes",
        type=command.size_hw,
        nargs="+",
        default=list(SIZES),
        metavar="HxW",
        help="crop sizes (height x width)",
    )
    p.add_argument("--repeats", type=int, default=5, help="in-process passes (fastest kept)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # `psm bench data data.x=1`
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    if args.json:  # before the minutes of measuring
        storage.require_output_file(args.json, "--json")
    run_bench_data(
        cfg,
        coco_root=args.coco_root if args.coco_root is not None else cfg.data.root,
        synthetic=args.synthetic,
        workers=args.workers,
        epochs=args.epochs,
        sizes=args.sizes,
        repeats=args.repeats,
        json_out=args.json,
        ray_min_samples=args.min_samples,
    )
