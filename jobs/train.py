"""`psm train CONFIG [overrides]` / `python -m jobs.train`: Ray Train DDP training of HRNet-PSM
(`jobs/training.py: run_training`)."""

from __future__ import annotations

import argparse
import sys

from jobs import command
from jobs.tracking import Tracker


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Trains with a Ray Train TorchTrainer: train.num_workers workers (one per GPU "
        "with train.use_gpu=true, NCCL; gloo on CPUs), fed by Ray Data, validated every "
        "train.val_every epochs, checkpointed every epoch to train.storage_path. An existing "
        "train.name resumes that run. Runs on the Ray cluster in RAY_ADDRESS, else a local one."
    )
    command.add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg = command.load(args)
    # Ray Train and torch (~2.5 s of imports) only once the config has passed its checks
    from jobs.training import run_training

    summary = run_training(cfg, Tracker.of(cfg))
    for key, value in summary.items():
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.train CONFIG [section.key=value ...]` (what `ray job submit` runs)."""
    return command.job_main("jobs.train", "psm train", argv)


if __name__ == "__main__":
    sys.exit(main())
