"""ONNX Runtime sessions for the Ray Data actors: the pose model (`infer.pose_runtime` /
`eval.pose_runtime = onnxruntime`) and the person detector (`pipelines.detect`).

The CUDA execution provider where onnxruntime-gpu offers it and the actor sees a GPU, the CPU one
otherwise; the provider the session actually uses is logged (ONNX Runtime falls back to the CPU
silently when CUDA cannot start).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def make_session(model: bytes | str, source: str, threads: int = 1):
    """An `onnxruntime.InferenceSession` of `model` (the bytes, or a path) with `threads` intra-op
    threads (what the actor reserved: ONNX Runtime otherwise takes every core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and _sees_gpu():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile)
        raise ValueError(f"{source}: ONNX Runtime cannot load the model: {e}") from e
    log.info("%s: ONNX Runtime on %s", source, session.get_providers()[0])
    return session


def _sees_gpu() -> bool:
    # only with onnxruntime-gpu: a detector actor on the CPU does not import torch (~1.2 s)
    import torch

    return torch.cuda.is_available()


class OnnxPoseModel:
    """An exported pose model (psm_model.export) behind the call of the torch model: normalised
    (B, 3, H, W) images in, heatmaps out, both torch tensors, so `pipelines.predict.predict`
    runs either runtime unchanged."""

    def __init__(self, model: bytes | str, source: str, threads: int = 1) -> None:
        self.session = make_session(model, source, threads)
        self.input = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch  # the pose actors have it already (pipelines.predict)

        # ORT reads a dense NCHW buffer: a channels_last tensor must be made contiguous first
        images = np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)
        return torch.from_numpy(self.session.run(None, {self.input: images})[0])

    def eval(self) -> OnnxPoseModel:  # nn.Module's interface, for callers that set eval mode
        return self
