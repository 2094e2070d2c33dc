"""One worker process: every consumer loop of its consumer names, one reclaimer, signals and the drain.

Start-up fails fast and cleanly (unreachable server, wrong password) so the caller can print one line and exit
with a distinct code. Once running, nothing but a stop ends it: Redis errors are ridden out by the loops. On stop,
reading ends, in-flight handlers finish and their batches are settled, within shutdown_grace_s; past that the
remaining work is abandoned, which loses nothing (it is still pending).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
from collections.abc import Callable

import uvloop

from fastworker.app import App, Hook
from fastworker.config import Settings
from fastworker.consumer import Consumer, Outage
from fastworker.dispatch import Dispatcher
from fastworker.errors import ExitCode, RedisAuthError, RedisUnavailable
from fastworker.permissions import check_permissions
from fastworker.reclaimer import Reclaimer
from fastworker.stats import Stats
from fastworker.streams import Streams

logger = logging.getLogger(__name__)


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
        self._stop = asyncio.Event()

    async def run(self, wait_for_server: bool = False) -> None:
        """Connect, create missing groups, run until `stop()`, then drain.

        Start-up errors propagate unless `wait_for_server`, in which case start-up is retried with backoff until
        it succeeds or the worker is stopped (a restarted worker process rides out an outage like a running one).
        """
        streams = Streams(self.settings)
        dispatcher = Dispatcher(self.settings.concurrency, self.settings.handler_timeout_s,
                                self.settings.max_deliveries, self.settings.dead_letter_suffix, streams,
                                self.settings.backoff())
        outage = Outage("worker start-up")
        try:
            while True:
                try:
                    await self._start(streams, dispatcher)
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
        await check_permissions(streams.redis, self.app, self.settings, monitor=False)
        groups = self.app.groups()
        pairs = [(stream, group) for group, handlers in groups.items() for stream in handlers]
        created = await streams.ensure_groups(pairs, self.settings.group_start_id)
        for stream, group in created:
            logger.info("created group %s on stream %s at id %s", group, stream, self.settings.group_start_id)
        await _run_hooks(self.app.startup_hooks)
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


async def _run_hooks(hooks: list[Hook]) -> None:
    for hook in hooks:
        result = hook()
        if inspect.isawaitable(result):
            await result


def _summary(stats: Stats) -> str:
    return " ".join(f"{name}={stats.total(name)}" for name in ("received", "acked", "retried", "dead", "claimed"))


def install_signal_handlers(stop: Callable[[], None], hard_stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: leave at once (the PEL keeps everything recoverable)."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info("received %s: draining (send it again to leave at once)", signal.Signals(signum).name)
            stop()
        else:
            logger.warning("received %s again: leaving at once", signal.Signals(signum).name)
            hard_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


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


async def serve(worker: Worker, wait_for_server: bool = False) -> int:
    """Run `worker` in the current task until a signal stops it; returns the exit code: 0 after a clean drain,
    INTERRUPTED when a second signal cut the drain short. The worker owns the process: its GC is tuned."""
    tune_gc(worker.settings.gc_threshold)
    task = asyncio.current_task()
    interrupted = False

    def hard_stop() -> None:
        nonlocal interrupted
        interrupted = True
        if task is not None:
            task.cancel()

    install_signal_handlers(worker.stop, hard_stop)
    try:
        await worker.run(wait_for_server)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return ExitCode.INTERRUPTED
    return ExitCode.FAILURE if worker.failed else ExitCode.OK


def run(app: App, settings: Settings | None = None, names: list[str] | None = None) -> int:
    """Run `app` in this process on uvloop until SIGTERM or SIGINT; returns the exit code (0 after a clean
    drain). Start-up errors (server unreachable, wrong password) propagate as FastworkerError."""
    resolved = settings or Settings()

    async def main() -> int:
        return await serve(Worker(app, resolved, names))

    return uvloop.run(main())
