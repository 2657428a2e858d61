"""What `benchmarks/gpu_run.sh` reads between its parts and at its end (issue 28): the ladder's
fastest rung and its settings, the whole training job's figures from its MLflow run, the
machine's packages, and the summary of every part. Each verb writes one JSON file (the device
tool brings back at most 8 files)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

# a ladder rung's record (benchmarks/train.py --json) -> the config keys that gave it
RUNG_KEYS = {
    "batch": "train.batch_size",
    "amp": "train.amp",
    "channels_last": "data.channels_last",
    "compile": "train.compile",
    "compile_scope": "train.compile_scope",
    "compile_mode": "train.compile_mode",
    "fused_optimizer": "train.fused_optimizer",
}
TRAIN_METRICS = ("samples_per_s", "data_wait_frac", "data_samples_per_s", "epoch_seconds")


def collect_ladder(folder: Path) -> dict:
    """The rungs gpu_train.sh finished: name -> its record."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def best_rung(rungs: dict, model: str, max_first_step_s: float) -> str | None:
    """The fastest rung of `model` whose first step (compilation included) fits the training
    part: the training job pays it again in its first epoch."""
    fits = {
        name: r
        for name, r in rungs.items()
        if r["model"] == model and not r["first_step_s"] > max_first_step_s
    }
    return max(fits, key=lambda name: fits[name]["images_per_s"], default=None)


def rung_overrides(rung: dict) -> list[str]:
    """The training config overrides of a rung (the compile keys only when it compiled)."""
    out = []
    for field, key in RUNG_KEYS.items():
        value = rung[field]
        if value is None:  # compile_scope / compile_mode of an eager rung
            continue
        out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def train_figures(uri: str, experiment: str, run_name: str, rung: dict | None) -> dict:
    """Per epoch, the training job's samples/s, data wait share and data side's samples/s (its
    MLflow metrics: what finished before any timeout); the epochs after the first (start-up,
    cuDNN's autotuning, compilation) against the model-only train step of the same settings."""
    from jobs.tracking import metric_histories, named_run

    run = named_run(uri, experiment, run_name)
    if run is None:  # the job did not start (or not get as far as its MLflow run)
        return {"error": f"no MLflow run named {run_name} in {uri}"}
    epochs: dict[int, dict] = {}
    for key in TRAIN_METRICS:
        for step, value in metric_histories(uri, [run.info.run_id], key)[run.info.run_id]:
            epochs.setdefault(step, {"epoch": step})[key] = value
    done = [epochs[e] for e in sorted(epochs)]
    steady = done[1:] or done  # one epoch only: it is all there is
    out: dict = {"run_status": run.info.status, "epochs": done, "steady_epochs": len(done) - 1}
    if steady:
        total_s = sum(e["epoch_seconds"] for e in steady)
        out["samples_per_s"] = (
            sum(e["samples_per_s"] * e["epoch_seconds"] for e in steady) / total_s
        )
        out["data_wait_frac"] = sum(e["data_wait_frac"] for e in steady) / len(steady)
        out["data_samples_per_s"] = sum(e["data_samples_per_s"] for e in steady) / len(steady)
    if rung and steady:
        out["model_only_images_per_s"] = rung["images_per_s"]
        out["job_over_model_only"] = out["samples_per_s"] / rung["images_per_s"]
    return out


def environment(site: str, install_s: float | None) -> dict:
    """The machine and its Python packages (the bundle's too, from `site`): the versions
    benchmarks/device_site.txt assumed, read off, and pip's own consistency check."""

    def run(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            return done.stdout + done.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"

    pip = (sys.executable, "-m", "pip")
    packages = run(*pip, "list", "--format=json")
    try:
        packages = {p["name"]: p["version"] for p in json.loads(packages)}
    except ValueError:  # the error text, kept
        pass
    return {
        "python": sys.version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nvidia_smi": run(
            "nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"
        ),
        "site": site,
        "bundle_install_s": install_s,
        "pip_check": run(*pip, "check"),
        "packages": packages,
    }


def summary(outdir: Path) -> str:
    """A markdown table of every part's headline figures, from the JSON files in `outdir`."""

    def read(name: str) -> dict:
        p = outdir / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def f(value, digits: int = 0) -> str:
        ok = isinstance(value, int | float) and math.isfinite(value)
        return f"{value:.{digits}f}" if ok else "-"

    lines = ["| part | figure | value |", "|---|---|---:|"]
    ladder = read("ladder")
    for name, r in ladder.get("rungs", {}).items():
        lines.append(f"| ladder | {name} img/s (batch {r['batch']}) | {f(r['images_per_s'])} |")
    train = read("train")
    lines.append(f"| train | best rung | {ladder.get('best') or '-'} |")
    for key, digits in (("samples_per_s", 0), ("data_wait_frac", 3), ("data_samples_per_s", 0)):
        lines.append(f"| train | {key} | {f(train.get(key), digits)} |")
    lines.append(f"| train | job / model only | {f(train.get('job_over_model_only'), 2)} |")
    for size in read("data").get("datasets", [{}])[0].get("sizes", {}).values():
        for r in size.get("ray", []):
            lines.append(f"| data | {r['workers']} workers samples/s | {f(r['samples_per_s'])} |")
    infer = read("infer")
    for runtime in infer.get("runtimes", []):
        for graph in ("job", "boxes_job", "pose_only"):
            key = f"{graph}_{runtime}_persons_s"
            lines.append(f"| infer | {key.removesuffix('_s')}/s | {f(infer.get(key), 1)} |")
        for graph in ("job", "boxes_job"):
            key = f"{graph}_over_pose_only_{runtime}"
            lines.append(f"| infer | {key} | {f(infer.get(key), 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("ladder", help="merge the rungs; pick the best; print its overrides")
    s.add_argument("folder", type=Path)
    s.add_argument("config", help="the trained model's config")
    s.add_argument("max_first_step_s", type=float)
    s.add_argument("out", type=Path)
    s = sub.add_parser("train", help="the training job's figures from its MLflow run")
    s.add_argument("uri")
    s.add_argument("run_name")
    s.add_argument("ladder", type=Path)
    s.add_argument("config")
    s.add_argument("out", type=Path)
    s = sub.add_parser("environment", help="the machine and its packages")
    s.add_argument("site")
    s.add_argument("out", type=Path)
    s.add_argument("--install-s", type=float, help="seconds the bundle's install took")
    sub.add_parser("summary", help="a table of every part").add_argument("outdir", type=Path)
    args = p.parse_args(argv)
    if args.verb == "summary":
        print(summary(args.outdir))
        return 0
    if args.verb == "environment":
        record = environment(args.site, args.install_s)
    else:
        from benchmarks.profile import describe
        from psm_model.config_yaml import load_config

        cfg = load_config(args.config, [])
        if args.verb == "ladder":
            rungs = collect_ladder(args.folder)
            best = best_rung(rungs, describe(cfg.model), args.max_first_step_s)
            record = {"best": best, "rungs": rungs}
            print(" ".join(rung_overrides(rungs[best])) if best else "")
        else:
            ladder = json.loads(args.ladder.read_text()) if args.ladder.exists() else {}
            rung = ladder.get("rungs", {}).get(ladder.get("best"))
            record = train_figures(args.uri, cfg.train.experiment, args.run_name, rung)
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
