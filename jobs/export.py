"""`psm export onnx CONFIG --checkpoint CKPT --output FILE`: the pose model as ONNX."""

from __future__ import annotations

import argparse
import sys

from jobs import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Writes the checkpoint's pose model (its own config wins) as ONNX: input "
        "'images' (batch, 3, H, W), ImageNet-normalised RGB; output 'heatmaps'; PixelShuffle as "
        "DepthToSpace (mode CRD, PyTorch's order), BatchNorm folded into the convolutions."
    )
    command.add_config_arguments(p)
    p.add_argument("--checkpoint", required=True, help="training checkpoint folder or .pth/.pt")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from jobs import storage
    from jobs.checkpoint_uri import load_model
    from jobs.tracking import Tracker
    from pipelines.uris import write_bytes
    from psm_model.export import export_onnx

    storage.require_output_file(args.output, "--output")
    cfg = command.load(args)
    model, cfg = load_model(args.checkpoint, cfg, Tracker.of(cfg))
    data = export_onnx(model, cfg.model.input_size)
    write_bytes(args.output, data)  # a local path or a URI, atomically
    h, w = cfg.model.input_size
    stride = cfg.model.heatmap_stride
    print(
        f"{args.output}: images (batch, 3, {h}, {w}) -> heatmaps (batch, "
        f"{cfg.model.num_joints}, {h // stride}, {w // stride}), {len(data) / 1e6:.1f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.export ARGS` is `psm export onnx ARGS`."""
    return command.job_main("jobs.export", "psm export onnx", argv)


if __name__ == "__main__":
    sys.exit(main())
