"""One consumer name's loop in one group: read -> decode -> dispatch -> settle, until stopped.

Invariants:
- An entry is acknowledged only in the settlement of the batch that handled it, never before its handler ran, and
  counted only once the server confirmed it.
- No entry is handled twice without a crash. At start the consumer recovers its own pending entries (what a
  crashed predecessor under the same name left) one at a time, each settled before the next is read: an entry that
  kills its worker is then alone when it does, so only it is charged the deliveries it causes, and once past
  max_deliveries it is dead-lettered as KilledWorker without being run again. Then it reads new entries (`>`).
- After a reconnect the consumer re-reads its own pending entries (history, ID 0) as batches, so a settlement lost
  with a connection is recovered at once instead of after claim_idle_ms. A settlement whose fate is unknown is
  never re-sent: if it was applied, sending it again would duplicate its results; if it was not, its entries are
  still pending and are handled again.
- A settlement the server refused (an error reply: a missing permission, a key of the wrong type) wrote nothing of
  what it refused: it is sent again, with growing backoff, without reading or handling anything meanwhile, until
  it is written or the consumer stops (its entries then stay pending). The loop reports the problem for health.
- Redis errors are caught here, in one place: back off with jitter, log once per outage, carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from fastworker.app import Handler
from fastworker.config import Settings
from fastworker.dispatch import Dispatcher, Isolated
from fastworker.edge.streams import Ahead, Channel, Streams
from fastworker.errors import FastworkerError, NoGroupError, RedisUnavailable, SettleRefused
from fastworker.message import Message, RawEntry, decode_entries
from fastworker.outages import outages
from fastworker.policy import backoff_s
from fastworker.settlement import Settlement
from fastworker.stats import Stats

logger = logging.getLogger(__name__)

NEW = ">"
SHALLOWER_AFTER = 16  # turns whose batch read ahead was waiting for its turn before one fewer is read ahead
REFUSED_BACKOFF_CAP_S = 30.0  # a settle the server refuses waits for an operator: no need to ask more often


class Outage:
    """Logs the first error of an outage and the recovery, not every retry in between; paces the retries.

    An error the server answered (a refused settle, a missing permission: not cured by waiting) is reported in
    `problems` while it lasts, which turns the fleet's health red. An unreachable server is not: restarting the
    worker would not bring it back, and readiness already checks the server."""

    def __init__(self, what: str, problems: dict[str, str] | None = None, cap_s: float = 5.0) -> None:
        self.what = what
        self.problems = problems if problems is not None else {}
        self.cap_s = cap_s
        self.attempt = 0
        self.since = 0.0

    async def failed(self, error: FastworkerError, stopping: asyncio.Event | None = None) -> None:
        if self.attempt == 0:
            self.since = time.monotonic()
        outages.failed(self.what, error)  # logged once per outage per process, not per loop
        if not isinstance(error, RedisUnavailable):
            self.problems[self.what] = str(error)
        delay = backoff_s(self.attempt, cap_s=self.cap_s)
        self.attempt += 1
        if stopping is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)

    def recovered(self) -> None:
        if self.attempt:
            outages.recovered(self.what)
            self.attempt = 0
            self.problems.pop(self.what, None)


class Consumer:
    """Reads one group's streams as one consumer name and settles what its handlers decided."""

    def __init__(self, streams: Streams, dispatcher: Dispatcher, settings: Settings, group: str,
                 handlers: Mapping[str, Handler], name: str, stats: Stats) -> None:
        self.streams = streams
        self.dispatcher = dispatcher
        self.settings = settings
        self.group = group
        self.handlers = handlers
        self.name = name
        self.stats = stats
        self.channel: Channel = streams.channel()
        self.stopping = asyncio.Event()
        self.on_retry: Callable[[float], None] | None = None  # told the delay of the first retry a settlement parked
        self._reading = False
        self._recovering: list[str] = []  # streams whose own pending entries are still to recover, one at a time
        self._recover_from = "0"  # last id recovered of the first of them
        self._history: dict[str, str] | None = None  # last id seen per stream while re-reading after a reconnect
        self._recovered = False
        self._ahead: deque[Ahead] = deque()  # reads written before the batch in hand was handled, oldest first
        self.reads_ahead = 0  # batches that came by read-ahead
        # How many batches to keep read ahead, between 1 and settings.read_ahead: one more each time a batch read
        # ahead was not in yet when its turn came (the round trip is longer than handling the batches before it),
        # one fewer after SHALLOWER_AFTER turns in a row whose batch was waiting. It settles at the least depth that
        # hides the round trip, so a consumer near its server holds fewer entries than one far from it.
        self.read_ahead_depth = 1
        self._in_time = 0  # turns in a row whose batch read ahead was in before it was needed
        dispatcher.recovery.begin()
        self._outage = Outage(f"consumer {name} group={group}", stats.problems)
        self._refused = Outage(f"consumer {name} group={group} settle", stats.problems, REFUSED_BACKOFF_CAP_S)

    async def run(self) -> None:
        settlement: Settlement | None = None
        self._recovering = list(self.handlers)
        try:
            while not self.stopping.is_set():
                settlement = await self._step(settlement)
            while self._ahead:  # batches already read ahead are handled too, like the batch in hand
                settlement = await self._step(settlement)
            if settlement is not None:
                await self._settle_last(settlement)
        finally:
            await self.channel.aclose()

    async def stop(self) -> None:
        """Stop reading: a blocked read returns at once; the batch in hand is handled and settled."""
        self.stopping.set()
        if self._reading:
            await self.streams.unblock(self.channel.client_id)

    async def _step(self, settlement: Settlement | None) -> Settlement | None:
        """One turn: settle the last batch with the next read, then handle what came back. A suspect (one of this
        consumer's own pending entries at start) is read, handled and settled with nothing else of the process in
        flight, so that if it kills the process again, nobody else is charged for it."""
        if not self._recovering:
            return await self._turn(settlement, "shared")
        async with self.dispatcher.isolation.alone():
            suspect = await self._turn(settlement, "held")
            if suspect is not None:
                await self._settle_now(suspect)
        return None

    async def _turn(self, settlement: Settlement | None, isolation: Isolated) -> Settlement | None:
        """Get the next batch (from a read written ahead, or by a read that carries `settlement`), then handle it.
        Returns the settlement still to write: the batch's, or one no read has carried yet."""
        ahead = self._ahead.popleft() if self._ahead else None
        # With a read-ahead, `settlement` was not written yet: the read that brought this batch went before it.
        sent, unsent = (ahead.settlement, settlement) if ahead is not None else (settlement, None)
        try:
            batch = await (self._read_ahead(ahead) if ahead is not None else self._read(settlement))
        except SettleRefused as exc:
            await self._drop_ahead()
            assert sent is not None
            await self._settle_refused(sent, exc, unsent)
            return unsent
        except NoGroupError as exc:
            await self._drop_ahead()
            self._settled(sent)
            self._settled(unsent)
            await self._recreate_groups(exc)
            return None
        except FastworkerError as exc:
            await self._drop_ahead()
            self._settled(sent)
            self._reread_own_pending()
            await self._outage.failed(exc, self.stopping)
            return unsent
        self._settled(sent)
        self._outage.recovered()
        if not batch:
            return unsent
        self.stats.received(self.group, {stream: len(messages) for stream, messages in batch.items()})
        await self._read_more(batch, unsent)
        # A batch read ahead has been idle since its read, or since the last refresh while the batch before it was
        # handled: its first refresh comes that much sooner, so no entry held goes unrefreshed longer than
        # every_s (half the claim idle time).
        keep = KeepClaimed(self.streams, self.group, self.name, lambda: self._held(batch), self.settings.claim_idle_ms)
        if ahead is not None:
            keep.first_s = max(0.0, keep.every_s - (time.monotonic() - ahead.sent_at))
        with keep:
            return await self.dispatcher.dispatch(self.group, self.handlers, batch, isolation)

    async def _read_more(self, batch: Mapping[str, list[Message]], unsent: Settlement | None) -> None:
        """Before handling `batch`: read the next batches ahead if it came full (the stream has a backlog), so that
        their round trip overlaps its handling, carrying `unsent` with the first read. Otherwise write `unsent` now.
        Read-aheads never block (a blocked read would hold back the settlements written behind it on the same
        connection), and never while recovering or re-reading this consumer's own pending entries."""
        settings = self.settings
        if (settings.read_ahead and self._recovered and self._history is None and not self.stopping.is_set()
                and not self.channel.broken
                and any(len(messages) >= settings.batch_size for messages in batch.values())):
            try:
                # `unsent` always goes with a read, even one past the depth just after it shrank: a settlement
                # only ever travels with a read or on its own, never stays behind.
                while len(self._ahead) < self.read_ahead_depth or unsent is not None:
                    self._ahead.append(await self.channel.settle_and_read_ahead(
                        self.group, self.name, settings.batch_size, list(self.handlers), unsent, self._settled))
                    unsent = None
            except FastworkerError as exc:  # the connection went while writing: what it carried has an unknown fate
                logger.debug("consumer %s group=%s: a read-ahead failed: %s", self.name, self.group, exc)
                self._settled(unsent)
                await self._drop_ahead()
                self._reread_own_pending()  # at once, as after any reconnect (also with no other read ahead)
            return
        if unsent is not None:
            await self._settle_now(unsent, holding=batch)

    async def _drop_ahead(self) -> None:
        """After an error: forget the read-aheads still in flight and drop the connection their replies would come
        on. What they carried has an unknown fate; the entries they read are re-read from this consumer's own
        pending entries."""
        if not self._ahead:
            return
        while self._ahead:
            ahead = self._ahead.popleft()
            ahead.cancel()
            self._settled(ahead.settlement)
        await self.channel.reset()
        self._reread_own_pending()

    def _held(self, batch: Mapping[str, list[Message]]) -> dict[str, list[str | bytes]]:
        """The entries this consumer holds while it handles `batch`: the batch's, those read ahead, and those of the
        settlements the reads ahead carry until they are written."""
        ids = ids_by_stream(batch)
        for ahead in self._ahead:
            # what it read, and what it carries until the server confirmed it (a NOSCRIPT reply, say, leaves the
            # settlement to be sent again only at this read's turn)
            carried = ahead.settlement.unwritten() if ahead.settlement is not None else {}
            for part in (ahead.delivered(), carried):
                for stream, more in part.items():
                    ids.setdefault(stream, []).extend(more)
        return ids

    async def _settle_now(self, settlement: Settlement, holding: Mapping[str, list[Message]] | None = None) -> None:
        """Write `settlement` on its own. `holding`: a batch read but not handled yet, kept claimed with the
        settlement's entries should the server refuse it (the refusal lasts until an operator fixes it)."""
        try:
            await self.channel.settle(settlement)
        except SettleRefused as exc:
            await self._settle_refused(settlement, exc, holding=holding)
            return
        except NoGroupError as exc:
            self._settled(settlement)
            await self._recreate_groups(exc)
            return
        except FastworkerError as exc:
            self._settled(settlement)
            self._reread_own_pending()
            await self._outage.failed(exc, self.stopping)
            return
        self._settled(settlement)

    def _settled(self, settlement: Settlement | None) -> None:
        """Count what the server confirmed of `settlement`, at the end of its life (written or given up), and tell
        the reclaimer when the retries it parked are due."""
        if settlement is not None and not settlement.counted:
            settlement.counted = True
            self.stats.settled(settlement)
            if settlement.retried_by_stream and settlement.earliest_retry_s is not None and self.on_retry:
                self.on_retry(settlement.earliest_retry_s)

    def _reread_own_pending(self) -> None:
        if self._recovering:
            self._recover_from = "0"
        else:
            self._history = dict.fromkeys(self.handlers, "0")

    async def _settle_refused(self, settlement: Settlement | None, error: SettleRefused,
                              unsent: Settlement | None = None,
                              holding: Mapping[str, list[Message]] | None = None) -> None:
        """Send a refused settlement again until it is written, keeping claimed meanwhile its entries, those of
        `unsent` (a batch handled while the refused one was in flight with a read-ahead, not written yet) and those
        of `holding` (a batch read and not handled yet)."""
        assert settlement is not None

        def held() -> dict[str, list[str | bytes]]:
            ids = settlement.unwritten()
            more = [unsent.unwritten() if unsent is not None else {}, ids_by_stream(holding or {})]
            for part in more:
                for stream, entry_ids in part.items():
                    ids.setdefault(stream, []).extend(entry_ids)
            return ids

        try:
            with KeepClaimed(self.streams, self.group, self.name, held, self.settings.claim_idle_ms):
                await resend_refused(self.channel, settlement, error, self._refused, self._outage, self.stopping)
        finally:
            self._settled(settlement)
            self._reread_own_pending()  # the read sent with the refused settlement delivered entries

    async def _settle_last(self, settlement: Settlement) -> None:
        try:
            await self.channel.settle(settlement)
        except FastworkerError as exc:
            logger.warning("consumer %s group=%s could not settle its last batch (%s); its entries stay pending",
                           self.name, self.group, exc)
        self._settled(settlement)

    async def _read(self, settlement: Settlement | None) -> dict[str, list[Message]]:
        if self._recovering:
            return await self._recover(settlement)
        if not self._recovered:
            await self._recovery_done(settlement)
            return {}
        history = self._history
        ids = history or dict.fromkeys(self.handlers, NEW)
        block = None if history else self.settings.block_ms
        self._reading = True
        try:
            reply = await self.channel.settle_and_read(self.group, self.name, ids, self.settings.batch_size, block,
                                                       settlement, self._settled)
        finally:
            self._reading = False
        if history is None:
            return {stream: self._decode(stream, entries, 1) for stream, entries in reply.items()}
        return await self._decode_history(history, reply)

    async def _read_ahead(self, ahead: Ahead) -> dict[str, list[Message]]:
        late = not ahead.task.done()
        reply = await ahead.entries()
        self.reads_ahead += bool(reply)
        if late:
            self.read_ahead_depth = min(self.read_ahead_depth + 1, self.settings.read_ahead)
            self._in_time = 0
        else:
            self._in_time += 1
            if self._in_time >= SHALLOWER_AFTER and self.read_ahead_depth > 1:
                self.read_ahead_depth -= 1
                self._in_time = 0
        return {stream: self._decode(stream, entries, 1) for stream, entries in reply.items()}

    async def _recover(self, settlement: Settlement | None) -> dict[str, list[Message]]:
        """The next of this consumer's own pending entries, alone (its predecessor may have died of it)."""
        stream = self._recovering[0]
        reply = await self.channel.settle_and_read(self.group, self.name, {stream: self._recover_from}, 1, None,
                                                   settlement)
        entries = reply.get(stream)
        if not entries:
            self._recovering.pop(0)
            self._recover_from = "0"
            return {}
        counts = await self.channel.deliveries(stream, self.group, self.name, entries)
        self._recover_from = _id(entries[-1])
        return {stream: self._decode(stream, entries, counts)}

    async def _recovery_done(self, settlement: Settlement | None) -> None:
        """This consumer's own pending entries are recovered: settle the last one, then wait for the process's other
        loops to finish theirs before reading new entries."""
        if settlement is not None:
            await self.channel.settle(settlement)  # raises like a read would, for _step to handle
        logger.debug("consumer %s group=%s: own pending entries recovered", self.name, self.group)
        self._recovered = True
        self.dispatcher.recovery.finished()
        await until(self.dispatcher.recovery.done, self.stopping)

    async def _decode_history(self, history: dict[str, str], reply: dict[str, list[RawEntry]]
                              ) -> dict[str, list[Message]]:
        if not reply:
            self._history = None  # own pending entries all seen: read new ones from now on
            logger.debug("consumer %s group=%s: own pending entries re-read", self.name, self.group)
            return {}
        batch = {}
        for stream, entries in reply.items():
            counts = await self.channel.deliveries(stream, self.group, self.name, entries)
            # Re-read because the connection (or a settlement) was lost, not because a worker died: this read
            # does not count as a delivery, or a flaky network would exhaust entries as KilledWorker.
            counts = {entry_id: max(1, count - 1) for entry_id, count in counts.items()}
            await self.channel.set_deliveries(stream, self.group, self.name, counts)
            history[stream] = _id(entries[-1])
            batch[stream] = self._decode(stream, entries, counts)
        return batch

    def _decode(self, stream: str, entries: list[RawEntry], deliveries: int | dict[str, int]) -> list[Message]:
        handler = self.handlers[stream]
        return decode_entries(stream, entries, deliveries, handler.payload, handler.payload_field, handler.typed)

    async def _recreate_groups(self, error: NoGroupError) -> None:
        # The stream or group vanished (deleted, FLUSHALL, restart without persistence). Its PEL went with it,
        # so there is nothing to settle: recreate and carry on, paced like any outage so it can never spin.
        logger.warning("consumer %s group=%s: %s; recreating the group", self.name, self.group, error)
        try:
            created = await self.streams.ensure_groups(
                ((stream, self.group) for stream in self.handlers), self.settings.group_start_id)
        except FastworkerError as exc:
            await self._outage.failed(exc, self.stopping)
            return
        if created:
            logger.warning("recreated groups: %s", ", ".join(f"{s}/{g}" for s, g in created))
        else:
            await self._outage.failed(error, self.stopping)  # the group exists, the error persists: slow down
        self._reread_own_pending()


async def until(event: asyncio.Event, stopping: asyncio.Event) -> None:
    """Wait for `event`, or for `stopping`."""
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def resend_refused(channel: Channel, settlement: Settlement, error: SettleRefused, refused: Outage,
                         outage: Outage, stopping: asyncio.Event) -> None:
    """Send a settlement the server refused again, with growing backoff, until it is written or `stopping` is set
    (its entries then stay pending). Nothing is read or handled meanwhile."""
    try:
        while not isinstance(error.cause, NoGroupError):  # with its group gone, there is nothing left to settle
            await refused.failed(error, stopping)
            if stopping.is_set():
                logger.warning("stopping with a batch of group=%s the server refused to settle; its entries stay "
                               "pending", settlement.group)
                return
            try:
                await channel.settle(settlement)
            except SettleRefused as exc:
                error = exc
                continue
            refused.recovered()
            return
    except FastworkerError as exc:  # the connection went: what was sent last has an unknown fate
        await outage.failed(exc, stopping)


class KeepClaimed:
    """While a batch is being handled, refresh its entries' idle time every claim_idle_ms / 2.

    An entry's idle time runs from its delivery, and the last entries of a long batch wait for the first ones: without
    this, a batch that takes longer than the claim idle time would be claimed and handled again elsewhere, with no
    crash at all. Costs nothing for batches shorter than half the claim idle time (one timer, cancelled).
    """

    def __init__(self, streams: Streams, group: str, consumer: str,
                 ids: Callable[[], Mapping[str, Sequence[str | bytes]]], claim_idle_ms: int) -> None:
        self.streams = streams
        self.group = group
        self.consumer = consumer
        self.ids = ids  # asked each time: what is still to keep
        self.every_s = claim_idle_ms / 2000
        self.first_s = self.every_s  # the first refresh
        self.timer: asyncio.TimerHandle | None = None
        self.refresh: asyncio.Task[None] | None = None
        self.done = False

    def __enter__(self) -> KeepClaimed:
        self.timer = asyncio.get_running_loop().call_later(self.first_s, self._due)
        return self

    def __exit__(self, *exc: object) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if self.refresh is not None:
            self.refresh.cancel()

    def _due(self) -> None:
        self.refresh = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        try:
            await self.streams.keep_claimed(self.group, self.consumer, self.ids())
        except FastworkerError as exc:  # the server is away: the consumer's own loop will say so
            logger.debug("could not refresh a long batch's idle time: %s", exc)
        finally:
            if not self.done:
                self.timer = asyncio.get_running_loop().call_later(self.every_s, self._due)


def ids_by_stream(batch: Mapping[str, list[Message]]) -> dict[str, list[str | bytes]]:
    return {stream: [message.raw_id for message in messages] for stream, messages in batch.items()}


def _id(entry: RawEntry) -> str:
    value = entry[0]
    return value.decode() if isinstance(value, bytes) else str(value)
