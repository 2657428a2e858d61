"""`psm`: the one command line. Each subcommand's work lives in jobs/ or psm_model/; heavy imports
(torch, Ray, MLflow) happen inside the handlers so `psm --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path

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
        compile_scope=args.compile_scope,
        json_out=args.json,
        cpu=not args.skip_cpu,
    )


def cmd_train(args: argparse.Namespace) -> None:
    from jobs.train import run_training
    from psm_model.config import load_config

    summary = run_training(load_config(args.config, args.overrides))
    for key, value in summary.items():
        print(f"{key}: {value}")


def cmd_eval(args: argparse.Namespace) -> None:
    from jobs.evaluate import run_eval
    from psm_model.config import flag_overrides, load_config

    if not args.checkpoint and not args.oracle:
        raise SystemExit(
            "psm eval: error: give --checkpoint CKPT, or --oracle for the GT round trip"
        )
    cfg = load_config(args.config, [*args.overrides, *flag_overrides("eval", dets=args.dets)])
    run_eval(cfg, args.checkpoint, args.oracle, args.results)


def cmd_infer(args: argparse.Namespace) -> None:
    from jobs.infer import run_inference
    from psm_model.config import flag_overrides, load_config

    flags = flag_overrides("infer", dets=args.dets, output=args.output)
    cfg = load_config(args.config, [*args.overrides, *flags])
    run_inference(cfg, args.checkpoint)


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from jobs.evaluate import load_model
    from psm_model.config import load_config
    from psm_model.export import export_onnx

    model, cfg = load_model(args.checkpoint, load_config(args.config, args.overrides))
    data = export_onnx(model, cfg.model.input_size)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_bytes(data)
    h, w = cfg.model.input_size
    print(f"{args.output}: images (batch, 3, {h}, {w}) -> heatmaps (batch, "
          f"{cfg.model.num_joints}, {h // cfg.model.heatmap_stride}, "
          f"{w // cfg.model.heatmap_stride}), {len(data) / 1e6:.1f} MB")  # fmt: skip


def cmd_make_synthetic(args: argparse.Namespace) -> None:
    from pipelines.synthetic import make_synthetic_coco

    counts = make_synthetic_coco(args.out, args.images, args.seed, args.val_fraction)
    for split, c in counts.items():
        print(f"{args.out}/{split}: {c['images']} images, {c['persons']} persons")
    print(f"annotations: {args.out}/annotations/person_keypoints_{{train,val}}2017.json")


def cmd_bench_train(args: argparse.Namespace) -> None:
    import json

    import torch

    from jobs.bench import machine
    from psm_model.config import load_config
    from psm_model.profile import describe, train_step_throughput

    cfg = load_config(args.config, args.overrides)
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
    )
    compiled = f"compile {cfg.train.compile_scope}" if cfg.train.compile else "eager"
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
            "steps": args.steps,
            "warmup": args.warmup,
            **dataclasses.asdict(r),
        }
        from psm_model.files import write_atomic

        write_atomic(args.json, json.dumps(record, indent=1))


def cmd_bench_infer(args: argparse.Namespace) -> None:
    from jobs.bench_infer import bench_infer
    from psm_model.config import load_config

    cfg = load_config(args.config, args.overrides)
    bench_infer(cfg, args.images, args.size, args.json)


def cmd_bench_data(args: argparse.Namespace) -> None:
    from pathlib import Path

    from jobs.bench_data import run_bench_data
    from psm_model.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # `psm bench data data.x=1`
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    run_bench_data(
        cfg,
        coco_root=args.coco_root if args.coco_root is not None else cfg.data.root,
        synthetic=args.synthetic,
        workers=args.workers,
        epochs=args.epochs,
        sizes=args.sizes,
        repeats=args.repeats,
        json_out=args.json,
    )


def _size_hw(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) <= 0 or int(w) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTH, e.g. 384x288")
    return int(h), int(w)


def cmd_tune(args: argparse.Namespace) -> None:
    from jobs.sweep_space import load_space
    from jobs.tune import run_sweep
    from psm_model.config import DataConfig, load_config

    base = load_config(args.config, args.overrides)
    space = load_space(args.space, base)
    if base.data.root == DataConfig().root:  # the demo's synthetic data, written if absent
        from jobs.demo import ensure_demo_data

        ensure_demo_data(base)
    if args.num_samples:
        space = dataclasses.replace(space, num_samples=args.num_samples)
    name = args.name or Path(args.space).stem
    summary = run_sweep(
        base,
        space,
        name,
        resume=args.resume,
        max_concurrent=args.max_concurrent or space.max_concurrent_trials,
        wait_s=args.wait_resources,
    )
    print(summary.pop("table"))
    for key, value in summary.items():
        print(f"{key}: {value}")


def cmd_compare(args: argparse.Namespace) -> None:
    from jobs import compare
    from jobs.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri or "")
    try:
        rows, params = compare.comparison(uri, args.experiment, args.sweep)
        rows = compare.sort_rows(rows, args.sort, descending=not args.ascending)
    except (LookupError, KeyError) as e:
        raise SystemExit(f"psm compare: error: {e.args[0]}") from e
    if args.csv:
        compare.write_csv(rows, params, args.csv)
    if args.csv != "-":
        print(compare.format_table(rows, params) if rows else "no training runs")
    if args.plot:
        compare.plot_sweep(rows, params, args.plot)
        print(f"plot: {args.plot}")


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
    p.add_argument(
        "--compile-scope",
        choices=["model", "blocks", "exchange"],
        default="blocks",
        help="with --compile: the whole model, or in place its residual blocks or its exchange "
        "modules (regional compilation)",
    )
    p.add_argument("--skip-cpu", action="store_true", help="GPU figures only")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_model)
    p = bench_sub.add_parser(
        "train",
        help="train-step images/s and peak memory of the configured model and train settings",
        description="Full train steps (forward, JointsMSE, backward, Adam) of the configured model "
        "on random data with train.batch_size, train.amp, data.channels_last, train.compile and "
        "train.compile_scope, "
        "on the GPU when there is one: images/s, ms per step, peak GPU memory.",
    )
    _config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (the first one compiles)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_train)
    p = bench_sub.add_parser(
        "infer",
        help="persons/s of the whole infer job (detector + pose) vs the pose model alone",
        description="On the same plain-background people, in one run: persons/s of the infer "
        "graph (decode, the tests' ONNX detector, crops, pose actors, results) against the pose "
        "model alone on the same crops in one process (eval.cpus_per_worker threads, what one "
        "pose actor has), for infer.pose_runtime torch and onnxruntime; the pose forward on "
        "ONNX Runtime vs PyTorch eager; decode ms per image vs the decoded size.",
    )
    _config_args(p)
    p.add_argument("--images", type=int, default=64, help="images (one person each)")
    p.add_argument("--size", type=_size_hw, default=(480, 640), metavar="HxW", help="image size")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_infer)
    p = bench_sub.add_parser(
        "data",
        help="augmented person crops/s per CPU core, bytes per sample, vs decode+warp and HRNet",
        description="On one core in-process: our train_batch path (decode each image once, "
        "augment every person) with its decode / warp / other breakdown, the decode + "
        "warpAffine-only limit, and an official-HRNet-style loader (decode per person, float "
        "image and heatmaps); then end to end through Ray Data per worker count. On the COCO "
        "train split under --coco-root and on a synthetic set, at each --sizes.",
    )
    p.add_argument("config", nargs="?", default=None, help="config (default: the defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument(
        "--coco-root",
        default=None,
        help="COCO-style root with data.train_images and data.train_annotations "
        "(default: data.root; skipped if absent)",
    )
    p.add_argument(
        "--synthetic",
        type=int,
        default=100,
        metavar="N",
        help="also bench N synthetic train images written to a temporary folder (0: skip)",
    )
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray worker counts")
    p.add_argument("--epochs", type=int, default=1, help="timed Ray epochs after the warm-up")
    p.add_argument(
        "--sizes",
        type=_size_hw,
        nargs="+",
        default=[(384, 288), (256, 192)],
        metavar="HxW",
        help="crop sizes (height x width)",
    )
    p.add_argument("--repeats", type=int, default=5, help="in-process passes (fastest kept)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_data)

    p = sub.add_parser(
        "train",
        help="Ray Train DDP training, logged to MLflow",
        description="Trains with a Ray Train TorchTrainer: train.num_workers workers (one per GPU "
        "with train.use_gpu=true, NCCL; gloo on CPUs), fed by Ray Data, validated every "
        "train.val_every epochs, checkpointed every epoch to train.storage_path. An existing "
        "train.name resumes that run. Runs on the Ray cluster in RAY_ADDRESS, else a local one.",
    )
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="COCO keypoint AP of a checkpoint (or the GT round trip) on the val set",
        description="Evaluates a checkpoint with the test recipe (flip test, decode, rescoring, "
        "OKS-NMS, COCOeval) on data.val_annotations, with ground-truth boxes or --dets, and logs "
        "the metrics to MLflow. --oracle evaluates the ground truth rendered to heatmaps and "
        "decoded again instead of a model.",
    )
    _config_args(p)
    p.add_argument("--checkpoint", help="a training checkpoint folder or a weights file (.pth)")
    p.add_argument(
        "--dets",
        help="person detections, COCO results format (eval.detections=FILE; default: GT boxes)",
    )
    p.add_argument("--oracle", action="store_true", help="GT round trip instead of a model")
    p.add_argument("--results", help="also write the keypoint results JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "infer",
        help="batch inference: poses for every image of an image list -> COCO results JSON",
        description="Poses for every image of infer.image_info (a COCO JSON with an images list: "
        "the test-dev image info, or an annotation file) in infer.images, with the person boxes "
        "of infer.boxes: a detections file (infer.detections, COCO results format), an ONNX "
        "detector run in the job on its own actors (infer.detector.model) or the annotations "
        "(gt), by the eval.* test recipe on eval.workers "
        "Ray Data actors. Writes infer.output (the test-dev submission format) in parts: run "
        "again with the same arguments, a killed job resumes after its last finished part. "
        "Logs an MLflow run; an annotation file with keypoints is also scored (COCO AP).",
    )
    _config_args(p)
    p.add_argument(
        "--checkpoint", required=True, help="a training checkpoint folder or a weights file (.pth)"
    )
    p.add_argument(
        "--dets",
        help="person detections, COCO results format (infer.boxes=file infer.detections=FILE)",
    )
    p.add_argument("--output", help="results JSON to write (infer.output)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "tune",
        help="Ray Tune sweep of widths, sigma, ...: every trial a training run, MLflow children",
        description="A Ray Tune sweep over the parameters of a search-space YAML (see "
        "configs/sweeps/demo.yaml and jobs/sweep_space.py): grid, random or optuna search, ASHA "
        "early stopping on val AP (validated every epoch). Every trial is a Ray Train run of "
        "CONFIG with its own workers; the sweep is an MLflow parent run with one child run per "
        "trial, and the best trial's model is registered. The space is checked against CONFIG "
        "before any trial starts. A sweep killed midway continues with --resume (same "
        "arguments): finished trials are kept, unfinished ones resume from their checkpoints.",
    )
    _config_args(p)
    p.add_argument("--space", required=True, help="search-space YAML file")
    p.add_argument("--num-samples", type=int, default=0, help="override the space's num_samples")
    p.add_argument(
        "--name", help="sweep name (default: the space file's stem); storage_path/NAME on disk"
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep NAME")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="trials at once (default: the space's value, else as many as the cluster holds)",
    )
    p.add_argument(
        "--wait-resources",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="when no trial fits yet (an autoscaling cluster starts without GPU nodes), ask the "
        "autoscaler for one trial's resources and wait this long for them (default 900)",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "compare",
        help="the training runs of an MLflow experiment (or one sweep) side by side",
        description="Reads the training runs of EXPERIMENT back from MLflow and prints run, trial, "
        "status, the config values that differ, val AP/AP50/AP75/AR, best AP, epochs and wall "
        "time.",
    )
    p.add_argument("experiment", help="MLflow experiment name (train.experiment)")
    p.add_argument("--sweep", help="only the trials of this sweep")
    p.add_argument("--sort", default="best_AP", help="column to sort by (default best_AP)")
    p.add_argument("--ascending", action="store_true", help="smallest first")
    p.add_argument("--csv", help="write the rows as CSV to this file ('-': stdout, no table)")
    p.add_argument("--plot", help="save a best-AP-vs-parameter plot (PNG) here")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, ./mlflow.db)"
    )
    p.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="export a model (see `psm export onnx --help`)")
    export_sub = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    p = export_sub.add_parser(
        "onnx",
        help="the pose model as ONNX (dynamic batch), for infer.pose_runtime=onnxruntime",
        description="Writes the checkpoint's pose model (its own config wins) as ONNX: input "
        "'images' (batch, 3, H, W), ImageNet-normalised RGB; output 'heatmaps'; PixelShuffle as "
        "DepthToSpace (mode CRD, PyTorch's order), BatchNorm folded into the convolutions.",
    )
    _config_args(p)
    p.add_argument("--checkpoint", required=True, help="training checkpoint folder or .pth/.pt")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.set_defaults(func=cmd_export_onnx)

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
        description="The quick start on one machine: writes the synthetic COCO dataset (if "
        "absent), starts a local Ray, trains configs/demo.yaml with 2 gloo workers (Ray Train "
        "fed by Ray Data), validates with the test recipe, logs to the local MLflow store and "
        "prints the val AP of the untrained and the trained model.",
    )
    p.add_argument("config", nargs="?", default=None, help="config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=cmd_demo)
    return parser


def _redact_record(record: logging.LogRecord) -> bool:
    """Log lines carry URIs: mask their credentials (psm_model.config.redact_secrets)."""
    from psm_model.config import redact_secrets

    record.msg, record.args = redact_secrets(record.getMessage()), None
    return True


OVERRIDE = re.compile(r"[A-Za-z_]\w*\.\w+=.*", re.S)  # section.key=value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags and `section.key=value` overrides in any order (`psm eval C --oracle data.root=X`):
    argparse stops filling the overrides at the first flag, so the rest are gathered here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not OVERRIDE.fullmatch(a)]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_record)
    from jobs.tracking import TrackingError
    from pipelines.coco import DataError
    from psm_model.config import ConfigError
    from psm_model.evaluation import EvalError
    from psm_model.weights import CheckpointError

    try:
        args.func(args)
    except (ConfigError, CheckpointError, DataError, EvalError, TrackingError) as e:
        print(f"psm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
