"""A pose model -> ONNX (`psm export onnx`): dynamic batch, PixelShuffle as DepthToSpace.

Exported with the TorchScript exporter (`dynamo=False`): on this model it gives the same graph
ops as the torch.export-based one (Conv, Relu, Add, DepthToSpace; BatchNorm folded into the convs)
much faster (docs/benchmarks.md), and needs neither onnxscript nor torch.export.
PyTorch's PixelShuffle reads channel c * r^2 + i * r + j into output (c, y * r + i, x * r + j):
ONNX DepthToSpace with mode "CRD" (column-row-depth); the default mode "DCR" is a different
permutation, so `check_depth_to_space` refuses a graph that uses it.
"""

from __future__ import annotations

import io
import warnings

import torch

INPUT_NAME = "images"  # (batch, 3, H, W) float32, normalised as psm_model.hrnet.normalize_images
OUTPUT_NAME = "heatmaps"  # (batch, joints, H / stride, W / stride)
OPSET = 17


def export_onnx(model: torch.nn.Module, input_size: tuple[int, int]) -> bytes:
    """The ONNX bytes of `model` (put in eval mode on the CPU) for crops of `input_size` (h, w),
    with a dynamic batch dimension."""
    model = model.cpu().eval()
    example = torch.zeros(2, 3, *input_size)  # batch 2: a batch of 1 could be specialised away
    buffer = io.BytesIO()
    # the TorchScript exporter warns that it is deprecated on every call (see the module docstring)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    data = buffer.getvalue()
    check_depth_to_space(data, "exported model")
    return data


def check_depth_to_space(data: bytes, source: str) -> int:
    """The number of DepthToSpace nodes; ValueError naming `source` if one is not in PyTorch's
    PixelShuffle order (mode CRD)."""
    import onnx

    graph = onnx.load_from_string(data).graph
    count = 0
    for node in graph.node:
        if node.op_type != "DepthToSpace":
            continue
        count += 1
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "DCR")
        if mode != "CRD":
            raise ValueError(
                f"{source}: node {node.name}: DepthToSpace mode {mode}, expected CRD "
                "(PyTorch's PixelShuffle channel order)"
            )
    return count
