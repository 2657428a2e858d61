"""`psm demo`: the quick-start job on the embedded default (tiny PSM config, synthetic data, CPU).

Until distributed training lands (Ray Train + MLflow), it runs what exists end to end in one
process: writes the synthetic COCO dataset, prints the model summary, decodes each training image
once and crops every person with augmentation, trains the tiny model for a few hundred steps on
those crops and reports the loss before and after, then the CPU latency.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from jobs.bench import print_model_summary
from pipelines.coco import decode_image, load_coco_persons
from pipelines.synthetic import make_synthetic
from psm_model.codec import HeatmapCodec, normalize_images
from psm_model.config import Config, load_config
from psm_model.geometry import make_training_sample
from psm_model.hrnet import build_model
from psm_model.loss import joints_mse_loss
from psm_model.profile import cpu_latency

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def run_demo(config: str | None, overrides: list[str], steps: int = 120) -> dict:
    cfg = load_config(config or TINY_CONFIG, overrides)
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(cfg.data.root)
    ann = root / cfg.data.train_annotations
    if not ann.exists():
        print(f"== writing the synthetic COCO dataset to {root}")
        make_synthetic(root, train_images=48, val_images=16, seed=cfg.train.seed)

    print("\n== model summary")
    print_model_summary(cfg.model)

    print("\n== person crops (decode once per image, augment every person)")
    images, skips = load_coco_persons(
        root / cfg.data.train_images, ann, cfg.model.input_size, cfg.data.box_padding
    )
    crops, keypoints, visible = [], [], []
    for rec in images:
        image = decode_image(rec.path, cfg.data.max_image_pixels)
        for p in rec.persons:
            rng = np.random.default_rng([cfg.train.seed, rec.image_id, p.ann_id])
            crop, xy, vis = make_training_sample(
                image, p.keypoints, p.center, p.scale, cfg.data, cfg.model.input_size, rng
            )
            crops.append(crop)
            keypoints.append(xy)
            visible.append(vis)
    print(f"{len(images)} images, {len(crops)} persons, skipped: {skips.summary()}")

    codec = HeatmapCodec.from_config(cfg)
    x = normalize_images(torch.from_numpy(np.stack(crops)))
    target, weight = codec.encode(
        torch.from_numpy(np.stack(keypoints)), torch.from_numpy(np.stack(visible))
    )

    print(
        f"\n== training {steps} steps on those crops "
        f"(batch {cfg.train.batch_size}, Adam lr {cfg.train.lr})"
    )
    model = build_model(cfg.model).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    g = torch.Generator().manual_seed(cfg.train.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x), (cfg.train.batch_size,), generator=g)
        loss = joints_mse_loss(model(x[idx]), target[idx], weight[idx], cfg.train.ohkm_topk)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.6f}  ({time.perf_counter() - t0:.0f} s)")
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    print(f"loss {first:.6f} -> {last:.6f} ({first / last:.1f}x lower)")

    print("\n== CPU latency (batch 1, median of 10)")
    latency = cpu_latency(cfg.model, threads=torch.get_num_threads(), batch=1)
    print(f"{latency * 1e3:.1f} ms per crop at {cfg.model.input_size[0]}x{cfg.model.input_size[1]}")
    _print_next_steps(cfg)
    return {"first_loss": first, "last_loss": last, "persons": len(crops), "latency_s": latency}


def _print_next_steps(cfg: Config) -> None:
    print(
        "\nNext: `psm model-summary configs/psm_w48_384x288.yaml` for the report's model, "
        "`psm bench model CONFIG` for speed."
    )
