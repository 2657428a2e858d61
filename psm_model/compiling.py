"""torch.compile for training: the whole model, or its repeated regions in place.

scope "model": `torch.compile(model)`, one graph of the whole network (forward and backward). It
returns a wrapper whose state_dict keys carry `_orig_mod.` (checkpoint.unwrap strips it). On
HRNet-W48 384x288 its compile time is the longest by far (docs/benchmarks.md).

scopes "blocks" and "exchange" (regional compilation): each repeated region is compiled in place
with `nn.Module.compile()`. Since torch 2.5 a module's parameters are inputs of the compiled graph
(not constants baked into it), so regions of one class that see the same input shapes share one
compiled graph: the compile cost is that of the few distinct regions, not of the 100+ blocks
(torch 2.4 needs `torch._dynamo.config.inline_inbuilt_nn_modules = True` for that; it recompiles
per instance otherwise). The module tree, the parameters and the state_dict keys stay those of the
eager model; the code between regions runs eagerly.

- "blocks": every residual block (4 bottlenecks, 104 basic blocks): 6 graphs, one per branch
  width (4) and 2 for the bottlenecks (the first has a 64-channel input and a downsample). The
  fusion sums between blocks stay eager.
- "exchange": every exchange module (four blocks per branch and the fusion sums) and every
  bottleneck. Branch i has the same shape in every stage, so the 8 exchange modules make 4 static
  graphs (stage 2, 3, 4 and stage 4's single-output last module), the bottlenecks 2.

Forward and backward are compiled per graph, train and eval mode separately; a new batch size
recompiles each graph once with a dynamic batch dimension. That can take 8 entries for one code
object (4 widths x 2), Dynamo's default recompile limit, after which it silently runs eagerly;
compile_model raises the limit to `RECOMPILE_LIMIT`.

"blocks" compiles several times faster than "model" and "exchange"; on the CPU its steady-state
steps were a little slower than "model"'s and no scope beat eager (docs/benchmarks.md; the GPU
gain is measured by benchmarks/gpu_train.sh).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from psm_model.hrnet import BasicBlock, Bottleneck, PoseHRNet

CompileScope = Literal["model", "blocks", "exchange"]


def block_regions(net: PoseHRNet) -> list[nn.Module]:
    """Every residual block (bottlenecks and basic blocks); the fusion sums stay eager."""
    return [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def exchange_regions(net: PoseHRNet) -> list[nn.Module]:
    """Every stage-1 bottleneck and every exchange module."""
    return [*net.layer1, *net.stage2, *net.stage3, *net.stage4]


RECOMPILE_LIMIT = 64

REGIONS: dict[str, Callable[[PoseHRNet], list[nn.Module]]] = {
    "blocks": block_regions,
    "exchange": exchange_regions,
}


def compile_model(
    model: nn.Module,
    scope: CompileScope = "blocks",
    regions: Callable[[PoseHRNet], list[nn.Module]] | None = None,
    **compile_kwargs,
) -> nn.Module:
    """The module to call for training steps.

    "model": a `torch.compile` wrapper around `model`. "blocks", "exchange": `model` itself, with
    the regions of every PoseHRNet inside it (also inside DDP) compiled in place; optimiser,
    checkpoints and evaluation keep using `model` and its unchanged keys. `regions` overrides the
    scope's choice of regions; `compile_kwargs` go to torch.compile (backend, mode, ...).
    """
    if scope == "model":
        return torch.compile(model, **compile_kwargs)
    if scope not in REGIONS:
        raise ValueError(f"compile scope {scope!r}: expected 'model', 'blocks' or 'exchange'")
    nets = [m for m in model.modules() if isinstance(m, PoseHRNet)]
    if not nets:
        raise ValueError(f"compile scope {scope!r}: no PoseHRNet inside {type(model).__name__}")
    config = torch._dynamo.config  # "recompile_limit" since torch 2.6, "cache_size_limit" before
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for net in nets:
        for region in (regions or REGIONS[scope])(net):
            region.compile(**compile_kwargs)
    return model


def compiled_regions(model: nn.Module) -> list[str]:
    """Names of the submodules compiled in place (empty for an eager or wrapped model)."""
    return [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None)]


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled code eagerly inside (validation of a model with compiled regions): no
    recompilation for eval mode, inference mode and other batch sizes. torch < 2.6: no-op."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


__all__ = [
    "RECOMPILE_LIMIT",
    "REGIONS",
    "CompileScope",
    "block_regions",
    "compile_model",
    "compiled_regions",
    "eager",
    "exchange_regions",
]
