"""Read-ahead (`--read-ahead`): batches read while one is handled, against a real server.

What it must keep: every entry read ahead is held like the batch in hand (never claimed from under a slow batch),
handled before a drained stop, and recovered exactly after a crash: the consumer's own pending entries cover every
batch it had in flight, also over a network with delay.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bench.faultproxy import ProxyProcess
from fastworker import App, EmbeddedServer, ExitCode, Message
from fastworker import consumer as consumer_module
from tests.conftest import RunningWorker, make_settings, publish, wait_for
from tests.test_fleet import Fleet, alive


def _true(value: bool) -> asyncio.Future[bool]:
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    done.set_result(value)
    return done


async def test_entries_read_ahead_are_kept_claimed_while_a_slow_batch_is_handled(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    # Three batches of 5; each call takes 80 ms, one at a time: a batch takes 0.4 s, and the batches read ahead
    # wait up to 0.8 s for their turn, twice the claim idle time. They are kept claimed like the batch in hand: no
    # entry ever looks idle past the claim idle time, so no other process's reclaimer would take one. (This
    # process's own reclaimer could not: it claims orphans only while nothing else of the process runs.)
    stream, group, claim_idle_ms = f"{uid}:jobs", f"{uid}-g", 400
    await publish(rc, stream, [{"n": i} for i in range(15)])
    calls: list[int] = []
    app = App()

    @app.handler(stream, group=group)
    async def slow(msg: Message) -> None:
        calls.append(msg.payload["n"])
        await asyncio.sleep(0.08)

    idle: set[bytes] = set()
    watched: list[int] = []

    async def watch() -> None:  # what another process's reclaimer would see
        while True:
            rows = await rc.xpending_range(stream, group, min="-", max="+", count=100, idle=claim_idle_ms)
            idle.update(row["message_id"] for row in rows)
            watched.append(len(rows))
            await asyncio.sleep(0.02)

    settings = make_settings(server, uid, batch_size=5, read_ahead=2, claim_idle_ms=claim_idle_ms,
                             claim_interval_ms=50, handler_timeout_s=0.2, concurrency=1)
    async with RunningWorker(app, settings) as worker:
        watcher = asyncio.create_task(watch())
        try:
            await wait_for(lambda: _true(worker.stats.total("acked") >= 15), what="all fifteen acked")
        finally:
            if watcher.done():
                watcher.result()  # the watcher's own error, if it failed
            watcher.cancel()
        consumer = worker.consumers[0]
    assert consumer.reads_ahead >= 2  # the batches did come by read-ahead
    assert len(watched) > 20 and idle == set()
    assert sorted(calls) == list(range(15))


async def test_every_batch_is_settled_while_the_read_ahead_depth_changes(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The depth grows when a batch read ahead is late and shrinks after turns in a row that were not; made to shrink
    # after every such turn here, it goes up and down all the time. Each batch's settlement must still be written:
    # every entry handled once, acked, nothing left pending.
    monkeypatch.setattr(consumer_module, "SHALLOWER_AFTER", 1)
    stream, group, n = f"{uid}:jobs", f"{uid}-g", 20_000
    await publish(rc, stream, list(range(n)))
    calls: list[int] = []
    depths: list[int] = []
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        calls.append(msg.payload)
        if msg.payload % 100 == 0:
            depths.append(worker.consumers[0].read_ahead_depth)

    settings = make_settings(server, uid, batch_size=100, read_ahead=4)
    async with RunningWorker(app, settings) as worker:
        await wait_for(lambda: _true(worker.stats.total("acked") >= n), what="every entry acked")
    assert sorted(calls) == list(range(n))
    assert (await rc.xpending(stream, group))["pending"] == 0
    changes = sum(1 for before, after in itertools.pairwise(depths) if before != after)
    assert max(depths) > 1 and changes >= 4  # it did go deeper and shallower, more than once


async def test_stop_handles_the_batches_read_ahead(server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": i} for i in range(40)])
    calls: list[int] = []
    started = asyncio.Event()
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        calls.append(msg.payload["n"])
        started.set()
        await asyncio.sleep(0.01)

    settings = make_settings(server, uid, batch_size=10, read_ahead=2, concurrency=1)
    async with RunningWorker(app, settings) as worker:
        await asyncio.wait_for(started.wait(), 10)
        consumer = worker.consumers[0]
    # stopped while the first batch was handled and the next was read ahead: both were handled and settled,
    # nothing is left pending
    assert consumer.reads_ahead >= 1
    assert len(calls) == len(set(calls)) >= 20
    summary = await rc.xpending(stream, group)
    assert summary["pending"] == 0


@pytest.mark.slow
def test_kill_with_batches_read_ahead_over_a_delayed_network_recovers_exactly(
        server: EmbeddedServer, uid: str, tmp_path: Path) -> None:
    # One worker process reaches the server through 0.5 ms of one-way delay, with two batches read ahead. It is
    # SIGKILLed while it holds more than one batch: the replacement's own pending entries cover every batch it had
    # in flight, so every job gets exactly one result, nothing stays pending, and only entries it held ran twice.
    n, batch, ahead = 20_000, 200, 2
    fleet = Fleet(server, uid, tmp_path)
    try:
        with ProxyProcess(server.port, lifetime_s=600) as proxy:
            proxy.set_delay(0.0005, 0.0005)
            fleet.env["REDIS_URL"] = server.url.replace(f":{server.port}/", f":{proxy.port}/")
            fleet.publish(n)
            fleet.start("--processes", "1", "--batch-size", str(batch), "--read-ahead", str(ahead))
            fleet.wait(lambda: sum(fleet.calls().values()) > n // 4, what="a quarter of the jobs handled")
            fleet.wait(lambda: fleet.pending() > batch, what="more than one batch in hand")
            (victim,) = fleet.workers()
            os.kill(victim, signal.SIGKILL)
            held = fleet.pending()  # what the dead worker held: nobody acks it until its replacement recovers it
            fleet.wait(lambda: not alive(victim) and len(fleet.workers()) == 1, what="a replacement worker")
            fleet.wait(lambda: len(fleet.calls()) == n and fleet.pending() == 0, timeout_s=120,
                       what="every job handled")
            assert fleet.stop() == ExitCode.OK
    finally:
        fleet.close()
    assert held > batch  # the kill did land with batches read ahead
    results = Counter(fields[b"data"] for _, fields in fleet.client.xrange(fleet.results))
    assert (n - len(results), sum(results.values()) - len(results)) == (0, 0)  # lost, duplicated
    # Only entries it held can have run twice (those read ahead and not yet started ran once); it never held more
    # than the batch in hand and the batches read ahead.
    reruns = sum(fleet.calls().values()) - n
    assert reruns <= held <= (1 + ahead) * batch, (reruns, held)
