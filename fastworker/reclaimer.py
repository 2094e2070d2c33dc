"""The reclaimer: hands out again the entries that sat pending too long, whoever owned them.

Every claim_interval_ms, for each stream of each group, it pages through the entries pending longer than
claim_idle_ms (XPENDING ... IDLE) and claims them (XCLAIM, which re-checks the idle time, so two reclaimers never
take the same entry) into a consumer name of its own (`<first name>.claim`): never into a live consumer's name,
whose history re-read would pick them up while they are being handled here. There are two kinds:
- retries: entries whose handler failed, parked by their settlement on the group's RETRY_CONSUMER. They are
  claimed and handled in batches, like fresh entries.
- orphans: entries pending on any other consumer, with no verdict: their worker died or hung while handling them.
  They are claimed and handled one at a time, each settled before the next is claimed, so an orphan that kills its
  worker is alone when it does and charges nobody else (it is dead-lettered as KilledWorker once past
  max_deliveries, without being run again). At start, the entries still pending on the reclaimer's own name (its
  predecessor under that name died with them) are orphans too, recovered at once.
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
from fastworker.consumer import REFUSED_BACKOFF_CAP_S, KeepClaimed, Outage, ids_by_stream, resend_refused
from fastworker.dispatch import Dispatcher
from fastworker.errors import FastworkerError, SettleRefused
from fastworker.message import decode_entries, text
from fastworker.settlement import RETRY_CONSUMER, Settlement
from fastworker.stats import Stats
from fastworker.streams import Channel, Streams

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

    async def run(self) -> None:
        interval = self.settings.claim_interval_ms / 1000
        recovered = False
        try:
            while not self.stopping.is_set():
                try:
                    if not recovered:  # first what a predecessor under our name left, then the regular sweep
                        await self.recover_own()
                        recovered = True
                    await self.sweep()
                    self._outage.recovered()
                except FastworkerError as exc:
                    await self._outage.failed(exc, self.stopping)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), interval)
        finally:
            await self.channel.aclose()

    async def stop(self) -> None:
        self.stopping.set()

    async def sweep(self) -> int:
        """One pass over every stream of every group; returns how many entries were claimed."""
        claimed = 0
        for group, handlers in self.groups.items():
            for stream, handler in handlers.items():
                claimed += await self._sweep_stream(group, stream, handler)
        return claimed

    async def recover_own(self) -> int:
        """Handle, one at a time, the entries pending on this reclaimer's own name from before it started."""
        claimed = 0
        for group, handlers in self.groups.items():
            for stream, handler in handlers.items():
                rows = await self.channel.pending_idle(stream, group, 0, "-", self.settings.batch_size, self.claimer)
                for entry_id, _, deliveries in rows:
                    if not self.stopping.is_set():
                        claimed += await self._claim(group, stream, handler, {entry_id: deliveries}, 0)
        return claimed

    async def _sweep_stream(self, group: str, stream: str, handler: Handler) -> int:
        start, claimed = "-", 0
        page = self.settings.batch_size
        while not self.stopping.is_set():
            rows = await self.channel.pending_idle(stream, group, self.settings.claim_idle_ms, start, page)
            retries = {entry_id: deliveries for entry_id, owner, deliveries in rows if owner == RETRY_CONSUMER}
            for entry_id, owner, deliveries in rows:
                if owner != RETRY_CONSUMER and not self.stopping.is_set():
                    claimed += await self._claim(group, stream, handler, {entry_id: deliveries})
            if retries and not self.stopping.is_set():
                claimed += await self._claim(group, stream, handler, retries)
            if len(rows) < page:
                break
            start = "(" + text(rows[-1][0])
        return claimed

    async def _claim(self, group: str, stream: str, handler: Handler, wanted: dict[bytes, int],
                     min_idle_ms: int | None = None) -> int:
        """Claim `wanted` (raw id -> deliveries so far), handle what was claimed, and settle it."""
        idle = self.settings.claim_idle_ms if min_idle_ms is None else min_idle_ms
        entries = await self.channel.claim(stream, group, self.claimer, idle, list(wanted))
        settlement = Settlement(group)
        if entries:
            counts = {text(entry[0]): wanted.get(entry[0], 0) + 1 for entry in entries}
            messages = decode_entries(stream, entries, counts, handler.payload, handler.payload_field)
            logger.info("claimed %d idle entries stream=%s group=%s into consumer=%s", len(messages), stream,
                        group, self.claimer)
            self.stats.received(group, {stream: len(messages)}, claimed=True)
            batch = {stream: messages}
            with KeepClaimed(self.streams, group, self.claimer, lambda: ids_by_stream(batch),
                             self.settings.claim_idle_ms):
                settlement = await self.dispatcher.dispatch(group, {stream: handler}, batch)
        missing = set(map(text, wanted)) - {text(entry[0]) for entry in entries}
        if missing:
            await self._forget_deleted(stream, group, sorted(missing), settlement)
        await self._settle(settlement)
        return len(entries)

    async def _forget_deleted(self, stream: str, group: str, ids: list[str], settlement: Settlement) -> None:
        """Of the ids that were not claimed (deleted from the stream, or settled or claimed elsewhere meanwhile),
        acknowledge and count those no longer in the stream: deleted before anyone handled them."""
        existing = await self.channel.existing(stream, ids)
        deleted = [entry_id for entry_id in ids if entry_id not in existing]
        if deleted:
            logger.warning("%d pending entries were deleted before being handled stream=%s group=%s ids=%s",
                           len(deleted), stream, group, ",".join(deleted[:10]))
            settlement.deleted(stream, deleted)

    async def _settle(self, settlement: Settlement) -> None:
        try:
            await self.channel.settle(settlement)
        except SettleRefused as exc:
            with KeepClaimed(self.streams, settlement.group, self.claimer, settlement.unwritten,
                             self.settings.claim_idle_ms):
                await resend_refused(self.channel, settlement, exc, self._refused, self._outage, self.stopping)
        finally:
            self.stats.settled(settlement)
