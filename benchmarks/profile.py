"""Model size and speed: parameters, multiply-adds, CPU latency and GPU train-step throughput.

Used by `psm model-summary` and `psm bench model`; torch only, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from psm_model.compiling import CompileScope, compile_model
from psm_model.config import Config, DataConfig, ModelConfig, TrainConfig
from psm_model.hrnet import build_model
from psm_model.loss import adam, train_step


@dataclass
class Summary:
    name: str
    params: int
    macs: int  # multiply-adds of one forward pass at the configured input
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def official_gflops(self) -> float:
        # the HRNet paper's "GFLOPs": conv multiply-adds / 2^30 (its get_model_summary)
        return self.macs / 2**30


def summarize(cfg: ModelConfig, name: str = "") -> Summary:
    model = build_model(cfg).eval()
    x = torch.zeros(1, 3, *cfg.input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = model(x)
    return Summary(
        name=name or describe(cfg),
        params=sum(p.numel() for p in model.parameters()),
        macs=counter.get_total_flops() // 2,  # FlopCounterMode counts a multiply-add as 2 FLOPs
        input_shape=tuple(x.shape),
        output_shape=tuple(y.shape),
    )


def describe(cfg: ModelConfig) -> str:
    h, w = cfg.input_size
    widths = f"W{cfg.width}" if cfg.widths is None else "W" + "-".join(map(str, cfg.widths))
    modules = "-".join(map(str, cfg.stage_modules))
    depth = "" if cfg.stage_modules == ModelConfig.stage_modules else f" modules {modules}"
    return f"{cfg.fusion} {widths}{depth} {h}x{w} stride {cfg.heatmap_stride}"


def cpu_latency(
    cfg: ModelConfig, threads: int, batch: int, repeats: int = 10, warmup: int = 2
) -> float:
    """Median seconds of one eval-mode forward pass on the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(cfg).eval()
        x = torch.randn(batch, 3, *cfg.input_size)
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(previous)


@dataclass
class TrainStepResult:
    images_per_s: float
    peak_memory_gb: float
    step_ms: float
    first_step_s: float = float("nan")  # the first step: compiles when compiling (else warm-up)
    warmup_s: float = float("nan")  # all warm-up steps (a recompile may happen after the first)


def train_step_throughput(
    cfg: ModelConfig,
    batch: int,
    steps: int = 20,
    warmup: int = 5,
    amp: str = "bf16",
    channels_last: bool = True,
    compile: bool = False,
    device: str = "cuda",
    compile_scope: CompileScope = "blocks",
    compile_mode: str = "default",
    fused: bool = False,
) -> TrainStepResult:
    """Images per second of training's own `train_step` (targets, forward, JointsMSE, backward,
    Adam) on a random batch already on the device (no host copy).

    `compile`: through `compiling.compile_model(model, compile_scope, mode=compile_mode)`; the
    first warm-up step pays the compilation (`first_step_s`). `fused`: Adam's fused kernel.
    """
    # fixed input shapes: let cuDNN time its algorithms once (the official CUDNN.BENCHMARK)
    torch.backends.cudnn.benchmark = True
    model = build_model(cfg).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    step_model = compile_model(model, compile_scope, mode=compile_mode) if compile else model
    train = TrainConfig(amp=amp, compile=compile, compile_mode=compile_mode, fused_optimizer=fused)
    opt = adam(model, train)
    run_cfg = Config(model=cfg, train=train, data=DataConfig(channels_last=channels_last))
    h, w = cfg.input_size
    images = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device)
    xy = torch.rand(batch, cfg.num_joints, 2, device=device) * torch.tensor([w, h], device=device)
    samples = {"image": images, "keypoints": xy, "visible": torch.ones_like(xy[..., 0])}
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")

    def step() -> None:
        train_step(step_model, samples, run_cfg, opt, scaler, torch.device(device))

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    first_step_s = float("nan")
    for i in range(warmup):
        step()
        if i == 0:
            sync()
            first_step_s = time.perf_counter() - t0
    sync()
    warmup_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return TrainStepResult(
        batch * steps / elapsed, peak, 1000 * elapsed / steps, first_step_s, warmup_s
    )
