"""`psm demo`: the quick-start job on the embedded default, on one small machine.

Writes the synthetic COCO dataset (if absent), starts a local Ray with this machine's CPUs, trains
the demo PSM config with 2 gloo workers (Ray Train, fed by Ray Data), validates with the full test
recipe, logs everything to the local MLflow store, and compares the val AP with the untrained
model's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import ray

from jobs import command
from jobs.tracking import Tracker
from jobs.training import run_training
from pipelines.synthetic import ensure_demo_data
from pipelines.validate import evaluate_model
from psm_model.coco_eval import metrics_table
from psm_model.config_yaml import load_config
from psm_model.hrnet import build_model
from psm_model.recipe import EvalRecipe, ValSet

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The quick start on one machine: writes the synthetic COCO dataset (if "
        "absent), starts a local Ray, trains configs/demo.yaml with 2 gloo workers (Ray Train "
        "fed by Ray Data), validates with the test recipe, logs to the local MLflow store and "
        "prints the val AP of the untrained and the trained model."
    )
    command.add_config_arguments(p, default="configs/demo.yaml")
    p.set_defaults(func=lambda args: run_demo(args.config, args.overrides))


def run_demo(config: str | None, overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    cfg = load_config(config or DEMO_CONFIG, overrides)
    tracker = Tracker.of(cfg)
    ensure_demo_data(cfg)

    cpus = os.cpu_count() or 2
    print(f"\n== local Ray with {cpus} CPUs")
    ray.init(num_cpus=cpus)  # Ray: the local instance of this demo
    ray.data.DataContext.get_current().enable_progress_bars = False

    print("\n== the untrained model on the val set")
    recipe, val = EvalRecipe.of(cfg), ValSet.of(cfg)
    untrained = evaluate_model(build_model(cfg.model), recipe, val, cfg.data.cpus_per_task)
    print(metrics_table(untrained))

    print(f"\n== training {cfg.train.epochs} epochs, {cfg.train.num_workers} gloo workers")
    summary = run_training(cfg, tracker)

    trained = {k[len("val_") :]: v for k, v in summary.items() if k.startswith("val_")}
    print("\n== the trained model on the val set (flip test, OKS-NMS, COCOeval)")
    print(metrics_table(trained))
    print(
        f"\nAP {untrained['AP']:.4f} untrained -> {trained.get('AP', float('nan')):.4f} trained "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    print(f"run {summary['run_name']}: checkpoint {summary['checkpoint']}")
    experiment = tracker.get_run(summary["mlflow_run_id"]).info.experiment_id
    print(
        f"MLflow: run {summary['mlflow_run_id']}, model {cfg.train.registered_model} "
        f"v{summary['model_version']}. Browse it with:\n"
        f"  mlflow ui --backend-store-uri {tracker.uri}\n"
        # the UI's GenAI / model-training switch is kept per browser, GenAI first
        f"  http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning"
    )
    ray.shutdown()
    return {"untrained": untrained, "trained": trained, **summary}


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.demo ARGS` is `psm demo ARGS`."""
    return command.job_main("jobs.demo", "psm demo", argv)


if __name__ == "__main__":
    sys.exit(main())
