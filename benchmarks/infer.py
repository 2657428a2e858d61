"""`psm bench infer`: the whole inference job (decode, detection, crops, pose, results) and the
graph of `psm eval` (crops of given boxes, pose, results) against the pose model alone on the
same crops, the pose model on ONNX Runtime against PyTorch eager, and what a detector actor
spends per image (decode; decode, detection and crops). One run, the same images: figures for
docs/benchmarks.md. The pose model runs on the GPU when there is one, as in the jobs.

The images are plain-background people (benchmarks.toy_detector) at COCO size, the detector the
ONNX model the tests build (the box around the figure), the pose model the config's with random
weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.data import _local_ray
from benchmarks.model import machine
from benchmarks.profile import describe
from benchmarks.toy_detector import export_toy_detector, write_plain_people
from jobs import command, storage
from pipelines.actors import OnnxPoseModel, keep_freed_memory
from pipelines.detect import box_row, detect_and_crop, detector_session
from pipelines.images import decode_image
from pipelines.predict import predict, predict_poses
from pipelines.uris import write_bytes
from psm_model.config import Config
from psm_model.config_inference import DetectorConfig
from psm_model.export import export_onnx
from psm_model.hrnet import build_model
from psm_model.recipe import CropSpec, EvalRecipe, PoseActors, Rescoring

log = logging.getLogger(__name__)

DETECTOR_SIZE = (160, 160)  # the size the tests build


def _rate(fn, warm_up, count: int, repeats: int) -> float:
    """count / the best of `repeats` timed calls of fn, after a call of warm_up."""
    warm_up()
    best = min(_timed(fn) for _ in range(repeats))
    return count / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _clocked(ds, arrivals: list[tuple[float, int]]):
    """The dataset's batches, noting when each arrived and how many pose rows it held."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        arrivals.append((time.perf_counter(), len(next(iter(batch.values())))))
        yield batch


RUNTIMES = ("torch", "onnxruntime")
# the graphs timed: `psm infer`'s detector + pose job, and `psm eval`'s (and `psm infer --dets`')
# crops of given boxes + pose, here the boxes the detector found
GRAPHS = ("job", "boxes_job")


def bench_infer(
    cfg: Config,
    images: int,
    size_hw: tuple[int, int],
    json_out: str | None,
    repeats: int = 3,
    runtimes: tuple[str, ...] = RUNTIMES,
) -> dict:
    from pipelines.predict import detected_pose_predictions, pose_predictions

    det = dataclasses.replace(
        cfg.infer.detector, input_size=DETECTOR_SIZE, pad_value=20.0, model="toy-raw.onnx"
    )
    cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, detector=det))
    recipe = EvalRecipe.of(cfg)
    threads = max(1, int(cfg.eval.cpus_per_worker))
    torch.set_num_threads(threads)  # the pose-alone figures get what one pose actor gets,
    keep_freed_memory()  # its malloc settings too
    model = build_model(cfg.model).eval()
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as a pose actor's (predict.py)
    detector = export_toy_detector("raw", DETECTOR_SIZE)
    record: dict = {
        "machine": machine(),
        "model": describe(cfg.model),
        "pose_device": device,
        "runtimes": list(runtimes),
        "images": images,
        "image_size": list(size_hw),
        "detector_input": list(DETECTOR_SIZE),
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_plain_people(tmp, images + 1, seed=0, size_hw=size_hw)
        paths = sorted(str(p) for p in (Path(tmp) / "images").glob("*.png"))[:images]
        rows = [{"image_id": i + 1, "path": p} for i, p in enumerate(paths)]

        def decode_all() -> None:
            for path in paths:
                decode_image(path, 1 << 28)

        record["decode_ms"] = 1e3 / _rate(decode_all, decode_all, len(paths), 1)

        # the same crops in process: what a detector actor does (decode, detect, crop)
        session, layout = detector_session(detector, "toy-raw.onnx", threads)
        columns = {"image_id": np.array([r["image_id"] for r in rows]), "path": np.array(paths)}
        started = time.perf_counter()
        crops = detect_and_crop(columns, session, layout, recipe.crop, det)
        record["detect_and_crop_ms_per_image"] = (time.perf_counter() - started) * 1e3 / len(paths)
        keep = crops["skip"] == ""
        persons = int(keep.sum())
        record["persons"] = persons
        batches = [
            {k: v[keep][i : i + recipe.batch_size] for k, v in crops.items()}
            for i in range(0, persons, recipe.batch_size)
        ]
        pose_steps = _pose_steps(model.to(device), device, recipe, threads, runtimes)

        def alone(name: str) -> float:  # persons/s; warm-up: the first two batches
            step = pose_steps[name]
            return _rate(
                lambda: [step(b) for b in batches],
                lambda: [step(b) for b in batches[:2]],
                persons,
                repeats,
            )

        for name in pose_steps:
            record[f"{name}_persons_s"] = alone(name)

        box_rows = _box_rows(rows, crops, recipe.crop)
        with _local_ray(os.cpu_count() or 2):
            for runtime in runtimes:
                actors = PoseActors.of(cfg, runtime)
                job = functools.partial(
                    detected_pose_predictions,
                    recipe=recipe,
                    actors=actors,
                    weights=weights,
                    det=det,
                    detector=detector,
                )
                boxes_job = functools.partial(
                    pose_predictions, recipe=recipe, actors=actors, weights=weights
                )
                scoring = recipe.rescoring
                # the first graph warms up what every later one reuses (task workers, imports)
                warm_up = runtime == runtimes[0]
                record |= _time_graph(job, rows, scoring, persons, f"job_{runtime}", warm_up)
                key = f"boxes_job_{runtime}"
                record |= _time_graph(boxes_job, box_rows, scoring, persons, key, False)
        # rates drift by ~10% over minutes here (the same passes, run first in a process, came out
        # ~10% faster than later): the pose alone again after the jobs; the faster is the goal's
        for runtime in runtimes:
            name = f"pose_only_{runtime}"
            record[f"{name}_before_persons_s"] = record[f"{name}_persons_s"]
            record[f"{name}_after_persons_s"] = alone(name)
            record[f"{name}_persons_s"] = max(
                record[f"{name}_before_persons_s"], record[f"{name}_after_persons_s"]
            )
    for runtime in runtimes:
        alone_rate = record[f"pose_only_{runtime}_persons_s"]
        for graph in GRAPHS:
            key = f"{graph}_{runtime}"
            record[f"{graph}_over_pose_only_{runtime}"] = record[f"{key}_persons_s"] / alone_rate
            record[f"{graph}_running_over_pose_only_{runtime}"] = (
                record[f"{key}_running_persons_s"] / alone_rate
            )
    if set(RUNTIMES) <= set(runtimes):
        record["onnxruntime_over_torch_forward"] = (
            record["forward_onnxruntime_persons_s"] / record["forward_torch_persons_s"]
        )
    _print(record, cfg.infer.detector)
    if json_out:
        write_bytes(json_out, json.dumps(record, indent=1).encode())
    return record


def _pose_steps(model, device: str, recipe: EvalRecipe, threads: int, runtimes) -> dict:
    """name -> a function of one batch of crops: poses (flip test, decode) and the forward
    alone, per runtime. ONNX Runtime runs on the CPU (its CPU provider: no onnxruntime-gpu)."""
    models = {"torch": (model, device)}
    if "onnxruntime" in runtimes:
        cpu_model = build_model(recipe.model).eval()
        cpu_model.load_state_dict(model.state_dict())
        onnx = export_onnx(cpu_model, recipe.model.input_size)
        models["onnxruntime"] = (OnnxPoseModel(onnx, "pose", threads), "cpu")
    steps = {}
    for runtime in runtimes:
        net, on = models[runtime]
        steps[f"pose_only_{runtime}"] = lambda b, net=net, on=on: predict_poses(net, b, recipe, on)
        steps[f"forward_{runtime}"] = lambda b, net=net, on=on: predict(net, b["image"], recipe, on)
    return steps


def _box_rows(rows: list[dict], crops: dict[str, np.ndarray], crop: CropSpec) -> list[dict]:
    """The image rows with the boxes the detector found (score 1): what `psm eval` and
    `psm infer --dets` crop."""
    keep = crops["skip"] == ""
    found: dict[int, list] = {r["image_id"]: [] for r in rows}
    for image_id, box in zip(crops["image_id"][keep], crops["box"][keep], strict=True):
        found[int(image_id)].append(box)
    out = []
    for r in rows:
        boxes = np.array(found[r["image_id"]], np.float32).reshape(-1, 4)
        out.append(box_row(r["image_id"], r["path"], boxes, np.ones(len(boxes)), crop))
    return out


def _time_graph(
    make, inputs: list[dict], rescoring: Rescoring, persons: int, key: str, warm_up: bool
) -> dict:
    """persons/s of the graph `make(inputs)` to the results, after a warm-up run on 8 inputs
    if `warm_up` (the Ray instance's task workers, imports: each later run reuses them); and
    apart, the start-up to the first poses (each run starts its actor pools) and the rate once
    they flow."""
    from pipelines.validate import pose_results

    def run(some: list[dict]) -> list[tuple[float, int]]:
        arrivals: list[tuple[float, int]] = []  # (time, pose rows) per batch
        pose_results(_clocked(make(some), arrivals), rescoring)
        return arrivals

    if warm_up:
        run(inputs[:8])
    started = time.perf_counter()
    arrivals = run(inputs)
    first, rest = arrivals[0], arrivals[1:]
    running_s = arrivals[-1][0] - first[0]  # 0 when all came in one batch
    return {
        f"{key}_persons_s": persons / (arrivals[-1][0] - started),
        f"{key}_start_s": first[0] - started,
        f"{key}_running_persons_s": (
            sum(n for _, n in rest) / running_s if running_s > 0 else float("nan")
        ),
    }


def _print(r: dict, det: DetectorConfig) -> None:
    print(
        f"{r['machine']}; {r['model']}; pose model on {r['pose_device']}; {r['images']} images "
        f"{r['image_size']}, {r['persons']} persons; detector input {r['detector_input']} "
        f"({r['date']})"
    )
    print("| figure | persons/s | / pose only | once running / pose only | to first poses s |")
    print("|---|---:|---:|---:|---:|")
    for runtime in r["runtimes"]:
        for graph in GRAPHS:
            key = f"{graph}_{runtime}"
            print(
                f"| {key.replace('_', ' ')} | {r[key + '_persons_s']:.1f} "
                f"| {r[f'{graph}_over_pose_only_{runtime}']:.2f} "
                f"| {r[f'{graph}_running_over_pose_only_{runtime}']:.2f} "
                f"| {r[key + '_start_s']:.1f} |"
            )
        for key in (f"pose_only_{runtime}", f"forward_{runtime}"):
            print(f"| {key.replace('_', ' ')} | {r[key + '_persons_s']:.1f} | | | |")
        print(
            f"(pose only {runtime}: the faster of two measures, before the jobs "
            f"{r[f'pose_only_{runtime}_before_persons_s']:.1f}, after "
            f"{r[f'pose_only_{runtime}_after_persons_s']:.1f})"
        )
    print("\njob: detector + pose (`psm infer`); boxes job: given boxes (`psm eval`); goal >= 0.9")
    if "onnxruntime_over_torch_forward" in r:
        print(f"pose forward onnxruntime / torch eager {r['onnxruntime_over_torch_forward']:.2f}")
    print(
        f"per image: decode {r['decode_ms']:.2f} ms; decode, detection and crops "
        f"{r['detect_and_crop_ms_per_image']:.2f} ms (score >= {det.score_threshold}, NMS "
        f"{det.nms_iou})"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "On the same plain-background people, in one run: persons/s of the infer "
        "graph (decode, the tests' ONNX detector, crops, pose actors, results) and of the eval "
        "graph (crops of the boxes found, pose actors, results) against the pose model alone "
        "on the same crops in one process (eval.cpus_per_worker threads, what one pose actor "
        "has; the GPU when there is one), for each --runtimes (infer.pose_runtime); the pose "
        "forward on ONNX Runtime vs PyTorch eager; a detector actor's ms per image."
    )
    command.add_config_arguments(p)
    p.add_argument("--images", type=int, default=64, help="images (one person each)")
    p.add_argument(
        "--size", type=command.size_hw, default=(480, 640), metavar="HxW", help="image size"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="best of this many passes for the pose-alone rates"
    )
    p.add_argument(
        "--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), help="pose runtimes"
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg = command.load(args)
    if args.json:  # before the minutes of measuring
        storage.require_output_file(args.json, "--json")
    bench_infer(cfg, args.images, args.size, args.json, args.repeats, tuple(args.runtimes))
