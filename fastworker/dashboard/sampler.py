"""The dashboard's samples: the latest snapshot of the server and 15 minutes of counters for the rate charts.

Rates come from the server's own counters, so they are right whoever adds and acknowledges entries (this fleet,
another one, an app): a stream's XINFO `entries-added` for entries added, and a group's `entries-read` minus its
pending count for entries acknowledged (or dead-lettered, which acknowledges them too). A counter that went down
(the stream was deleted and written again, a group's cursor moved) or is unknown (`entries-read` is null after an
XDEL or SETID) gives no rate for that interval rather than a wrong one.

Invariant: one sample at a time (a lock), whether taken by the timer or by a request that found the last one
stale; pages read the latest sample and never query the server themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from fastworker.errors import FastworkerError
from fastworker.ops.inspect import Snapshot

logger = logging.getLogger(__name__)

WINDOW_MS = 15 * 60 * 1000  # what the charts show
RATE_WINDOW_MS = 10_000  # the "now" rate is the mean over about this long

GroupKey = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Counters:
    """The server's counters at one moment (server clock)."""

    at_ms: int
    added: dict[str, int | None]  # stream -> entries ever added
    acked: dict[GroupKey, int | None]  # (stream, group) -> entries read and no longer pending

    @classmethod
    def of(cls, snap: Snapshot) -> Counters:
        added: dict[str, int | None] = {}
        acked: dict[GroupKey, int | None] = {}
        for stream in snap.streams:
            added[stream.name] = stream.entries_added
            for group in stream.groups:
                read = group.entries_read
                acked[stream.name, group.name] = None if read is None else max(0, read - group.pending)
        return cls(snap.taken_at_ms, added, acked)


def _rate(old: int | None, new: int | None, seconds: float) -> float | None:
    if old is None or new is None or new < old or seconds <= 0:
        return None
    return (new - old) / seconds


class History:
    """Counters over the chart window, oldest first, and the rates between them."""

    def __init__(self, window_ms: int = WINDOW_MS, interval_s: float = 2.0) -> None:
        self.window_ms = window_ms
        self.samples: deque[Counters] = deque(maxlen=int(window_ms / 1000 / interval_s) + 2)

    def add(self, counters: Counters) -> None:
        if self.samples and counters.at_ms <= self.samples[-1].at_ms:
            return  # the server's clock did not move (two samples in one millisecond): nothing to rate
        self.samples.append(counters)
        while self.samples and self.samples[0].at_ms < counters.at_ms - self.window_ms:
            self.samples.popleft()

    def series(self, pick: Callable[[Counters], int | None]) -> list[tuple[int, float | None]]:
        """(end of interval in server ms, rate per second) for each interval between consecutive samples."""
        pairs = zip(list(self.samples)[:-1], list(self.samples)[1:], strict=True)
        return [(new.at_ms, _rate(pick(old), pick(new), (new.at_ms - old.at_ms) / 1000)) for old, new in pairs]

    def rate_now(self, pick: Callable[[Counters], int | None]) -> float | None:
        """The mean rate over the last RATE_WINDOW_MS or so (at least one interval)."""
        if len(self.samples) < 2:
            return None
        newest = self.samples[-1]
        oldest = next((s for s in self.samples if s.at_ms >= newest.at_ms - RATE_WINDOW_MS and s is not newest),
                      self.samples[-2])
        return _rate(pick(oldest), pick(newest), (newest.at_ms - oldest.at_ms) / 1000)

    def added_rate(self, stream: str) -> float | None:
        return self.rate_now(lambda c: c.added.get(stream))

    def acked_rate(self, stream: str, group: str) -> float | None:
        return self.rate_now(lambda c: c.acked.get((stream, group)))


class Sampler:
    """Takes snapshots with `take` (one at a time), every `interval_s` once started, and keeps the history."""

    def __init__(self, take: Callable[[], Awaitable[Snapshot]], interval_s: float = 2.0) -> None:
        self.take = take
        self.interval_s = interval_s
        self.history = History(interval_s=interval_s)
        self.latest: Snapshot | None = None
        self.latest_at = 0.0  # monotonic time of the latest sample
        self.error: str | None = None  # why the last attempt failed, until one succeeds
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        """Sample on a timer from now on (idempotent), so that the charts have history before anyone looks."""
        if not self._closing and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        # The flag as well as the cancellation: a cancel that lands inside a redis-py command can come out of it as
        # a timeout (a FastworkerError here), and the loop would go on.
        while not self._closing:
            with contextlib.suppress(FastworkerError):  # kept in self.error and shown on the page
                await self.sample()
            if not self._closing:
                await asyncio.sleep(self.interval_s)

    async def sample(self) -> Snapshot:
        """A new snapshot now; raises FastworkerError (and remembers it) when the server cannot be read."""
        async with self._lock:
            try:
                snap = await self.take()
            except FastworkerError as exc:
                if self.error is None:
                    logger.warning("dashboard sampling failed: %s", exc)
                self.error = str(exc)
                raise
            if self.error is not None:
                logger.info("dashboard sampling works again")
            self.latest, self.latest_at, self.error = snap, time.monotonic(), None
            self.history.add(Counters.of(snap))
            return snap

    async def current(self) -> Snapshot | None:
        """The latest snapshot, taken now if it is older than the interval; the last good one (or None) while the
        server cannot be read."""
        if self.latest is None or time.monotonic() - self.latest_at >= self.interval_s:
            with contextlib.suppress(FastworkerError):
                if self._lock.locked():  # a sample is under way: wait for it rather than take another
                    async with self._lock:
                        pass
                else:
                    await self.sample()
        return self.latest
