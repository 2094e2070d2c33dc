"""The fleet's eyes and hands, in the supervisor process: HTTP endpoints, sampled gauges, housekeeping.

- `/healthz`: every worker process alive and its loop reporting (liveness).
- `/readyz`: the server reachable, every group of the app present, and no worker reporting a problem that waiting
  does not cure, such as a settle the server refuses (readiness). `/healthz` turns red on such a problem too.
- `/inspect`: what every worker process is doing, as JSON (`fastworker inspect`): its consumers, handlers, the
  handler calls in flight with their running time, and its recent failures, from the workers' last reports.
- `/metrics`: Prometheus text, counters and histograms added up over all worker processes (including the ones a
  restart replaced, so counters never go down), and gauges (stream length, pending, lag, oldest pending age,
  dead letters) sampled every sample_interval_s, never per message.
- A progress line in the log every PROGRESS_EVERY_S: the rate, acked, retried and dead since the last one, and the
  app's groups' lag and pending, so that a fleet says what it is doing without a dashboard.
- Housekeeping on timers: safe trimming (`trim_interval_s`) of the app's streams and of the output streams named
  in `output_streams` (by their retention limits), and removal of dead consumers, those with nothing pending that
  have been idle longer than `dead_consumer_idle_s`.

None of it is on the hot path: workers count per batch and report once a second over their pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fastworker.app import App
from fastworker.config import Settings
from fastworker.edge.streams import Streams
from fastworker.errors import FastworkerError
from fastworker.ops.consumers import remove_dead_consumers
from fastworker.ops.inspect import Snapshot, check_health, groups_info, snapshot
from fastworker.ops.trim import TrimRefused, housekeeping_plan, safe_trim
from fastworker.stats import BATCH_BUCKETS, DURATION_BUCKETS_S, OUTCOMES

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
PROGRESS_EVERY_S = 60.0
# Serves the whole connection of a request under a mounted path, given the request head already read.
Mount = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Fleet(Protocol):
    """What the monitor needs of the supervisor."""

    restarts_total: int

    def healthy(self) -> tuple[bool, str]: ...
    def problems(self) -> list[str]: ...
    def reports(self) -> list[dict[str, Any]]: ...
    def totals(self) -> dict[tuple[str, str, str], int]: ...
    def alive_count(self) -> int: ...
    def inspect(self) -> dict[str, Any]: ...


class Monitor:
    def __init__(self, fleet: Fleet, app: App, settings: Settings) -> None:
        self.fleet = fleet
        self.app = app
        self.settings = settings
        self.sample: Snapshot | None = None
        self.ready_reason: str | None = "not sampled yet"
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_FleetCollector(self))
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: Streams | None = None
        self._progress_from: tuple[float, dict[str, int]] = (time.monotonic(), {})
        self.mounts: dict[str, Mount] = {}  # path prefix -> what serves it (the dashboard mounts itself here)

    async def start(self) -> None:
        self._streams = Streams(self.settings)
        if self.settings.http_port:
            self._tasks.append(asyncio.create_task(self._every(self.settings.sample_interval_s, self._sample)))
        if self.settings.trim_interval_s:
            self._tasks.append(asyncio.create_task(self._every(self.settings.trim_interval_s, self._trim)))
        if self.settings.dead_consumer_idle_s:
            self._tasks.append(asyncio.create_task(self._every(300, self._prune_consumers)))
        self._progress_from = (time.monotonic(), self._outcomes())
        self._tasks.append(asyncio.create_task(self._every(PROGRESS_EVERY_S, self._progress, first_after=True)))
        if self.settings.http_port:
            self._server = await asyncio.start_server(self._serve, self.settings.http_host, self.settings.http_port)
            logger.info("serving /healthz /readyz /metrics /inspect on %s:%d", self.settings.http_host,
                        self.settings.http_port)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        if self._streams is not None:
            await self._streams.aclose()

    # -- timers ---------------------------------------------------------------------------------------------

    async def _every(self, interval_s: float, job: Any, first_after: bool = False) -> None:
        failing = False
        if first_after:
            await asyncio.sleep(interval_s)
        while True:
            try:
                await job()
            except FastworkerError as exc:  # e.g. the server is down: the workers ride it out, so do we
                if not failing:  # once per run of failures, not every interval
                    logger.warning("%s failed: %s; retrying every %g s", job.__name__.strip("_"), exc, interval_s)
                failing = True
            else:
                if failing:
                    logger.info("%s works again", job.__name__.strip("_"))
                failing = False
            await asyncio.sleep(interval_s)

    def _outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (_, _, outcome), value in self.fleet.totals().items():
            counts[outcome] = counts.get(outcome, 0) + value
        return counts

    async def _progress(self) -> None:
        """One INFO line: what the fleet did since the last one (summed over its workers' reports) and what waits."""
        now, counts = time.monotonic(), self._outcomes()
        since, before = self._progress_from
        self._progress_from = (now, counts)
        done = {outcome: counts.get(outcome, 0) - before.get(outcome, 0) for outcome in ("acked", "retried", "dead")}
        lag, pending = await self._backlog()
        logger.info("last %.0f s: rate_per_s=%.1f acked=%d retried=%d dead=%d lag=%s pending=%d", now - since,
                    (done["acked"] + done["dead"]) / max(now - since, 1e-9), done["acked"], done["retried"],
                    done["dead"], "unknown" if lag is None else lag, pending)

    async def _backlog(self) -> tuple[int | None, int]:
        """(entries not yet delivered to the app's groups, or None when the server cannot tell; entries pending)."""
        assert self._streams is not None
        lag: int | None = 0
        pending = 0
        wanted = {(handler.stream, handler.group) for handler in self.app.handlers}
        for stream in self.app.streams():
            for group in await groups_info(self._streams, stream) or []:
                if (stream, group.name) not in wanted:
                    continue
                pending += group.pending
                lag = None if lag is None or group.lag is None else lag + group.lag
        return lag, pending

    async def _sample(self) -> None:
        assert self._streams is not None
        pairs = [(handler.stream, handler.group) for handler in self.app.handlers]
        try:
            health = await check_health(self._streams, pairs)
        except FastworkerError as exc:
            self.ready_reason = str(exc)
            raise
        self.ready_reason = health.reason
        self.sample = await snapshot(self._streams, self.app.streams(),
                                     dead_letter_suffix=self.settings.dead_letter_suffix)

    async def _trim(self) -> None:
        assert self._streams is not None
        for stream, policy in housekeeping_plan(self.app.streams(), self.settings).items():
            try:
                result = await safe_trim(self._streams, stream, retain_ms=policy.retain_ms, max_len=policy.max_len,
                                         max_age_ms=policy.max_age_ms, force=policy.force)
            except TrimRefused as exc:  # e.g. the stream does not exist yet
                logger.debug("trim skipped stream=%s: %s", stream, exc)
                continue
            if result.removed:
                logger.info("trimmed stream=%s removed=%d length=%d limited_by=%s", stream, result.removed,
                            result.length_after, result.limited_by)

    async def _prune_consumers(self) -> None:
        assert self._streams is not None
        idle_ms = int(self.settings.dead_consumer_idle_s * 1000)
        for handler in self.app.handlers:
            removed = await remove_dead_consumers(self._streams, handler.stream, handler.group, idle_ms)
            if removed:
                logger.info("removed dead consumers stream=%s group=%s consumers=%s", handler.stream,
                            handler.group, ",".join(removed))

    # -- HTTP -----------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mount: Mount | None = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path = _request_line(head)
            mount = self._mount(path)
            if mount is None:
                status, content_type, body = self.respond(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except ConnectionError:
            return
        if mount is not None:
            await mount(head, reader, writer)  # it answers and closes the connection
            return
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (status, _REASONS[status], content_type.encode(), len(body)) + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _mount(self, path: str) -> Mount | None:
        route = path.split("?", 1)[0]
        return next((mount for prefix, mount in self.mounts.items()
                     if route == prefix or route.startswith(prefix + "/")), None)

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        route = path.split("?", 1)[0]
        if route == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry)
        if route == "/healthz":
            ok, reason = self.fleet.healthy()
            return (200 if ok else 503), "text/plain", f"{reason}\n".encode()
        if route == "/inspect":
            return 200, "application/json", orjson.dumps(self.fleet.inspect())
        if route == "/readyz":
            problems = self.fleet.problems()
            not_ready = self.ready_reason or (problems[0] if problems else None)
            return (503, "text/plain", f"{not_ready}\n".encode()) if not_ready else (200, "text/plain", b"ok\n")
        return 404, "text/plain", b"not found: try /healthz, /readyz, /metrics or /inspect\n"


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            503: b"Service Unavailable"}


def _request_line(head: bytes) -> tuple[str, str]:
    method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    return method, path


class _FleetCollector:
    """Builds the metric families at scrape time from the workers' reports and the last sample."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        fleet = self.monitor.fleet
        messages = CounterMetricFamily("fastworker_messages", "Entries by outcome, over all worker processes",
                                       labels=["stream", "group", "outcome"])
        for (stream, group, outcome), value in sorted(fleet.totals().items()):
            if outcome in OUTCOMES:
                messages.add_metric([stream, group, outcome], value)
        yield messages
        yield from _histograms(fleet.reports())
        restarts = CounterMetricFamily("fastworker_worker_restarts", "Worker processes restarted after dying")
        restarts.add_metric([], fleet.restarts_total)
        yield restarts
        alive = GaugeMetricFamily("fastworker_workers_alive", "Worker processes running")
        alive.add_metric([], fleet.alive_count())
        yield alive
        if self.monitor.sample is not None:
            yield from _gauges(self.monitor.sample)


def _merged(reports: list[dict[str, Any]], key: str, width: int) -> dict[tuple[str, ...], list[float]]:
    """Histogram snapshots added up per label tuple: bucket counts, then sum, then count."""
    merged: dict[tuple[str, ...], list[float]] = {}
    for report in reports:
        for *labels, snap in report.get(key, ()):
            into = merged.setdefault(tuple(labels), [0.0] * (width + 3))
            for index, count in enumerate(snap["buckets"]):
                into[index] += count
            into[-2] += snap["sum"]
            into[-1] += snap["count"]
    return merged


def _cumulative(bounds: tuple[float, ...], values: list[float]) -> list[tuple[str, float]]:
    total, buckets = 0.0, []
    for bound, count in zip((*map(str, bounds), "+Inf"), values[:-2], strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def _histograms(reports: list[dict[str, Any]]) -> Iterator[Metric]:
    durations = HistogramMetricFamily("fastworker_handler_duration_seconds",
                                      "Handler time per message (the mean of each batch, observed per message)",
                                      labels=["stream", "group"])
    for labels, values in sorted(_merged(reports, "durations", len(DURATION_BUCKETS_S)).items()):
        durations.add_metric(list(labels), _cumulative(DURATION_BUCKETS_S, values), values[-2])
    yield durations
    sizes = HistogramMetricFamily("fastworker_batch_size", "Entries per batch read", labels=["group"])
    for labels, values in sorted(_merged(reports, "batch_sizes", len(BATCH_BUCKETS)).items()):
        sizes.add_metric(list(labels), _cumulative(tuple(map(float, BATCH_BUCKETS)), values), values[-2])
    yield sizes


def _gauges(sample: Snapshot) -> Iterator[Metric]:
    length = GaugeMetricFamily("fastworker_stream_length", "Entries in the stream (sampled)", labels=["stream"])
    dead = GaugeMetricFamily("fastworker_dead_letters", "Entries in the stream's dead-letter stream (sampled)",
                             labels=["stream"])
    pending = GaugeMetricFamily("fastworker_group_pending", "Entries delivered and not yet acknowledged",
                                labels=["stream", "group"])
    lag = GaugeMetricFamily("fastworker_group_lag", "Entries not yet delivered to the group (absent when the "
                            "server cannot tell)", labels=["stream", "group"])
    oldest = GaugeMetricFamily("fastworker_oldest_pending_age_seconds", "Age of the oldest pending entry",
                               labels=["stream", "group"])
    for stream in sample.streams:
        length.add_metric([stream.name], stream.length)
        if stream.dead_letters is not None:
            dead.add_metric([stream.name], stream.dead_letters)
        for group in stream.groups:
            pending.add_metric([stream.name, group.name], group.pending)
            if group.lag is not None:
                lag.add_metric([stream.name, group.name], group.lag)
            oldest.add_metric([stream.name, group.name], (group.oldest_pending_age_ms or 0) / 1000)
    yield from (length, dead, pending, lag, oldest)
