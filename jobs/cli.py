"""`psm`: the one command line of PSM-Pose.

A dispatcher: each command's arguments and work live in its module (`add_arguments(parser)` sets
`func`); only the chosen command's module is imported, so `psm --help` stays fast and
`psm bench train` needs no Ray."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from jobs import command

GROUPS = {  # name: (the dest of its subcommand, help)
    "bench": ("target", "benchmarks (see `psm bench model --help`)"),
    "export": ("format", "export a model (see `psm export onnx --help`)"),
    "make-data": ("kind", "write datasets (see `psm make-data synthetic --help`)"),
}
# command words: (module[:function adding its arguments, default add_arguments], help)
COMMANDS = {
    ("model-summary",): (
        "benchmarks.model:add_summary_arguments",
        "parameters, multiply-adds and output shape for both fusions and strides",
    ),
    ("bench", "model"): (
        "benchmarks.model",
        "CPU forward latency and, with a GPU, train-step images/s",
    ),
    ("bench", "train"): (
        "benchmarks.train",
        "train-step images/s and peak memory of the configured model and train settings",
    ),
    ("bench", "train-start"): (
        "benchmarks.train_start",
        "where a short Ray Train run's time goes: the driver's phases and Ray Train's own",
    ),
    ("bench", "infer"): (
        "benchmarks.infer",
        "persons/s of the whole infer job (detector + pose) vs the pose model alone",
    ),
    ("bench", "load"): (
        "benchmarks.load",
        "the driver's parse of the train annotations (time, peak memory) and the shared rows",
    ),
    ("bench", "serve"): (
        "benchmarks.serve",
        "the pose service under load on 127.0.0.1: latency percentiles, persons/s, replica kill",
    ),
    ("bench", "data"): (
        "benchmarks.data",
        "augmented person crops/s per CPU core, bytes per sample, vs decode+warp and HRNet",
    ),
    ("train",): ("jobs.train", "Ray Train DDP training, logged to MLflow"),
    ("eval",): (
        "jobs.evaluate",
        "COCO keypoint AP of a checkpoint (or the GT round trip) on the val set",
    ),
    ("infer",): (
        "jobs.infer",
        "batch inference: poses for every image of an image list -> COCO results JSON",
    ),
    ("serve",): (
        "jobs.serve",
        "the pose service on Ray Serve: POST an image, get its persons' keypoints as JSON",
    ),
    ("tune",): (
        "jobs.tune",
        "Ray Tune sweep of widths, sigma, ...: every trial a training run, MLflow children",
    ),
    ("compare",): (
        "jobs.compare",
        "the training runs of an MLflow experiment (or one sweep) side by side",
    ),
    ("job-env",): (
        "jobs.job_env",
        "a `ray job submit --runtime-env-json` value carrying this checkout's git commit",
    ),
    ("export", "onnx"): (
        "jobs.export",
        "the pose model as ONNX (dynamic batch), for infer.pose_runtime=onnxruntime",
    ),
    ("make-data", "synthetic"): (
        "jobs.make_data",
        "a synthetic COCO-format keypoint dataset of drawn people",
    ),
    ("make-data", "coco-size"): (
        "jobs.make_data:add_coco_size_arguments",
        "a COCO root's train annotations repeated to COCO's size (load and memory tests)",
    ),
    ("demo",): ("jobs.demo", "the quick-start job on the embedded default"),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Every command, with the arguments of the one `argv` names (its module is imported)."""
    parser = argparse.ArgumentParser(prog="psm", description=__doc__.split("\n")[0])
    command.add_verbose_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    words = tuple(a for a in argv if not a.startswith("-"))
    for path, (target, help_) in COMMANDS.items():
        if len(path) == 2 and path[0] not in groups:
            dest, group_help = GROUPS[path[0]]
            group = sub.add_parser(path[0], help=group_help)
            groups[path[0]] = group.add_subparsers(dest=dest, required=True, metavar=dest.upper())
        p = (groups[path[0]] if len(path) == 2 else sub).add_parser(path[-1], help=help_)
        if words[: len(path)] == path:
            module, _, function = target.partition(":")
            getattr(importlib.import_module(module), function or "add_arguments")(p)
            # `psm train -v` as well as `psm -v train`; SUPPRESS keeps the latter's value
            command.add_verbose_argument(p, default=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return command.parse(build_parser(argv), argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    return command.run(args, args.command)


if __name__ == "__main__":
    sys.exit(main())
