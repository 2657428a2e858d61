"""`psm bench infer`: the whole inference job (decode, detection, crops, pose, results) against
the pose model alone on the same crops, the pose model on ONNX Runtime against PyTorch eager,
and what a detector actor spends per image (decode; decode, detection and crops). One run, the
same images: figures for docs/benchmarks.md.

The images are plain-background people (pipelines.toy_detector) at COCO size, the detector the
ONNX model the tests build (the box around the figure), the pose model the config's with random
weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.data import _local_ray
from benchmarks.model import machine
from benchmarks.profile import describe
from jobs import command, storage
from pipelines.detect import detect_and_crop, detector_session
from pipelines.images import decode_image
from pipelines.malloc import keep_freed_memory
from pipelines.onnx_runtime import OnnxPoseModel
from pipelines.predict import predict, predict_poses
from pipelines.toy_detector import export_toy_detector, write_plain_people
from pipelines.uris import write_bytes
from psm_model.config import Config, DetectorConfig
from psm_model.export import export_onnx
from psm_model.hrnet import build_model

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


def bench_infer(
    cfg: Config, images: int, size_hw: tuple[int, int], json_out: str | None, repeats: int = 3
) -> dict:
    from pipelines.datasets import detected_pose_predictions
    from pipelines.evaluate import pose_results

    det = dataclasses.replace(
        cfg.infer.detector, input_size=DETECTOR_SIZE, pad_value=20.0, model="toy-raw.onnx"
    )
    cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, detector=det))
    threads = max(1, int(cfg.eval.cpus_per_worker))
    torch.set_num_threads(threads)  # the pose-alone figures get what one pose actor gets,
    keep_freed_memory()  # its malloc settings too
    model = build_model(cfg.model).eval()
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    detector = export_toy_detector("raw", DETECTOR_SIZE)
    record: dict = {
        "machine": machine(),
        "model": describe(cfg.model),
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
        crops = detect_and_crop(columns, session, layout, cfg)
        record["detect_and_crop_ms_per_image"] = (time.perf_counter() - started) * 1e3 / len(paths)
        keep = crops["skip"] == ""
        persons = int(keep.sum())
        record["persons"] = persons
        batches = [
            {k: v[keep][i : i + cfg.eval.batch_size] for k, v in crops.items()}
            for i in range(0, persons, cfg.eval.batch_size)
        ]
        onnx_model = OnnxPoseModel(export_onnx(model, cfg.model.input_size), "pose", threads)
        pose_steps = {
            "pose_only_torch": lambda b: predict_poses(model, b, cfg, "cpu"),
            "pose_only_onnxruntime": lambda b: predict_poses(onnx_model, b, cfg, "cpu"),
            "forward_torch": lambda b: predict(model, b["image"], cfg, "cpu"),
            "forward_onnxruntime": lambda b: predict(onnx_model, b["image"], cfg, "cpu"),
        }

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

        # the whole job's graph: detector actors (decode, detect, crop) -> pose actors -> results
        with _local_ray(max(2, torch.get_num_threads())):
            for runtime in ("torch", "onnxruntime"):
                run_cfg = dataclasses.replace(
                    cfg, infer=dataclasses.replace(cfg.infer, pose_runtime=runtime)
                )

                def job(rows=rows, run_cfg=run_cfg, runtime=runtime) -> list[tuple[float, int]]:
                    ds = detected_pose_predictions(
                        rows, run_cfg, weights, runtime, detector, "toy-raw.onnx"
                    )
                    arrivals: list[tuple[float, int]] = []  # (time, pose rows) per batch
                    pose_results(_clocked(ds, arrivals), run_cfg)
                    return arrivals

                job(rows[: min(8, len(rows))])  # warm-up: workers, imports
                started = time.perf_counter()
                arrivals = job()
                record[f"job_{runtime}_persons_s"] = persons / (arrivals[-1][0] - started)
                # the actor pools start with every job: the start-up apart from the running rate
                first, rest = arrivals[0], arrivals[1:]
                record[f"job_{runtime}_start_s"] = first[0] - started
                running_s = arrivals[-1][0] - first[0]  # 0 when all came in one batch
                record[f"job_{runtime}_running_persons_s"] = (
                    sum(n for _, n in rest) / running_s if running_s > 0 else float("nan")
                )
        # rates drift by ~10% over minutes here (the same passes, run first in a process, came out
        # ~10% faster than later): the pose alone again after the jobs; the faster is the goal's
        for runtime in ("torch", "onnxruntime"):
            name = f"pose_only_{runtime}"
            record[f"{name}_before_persons_s"] = record[f"{name}_persons_s"]
            record[f"{name}_after_persons_s"] = alone(name)
            record[f"{name}_persons_s"] = max(
                record[f"{name}_before_persons_s"], record[f"{name}_after_persons_s"]
            )
    record["job_over_pose_only_torch"] = (
        record["job_torch_persons_s"] / record["pose_only_torch_persons_s"]
    )
    record["job_over_pose_only_onnxruntime"] = (
        record["job_onnxruntime_persons_s"] / record["pose_only_onnxruntime_persons_s"]
    )
    record["onnxruntime_over_torch_forward"] = (
        record["forward_onnxruntime_persons_s"] / record["forward_torch_persons_s"]
    )
    for runtime in ("torch", "onnxruntime"):
        record[f"job_running_over_pose_only_{runtime}"] = (
            record[f"job_{runtime}_running_persons_s"] / record[f"pose_only_{runtime}_persons_s"]
        )
    _print(record, cfg.infer.detector)
    if json_out:
        write_bytes(json_out, json.dumps(record, indent=1).encode())
    return record


def _print(r: dict, det: DetectorConfig) -> None:
    print(
        f"{r['machine']}; {r['model']}; {r['images']} images {r['image_size']}, "
        f"{r['persons']} persons; detector input {r['detector_input']} ({r['date']})"
    )
    print("| figure | persons/s |")
    print("|---|---:|")
    for key in (
        "job_torch",
        "pose_only_torch",
        "job_onnxruntime",
        "pose_only_onnxruntime",
        "forward_torch",
        "forward_onnxruntime",
    ):
        print(f"| {key.replace('_', ' ')} | {r[key + '_persons_s']:.1f} |")
    print(
        "(pose only: the faster of two measures, before the jobs: torch "
        f"{r['pose_only_torch_before_persons_s']:.1f}, onnxruntime "
        f"{r['pose_only_onnxruntime_before_persons_s']:.1f}; after: torch "
        f"{r['pose_only_torch_after_persons_s']:.1f}, onnxruntime "
        f"{r['pose_only_onnxruntime_after_persons_s']:.1f})"
    )
    print(
        f"\njob / pose only: torch {r['job_over_pose_only_torch']:.2f}, onnxruntime "
        f"{r['job_over_pose_only_onnxruntime']:.2f} (goal >= 0.9); pose forward onnxruntime / "
        f"torch eager {r['onnxruntime_over_torch_forward']:.2f}"
    )
    print(
        f"once running (after the first poses: torch {r['job_torch_start_s']:.1f} s, onnxruntime "
        f"{r['job_onnxruntime_start_s']:.1f} s): job / pose only torch "
        f"{r['job_running_over_pose_only_torch']:.2f}, onnxruntime "
        f"{r['job_running_over_pose_only_onnxruntime']:.2f}"
    )
    print(
        f"per image: decode {r['decode_ms']:.2f} ms; decode, detection and crops "
        f"{r['detect_and_crop_ms_per_image']:.2f} ms (score >= {det.score_threshold}, NMS "
        f"{det.nms_iou})"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "On the same plain-background people, in one run: persons/s of the infer "
        "graph (decode, the tests' ONNX detector, crops, pose actors, results) against the pose "
        "model alone on the same crops in one process (eval.cpus_per_worker threads, what one "
        "pose actor has), for infer.pose_runtime torch and onnxruntime; the pose forward on "
        "ONNX Runtime vs PyTorch eager; a detector actor's ms per image."
    )
    command.add_config_arguments(p)
    p.add_argument("--images", type=int, default=64, help="images (one person each)")
    p.add_argument(
        "--size", type=command.size_hw, default=(480, 640), metavar="HxW", help="image size"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="best of this many passes for the pose-alone rates"
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.json:  # before the minutes of measuring
        storage.require_output_file(args.json, "--json")
    bench_infer(command.load(args), args.images, args.size, args.json, args.repeats)
