"""Apps for the benchmarks, configured by environment so that spawned worker processes build the same one."""

from __future__ import annotations

import os

from fastworker import App, Dedup, Message

STREAM = os.environ.get("BENCH_STREAM", "bench:jobs")
GROUP = os.environ.get("BENCH_GROUP", "bench")

noop = App("noop")


@noop.handler(STREAM, group=GROUP)
async def handle(msg: Message) -> None:
    return None


noop_sync = App("noop-sync")


@noop_sync.handler(STREAM, group=GROUP)
def handle_sync(msg: Message) -> None:
    return None


noop_batch = App("noop-batch")


@noop_batch.handler(STREAM, group=GROUP, batch=True)
async def handle_batch(batch: list[Message]) -> None:
    return None


noop_dedup = App("noop-dedup")


@noop_dedup.handler(STREAM, group=GROUP, dedup=Dedup(ttl_s=600))
async def handle_dedup(msg: Message) -> None:
    return None


# One small result per entry: the settle script's cost per result, without the demo's own work.
RESULTS_STREAM = os.environ.get("BENCH_RESULTS", "bench:results")
one_result = App("one-result")


@one_result.handler(STREAM, group=GROUP)
async def handle_one_result(msg: Message) -> None:
    msg.emit(RESULTS_STREAM, fields={"job": msg.id, "status": "done"})


# Delete-on-ack (bench/memory.py): each entry is deleted from the stream once acked, XACKDEL ... ACKED (Redis 8.2+).
noop_delete_acked = App("noop-delete-acked")


@noop_delete_acked.handler(STREAM, group=GROUP, delete_acked=True)
async def handle_delete_acked(msg: Message) -> None:
    return None
