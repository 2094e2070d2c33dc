"""The reclaimer: hands out again the entries that sat pending too long, whoever owned them.

Every claim_interval_ms, for each stream of each group, it follows XAUTOCLAIM's cursor from `0-0` to the end,
claiming entries idle at least claim_idle_ms into a consumer name of its own (`<first name>.claim`): never into a
live consumer's name, whose history re-read would pick them up while they are being handled here. That is how the
work of a crashed consumer is picked up, and how a failed entry is retried (claim idle is the retry delay). Claimed
entries take the consumer's dispatch path; their delivery counts come from the PEL, so an entry past
max_deliveries is dead-lettered, and ids XAUTOCLAIM reports as deleted are acknowledged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from fastworker.app import Handler
from fastworker.config import Settings
from fastworker.consumer import Outage
from fastworker.dispatch import Dispatcher
from fastworker.errors import FastworkerError
from fastworker.message import decode_entries
from fastworker.stats import Stats
from fastworker.streams import Channel, Settlement, Streams

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
        self._outage = Outage(f"reclaimer {claimer}")

    async def run(self) -> None:
        interval = self.settings.claim_interval_ms / 1000
        try:
            while not self.stopping.is_set():
                try:
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

    async def _sweep_stream(self, group: str, stream: str, handler: Handler) -> int:
        cursor, claimed = "0-0", 0
        settings = self.settings
        while not self.stopping.is_set():
            cursor, entries, deleted = await self.channel.autoclaim(
                stream, group, self.claimer, settings.claim_idle_ms, cursor, settings.batch_size)
            if entries or deleted:
                claimed += len(entries)
                await self._handle(group, stream, handler, entries, deleted)
            if cursor == "0-0":
                break
        return claimed

    async def _handle(self, group: str, stream: str, handler: Handler, entries: list[list[object]],
                      deleted: list[str]) -> None:
        settlement = Settlement(group)
        if entries:
            counts = await self.channel.deliveries(stream, group, self.claimer, entries)
            messages = decode_entries(stream, entries, counts, handler.payload, handler.payload_field)
            logger.info("claimed %d idle entries stream=%s group=%s into consumer=%s",
                        len(messages), stream, group, self.claimer)
            settlement = await self.dispatcher.dispatch(group, {stream: handler}, {stream: messages})
        if deleted:
            # Trimmed or deleted before anyone handled them; XAUTOCLAIM already dropped them from the PEL on
            # current servers, the XACK covers older ones. Nothing is left to dead-letter but the fact.
            logger.warning("%d pending entries were deleted before being handled stream=%s group=%s ids=%s",
                           len(deleted), stream, group, ",".join(deleted[:10]))
            settlement.deleted(stream, deleted)
        await self.channel.settle(settlement)
        self.stats.record(settlement, {stream: len(entries)}, claimed=True)
