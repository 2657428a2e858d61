"""`psm bench train`: train-step images/s and peak memory of the configured model and train
settings. Torch only (no Ray, MLflow or pycocotools): `benchmarks/gpu_train.sh` runs it on a bare
GPU machine through `main`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from benchmarks.model import machine
from benchmarks.profile import describe, train_step_throughput
from jobs import command, storage
from pipelines.uris import write_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Full train steps (forward, JointsMSE, backward, Adam) of the configured model "
        "on random data with train.batch_size, train.amp, data.channels_last, train.compile and "
        "train.compile_scope, on the GPU when there is one: images/s, ms per step, peak GPU "
        "memory."
    )
    command.add_config_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (the first one compiles)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg = command.load(args)
    if args.json:  # before the minutes of measuring
        storage.require_output_file(args.json, "--json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = train_step_throughput(
        cfg.model,
        cfg.train.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        amp=cfg.train.amp,
        channels_last=cfg.data.channels_last,
        compile=cfg.train.compile,
        device=device,
        compile_scope=cfg.train.compile_scope,
        compile_mode=cfg.train.compile_mode,
        fused=cfg.train.fused_optimizer,
    )
    compiled = "eager"
    if cfg.train.compile:
        compiled = f"compile {cfg.train.compile_scope} ({cfg.train.compile_mode})"
    if cfg.train.fused_optimizer:
        compiled += ", fused Adam"
    print(f"machine: {machine()}")
    print(
        f"{describe(cfg.model)}: batch {cfg.train.batch_size}, amp {cfg.train.amp}, channels_last "
        f"{cfg.data.channels_last}, {compiled}: {r.images_per_s:.1f} img/s, "
        f"{r.step_ms:.1f} ms/step, peak {r.peak_memory_gb:.2f} GiB; first step "
        f"{r.first_step_s:.1f} s, {args.warmup} warm-up steps {r.warmup_s:.1f} s"
    )
    if args.json:
        record = {
            "machine": machine(),
            "model": describe(cfg.model),
            "device": device,
            "batch": cfg.train.batch_size,
            "amp": cfg.train.amp,
            "channels_last": cfg.data.channels_last,
            "compile": cfg.train.compile,
            "compile_scope": cfg.train.compile_scope if cfg.train.compile else None,
            "compile_mode": cfg.train.compile_mode if cfg.train.compile else None,
            "fused_optimizer": cfg.train.fused_optimizer,
            "steps": args.steps,
            "warmup": args.warmup,
            **dataclasses.asdict(r),
        }
        write_bytes(args.json, json.dumps(record, indent=1).encode())


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.train CONFIG [overrides] [--steps N ...]` = `psm bench train ...`."""
    return command.job_main("benchmarks.train", "psm bench train", argv)


if __name__ == "__main__":
    sys.exit(main())
