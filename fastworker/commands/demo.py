"""`fastworker demo`: the whole picture on the embedded server, no Redis install needed.

It starts an embedded Valkey (unless --redis-url names a server), emulates the app publishing the sample jobs to
the three job streams, runs the fleet with the demo handlers (`fastworker.demo:app`), shows live progress, stops
the fleet once every job is settled, and ends with the throughput and a per-stream summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis

from fastworker import demo
from fastworker.cli import add_settings_flags, flag_values
from fastworker.config import load_settings
from fastworker.errors import ExitCode
from fastworker.publisher import Publisher
from fastworker.server import EmbeddedServer
from fastworker.supervisor import Supervisor

STREAMS = (demo.DATA_JOBS, demo.ML_TRAINING, demo.NOTIFICATIONS)
CHUNK = 500


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="publish sample jobs to an embedded server and process them with a fleet",
                            description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs to publish over the three streams")
    parser.add_argument("--rate", type=float, default=0,
                        help="jobs per second the emulated app publishes (0: as fast as it can)")
    parser.add_argument("--fail-rate", type=float, default=0.001,
                        help="share of jobs whose handler fails every time (they end as dead letters)")
    parser.add_argument("--timeout-s", type=float, default=600, help="give up after this long")
    add_settings_flags(parser)
    parser.set_defaults(handler=run, setting_log_level="WARNING")  # the progress line says enough


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1 or args.rate < 0 or not 0 <= args.fail_rate <= 1:
        print("fastworker: error: --jobs must be at least 1, --rate >= 0, --fail-rate within 0..1", file=sys.stderr)
        return ExitCode.USAGE
    flags = flag_values(args)
    # Short claim idle so the failing jobs' retries and dead letters happen within the demo.
    demo_defaults = {"claim_idle_ms": 500, "claim_interval_ms": 250, "handler_timeout_s": 0.3, "max_deliveries": 3}
    with contextlib.ExitStack() as stack:
        if "redis_url" not in flags:
            server = stack.enter_context(EmbeddedServer())
            print(f"embedded server: {server.version()} at {server.url}")
            flags["redis_url"] = server.url
        settings, _ = load_settings({**{k: str(v) for k, v in demo_defaults.items()}, **flags})
        supervisor = Supervisor("fastworker.demo:app", demo.app, settings)
        emulation = AppEmulation(settings.redis_url, args.jobs, args.rate, args.fail_rate, args.timeout_s)
        emulation.dead_letter_suffix = settings.dead_letter_suffix
        supervisor.on_started.append(emulation.start)
        code = supervisor.run()
        if emulation.error:
            print(f"fastworker: error: {emulation.error}", file=sys.stderr)
            return ExitCode.FAILURE
        asyncio.run(emulation.summary(supervisor))
        return code


class AppEmulation:
    """The app's side of the demo: publishes jobs, watches the fleet's counters, stops it when all are settled."""

    def __init__(self, url: str, jobs: int, rate: float, fail_rate: float, timeout_s: float) -> None:
        self.url = url
        self.jobs = jobs
        self.rate = rate
        self.fail_rate = fail_rate
        self.timeout_s = timeout_s
        self.published = 0
        self.published_by: dict[str, int] = {}
        self.failing = 0
        self.started = 0.0
        self.first_pass = 0.0  # when every job that can succeed had succeeded
        self.finished = 0.0
        self.error: str | None = None
        self.dead_letter_suffix = ":dead"
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, supervisor: Supervisor) -> None:
        self._tasks = [asyncio.create_task(self._publish(supervisor)), asyncio.create_task(self._watch(supervisor))]

    async def _publish(self, supervisor: Supervisor) -> None:
        """Publish the jobs round-robin over the three job streams, like the app would, at the chosen rate."""
        await supervisor.all_ready.wait()  # time the fleet's work, not its start-up
        self.started = time.perf_counter()
        async with Publisher(self.url) as publisher:
            await asyncio.gather(*(
                publisher.publish_stream(stream, self._payloads(offset), on_progress=self._progress(stream))
                for offset, stream in enumerate(STREAMS)))

    async def _payloads(self, offset: int) -> AsyncIterator[dict[str, Any]]:
        rng = random.Random(offset)
        for index in range(offset, self.jobs, len(STREAMS)):
            payload = demo.sample_payload(STREAMS[offset], index)
            if rng.random() < self.fail_rate:
                payload["simulate"] = "error" if index % 2 else "poison"
                self.failing += 1
            yield payload
            if self.rate and index % CHUNK < len(STREAMS):
                await _pace(self.started, index, self.rate)

    def _progress(self, stream: str) -> Callable[[int], None]:
        def count(published: int) -> None:
            self.published_by[stream] = published
            self.published = sum(self.published_by.values())

        return count

    async def _watch(self, supervisor: Supervisor) -> None:
        deadline = time.monotonic() + self.timeout_s
        tty = sys.stdout.isatty()
        ticks = 0
        while True:
            await asyncio.sleep(0.25)
            ticks += 1
            totals = supervisor.totals()
            settled, acked = _settled(totals), _count(totals, "acked")
            if not self.first_pass and self.published == self.jobs and acked >= self.jobs - self.failing:
                self.first_pass = time.perf_counter()
            elapsed = time.perf_counter() - self.started if self.started else 0.0
            line = (f"published {self.published:>9,}  acked {acked:>9,}  dead {_count(totals, 'dead'):>5,}  "
                    f"{acked / elapsed if elapsed else 0:>9,.0f} msgs/s")
            if tty:
                print(f"\r{line}", end="", flush=True)
            elif ticks % 4 == 0:
                print(line, flush=True)
            if self.published == self.jobs and settled >= self.jobs:
                self.finished = time.perf_counter()
                break
            if time.monotonic() > deadline or any(t.done() and t.exception() for t in self._tasks):
                failed = next((t.exception() for t in self._tasks if t.done() and t.exception()), None)
                self.error = str(failed) if failed else f"not all jobs were settled within {self.timeout_s:g} s"
                break
        print()
        supervisor.stop()

    async def summary(self, supervisor: Supervisor) -> None:
        totals = supervisor.totals()
        first_pass = max((self.first_pass or self.finished) - self.started, 1e-9)
        acked = _count(totals, "acked")
        print(f"{acked:,} jobs handled in {first_pass:.2f} s: {acked / first_pass:,.0f} msgs/s with "
              f"{len(supervisor.slots)} worker processes, publishing at the same time")
        print(f"{_count(totals, 'dead'):,} failing jobs dead-lettered, {_count(totals, 'retried'):,} retries, "
              f"all settled after {self.finished - self.started:.2f} s")
        client = aioredis.Redis.from_url(self.url)
        try:
            rows = [await _stream_row(client, stream, demo.GROUPS[stream], totals, self.dead_letter_suffix)
                    for stream in STREAMS]
            rows += [(stream, await client.xlen(stream), "-", "-", "-", "results")
                     for stream in (demo.ANALYSIS_RESULTS, demo.FEATURES_COMPUTED)]
        finally:
            await client.aclose()
        header = ("stream", "length", "pending", "dead letters", "acked", "")
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _count(totals: dict[tuple[str, str, str], int], outcome: str) -> int:
    return sum(value for (_, _, name), value in totals.items() if name == outcome)


def _settled(totals: dict[tuple[str, str, str], int]) -> int:
    return _count(totals, "acked") + _count(totals, "dead")


async def _pace(started: float, sent: int, rate: float) -> None:
    ahead = sent / rate - (time.perf_counter() - started)
    if ahead > 0:
        await asyncio.sleep(ahead)


async def _stream_row(client: aioredis.Redis, stream: str, group: str, totals: dict[tuple[str, str, str], int],
                      dead_letter_suffix: str) -> tuple[Any, ...]:
    pending = (await client.xpending(stream, group))["pending"]
    dead = await client.xlen(stream + dead_letter_suffix)
    return stream, await client.xlen(stream), pending, dead, totals.get((stream, group, "acked"), 0), group
