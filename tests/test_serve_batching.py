"""`WhenFree` in front of `@serve.batch` (jobs/deployments.py), in plain asyncio: the requests
that arrive while the model runs join one batch when it is free, however far apart they came.
No Serve instance: the batcher is Ray Serve's own code, running in this event loop (given a
stand-in replica context, which it reads only to warn about max_ongoing_requests)."""

from __future__ import annotations

import asyncio
import types

import pytest
from ray import serve

from jobs.deployments import WhenFree


@pytest.fixture(autouse=True)
def _replica_context(monkeypatch):
    config = types.SimpleNamespace(max_ongoing_requests=64)
    context = types.SimpleNamespace(_deployment_config=config)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


def _model(gate: bool):
    """A model whose runs end when the test says so; it records each batch's size. A new class
    each time: Serve keeps a method's batch queue with the method, bound to the event loop it
    first ran in."""

    class Model:
        def __init__(self, gate: bool) -> None:
            self.free = WhenFree() if gate else None
            self.started = asyncio.Event()
            self.release = asyncio.Event()
            self.batches: list[int] = []

        async def __call__(self, x: int) -> int:
            if self.free:
                await self.free.wait()
            return await self._batch(x)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def _batch(self, xs: list[int]) -> list[int]:
            async def run() -> list[int]:
                self.batches.append(len(xs))
                self.started.set()
                await self.release.wait()
                return [2 * x for x in xs]

            if self.free:
                async with self.free.running():
                    return await run()
            return await run()

    return Model(gate)


async def _twenty_during_one_run(gate: bool) -> tuple[list[int], list[int]]:
    model = _model(gate)
    first = asyncio.create_task(model(0))
    await model.started.wait()  # the first batch runs, and holds the model
    later = []
    for i in range(1, 21):  # arrivals 20 ms apart: four times the batch wait
        later.append(asyncio.create_task(model(i)))
        await asyncio.sleep(0.02)
    model.release.set()  # every run from now on ends at once
    results = await asyncio.gather(first, *later)
    return model.batches, results


def test_requests_held_while_the_model_runs_fill_one_batch():
    batches, results = asyncio.run(_twenty_during_one_run(gate=True))
    assert results == [2 * i for i in range(21)]  # each caller gets its own answer
    assert batches == [1, 20]


def test_without_the_gate_serve_cuts_them_into_small_batches():
    # what WhenFree is for: Serve's batcher closes a batch 5 ms after its first request even
    # while the model is busy, so spaced arrivals queue up as many small batches
    batches, results = asyncio.run(_twenty_during_one_run(gate=False))
    assert results == [2 * i for i in range(21)]
    assert batches[0] == 1 and len(batches) > 2
