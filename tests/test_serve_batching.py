"""`WhenFree` in front of `@serve.batch` (jobs/deployments.py), in plain asyncio: the requests
that arrive while the model runs join one batch when it is free, however far apart they came.
No Serve instance: the batcher is Ray Serve's own code, running in this event loop (given a
stand-in replica context, which it reads only to warn about max_ongoing_requests)."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
from ray import serve

from jobs.deployments import WhenFree
from psm_model.config_inference import ReplicaConfig


@pytest.fixture(autouse=True)
def _replica_context(monkeypatch):
    config = types.SimpleNamespace(max_ongoing_requests=64)
    context = types.SimpleNamespace(_deployment_config=config)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


def _model(gate: bool, wait_s: float = 0.005):
    """A model whose runs end when the test says so; it records each batch's size. A new class
    each time: Serve keeps a method's batch queue with the method, bound to the event loop it
    first ran in."""

    class Model:
        def __init__(self, gate: bool) -> None:
            replica = ReplicaConfig(max_batch_size=32, batch_wait_s=wait_s, max_ongoing=64)
            self.free = WhenFree(self._batch, replica) if gate else None
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


def test_a_held_batch_starts_at_once_and_a_lone_request_waits_for_company():
    async def run() -> tuple[float, float, list[int]]:
        model = _model(gate=True, wait_s=0.3)  # long: the waits are plain to see
        model.release.set()  # runs end at once
        t0 = time.perf_counter()
        await model(1)  # the model is idle: its batch waits 0.3 s for more
        lone = time.perf_counter() - t0
        async with model.free.running():  # the model busy: three requests queue behind it
            held = [asyncio.create_task(model(i)) for i in range(3)]
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
        await asyncio.gather(*held)  # they were the backlog: no wait
        return lone, time.perf_counter() - t0, model.batches

    lone, backlog, batches = asyncio.run(run())
    assert lone >= 0.3 and backlog < 0.25
    assert batches == [1, 3]


def test_without_the_gate_serve_cuts_them_into_small_batches():
    # what WhenFree is for: Serve's batcher closes a batch 5 ms after its first request even
    # while the model is busy, so spaced arrivals queue up as many small batches
    batches, results = asyncio.run(_twenty_during_one_run(gate=False))
    assert results == [2 * i for i in range(21)]
    assert batches[0] == 1 and len(batches) > 2
