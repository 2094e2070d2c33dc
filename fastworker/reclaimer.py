"""The reclaimer: hands out again the entries that wait on a retry, and those whose worker died.

Each pass, for each stream of each group:
- due retries: entries whose handler failed are parked on the group's RETRY_CONSUMER with a due time in the
  stream's retry set (both on the server: see `fastworker.settlement`). TAKE_DUE_SCRIPT claims the due ones into
  the reclaimer's own consumer name (`<first name>.claim`), atomically, so two reclaimers never take the same one;
  they are handled in batches, like fresh entries. Between passes the reclaimer sleeps until the next retry is due
  (or a local consumer parks an earlier one), at most claim_interval_ms, so a retry due in 2 s runs in about 2 s.
- orphans: entries pending on any other consumer and idle past claim_idle_ms had no verdict: their worker died or
  hung while handling them. They are claimed (XCLAIM re-checks the idle time, so two reclaimers never take the same
  one) and handled one at a time, each settled before the next is claimed, so an orphan that kills its worker is
  alone when it does and charges nobody else (it is dead-lettered as KilledWorker once past max_deliveries, without
  being run again). At start, the entries still pending on the reclaimer's own name (its predecessor under that
  name died with them) are orphans too, recovered at once. A parked entry that lost its due time (its retry set was
  deleted) is an orphan once it has waited longer than any retry may.
Claimed entries take the consumer's dispatch path, with delivery counts from the PEL. Ids deleted from the stream
while pending are acknowledged and counted as deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from fastworker.app import Handler
from fastworker.config import Settings
from fastworker.consumer import REFUSED_BACKOFF_CAP_S, KeepClaimed, Outage, ids_by_stream, resend_refused, until
from fastworker.dispatch import Dispatcher, Isolated
from fastworker.edge.streams import Channel, Streams
from fastworker.errors import FastworkerError, SettleRefused
from fastworker.logs import plural
from fastworker.message import RawEntry, decode_entries, text
from fastworker.policy import MAX_RETRY_DELAY_S
from fastworker.settlement import RETRY_CONSUMER, Settlement
from fastworker.stats import Stats

logger = logging.getLogger(__name__)


class Reclaimer:
    """Claims idle pending entries of every group of a worker process, on a timer."""

    def __init__(self, streams: Streams, dispatcher: Dispatcher, settings: Settings,
                 groups: Mapping[str, Mapping[str, Handler]], claimer: str, stats: Stats) -> None:
        self.streams = streams
        self.dispatcher = dispatcher
        self.settings = settings
        self.groups = groups
        self.claimer = claimer
        self.stats = stats
        self.channel: Channel = streams.channel()
        self.stopping = asyncio.Event()
        self._outage = Outage(f"reclaimer {claimer}", stats.problems)
        self._refused = Outage(f"reclaimer {claimer} settle", stats.problems, REFUSED_BACKOFF_CAP_S)
        self._wake = asyncio.Event()  # set to look again before the planned time (a retry parked, a stop)
        self._wake_at = float("inf")  # loop time of the next planned pass
        dispatcher.recovery.begin()

    async def run(self) -> None:
        interval = self.settings.claim_interval_ms / 1000
        recovered = False
        try:
            while not self.stopping.is_set():
                try:
                    if not recovered:  # first what a predecessor under our name left, then the regular sweep
                        await self.recover_own()
                        recovered = True
                        self.dispatcher.recovery.finished()
                        await until(self.dispatcher.recovery.done, self.stopping)
                    next_due = await self.sweep()
                    self._outage.recovered()
                except FastworkerError as exc:
                    await self._outage.failed(exc, self.stopping)
                    continue
                await self._pause(interval if next_due is None else min(interval, next_due))
        finally:
            await self.channel.aclose()

    async def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def retry_parked(self, delay_s: float) -> None:
        """A consumer of this process parked a retry due in `delay_s`: wake up for it if that is earlier."""
        due = asyncio.get_running_loop().time() + delay_s
        if due < self._wake_at:
            self._wake_at = due
            self._wake.set()

    async def _pause(self, timeout_s: float) -> None:
        """Wait `timeout_s`, or less when a retry is due sooner (one parked during the sweep counts too)."""
        loop = asyncio.get_running_loop()
        self._wake_at = min(self._wake_at, loop.time() + timeout_s)
        while not self.stopping.is_set():
            remaining = self._wake_at - loop.time()
            if remaining <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
        self._wake_at = float("inf")  # from now on (the sweep), a parked retry is noted for the next pause

    async def sweep(self) -> float | None:
        """One pass over every stream of every group; returns the seconds until the next retry is due (None when
        none is waiting)."""
        next_due: float | None = None
        for group, handlers in self.groups.items():
            for stream, handler in handlers.items():
                due = await self._due_retries(group, stream, handler)
                if due is not None:
                    next_due = due if next_due is None else min(next_due, due)
                await self._orphans(group, stream, handler)
        return next_due

    async def recover_own(self) -> int:
        """Handle, one at a time, the entries pending on this reclaimer's own name from before it started."""
        claimed = 0
        for group, handlers in self.groups.items():
            for stream, handler in handlers.items():
                rows = await self.channel.pending_idle(stream, group, 0, "-", self.settings.batch_size, self.claimer)
                for entry_id, _, deliveries in rows:
                    if not self.stopping.is_set():
                        claimed += await self._claim(group, stream, handler, {entry_id: deliveries}, 0, alone=True)
        return claimed

    async def _due_retries(self, group: str, stream: str, handler: Handler) -> float | None:
        page = self.settings.batch_size
        while not self.stopping.is_set():
            entries, counts, deleted, next_due = await self.channel.take_due(stream, group, self.claimer, page)
            if entries or deleted:
                await self._handle(group, stream, handler, entries, counts, deleted)
            if len(entries) + len(deleted) < page:
                return next_due
        return None

    async def _orphans(self, group: str, stream: str, handler: Handler) -> int:
        claimed = 0
        for consumer, pending in await self.channel.consumers(stream, group):
            if not pending or consumer == self.claimer:
                continue
            if consumer == RETRY_CONSUMER:  # parked: an orphan only if it lost its due time
                idle = int((MAX_RETRY_DELAY_S * 1000) + self.settings.claim_idle_ms)
                rows = await self.channel.pending_idle(stream, group, idle, "-", self.settings.batch_size, consumer)
                lost = set(await self.channel.unscheduled(stream, group, [row[0] for row in rows])) if rows else set()
                rows = [row for row in rows if row[0] in lost]
            else:
                rows = await self.channel.pending_idle(stream, group, self.settings.claim_idle_ms, "-",
                                                       self.settings.batch_size, consumer)
            for entry_id, _, deliveries in rows:
                if not self.stopping.is_set():
                    claimed += await self._claim(group, stream, handler, {entry_id: deliveries}, alone=True)
        return claimed

    async def _claim(self, group: str, stream: str, handler: Handler, wanted: dict[bytes, int],
                     min_idle_ms: int | None = None, alone: bool = False) -> int:
        """Claim `wanted` (raw id -> deliveries so far), handle what was claimed, and settle it. `alone`: orphans
        are claimed, handled and settled with nothing else of the process in flight (their worker died)."""
        if alone:
            async with self.dispatcher.isolation.alone():
                return await self._claim_now(group, stream, handler, wanted, min_idle_ms, "held")
        return await self._claim_now(group, stream, handler, wanted, min_idle_ms, "shared")

    async def _claim_now(self, group: str, stream: str, handler: Handler, wanted: dict[bytes, int],
                         min_idle_ms: int | None, isolation: Isolated) -> int:
        idle = self.settings.claim_idle_ms if min_idle_ms is None else min_idle_ms
        entries = await self.channel.claim(stream, group, self.claimer, idle, list(wanted))
        counts = {text(entry[0]): wanted.get(entry[0], 0) + 1 for entry in entries}
        missing = set(map(text, wanted)) - counts.keys()
        deleted = []
        if missing:  # deleted from the stream (XCLAIM dropped them from the PEL), or settled or claimed elsewhere
            existing = await self.channel.existing(stream, sorted(missing))
            deleted = [entry_id for entry_id in sorted(missing) if entry_id not in existing]
        if entries or deleted:
            await self._handle(group, stream, handler, entries, counts, deleted, isolation)
        return len(entries)

    async def _handle(self, group: str, stream: str, handler: Handler, entries: list[RawEntry],
                      counts: dict[str, int], deleted: list[str], isolation: Isolated = "shared") -> None:
        settlement = Settlement(group)
        if entries:
            messages = decode_entries(stream, entries, counts, handler.payload, handler.payload_field, handler.typed)
            # An orphan (its worker died) is news; a retry that came due is the schedule working.
            logger.log(logging.INFO if isolation != "shared" else logging.DEBUG,
                       "claimed %s stream=%s group=%s into consumer=%s", plural(len(messages), "entry", "entries"),
                       stream, group, self.claimer)
            self.stats.received(group, {stream: len(messages)}, claimed=True)
            batch = {stream: messages}
            with KeepClaimed(self.streams, group, self.claimer, lambda: ids_by_stream(batch),
                             self.settings.claim_idle_ms):
                settlement = await self.dispatcher.dispatch(group, {stream: handler}, batch, isolation)
        if deleted:
            logger.warning("%d pending entries were deleted before being handled stream=%s group=%s ids=%s",
                           len(deleted), stream, group, ",".join(deleted[:10]))
            settlement.deleted(stream, deleted)
        await self._settle(settlement)

    async def _settle(self, settlement: Settlement) -> None:
        try:
            await self.channel.settle(settlement)
        except SettleRefused as exc:
            with KeepClaimed(self.streams, settlement.group, self.claimer, settlement.unwritten,
                             self.settings.claim_idle_ms):
                await resend_refused(self.channel, settlement, exc, self._refused, self._outage, self.stopping)
        finally:
            self.stats.settled(settlement)
        if settlement.retried_by_stream and settlement.earliest_retry_s is not None:
            self.retry_parked(settlement.earliest_retry_s)
