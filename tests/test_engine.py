"""The consumer engine against a real server: throughput of the contract, results, pending recovery."""

from __future__ import annotations

import redis.asyncio as aioredis

from fastworker import App, EmbeddedServer, Message
from tests.conftest import JOB, RunningWorker, make_settings, pending_count, publish, wait_for


async def test_engine_handles_every_entry_and_publishes_results(server: EmbeddedServer, rc: aioredis.Redis,
                                                                uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    n = 20_000
    payloads = [{**JOB, "job_id": f"job-{i}"} for i in range(n)]
    await publish(rc, stream, payloads)
    seen: list[str] = []
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        seen.append(msg.payload["job_id"])
        msg.emit(results, {"job_id": msg.payload["job_id"], "shop_id": msg.payload["shop_id"], "status": "completed"})

    async with RunningWorker(app, make_settings(server, uid, batch_size=500)):
        await wait_for(lambda: _length_is(rc, results, n), what="all results")
    assert sorted(seen) == sorted(p["job_id"] for p in payloads)
    assert await pending_count(rc, stream, group) == 0
    assert await rc.xlen(results) == n


async def _length_is(rc: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await rc.xlen(stream)) >= n
