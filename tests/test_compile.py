"""compile_model: regional compilation in place ("blocks", "exchange") vs the whole model.

The fast tests compile through Dynamo + AOTAutograd with the `aot_eager` backend (no C++ kernels),
counting the graphs; the inductor test (minutes on 2 cores) is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks.profile import train_step_throughput
from psm_model.checkpoint import unwrap
from psm_model.compiling import compile_model, compiled_regions, eager
from psm_model.config import ModelConfig
from psm_model.hrnet import build_model
from psm_model.loss import joints_mse_loss

TINY = ModelConfig(width=8, fusion="psm", heatmap_stride=2, input_size=(64, 64))
EXCHANGE = [*(f"layer1.{i}" for i in range(4)), "stage2.0", *(f"stage3.{i}" for i in range(4))]
EXCHANGE += [f"stage4.{i}" for i in range(3)]
# 4 bottlenecks; basic blocks: 4 per branch, stage 2: 1 module x 2 branches, 3: 4 x 3, 4: 3 x 4
BLOCKS = 4 + 4 * (1 * 2 + 4 * 3 + 3 * 4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(TINY)
    for p in model.parameters():  # larger than the N(0, 0.001) init, so outputs differ visibly
        p.data.normal_(0, 0.1)
    return model, copy.deepcopy(model)


def _batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, *TINY.input_size, generator=g)
    target = torch.rand(n, TINY.num_joints, *TINY.heatmap_size, generator=g)
    return x, target, torch.ones(n, TINY.num_joints)


def test_regional_scopes_compile_in_place_with_the_same_keys():
    for scope in ("blocks", "exchange"):
        model, reference = _pair()
        assert compile_model(model, scope, backend="aot_eager") is model
        names = compiled_regions(model)
        if scope == "exchange":
            assert names == EXCHANGE
        else:
            assert len(names) == BLOCKS
            assert all(n.startswith("layer1.") or ".branches." in n for n in names)
        assert list(model.state_dict()) == list(reference.state_dict())
        assert [n for n, _ in model.named_parameters()] == [
            n for n, _ in reference.named_parameters()
        ]


@pytest.mark.parametrize("scope", ["blocks", "exchange"])
def test_regional_scope_matches_eager_and_shares_graphs(scope):
    model, reference = _pair()
    counter = CompileCounterWithBackend("aot_eager")
    compile_model(model, scope, backend=counter)
    x, target, weight = _batch()
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    # blocks: 108 regions, 6 graphs: 2 bottlenecks (the first has a downsample), 4 basic-block
    # widths. exchange: 12 regions, 6 graphs: the 2 bottlenecks, stage 2, stage 3 (x4),
    # stage 4 (x2), stage 4's single-output last module
    assert counter.frame_count == 6
    model.train(), reference.train()
    losses = [joints_mse_loss(m(x), target, weight) for m in (model, reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-6, msg=name)  # BN running stats
    assert counter.frame_count == 12  # train mode: each graph once more
    if scope == "blocks":  # (slower for "exchange": its graphs are large)
        for n in (3, 5):  # a new batch size: once more per graph, with a dynamic batch; no more
            joints_mse_loss(model(_batch(n)[0]), *_batch(n)[1:]).backward()
        assert counter.frame_count == 18


def test_eager_context_runs_compiled_regions_without_compiling():
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch.compiler.set_stance needs torch >= 2.6")
    model, reference = _pair()
    counter = CompileCounterWithBackend("aot_eager")
    compile_model(model, "blocks", backend=counter)
    x, _, _ = _batch(3)
    with eager(), torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    assert counter.frame_count == 0


def test_compiled_train_step_updates_the_model_like_eager():
    model, reference = _pair()
    compile_model(model, "blocks", backend="aot_eager")
    x, target, weight = _batch()
    for m in (model, reference):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for _ in range(2):
            loss = joints_mse_loss(m(x), target, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_model_scope_wraps_and_unwrap_gives_plain_keys():
    model, reference = _pair()
    wrapped = compile_model(model, "model", backend="aot_eager")
    assert wrapped is not model
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    assert unwrap(wrapped) is model
    assert list(unwrap(wrapped).state_dict()) == list(reference.state_dict())
    assert compiled_regions(model) == []


def test_unknown_scope_and_foreign_model_are_refused():
    model, _ = _pair()
    with pytest.raises(ValueError, match="compile scope"):
        compile_model(model, "layers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no PoseHRNet"):
        compile_model(torch.nn.Linear(2, 2), "blocks")


@pytest.mark.slow
def test_inductor_train_step_on_cpu():
    """The real backend (C++ kernels), with the GPU settings' code paths: mode "reduce-overhead"
    (CUDA graphs on a GPU; on a CPU it compiles as "default") and fused Adam."""
    r = train_step_throughput(
        TINY,
        2,
        steps=1,
        warmup=1,
        amp="none",
        channels_last=False,
        compile=True,
        device="cpu",
        compile_mode="reduce-overhead",
        fused=True,
    )
    assert r.images_per_s > 0 and r.first_step_s > 0
