"""FeedStats: which side bounds a run, as each epoch of training reports it (issue 16).

The data side here is a Ray Data graph that sleeps a known time per chunk; the consumer is either
instant (so it waits for data nearly all the time) or slower than the data side (so, after the
first chunk, the next one is always made ahead and it hardly waits). Wide margins: the machine is
shared, and what is checked is which side the numbers blame, not a speed.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from pipelines.datasets import FeedStats, iter_chunked

CHUNK_SLEEP_S = 0.4
ROWS, CHUNK_ROWS, BATCH = 12, 4, 4


def _make(chunk) -> ray.data.Dataset:
    def slow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # nested: shipped by value (workers cannot import this test module)
        time.sleep(CHUNK_SLEEP_S)
        return batch

    return ray.data.from_items(list(chunk), override_num_blocks=1).map_batches(
        slow, batch_size=None
    )


def _consume(step_s: float, until_next_made: bool = False) -> tuple[FeedStats, int, list]:
    """Consume every batch, each step taking `step_s`, and with `until_next_made` also until the
    data side has made the next chunk: a consumer slower than the data side by construction, on
    however loaded a machine. Returns the stats, the rows seen and each batch's wait."""
    rows = [{"i": i} for i in range(ROWS)]
    feed = FeedStats()
    batches = iter_chunked(_make, rows, CHUNK_ROWS, BATCH, feed)
    seen, waits = 0, []
    while True:
        waited = feed.wait_s
        batch = feed.next(batches)
        if batch is None:
            break
        waits.append(feed.wait_s - waited)
        t0 = time.perf_counter()
        seen += len(batch["i"])
        time.sleep(step_s)
        next_chunk_end = min(ROWS, (seen // CHUNK_ROWS + 1) * CHUNK_ROWS)
        while until_next_made and feed.made_samples < next_chunk_end:
            time.sleep(0.01)
        feed.compute_s += time.perf_counter() - t0
    return feed, seen, waits


def test_a_fast_consumer_waits_for_the_data_side(ray_local):
    feed, seen, _ = _consume(step_s=0.0)
    assert seen == ROWS and feed.made_samples == ROWS
    assert feed.making_s >= 3 * CHUNK_SLEEP_S  # three chunks, each sleeping inside its task
    assert feed.data_rate() <= ROWS / (3 * CHUNK_SLEEP_S)
    assert feed.wait_s / (feed.wait_s + feed.compute_s) > 0.9


def test_a_slow_consumer_finds_the_next_chunk_made_ahead(ray_local):
    feed, seen, waits = _consume(step_s=0.5, until_next_made=True)
    assert seen == ROWS and feed.made_samples == ROWS and len(waits) == ROWS // BATCH
    # only the first chunk is waited for; the later batches are there when asked for
    assert waits[0] > 0.9 * CHUNK_SLEEP_S
    assert sum(waits[1:]) < 0.25 * feed.compute_s
    assert feed.compute_s >= 3 * 0.5


def test_nothing_made_gives_a_zero_rate_not_an_error():
    feed = FeedStats()
    assert feed.data_rate() == 0.0
    assert feed.next(iter([])) is None and feed.wait_s >= 0.0
