"""`fastworker demo`: the whole picture on the embedded server, no Redis install needed.

It starts an embedded Valkey (unless --redis-url names a server), emulates the app publishing the sample jobs to
the three job streams, runs the fleet with the demo handlers (`fastworker.demo:app`), shows live progress, stops
the fleet once every job is settled, and ends with the throughput and a per-stream summary.

Interrupted (Ctrl-C, SIGTERM), the fleet drains what it has in hand and the summary says what was done and what
was not (published jobs not settled yet), and the exit code is 130. The live line and the summary count the same
way: `published` is what the emulated app has handed to its publisher (never behind `acked`), and the rate is
acked jobs over the time from the first job published to now, or to the moment every job that can succeed had.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

from fastworker import demo
from fastworker.cli import add_settings_flags, at_least, flag_values, number
from fastworker.commands.dashboard import serve_dashboard
from fastworker.config import Settings, load_settings
from fastworker.edge.admin import Admin
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode
from fastworker.logs import plural
from fastworker.publisher import Publisher
from fastworker.server import EmbeddedServer
from fastworker.supervisor import Supervisor

STREAMS = (demo.DATA_JOBS, demo.ML_TRAINING, demo.NOTIFICATIONS)
CHUNK = 500
TICK_S = 0.25
CLEAR_LINE = "\x1b[2K"


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="publish sample jobs to an embedded server and process them with a fleet",
                            description=__doc__)
    parser.add_argument("--jobs", type=at_least(1), default=100_000, help="jobs to publish over the three streams")
    parser.add_argument("--rate", type=number(unit="jobs per second"), default=0,
                        help="jobs per second the emulated app publishes (0: as fast as it can)")
    parser.add_argument("--fail-rate", type=number(high=1, unit=""), default=0.001,
                        help="share of jobs (0 to 1) whose handler fails every time (they end as dead letters)")
    parser.add_argument("--timeout-s", type=number(above=True), default=600,
                        help="give up after this many seconds")
    parser.add_argument("--dashboard", action="store_true",
                        help="serve the web dashboard under /dashboard/ on --http-port while the demo runs")
    add_settings_flags(parser, defaults={**DEMO_DEFAULTS, "redis_url": "an embedded server of its own"})
    parser.set_defaults(handler=run, setting_log_level="WARNING")  # the progress line says enough


# Short claim idle so that crash recovery and the failing jobs' dead letters happen within the demo.
DEMO_DEFAULTS = {"claim_idle_ms": 500, "claim_interval_ms": 250, "handler_timeout_s": 0.3, "max_deliveries": 3}

def run(args: argparse.Namespace) -> int:
    if args.jobs < 1 or args.rate < 0 or not 0 <= args.fail_rate <= 1:
        print("fastworker: error: --jobs must be at least 1, --rate >= 0, --fail-rate within 0..1", file=sys.stderr)
        return ExitCode.USAGE
    flags = flag_values(args)
    demo_defaults = DEMO_DEFAULTS
    with contextlib.ExitStack() as stack:
        embedded = "redis_url" not in flags
        if embedded:
            server = stack.enter_context(EmbeddedServer())
            print(f"embedded server: {server.version()} at {server.url}")
            flags["redis_url"] = server.url
        settings, _ = load_settings({**{k: str(v) for k, v in demo_defaults.items()}, **flags})
        supervisor = Supervisor("fastworker.demo:app", demo.app, settings)
        emulation = AppEmulation(settings.redis_url, args.jobs, args.rate, args.fail_rate, args.timeout_s)
        emulation.dead_letter_suffix = settings.dead_letter_suffix
        emulation.embedded = embedded
        supervisor.on_started.append(emulation.start)
        if args.dashboard:
            serve_dashboard(supervisor)
        code = supervisor.run()
        if emulation.reader_gone:
            raise BrokenPipeError  # the command line ends quietly, as it does for every command
        if emulation.error:
            emulation.display.finish(emulation.line(emulation.tally(supervisor)))
            print(f"fastworker: error: {emulation.error}", file=sys.stderr)
            return ExitCode.FAILURE
        interrupted = not emulation.finished
        asyncio.run(emulation.summary(supervisor, interrupted))
        return ExitCode.INTERRUPTED if interrupted else code


@dataclasses.dataclass(frozen=True)
class Tally:
    """What the demo has done so far, counted one way for the live line and the summary."""

    published: int
    acked: int
    dead: int
    retried: int
    seconds: float  # from the first job published to now, or to when every job that can succeed had

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0


class Display:
    """The live line. On a terminal it is redrawn in place with the cursor left at its start: a log line (the
    workers write to the same terminal, and their log lines begin by clearing the line) then replaces it whole,
    and the next tick draws it again below. Elsewhere, one line a second."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.ticks = 0
        self.printed = ""  # the last line printed on a line of its own (not on a terminal)

    def draw(self, line: str) -> None:
        if self.tty:
            self.out.write(f"{CLEAR_LINE}{line}\r")
            self.out.flush()
        elif self.ticks % round(1 / TICK_S) == 0:
            self._print(line)
        self.ticks += 1

    def finish(self, line: str) -> None:
        """The last state, once, on a line of its own."""
        if self.tty:
            print(f"{CLEAR_LINE}{line}", file=self.out, flush=True)
        elif line != self.printed:
            self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)
        self.printed = line


class AppEmulation:
    """The app's side of the demo: publishes jobs, watches the fleet's counters, stops it when all are settled."""

    def __init__(self, url: str, jobs: int, rate: float, fail_rate: float, timeout_s: float) -> None:
        self.url = url
        self.jobs = jobs
        self.rate = rate
        self.fail_rate = fail_rate
        self.timeout_s = timeout_s
        self.handed = 0  # payloads handed to the publisher: the live line's `published`
        self.confirmed_by: dict[str, int] = {}  # entries the server confirmed, per stream
        self.failing = 0
        self.rate_limited = 0  # handled after one retry: the throughput figure does not wait for them
        self.reader_gone = False  # our output's reader went away (a closed pipe)
        self.started = 0.0
        self.first_pass = 0.0  # when every job that can succeed had succeeded
        self.finished = 0.0
        self.error: str | None = None
        self.dead_letter_suffix = ":dead"
        self.embedded = True
        self.display = Display()
        self.lengths_before: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, supervisor: Supervisor) -> None:
        self.lengths_before = await self._lengths()
        self._tasks = [asyncio.create_task(self._publish(supervisor)), asyncio.create_task(self._watch(supervisor))]

    @contextlib.asynccontextmanager
    async def _admin(self) -> AsyncIterator[Admin]:
        """The server's counters, on connections of their own (the summary runs in an event loop of its own)."""
        streams = Streams(Settings(redis_url=self.url))
        try:
            yield Admin(streams)
        finally:
            await streams.aclose()

    async def _lengths(self) -> dict[str, int]:
        async with self._admin() as admin:
            return {stream: await admin.length(stream) for stream in STREAMS}

    async def _publish(self, supervisor: Supervisor) -> None:
        """Publish the jobs round-robin over the three job streams, like the app would, at the chosen rate."""
        await supervisor.all_ready.wait()  # time the fleet's work, not its start-up
        self.started = time.perf_counter()
        async with Publisher(self.url) as publisher:
            await asyncio.gather(*(
                publisher.publish_stream(stream, self._payloads(offset), on_progress=self._confirmed(stream))
                for offset, stream in enumerate(STREAMS)))

    async def _payloads(self, offset: int) -> AsyncIterator[dict[str, Any]]:
        """The sample jobs; a share `fail_rate` of them fail for good (an upstream error retried with backoff until
        dead-lettered, a poison message, a malformed payload), another as many are rate limited once (retried after
        the API's Retry-After, then handled)."""
        rng = random.Random(offset)
        stream = STREAMS[offset]
        for index in range(offset, self.jobs, len(STREAMS)):
            payload = demo.sample_payload(stream, index)
            draw = rng.random()
            if draw < self.fail_rate:
                kind = ("error", "poison", "malformed")[index % 3]
                if kind == "malformed":
                    payload = demo.malformed_payload(stream, index)
                else:
                    payload["simulate"] = kind
                self.failing += 1
            elif draw < 2 * self.fail_rate:
                payload["simulate"] = "rate_limited"
                self.rate_limited += 1
            self.handed += 1
            yield payload
            if self.rate and index % CHUNK < len(STREAMS):
                await _pace(self.started, index, self.rate)

    def _confirmed(self, stream: str) -> Callable[[int], None]:
        def count(confirmed: int) -> None:
            self.confirmed_by[stream] = confirmed

        return count

    def tally(self, supervisor: Supervisor, published: int | None = None) -> Tally:
        totals = supervisor.totals()
        end = self.first_pass or time.perf_counter()
        return Tally(self.handed if published is None else published, _count(totals, "acked"),
                     _count(totals, "dead"), _count(totals, "retried"), end - self.started if self.started else 0.0)

    @staticmethod
    def line(tally: Tally) -> str:
        return (f"published {tally.published:>9,}  acked {tally.acked:>9,}  dead {tally.dead:>5,}  "
                f"{tally.rate:>9,.0f} msgs/s")

    async def _watch(self, supervisor: Supervisor) -> None:
        try:
            await self._watch_until_settled(supervisor)
        except BrokenPipeError:  # whoever read our output (`| head`) went away: stop, and end quietly
            self.reader_gone = True
            supervisor.stop()

    async def _watch_until_settled(self, supervisor: Supervisor) -> None:
        deadline = time.monotonic() + self.timeout_s
        told = False
        while True:
            await asyncio.sleep(TICK_S)
            tally = self.tally(supervisor)
            if not self.first_pass and self.handed == self.jobs and \
                    tally.acked >= self.jobs - self.failing - self.rate_limited:
                self.first_pass = time.perf_counter()
                tally = self.tally(supervisor)
            if supervisor.signals.received is not None and not told:
                told = True
                print(f"{CLEAR_LINE}interrupted: the fleet finishes what it has in hand (once more, a second later, "
                      "to leave at once)", flush=True)
            self.display.draw(self.line(tally))
            if sum(self.confirmed_by.values()) == self.jobs and tally.acked + tally.dead >= self.jobs:
                self.finished = time.perf_counter()
                break
            if time.monotonic() > deadline or any(t.done() and t.exception() for t in self._tasks):
                failed = next((t.exception() for t in self._tasks if t.done() and t.exception()), None)
                self.error = str(failed) if failed else f"not all jobs were settled within {self.timeout_s:g} s"
                break
        self.display.finish(self.line(tally))
        supervisor.stop()

    async def summary(self, supervisor: Supervisor, interrupted: bool) -> None:
        after = await self._lengths()
        published = sum(after.values()) - sum(self.lengths_before.get(stream, 0) for stream in STREAMS)
        tally = self.tally(supervisor, published if interrupted else self.jobs)
        if interrupted:
            self.display.finish(self.line(tally))
            self._interrupted(tally, supervisor)
        else:
            print(f"{tally.acked:,} jobs handled in {tally.seconds:.2f} s: {tally.rate:,.0f} msgs/s with "
                  f"{plural(len(supervisor.slots), 'worker process', 'worker processes')}, publishing at the "
                  "same time")
            print(f"{tally.dead:,} failing jobs dead-lettered, {plural(tally.retried, 'retry', 'retries')}, "
                  f"all settled after {self.finished - self.started:.2f} s")
            await self._failures(supervisor)
        await self._table(supervisor)

    async def _failures(self, supervisor: Supervisor) -> None:
        """What the handler contract did with the failing jobs: backoff, Retry-After, validation."""
        totals = supervisor.totals()
        classes = await self._dead_classes()
        waited = _count(totals, "retry_wait_ms") / 1000
        retried = _count(totals, "retried")
        print(f"{plural(retried, 'retry', 'retries')} with backoff waited {waited:.2f} s in all"
              f"{f' ({waited / retried:.2f} s each on average)' if retried else ''}; dead letters by class: "
              + (", ".join(f"{name} {count:,}" for name, count in sorted(classes.items())) or "none"))
        print(f"{plural(classes.get('PayloadInvalid', 0), 'malformed job')} dead-lettered for validation at the "
              f"first delivery (see `fastworker dlq list {demo.DATA_JOBS} --error-class PayloadInvalid`)")

    async def _dead_classes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with self._admin() as admin:
            for stream in STREAMS:
                for _, fields in await admin.entries(stream + self.dead_letter_suffix):
                    name = fields.get(b"fw:error_class", b"?").decode()
                    counts[name] = counts.get(name, 0) + 1
        return counts

    def _interrupted(self, tally: Tally, supervisor: Supervisor) -> None:
        if not self.started:
            print("interrupted before the fleet was ready: nothing was published")
            return
        elapsed = time.perf_counter() - self.started
        print(f"interrupted after {elapsed:.2f} s: {tally.published:,} of {self.jobs:,} jobs published, "
              f"{tally.acked:,} acked ({tally.rate:,.0f} msgs/s over {tally.seconds:.2f} s), "
              f"{tally.dead:,} dead-lettered, {plural(tally.retried, 'retry', 'retries')}")
        left = max(tally.published - tally.acked - tally.dead, 0)
        where = ("the embedded server goes away with the demo" if self.embedded else
                 f"`fastworker run fastworker.demo:app --redis-url {supervisor.settings.redacted_url()}` handles them")
        print(f"{plural(left, 'published job')} not settled (pending or not yet read): {where}" if left else
              "every published job was settled")

    async def _table(self, supervisor: Supervisor) -> None:
        totals = supervisor.totals()
        async with self._admin() as admin:
            rows = [await _stream_row(admin, stream, demo.GROUPS[stream], totals, self.dead_letter_suffix)
                    for stream in STREAMS]
            rows += [(stream, await admin.length(stream), "-", "-", "-", "results")
                     for stream in (demo.ANALYSIS_RESULTS, demo.FEATURES_COMPUTED)]
        header = ("stream", "length", "pending", "dead letters", "acked", "")
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _count(totals: dict[tuple[str, str, str], int], outcome: str) -> int:
    return sum(value for (_, _, name), value in totals.items() if name == outcome)


async def _pace(started: float, sent: int, rate: float) -> None:
    ahead = sent / rate - (time.perf_counter() - started)
    if ahead > 0:
        await asyncio.sleep(ahead)


async def _stream_row(admin: Admin, stream: str, group: str, totals: dict[tuple[str, str, str], int],
                      dead_letter_suffix: str) -> tuple[Any, ...]:
    summary = await admin.pending_summary(stream, group)  # None: interrupted before the group was made
    dead = await admin.length(stream + dead_letter_suffix)
    pending = "-" if summary is None else summary.count
    return stream, await admin.length(stream), pending, dead, totals.get((stream, group, "acked"), 0), group
