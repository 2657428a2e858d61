"""What a process that runs a model needs, the same for Ray Data's pose and detector actors and
Serve's replicas: glibc malloc settings, an actor pool that calls the model in its main thread,
and ONNX Runtime sessions.

- `keep_freed_memory`: by default glibc serves large blocks (from 128 kB up, a threshold it raises
  as blocks are freed) with mmap and hands freed memory back to the kernel, so a forward pass that
  allocates and frees the same large activations every batch pays page faults for them every
  batch. On the CPU machine the tiny pose model ran 30.5 persons/s so and 40 with these settings
  (docs/benchmarks.md).
- `model_actors`: the actor pool strategy of every model stage.
- `make_session` / `OnnxPoseModel`: the pose model (`eval.pose_runtime` / `infer.pose_runtime =
  onnxruntime`) and the person detector (`pipelines.detect`) on ONNX Runtime: the CUDA execution
  provider where onnxruntime-gpu offers it and the actor sees a GPU, the CPU one otherwise; the
  provider the session actually uses is logged (ONNX Runtime falls back to the CPU silently when
  CUDA cannot start).

No torch or Ray Data import at module level: the detector actors import neither.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from ray.data import ActorPoolStrategy

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30  # blocks up to this size come from the heap and stay there when freed


def keep_freed_memory() -> bool:
    """Serve blocks up to KEEP_BYTES from the heap and do not return freed heap memory to the
    kernel: the process keeps its peak working set and reuses it. False where the C library is
    not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_BYTES) == 1
    # one arena: a thread started from now on (a Serve replica's `asyncio.to_thread`, Ray Data's
    # and Ray Train's call threads) allocates from the main heap too, which the thresholds keep;
    # its own arena's heaps (64 MB at most each) came and went with every batch's activations:
    # the tiny pose model on 1 thread, batches of 32, 26.0 persons/s in a second thread against
    # 34.4 in the main one; 31.8 and 32.5 so (session 14)
    ok = ok and mallopt(_M_ARENA_MAX, 1) == 1
    if not ok:
        log.info("mallopt refused the thresholds: the C library's defaults stay")
    return ok


def model_actors(size: int) -> ActorPoolStrategy:
    """A fixed pool of `size` actors that call the model in their main thread.

    By default Ray Data calls an actor's `__call__` in a second thread, where glibc serves the
    call from another malloc arena than the main one (heaps of at most 64 MB that are created and
    unmapped as the batch's activations come and go): the tiny pose model on one thread paid
    ~90k page faults per batch of 32 and ran 32 persons/s there, 40 in the main thread
    (docs/benchmarks.md). With one call at a time per actor (the default) nothing overlapped with
    the call in that thread anyway."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=size, enable_true_multi_threading=True)


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
