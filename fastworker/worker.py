"""One worker process: every consumer loop of its consumer names, one reclaimer, signals and the drain.

Start-up fails fast and cleanly (unreachable server, wrong password, an `on_startup` hook that raised) so the caller
can print one line and exit with a distinct code. Once running, nothing but a stop ends it: Redis errors are ridden
out by the loops. On stop, reading ends, in-flight handlers finish and their batches are settled, within
shutdown_grace_s; past that the remaining work is abandoned, which loses nothing (it is still pending). Signals
follow the rule of `fastworker.signals`.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import traceback
from typing import Any

import uvloop

from fastworker import logs, recent
from fastworker.app import App, Hook
from fastworker.config import Settings
from fastworker.consumer import Consumer, Outage
from fastworker.dispatch import Dispatcher
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode, FastworkerError, RedisAuthError, RedisUnavailable
from fastworker.permissions import check_permissions
from fastworker.reclaimer import Reclaimer
from fastworker.signals import StopSignals
from fastworker.stats import Stats
from fastworker.tracing import tracer_for

logger = logging.getLogger(__name__)


class StartupFailed(FastworkerError):
    """An `on_startup` hook raised: the worker cannot start. `details` is the hook's traceback, for the log."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class Worker:
    """Runs an app's handlers as the given consumer names in the current process's event loop."""

    def __init__(self, app: App, settings: Settings, names: list[str] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.names = names or settings.consumer_names()
        self.stats = Stats()
        self.consumers: list[Consumer] = []
        self.reclaimer: Reclaimer | None = None
        self.ready = asyncio.Event()
        self.failed = False  # a loop died of a bug: the process must exit non-zero so that it is restarted
        self.dispatcher: Dispatcher | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, wait_for_server: bool = False) -> None:
        """Connect, create missing groups, run until `stop()`, then drain.

        Start-up errors propagate unless `wait_for_server`, in which case start-up is retried with backoff until
        it succeeds or the worker is stopped (a restarted worker process rides out an outage like a running one).
        """
        if self._stop.is_set():  # stopped before it started: nothing to start, nothing to drain
            return
        streams = Streams(self.settings)
        dispatcher = self.dispatcher = Dispatcher(
            self.settings.concurrency, self.settings.handler_timeout_s, self.settings.max_deliveries,
            self.settings.dead_letter_suffix, streams, self.settings.backoff())
        outage = Outage("worker start-up")
        try:
            while True:
                try:
                    await self._start(streams, dispatcher)
                    outage.recovered()
                    break
                except (RedisUnavailable, RedisAuthError) as exc:
                    if not wait_for_server:
                        raise
                    await outage.failed(exc, self._stop)
                    if self._stop.is_set():
                        return
            await self._stop.wait()
            await self._drain()
            await _run_hooks(self.app.shutdown_hooks)
        finally:
            dispatcher.close()
            await streams.aclose()

    async def _start(self, streams: Streams, dispatcher: Dispatcher) -> None:
        await streams.ping()
        await check_permissions(streams, self.app, self.settings, monitor=False)
        groups = self.app.groups()
        pairs = [(stream, group) for group, handlers in groups.items() for stream in handlers]
        created = await streams.ensure_groups(pairs, self.settings.group_start_id)
        for stream, group in created:
            logger.info("created group %s on stream %s at id %s", group, stream, self.settings.group_start_id)
        dispatcher.deleting = await self._deleting(streams)
        await _run_startup_hooks(self.app.startup_hooks)
        dispatcher.tracer = tracer_for(self.settings.tracing)  # after the hooks: they may set up OpenTelemetry
        self.consumers = [Consumer(streams, dispatcher, self.settings, group, handlers, name, self.stats)
                          for group, handlers in groups.items() for name in self.names]
        self.reclaimer = Reclaimer(streams, dispatcher, self.settings, groups, f"{self.names[0]}.claim", self.stats)
        for consumer in self.consumers:
            consumer.on_retry = self.reclaimer.retry_parked
        loops: list[Consumer | Reclaimer] = [*self.consumers, self.reclaimer]
        self._tasks = [asyncio.create_task(loop.run(), name=f"fastworker:{type(loop).__name__}") for loop in loops]
        for task in self._tasks:
            task.add_done_callback(self._loop_ended)
        logger.info("worker ready consumers=%s groups=%s", ",".join(self.names), ",".join(groups))
        self.ready.set()

    async def _deleting(self, streams: Streams) -> dict[str, frozenset[str]]:
        """Per group, the streams whose acks delete the entry: their handlers have `delete_acked` and the server
        takes XACKDEL on them (tried once here, never assumed from a version). Where it does not, the worker says
        so once and acks as before (XACK: the entries stay, for the trim)."""
        wanted = sorted({handler.stream for handler in self.app.handlers if handler.delete_acked})
        able = set()
        for stream in wanted:
            refusal = await streams.xackdel_refusal(stream)
            if refusal is None:
                able.add(stream)
            else:
                logger.warning("delete_acked is off for stream=%s: the server refused XACKDEL (Redis 8.2+): %s; its "
                               "entries are acked with XACK and stay until trimmed (--trim-interval-s, or "
                               "`fastworker trim`)", stream, refusal)
        if able:
            logger.info("delete_acked on for streams=%s: an entry is deleted once every group acked it "
                        "(XACKDEL ... ACKED)", ",".join(sorted(able)))
        return {group: frozenset(stream for stream, handler in handlers.items()
                                 if handler.delete_acked and stream in able)
                for group, handlers in self.app.groups().items()}

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self._stop.is_set():
            # A loop only ends early on a bug: stop the worker rather than run with a silent hole in it.
            logger.error("%s failed; stopping the worker", task.get_name(), exc_info=task.exception())
            self.failed = True
            self.stop()

    def stop(self) -> None:
        """Begin a graceful stop: safe to call from a signal handler, more than once."""
        self._stop.set()

    async def _drain(self) -> None:
        loops: list[Consumer | Reclaimer] = [*self.consumers, *([self.reclaimer] if self.reclaimer else [])]
        await asyncio.gather(*(loop.stop() for loop in loops))
        done, pending = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("shutdown grace of %g s ran out: %d loops abandoned, their entries stay pending",
                           self.settings.shutdown_grace_s, len(pending))
            await asyncio.wait(pending, timeout=2)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.error("%s failed during drain", task.get_name(), exc_info=task.exception())
        logger.info("worker stopped %s", _summary(self.stats))

    def inspect(self) -> dict[str, Any]:
        """What this process is doing, for `fastworker inspect`: its consumers, handlers, the calls in flight and
        the recent failures. Cheap enough for every report (a few dicts; in-flight calls are at most concurrency)."""
        return {
            "pid": os.getpid(),
            "consumers": [*self.names, f"{self.names[0]}.claim"] if self.names else [],
            "handlers": [{"handler": h.name, "stream": h.stream, "group": h.group,
                          "kind": "batch" if h.batch else ("async" if h.is_async else "sync")}
                         for h in self.app.handlers],
            "in_flight": self.dispatcher.in_flight() if self.dispatcher is not None else [],
            "recent_failures": recent.failures.snapshot(),
        }


async def _run_hooks(hooks: list[Hook]) -> None:
    for hook in hooks:
        result = hook()
        if inspect.isawaitable(result):
            await result


async def _run_startup_hooks(hooks: list[Hook]) -> None:
    """Run the `on_startup` hooks; one that raises is a StartupFailed naming it, with its own frames only."""
    for hook in hooks:
        try:
            result = hook()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # user code
            name = getattr(hook, "__qualname__", repr(hook))
            frames = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # from the hook down
            details = "".join(traceback.format_exception(type(exc), exc, frames)).rstrip()
            raise StartupFailed(f"on_startup hook {name} raised {type(exc).__name__}: {exc}", details) from exc


def _summary(stats: Stats) -> str:
    return " ".join(f"{name}={stats.total(name)}" for name in ("received", "acked", "retried", "dead", "claimed"))


def tune_gc(threshold: int) -> None:
    """Collect young objects less often, and never rescan what start-up allocated.

    A batch keeps a few objects per entry alive until it is settled (messages, payloads), so with Python's default
    first threshold of 700 the collector runs several times per batch and walks all of them: about a quarter of a
    no-op worker's time, measured. The process owns its heap, so this is ours to tune.
    """
    if threshold:
        gc.collect()
        gc.freeze()
        _, second, third = gc.get_threshold()
        gc.set_threshold(threshold, second, third)


async def serve(worker: Worker, wait_for_server: bool = False, signals: StopSignals | None = None) -> int:
    """Run `worker` in the current task until a signal stops it; returns the exit code: 0 after a clean drain,
    INTERRUPTED when a later signal cut the drain short. The worker owns the process: its GC is tuned.

    `signals`: the process's stop signals, installed by the caller for the life of the command; without them the
    usual ones are installed here for the worker's run and put back after."""
    tune_gc(worker.settings.gc_threshold)
    task = asyncio.current_task()
    interrupted = False

    def leave() -> None:
        nonlocal interrupted
        interrupted = True
        if task is not None:
            task.cancel()

    stops = signals or StopSignals(doing="draining").install()
    stops.bind(worker.stop, leave)
    if stops.received is not None or stops.stop_requested:  # asked before there was a worker to stop
        worker.stop()
    try:
        await worker.run(wait_for_server)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return ExitCode.INTERRUPTED
    finally:
        if signals is None:
            stops.restore()
    return ExitCode.FAILURE if worker.failed else ExitCode.OK


def run(app: App, settings: Settings | None = None, names: list[str] | None = None) -> int:
    """Run `app` in this process on uvloop until SIGTERM or SIGINT; returns the exit code (0 after a clean
    drain). Start-up errors (server unreachable, wrong password, a failing on_startup hook) propagate as
    FastworkerError. Logs like the `fastworker` command (to stderr, at the settings' level and format) unless the
    program has configured logging itself."""
    resolved = settings or Settings()
    logs.configure_unless_configured(resolved.log_level, resolved.log_format)
    with StopSignals(doing="draining") as signals:
        return uvloop.run(serve(Worker(app, resolved, names), signals=signals))
