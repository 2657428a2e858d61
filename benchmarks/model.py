"""`psm model-summary` and `psm bench model`: figures as markdown tables for docs/benchmarks.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform

import torch

from benchmarks.profile import cpu_latency, describe, summarize, train_step_throughput
from jobs import command, storage
from pipelines.uris import write_bytes
from psm_model.compiling import CompileScope
from psm_model.config import ModelConfig

log = logging.getLogger(__name__)

VARIANTS = (("hrnet", 4), ("hrnet", 2), ("psm", 4), ("psm", 2))


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def print_model_summary(cfg: ModelConfig) -> list[dict]:
    rows = []
    print("| model | params (M) | GMACs | official GFLOPs | input | heatmaps |")
    print("|---|---:|---:|---:|---|---|")
    for fusion, stride in VARIANTS:
        variant = dataclasses.replace(cfg, fusion=fusion, heatmap_stride=stride)
        s = summarize(variant)
        mark = " *" if (fusion, stride) == (cfg.fusion, cfg.heatmap_stride) else ""
        print(
            f"| {s.name}{mark} | {s.params / 1e6:.2f} | {s.macs / 1e9:.2f} "
            f"| {s.official_gflops:.2f} "
            f"| {'x'.join(map(str, s.input_shape))} | {'x'.join(map(str, s.output_shape))} |"
        )
        rows.append({**dataclasses.asdict(s), "fusion": fusion, "stride": stride})
    print(
        "\nGMACs: multiply-adds / 1e9. Official GFLOPs: multiply-adds / 2^30 "
        "(as HRNet's get_model_summary)."
    )
    return rows


def bench_model(
    cfg: ModelConfig,
    threads: list[int],
    batches: list[int],
    repeats: int,
    gpu_batch: int,
    gpu_steps: int,
    compile: bool = False,
    compile_scope: CompileScope = "blocks",
    json_out: str | None = None,
    cpu: bool = True,
) -> dict:
    """Speed of HRNet (hrnet fusion, stride 4) and the configured variant: same widths and input."""
    baseline = dataclasses.replace(cfg, fusion="hrnet", heatmap_stride=4)
    variants = [baseline] + ([cfg] if cfg != baseline else [])
    results: dict = {"machine": machine(), "cpu": [], "gpu": []}
    print(f"machine: {results['machine']}\n")
    if cpu:
        print("| model | threads | batch | median ms | img/s | vs HRNet |")
        print("|---|---:|---:|---:|---:|---:|")
    for t in threads if cpu else []:
        for b in batches:
            base_s = None
            for v in variants:
                sec = cpu_latency(v, threads=t, batch=b, repeats=repeats)
                base_s = base_s or sec
                print(
                    f"| {describe(v)} | {t} | {b} | {sec * 1e3:.1f} | {b / sec:.1f} "
                    f"| {sec / base_s:.2f}x |"
                )
                results["cpu"].append(
                    {"model": describe(v), "threads": t, "batch": b, "seconds": sec}
                )
    if torch.cuda.is_available():
        print(
            "\n| model | batch | AMP | channels_last | compile | train img/s | step ms | peak GiB "
            "| first step s |"
        )
        print("|---|---:|---|---|---|---:|---:|---:|---:|")
        settings = [("bf16", True, False), ("bf16", False, False), ("none", False, False)]
        if compile:  # compiling takes minutes: time only the fastest eager setting compiled
            settings = [("bf16", True, True)]
        for v in variants:
            for amp, cl, comp in settings:
                torch.cuda.empty_cache()
                r = train_step_throughput(
                    v,
                    gpu_batch,
                    steps=gpu_steps,
                    amp=amp,
                    channels_last=cl,
                    compile=comp,
                    compile_scope=compile_scope,
                )
                shown = compile_scope if comp else comp
                print(
                    f"| {describe(v)} | {gpu_batch} | {amp} | {cl} | {shown} "
                    f"| {r.images_per_s:.0f} | {r.step_ms:.1f} | {r.peak_memory_gb:.1f} "
                    f"| {r.first_step_s:.1f} |"
                )
                results["gpu"].append(
                    {
                        "model": describe(v),
                        "batch": gpu_batch,
                        "amp": amp,
                        "channels_last": cl,
                        "compile": comp,
                        "compile_scope": compile_scope if comp else None,
                        **dataclasses.asdict(r),
                    }
                )
    else:
        print("\n(no GPU: train-step images/s is measured where torch.cuda.is_available())")
    if json_out:
        write_bytes(json_out, json.dumps(results, indent=1).encode())
    return results


def add_summary_arguments(p: argparse.ArgumentParser) -> None:
    """`psm model-summary`."""
    p.description = (
        "Parameters, multiply-adds at the configured input and output shape of the "
        "configured widths, for fusion hrnet|psm and heatmap stride 4|2 (* marks the configured "
        "one)."
    )
    command.add_config_arguments(p)
    p.set_defaults(func=lambda args: print_model_summary(command.load(args).model))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`psm bench model`."""
    p.description = (
        "CPU forward latency (median of --repeats) for HRNet (fusion hrnet, stride 4) "
        "and the configured variant at the same widths and input, with the ratio to HRNet; on a "
        "GPU also train-step images/s with AMP (bf16) and channels_last."
    )
    command.add_config_arguments(p)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="CPU batch sizes")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per setting")
    p.add_argument("--gpu-batch", type=int, default=64, help="GPU train-step batch size")
    p.add_argument("--gpu-steps", type=int, default=30, help="timed GPU train steps")
    p.add_argument(
        "--compile",
        action="store_true",
        help="GPU: time torch.compile (bf16, channels_last) instead of the eager settings",
    )
    p.add_argument(
        "--compile-scope",
        choices=["model", "blocks", "exchange"],
        default="blocks",
        help="with --compile: the whole model, or in place its residual blocks or its exchange "
        "modules (regional compilation)",
    )
    p.add_argument("--skip-cpu", action="store_true", help="GPU figures only")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.json:  # before the minutes of measuring
        storage.require_output_file(args.json, "--json")
    bench_model(
        command.load(args).model,
        threads=args.threads,
        batches=args.batches,
        repeats=args.repeats,
        gpu_batch=args.gpu_batch,
        gpu_steps=args.gpu_steps,
        compile=args.compile,
        compile_scope=args.compile_scope,
        json_out=args.json,
        cpu=not args.skip_cpu,
    )
