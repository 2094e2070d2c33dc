"""Dispatch: run a group's handlers over a decoded batch and turn what happened into a `Settlement`.

Handling a message yields an outcome and never raises: the only broad `except` in the package is the one here
around user code. Concurrency is bounded per process by a semaphore taken per lane (a lane works through the
batch's messages one after another), not per message, so a batch of 1000 costs `concurrency` tasks, not 1000.
Sync handlers run in a thread pool, one pool job per lane, so the event loop never waits on user code.

Lanes open as the handler shows what it is: a batch starts on one lane (handlers that do not wait finish it
without a task or a thread hop per message), and as soon as a call has been running for LANE_OPEN_S the other
lanes open, so a batch of 16 calls that each wait 1 s on I/O takes about 1 s, not 16. The handler timeout is per
call on every lane: a call past it is charged alone (HandlerTimeout) and its lane's other messages go on, on a new
thread for sync handlers, since a thread cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal

from fastworker import recent
from fastworker.app import Dedup, Handler
from fastworker.config import TIMEOUT_OVERSHOOT
from fastworker.edge.streams import Recorder, Streams
from fastworker.errors import FastworkerError, Reject, Retry
from fastworker.message import Message, decode_record, encode_record
from fastworker.policy import Action, Backoff, decide, retry_delay_s
from fastworker.settlement import Settlement
from fastworker.tracing import HandlerTracer

logger = logging.getLogger(__name__)

Outcome = BaseException | None
LANE_OPEN_S = 0.002  # a call running this long opens the batch's other lanes
MIN_SYNC_CHUNK = 64  # messages per thread-pool lane at the start: a hop to a thread costs tens of microseconds
KILLED_WORKER = "KilledWorker"  # the error class of an entry whose worker kept dying while handling it


class HandlerTimeout(Exception):
    """An async handler call ran longer than handler_timeout_s and was cancelled."""


class _Lane:
    """A run of handler calls in one task, as the timeout watchdog sees it."""

    __slots__ = ("calls", "expired", "handler", "message", "seen", "seen_by_inspect", "since", "started", "strikes",
                 "task")

    def __init__(self, task: asyncio.Task[Any] | None, handler: str = "") -> None:
        self.task = task
        self.handler = handler
        self.message: Message | None = None  # the call in flight, for `Dispatcher.in_flight()`
        self.since = 0.0  # when in_flight() first saw this lane's calls counter at its current value (monotonic)
        self.seen_by_inspect = 0
        self.calls = 0  # moves at every call: cheaper than a timer per call
        self.seen = 0
        self.strikes = 0
        self.expired = False
        self.started = True  # False while a sync lane's job waits for a free thread: it cannot be late then

    def cancelled_by_others(self) -> bool:
        """Someone besides the watchdog asked to cancel this lane's task too."""
        return self.task is not None and self.task.cancelling() > 1

    def clear_expiry(self, timeout_s: float) -> HandlerTimeout:
        self.expired = False
        self.strikes = 0
        if self.task is not None:
            self.task.uncancel()
        return HandlerTimeout(f"handler ran longer than {timeout_s:g} s")


class Dispatcher:
    """Runs handlers with bounded concurrency; one per worker process, shared by its consumers."""

    def __init__(self, concurrency: int, handler_timeout_s: float, max_deliveries: int,
                 dead_letter_suffix: str, streams: Streams | None = None, backoff: Backoff | None = None) -> None:
        self.streams = streams  # for idempotency records (handlers with `dedup`)
        self.concurrency = concurrency
        self.handler_timeout_s = handler_timeout_s
        self.max_deliveries = max_deliveries
        self.backoff = backoff or Backoff()  # for handlers that declare none
        self._failures = FailureLog()
        self.isolation = Isolation()
        self.tracer: HandlerTracer | None = None  # set by the worker when tracing is on
        self.deleting: dict[str, frozenset[str]] = {}  # group -> streams acked with XACKDEL (set by the worker)
        self.recovery = Recovery()
        self.dead_letter_suffix = dead_letter_suffix
        self._slots = asyncio.Semaphore(concurrency)
        self._threads = HandlerThreads()
        self._recorder: Recorder | None = None  # idempotency records, for handlers with dedup
        self._lanes: set[_Lane] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    async def dispatch(self, group: str, handlers: Mapping[str, Handler],
                       batch: Mapping[str, list[Message]], isolation: Isolated = "shared") -> Settlement:
        """Handle every message of `batch` (per stream) and decide each one's fate.

        `isolation`: "alone" for a crash suspect (an entry whose worker died while handling it): it runs with nothing
        else of this process in flight, so that if it kills the process again, it is the only one charged; "held"
        when the caller holds `self.isolation.alone()` already; "shared" for everything else."""
        settlement = Settlement(group, self.deleting.get(group, frozenset()))
        runs = [self._stream(handlers[stream], messages, settlement) for stream, messages in batch.items()]
        entered = {"alone": self.isolation.alone, "shared": self.isolation.shared}.get(isolation, _held)
        async with entered():
            if len(runs) == 1:
                await runs[0]
            else:
                await asyncio.gather(*runs)
        return settlement

    def _runnable(self, handler: Handler, messages: list[Message], dead_stream: str,
                  settlement: Settlement) -> list[Message]:
        """The messages a handler may see; the undecodable, the unfit and the exhausted are dead-lettered instead."""
        limit = handler.max_deliveries or self.max_deliveries
        # policy.exhausted(), inlined: a call per message costs more than the rest of this line
        unfit = [m for m in messages if m.error is not None or m.deliveries > limit]
        if not unfit:
            return messages
        for message in unfit:
            if message.error is None:
                kind, why = KILLED_WORKER, (
                    f"delivered {message.deliveries} times and never settled: the worker handling it died (or lost "
                    "the server) every time; it was handled alone after the first, so it is the one to blame")
            else:
                kind = "EntryDeleted" if not message.raw_fields else message.error_class
                why = message.error
            settlement.dead_letter(message, dead_stream, kind, why)
            self._failures.seen(handler.name, message, kind, why, None, logging.WARNING)
        dead = set(map(id, unfit))
        return [m for m in messages if id(m) not in dead]

    async def _stream(self, handler: Handler, messages: list[Message], settlement: Settlement) -> None:
        dead_stream = handler.stream + self.dead_letter_suffix
        runnable = self._runnable(handler, messages, dead_stream, settlement)
        func = handler.func
        records: list[tuple[Message, asyncio.Future[None]]] = []
        if handler.dedup is not None and runnable:
            runnable = await self._skip_done(handler, handler.dedup, runnable, settlement)
            func = self._recording(handler.func, handler.dedup, settlement.group, handler.is_async, records)
        if not runnable:
            return
        if self.tracer is not None:
            func = self.tracer.wrap(func, handler.stream, settlement.group, handler.is_async, handler.batch)
        started = time.perf_counter()
        outcomes = await self._run(handler, func, runnable)
        await self._confirm_records(records, runnable, outcomes)
        settlement.timings[handler.stream] = (time.perf_counter() - started, len(runnable))
        if not any(outcomes):  # the common case: everything succeeded
            settlement.ack_all(handler.stream, runnable)
            return
        self._settle_failures(handler, runnable, outcomes, dead_stream, settlement)

    def _settle_failures(self, handler: Handler, runnable: list[Message], outcomes: list[Outcome],
                         dead_stream: str, settlement: Settlement) -> None:
        """Acknowledge the successes; dead-letter or park for a retry (with its backoff delay) each failure."""
        limit = handler.max_deliveries or self.max_deliveries
        backoff = handler.retry or self.backoff
        for message, outcome in zip(runnable, outcomes, strict=True):
            if outcome is None:
                settlement.ack(message)
                continue
            action = decide(outcome, message.deliveries, limit, handler.dead_on)
            reason = outcome.reason if isinstance(outcome, Reject | Retry) else str(outcome)
            kind = type(outcome).__name__
            if isinstance(outcome, Retry) and outcome.__cause__ is not None:  # `raise Retry(...) from exc`: file it
                cause = outcome.__cause__  # under the real error, so `dlq list --error-class` finds it
                kind, reason = type(cause).__name__, f"{reason}: {cause}"
            trace = self.tracer.failed_call_fields(message) if self.tracer is not None else ()
            if action is Action.DEAD:
                settlement.dead_letter(message, dead_stream, kind, reason, _traceback(outcome), trace)
            else:
                settlement.retry(message, retry_delay_s(outcome, message.deliveries, backoff))
            expected = isinstance(outcome, Retry | Reject)
            self._failures.seen(handler.name, message, kind, reason, None if expected else outcome,
                                logging.INFO if expected else logging.WARNING, action)

    async def _run(self, handler: Handler, func: Callable[..., Any], messages: list[Message]) -> list[Outcome]:
        if handler.batch:
            return await self._run_batch(handler, func, messages)
        outcomes: list[Outcome] = [None] * len(messages)
        if handler.is_async:
            await self._run_async(func, messages, outcomes, handler.name)
        else:
            await self._run_sync(func, messages, outcomes, handler.name)
        return outcomes

    async def _run_async(self, func: Callable[[Message], Awaitable[Any]], messages: list[Message],
                         outcomes: list[Outcome], name: str) -> None:
        """The first lane runs in the caller's task: handlers that do not really wait finish the whole batch there
        without a task being made. The loop only gets to the timer when a call waits, so a call still waiting after
        LANE_OPEN_S opens the other lanes, which take the next messages while it waits."""
        pending = iter(enumerate(messages))
        lanes: list[asyncio.Future[None]] = []

        def open_lanes() -> None:
            for _ in range(min(self.concurrency, len(messages)) - 1):
                lanes.append(asyncio.ensure_future(self._async_lane(func, pending, outcomes, name)))

        opener = asyncio.get_running_loop().call_later(LANE_OPEN_S, open_lanes)
        try:
            await self._async_lane(func, pending, outcomes, name)
            opener.cancel()
            if lanes:
                await asyncio.gather(*lanes)
        finally:
            opener.cancel()
            for lane in lanes:
                lane.cancel()  # only those still running, when the dispatch itself was cancelled

    async def _run_sync(self, func: Callable[[Message], Any], messages: list[Message],
                        outcomes: list[Outcome], name: str) -> None:
        """Sync lanes are pool jobs taking messages from one queue: one lane per MIN_SYNC_CHUNK messages to start
        with, all of them once a call has been running for LANE_OPEN_S (the handler waits on something)."""
        queue: deque[tuple[int, Message]] = deque(enumerate(messages))
        jobs: list[_SyncJob] = []
        lanes: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()

        def add_lanes(count: int) -> None:
            for _ in range(count):
                lanes.append(asyncio.ensure_future(self._sync_lane(func, queue, outcomes, jobs, name)))

        opener: asyncio.TimerHandle | None = None

        def check(delay_s: float) -> None:
            nonlocal opener
            if not queue or len(lanes) >= self.concurrency:
                return
            if any(job.running_for() >= LANE_OPEN_S for job in jobs):
                add_lanes(min(self.concurrency - len(lanes), len(queue)))
                return
            delay_s = min(delay_s * 2, 0.1)  # quick calls so far: look again, less often
            opener = loop.call_later(delay_s, check, delay_s)

        add_lanes(min(self.concurrency, -(-len(messages) // MIN_SYNC_CHUNK)))
        opener = loop.call_later(LANE_OPEN_S, check, LANE_OPEN_S)
        try:
            while lanes and not all(lane.done() for lane in lanes):  # lanes may be added while we wait
                await asyncio.gather(*lanes)
        finally:
            if opener is not None:
                opener.cancel()
            for lane in lanes:
                lane.cancel()

    async def _skip_done(self, handler: Handler, dedup: Dedup, messages: list[Message],
                         settlement: Settlement) -> list[Message]:
        """Acknowledge the messages whose work is recorded as done (republishing the results recorded with it);
        return the others. If the records cannot be read, nothing is run: all stay pending for a retry."""
        assert self.streams is not None, "a Dispatcher for handlers with dedup needs streams"
        try:
            keys = [dedup.key(settlement.group, m) for m in messages]
            records = await self.streams.done_marks(keys)
        except FastworkerError as exc:
            logger.warning("idempotency records unreadable stream=%s (%s); %d entries left pending",
                           handler.stream, exc, len(messages))
            for message in messages:
                settlement.retry(message, self.backoff.delay_s(message.deliveries))
            return []
        fresh, seen = [], set()
        for message, key, record in zip(messages, keys, records, strict=True):
            if record is None and key not in seen:
                seen.add(key)
                fresh.append(message)
            elif record is None:  # a twin in this very batch: it comes back as a retry, and is skipped then
                settlement.retry(message, self.backoff.delay_s(message.deliveries))
            else:
                try:
                    worker_id, outputs = decode_record(record)
                except (ValueError, KeyError, TypeError):  # not a record of ours: the key says done, trust it
                    worker_id, outputs = "", []
                # The same entry again (its settlement was lost): publish what its handler emitted. Another entry
                # with the same key (a producer's duplicate): that entry's own settlement publishes the results.
                message.outputs = outputs if worker_id == message.id and outputs else None
                settlement.ack(message)
                settlement.deduplicated_by_stream[message.stream] = \
                    settlement.deduplicated_by_stream.get(message.stream, 0) + 1
        return fresh

    def _recording(self, func: Callable[..., Any], dedup: Dedup, group: str, is_async: bool,
                   records: list[tuple[Message, asyncio.Future[None]]]) -> Callable[..., Any]:
        """`func`, followed at once by the idempotency record of the work it did (its write confirmed later, per
        batch: see `_confirm_records`)."""
        if self._recorder is None:
            assert self.streams is not None, "a Dispatcher for handlers with dedup needs streams"
            self._recorder = self.streams.recorder()
        recorder = self._recorder

        def record(message: Message) -> None:
            key = dedup.key(group, message)
            records.append((message, recorder.record(key, encode_record(message), dedup.ttl_s)))

        if is_async:
            async def call_async(message: Message) -> None:
                await func(message)
                record(message)

            return call_async
        loop = asyncio.get_running_loop()

        def call_sync(message: Message) -> None:  # in a pool thread: the loop queues the record, in order
            func(message)
            loop.call_soon_threadsafe(record, message)

        return call_sync

    @staticmethod
    async def _confirm_records(records: list[tuple[Message, asyncio.Future[None]]], runnable: list[Message],
                               outcomes: list[Outcome]) -> None:
        """Wait for the batch's idempotency records; an entry whose record failed is not acked (retried later)."""
        if not records:
            return
        results = await asyncio.gather(*(done for _, done in records), return_exceptions=True)
        failed = {id(message): result for (message, _), result in zip(records, results, strict=True)
                  if isinstance(result, BaseException)}
        if failed:
            for position, message in enumerate(runnable):
                if id(message) in failed and outcomes[position] is None:
                    outcomes[position] = failed[id(message)]

    async def _async_lane(self, func: Callable[[Message], Awaitable[Any]], pending: Any,
                          outcomes: list[Outcome], name: str) -> None:
        """Call `func` on messages from the shared iterator, one after another."""
        async with self._slots:
            lane = _Lane(asyncio.current_task(), name)
            self._watch(lane)
            try:
                for index, message in pending:
                    lane.calls += 1
                    lane.message = message
                    try:
                        await func(message)
                    except asyncio.CancelledError:
                        if not lane.expired or lane.cancelled_by_others():
                            raise  # a shutdown's cancellation, not (only) our timeout: let it through
                        outcomes[index] = lane.clear_expiry(self.handler_timeout_s)
                    except Exception as exc:  # user code: any failure is an outcome, never a crash
                        outcomes[index] = exc
                    else:
                        if lane.expired:  # the handler swallowed our cancellation and returned
                            outcomes[index] = lane.clear_expiry(self.handler_timeout_s)
            finally:
                self._lanes.discard(lane)

    def in_flight(self) -> list[dict[str, Any]]:
        """The handler calls running now: stream, entry id, deliveries, handler and running time in seconds.

        The running time is measured from the first time a call was seen here (no clock is read per call on the hot
        path): ask twice to see a long call's true age; a call younger than the interval between asks shows as 0."""
        now = time.monotonic()
        calls = []
        for lane in list(self._lanes):
            message = lane.message
            if message is None:
                continue
            if lane.calls != lane.seen_by_inspect:
                lane.seen_by_inspect, lane.since = lane.calls, now
            calls.append({"stream": message.stream, "id": message.id, "deliveries": message.deliveries,
                          "handler": lane.handler, "running_s": round(now - lane.since, 3)})
        return calls

    def _watch(self, lane: _Lane) -> None:
        self._lanes.add(lane)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.handler_timeout_s / 2, self._check_lanes)

    def _check_lanes(self) -> None:
        """The handler timeout, enforced without a timer per call: a lane whose call counter has not moved for
        two checks (half a timeout apart) has had one call running for between 1 and 1.5 timeouts; cancel it.
        The cancellation lands inside that call, since the lane's task is suspended there."""
        self._watchdog = None
        for lane in self._lanes:
            if lane.calls != lane.seen:
                lane.seen, lane.strikes = lane.calls, 0
                continue
            lane.strikes += lane.started
            if lane.strikes >= 2 and not lane.expired and lane.task is not None:
                lane.expired = True
                lane.task.cancel()
        if self._lanes:
            self._watchdog = asyncio.get_running_loop().call_later(self.handler_timeout_s / 2, self._check_lanes)

    async def _sync_lane(self, func: Callable[[Message], Any], queue: deque[tuple[int, Message]],
                         outcomes: list[Outcome], jobs: list[_SyncJob], name: str) -> None:
        """One thread job at a time takes messages from `queue` until it is empty. A call past the timeout is charged
        alone: its thread is abandoned (a thread cannot be interrupted) and a new job goes on with the queue."""
        async with self._slots:
            lane = _Lane(asyncio.current_task(), name)
            self._watch(lane)
            try:
                while queue:
                    job = _SyncJob(func, queue, outcomes, lane)
                    jobs.append(job)
                    lane.started = False
                    try:
                        await self._threads.run(job.run)
                    except asyncio.CancelledError:
                        late = job.abandon()
                        if not lane.expired or lane.cancelled_by_others():
                            raise
                        timeout = lane.clear_expiry(self.handler_timeout_s)
                        if late is not None:
                            outcomes[late] = timeout
            finally:
                self._lanes.discard(lane)


    async def _run_batch(self, handler: Handler, func: Callable[..., Any], messages: list[Message]) -> list[Outcome]:
        """A batch handler gets every message at once. Raising fails all of them; returning a mapping of entry
        id to exception fails just those."""
        async with self._slots:
            try:
                if handler.is_async:
                    async with asyncio.timeout(self.handler_timeout_s):
                        result = await func(messages)
                else:
                    result = await asyncio.wait_for(self._threads.run(lambda: func(messages)),
                                                    self.handler_timeout_s * TIMEOUT_OVERSHOOT)
            except Exception as exc:  # user code
                return [exc] * len(messages)
        if isinstance(result, Mapping):
            return [result.get(message.id) for message in messages]
        return [None] * len(messages)

    def close(self) -> None:
        # Never join user threads on the event loop: the drain has waited as long as it may, and a thread that is
        # still running (a sync handler past its timeout) must not hold the process after the grace period.
        self._threads.close()


Isolated = Literal["shared", "alone", "held"]


@contextlib.asynccontextmanager
async def _held() -> AsyncIterator[None]:
    yield


class Recovery:
    """The loops of one process recover what their predecessors under the same names left pending (one entry at a
    time) before any of them reads new entries: new entries read meanwhile would wait, delivered and charged, while
    a suspect might kill the process."""

    def __init__(self) -> None:
        self._left = 0
        self.done = asyncio.Event()
        self.done.set()

    def begin(self) -> None:
        self._left += 1
        self.done.clear()

    def finished(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self.done.set()


class Isolation:
    """Crash suspects run alone in their process: a batch marked `alone` waits until the batches in flight are
    done and holds back new ones until it is done itself. Ordinary batches share the process freely; entering
    costs them a counter when no suspect is waiting."""

    def __init__(self) -> None:
        self._shared = 0
        self._suspects = 0  # suspects running or waiting to
        self._lock = asyncio.Lock()  # one suspect at a time
        self._clear = asyncio.Event()  # no suspect running or waiting
        self._clear.set()
        self._drained = asyncio.Event()  # no ordinary batch in flight
        self._drained.set()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._suspects:
            await self._clear.wait()
        self._shared += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._shared -= 1
            if not self._shared:
                self._drained.set()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        self._suspects += 1
        self._clear.clear()
        try:
            async with self._lock:
                await self._drained.wait()
                yield
        finally:
            self._suspects -= 1
            if not self._suspects:
                self._clear.set()


class HandlerThreads:
    """Threads for sync handlers: a job starts at once, on an idle thread or a new one.

    Not a fixed-size pool: a thread stuck in a call past the timeout is abandoned by its lane, and a fixed pool
    whose threads are all stuck would queue every later job behind them for good. The lanes' semaphore already
    bounds how many jobs run at once, so the threads are `concurrency` plus those stuck; a stuck thread that
    finally returns becomes idle again. Threads are daemons: a process never waits for them to exit.
    """

    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None]] = []
        self._all: list[queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None]] = []

    def run(self, func: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `func` in a thread now; its result (or exception) on the returned future."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        if self._idle:
            inbox = self._idle.pop()
        else:
            inbox = queue.SimpleQueue()
            self._all.append(inbox)
            threading.Thread(target=self._serve, args=(inbox, loop), name=f"fastworker-handler-{len(self._all)}",
                             daemon=True).start()
        inbox.put((func, done))
        return done

    def _serve(self, inbox: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None],
               loop: asyncio.AbstractEventLoop) -> None:
        while (job := inbox.get()) is not None:
            func, done = job
            try:
                result, error = func(), None
            except BaseException as exc:  # handed to the loop, which decides
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(self._finished, inbox, done, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    def _finished(self, inbox: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None],
                  done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        self._idle.append(inbox)
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def close(self) -> None:
        for inbox in self._all:
            inbox.put(None)  # an idle thread ends now, a busy one after its call
        self._idle.clear()
        self._all.clear()


class _SyncJob:
    """A pool job: takes messages from the lane's queue and calls the sync handler on each, in a pool thread,
    until the queue is empty or the loop abandons it."""

    def __init__(self, func: Callable[[Message], Any], queue: deque[tuple[int, Message]], outcomes: list[Outcome],
                 lane: _Lane) -> None:
        self.func = func
        self.queue = queue
        self.outcomes = outcomes
        self.lane = lane
        self.lock = threading.Lock()
        self.current: int | None = None  # index of the message being handled
        self.since = 0.0  # when that call started (perf_counter)
        self.abandoned = False

    def run(self) -> None:
        lane = self.lane
        lane.started = True
        while True:
            try:
                index, message = self.queue.popleft()
            except IndexError:
                return
            with self.lock:
                if self.abandoned:
                    self.queue.appendleft((index, message))
                    return
                self.current, self.since = index, time.perf_counter()
            lane.calls += 1
            lane.message = message
            outcome: Outcome = None
            try:
                self.func(message)
            except Exception as exc:  # user code, in a pool thread
                outcome = exc
            with self.lock:
                if self.abandoned:  # the loop charged this call with the timeout and went on without us
                    return
                self.outcomes[index] = outcome
                self.current = None

    def running_for(self) -> float:
        """How long the current call has been running, in seconds (0 when none is)."""
        return time.perf_counter() - self.since if self.current is not None else 0.0

    def abandon(self) -> int | None:
        """Stop taking messages; returns the index of the call still running, which is now the loop's to charge."""
        with self.lock:
            self.abandoned = True
            return self.current


def _traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


class FailureLog:
    """Failures in the log where people look, without a flood: the first failure of each (handler, error class)
    is logged at once (with its traceback when it was not an expected Retry or Reject), then at most one line per
    LOG_EVERY_S with how many more there were, so an outage downstream is one line a minute, not one per message."""

    LOG_EVERY_S = 60.0

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # (handler, class) -> (last logged, not logged)

    def seen(self, handler: str, message: Message, kind: str, reason: str, error: BaseException | None, level: int,
             action: Action = Action.DEAD) -> None:
        recent.failures.note(handler, message.stream, message.id, message.deliveries, kind, reason, action.value)
        key = (handler, kind)
        now = time.monotonic()
        last, quiet = self._last.get(key, (None, 0))
        if last is not None and now - last < self.LOG_EVERY_S:
            self._last[key] = (last, quiet + 1)
            return
        self._last[key] = (now, 0)
        more = f" ({quiet} more since the last line)" if quiet else ""
        logger.log(level, "handler %s failed%s: %s: %s stream=%s id=%s deliveries=%d -> %s", handler, more, kind,
                   reason, message.stream, message.id, message.deliveries, action.value,
                   exc_info=error if error is not None and error.__traceback__ is not None else None)
