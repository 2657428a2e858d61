"""`psm`: the one command line. Each subcommand's work lives in jobs/ or psm_model/; heavy imports
(torch, Ray, MLflow) happen inside the handlers so `psm --help` stays fast."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("psm")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (e.g. configs/psm_w48_384x288.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def cmd_model_summary(args: argparse.Namespace) -> None:
    from jobs.bench import print_model_summary
    from psm_model.config import load_config

    print_model_summary(load_config(args.config, args.overrides).model)


def cmd_bench_model(args: argparse.Namespace) -> None:
    from jobs.bench import bench_model
    from psm_model.config import load_config

    cfg = load_config(args.config, args.overrides)
    bench_model(
        cfg.model,
        threads=args.threads,
        batches=args.batches,
        repeats=args.repeats,
        gpu_batch=args.gpu_batch,
        gpu_steps=args.gpu_steps,
        compile=args.compile,
        json_out=args.json,
        cpu=not args.skip_cpu,
    )


def cmd_make_synthetic(args: argparse.Namespace) -> None:
    from pipelines.synthetic import make_synthetic_coco

    counts = make_synthetic_coco(args.out, args.images, args.seed, args.val_fraction)
    for split, c in counts.items():
        print(f"{args.out}/{split}: {c['images']} images, {c['persons']} persons")
    print(f"annotations: {args.out}/annotations/person_keypoints_{{train,val}}2017.json")


def cmd_demo(args: argparse.Namespace) -> None:
    from jobs.demo import run_demo

    run_demo(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "model-summary",
        help="parameters, multiply-adds and output shape for both fusions and strides",
        description="Parameters, multiply-adds at the configured input and output shape of the "
        "configured widths, for fusion hrnet|psm and heatmap stride 4|2 (* marks the configured "
        "one).",
    )
    _config_args(p)
    p.set_defaults(func=cmd_model_summary)

    bench = sub.add_parser("bench", help="benchmarks (see `psm bench model --help`)")
    bench_sub = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    p = bench_sub.add_parser(
        "model",
        help="CPU forward latency and, with a GPU, train-step images/s",
        description="CPU forward latency (median of --repeats) for HRNet (fusion hrnet, stride 4) "
        "and the configured variant at the same widths and input, with the ratio to HRNet; on a "
        "GPU also train-step images/s with AMP (bf16) and channels_last.",
    )
    _config_args(p)
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
    p.add_argument("--skip-cpu", action="store_true", help="GPU figures only")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_model)

    data = sub.add_parser("make-data", help="write datasets (see `psm make-data synthetic --help`)")
    data_sub = data.add_subparsers(dest="kind", required=True, metavar="KIND")
    p = data_sub.add_parser(
        "synthetic",
        help="a synthetic COCO-format keypoint dataset of drawn people",
        description="Writes OUT/train2017, OUT/val2017 (JPEG images of drawn people: several per "
        "image, varied poses, sizes, backgrounds, occlusion) and "
        "OUT/annotations/person_keypoints_{train,val}2017.json with the exact keypoints.",
    )
    p.add_argument("out", help="output COCO root")
    p.add_argument("--images", type=int, default=200, help="images in both splits together")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of images in val2017")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser(
        "demo",
        help="the quick-start job on the embedded default",
        description="Runs what the project can do end to end here with the tiny config: "
        "synthetic COCO data, model summary, a short CPU training of the tiny PSM model on "
        "augmented person crops, CPU latency.",
    )
    p.add_argument("config", nargs="?", default=None, help="config (default: the tiny config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from psm_model.config import ConfigError
    from psm_model.weights import CheckpointError

    try:
        args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"psm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
