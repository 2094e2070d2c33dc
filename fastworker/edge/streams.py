"""The loops' connections (the hot path of the I/O edge): groups, reads, read-aheads, claims and the settle step.

Invariants kept here:
- A batch costs one round trip: the settle commands of the previous batch (XACK, result XADDs, dead letters) travel
  in the same write as the next XREADGROUP, and the replies are read in order, so the connection never falls out
  of step even when one command fails.
- A settlement's steps are written as `fastworker.settlement` builds them (each all-or-nothing) and confirmed from
  the replies. A step the server refused (an error reply) raises SettleRefused and stays in the settlement to be
  sent again; after an I/O error the fate of what was sent is unknown, so it is never sent again.
- redis-py's errors are translated into fastworker's here (through `fastworker.edge.errors`). After any I/O error
  a channel drops its connection; the caller decides when to reconnect.
- Replies stay in the raw shape hiredis produces: redis-py's per-entry conversion is skipped on the hot path.

On a cluster (next): one channel per partition, to the master of its slot (`fastworker.edge.cluster` has the slot
map); a partition's stream, dead letters, retry set and result streams share its hash tag, so its settle stays one
script call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from fastworker.config import Settings, redact_url
from fastworker.edge.errors import is_busy_group, translate, translated
from fastworker.edge.wire import Command, pack
from fastworker.errors import FastworkerError, RedisUnavailable, SettleRefused
from fastworker.message import RawEntry, text
from fastworker.settlement import (
    RETRY_CONSUMER,
    TAKE_DUE_SCRIPT,
    Settlement,
    retry_key,
    script_call,
    with_text,
)

logger = logging.getLogger(__name__)

DEAD_FIELD_PREFIX = "fw:"


def raise_refused(settlement: Settlement, errors: Sequence[Exception], url: str) -> None:
    """Raise SettleRefused if the server refused any of a settlement's steps (those steps wrote nothing and stay in
    the settlement, to be sent again)."""
    _log_skipped(settlement)
    if errors:
        raise SettleRefused(translate(errors[0], url), len(errors))


def _uncached(errors: Sequence[Exception]) -> bool:
    """Every refusal is a script call the server's script cache did not know (it did nothing)."""
    return bool(errors) and all(isinstance(error, rex.NoScriptError) for error in errors)


def _log_skipped(settlement: Settlement) -> None:
    if settlement.skipped:
        logger.info("%d entries of group=%s were settled by another consumer first; their outputs were not "
                    "written again", settlement.skipped, settlement.group)
        settlement.skipped = 0


class Channel:
    """One dedicated connection for one loop (a consumer or the reclaimer): reads, settles and claims."""

    def __init__(self, pool: aioredis.ConnectionPool, url: str) -> None:
        self._pool = pool
        self._url = url
        self._conn: Any = None
        self.client_id: int | None = None
        self._ahead: deque[asyncio.Task[list[Any]]] = deque()  # replies of read-aheads still to read, in order
        self.broken = False  # a read-ahead's reply failed: the connection is to be dropped by the next call
        self._generation = 0  # connections dropped so far: a read-ahead's reply never comes on a new one

    async def _connection(self) -> Any:
        if self._conn is None:
            self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        if not self._conn.is_connected:
            self.client_id = None
            await self._conn.connect()
        if self.client_id is None:  # needed to CLIENT UNBLOCK this connection's blocking reads on stop
            await self._conn.send_command("CLIENT", "ID")
            self.client_id = int(await self._conn.read_response())
        return self._conn

    async def roundtrip(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write and read every reply; the first server error is raised after all
        replies are read (so the connection stays usable). I/O errors drop the connection."""
        replies = await self._exchange(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise translate(reply, self._url)
        return replies

    async def roundtrip_values(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write; their replies in order, server errors as values (I/O errors raise)."""
        return await self._exchange(commands)

    async def _exchange(self, commands: Sequence[Command],
                        first: Callable[[list[Any]], None] | None = None) -> list[Any]:
        """Replies in order, server errors as values. `first` is given the replies of all but the last command as
        soon as they are in: a settlement is confirmed while the blocking read sent behind it still waits."""
        if self._ahead:  # replies to exchanges written earlier come first
            await asyncio.wait(self._ahead)
        if self.broken:
            await self.reset()
        try:
            conn = await self._connection()
            await conn.send_packed_command(pack(commands), check_health=False)
            return await _replies(conn, len(commands), first)
        except (rex.RedisError, OSError) as exc:
            await self.reset()
            raise translate(exc, self._url) from exc

    async def settle_and_read(self, group: str, consumer: str, ids: dict[str, str], count: int, block_ms: int | None,
                   settlement: Settlement | None = None,
                   on_settled: Callable[[Settlement], None] | None = None) -> dict[str, list[RawEntry]]:
        """Settle the previous batch (if any) and XREADGROUP the next one, in one round trip.

        `ids` maps each stream to `>` (new entries) or the last id seen of this consumer's own pending history.
        Returns the entries per stream; streams with nothing to read are absent. `on_settled` is called with the
        settlement once the server confirmed all of it, before a blocking read returns.
        """
        refused: list[Exception] = []
        commands = [*(settlement.commands() if settlement else []), _read_command(group, consumer, ids, count,
                                                                                   block_ms)]
        replies = await self._exchange(commands, _confirming(settlement, refused, on_settled))
        return await self._entries(replies[-1], settlement, refused, on_settled)

    async def settle_and_read_ahead(self, group: str, consumer: str, count: int, streams: Sequence[str],
                         settlement: Settlement | None = None,
                         on_settled: Callable[[Settlement], None] | None = None) -> Ahead:
        """Write `settlement` (if any) and a non-blocking XREADGROUP of new entries now, and return at once: the
        replies are read by a task of their own as soon as they arrive, while the caller handles the batch in hand.
        `Ahead.entries()` gives the batch, as `settle_and_read` would. Exchanges written later wait for these
        replies."""
        refused: list[Exception] = []
        commands = [*(settlement.commands() if settlement else []),
                    _read_command(group, consumer, dict.fromkeys(streams, ">"), count, None)]
        conn = None
        try:
            conn = await self._connection()
            await conn.send_packed_command(pack(commands), check_health=False)
        except (rex.RedisError, OSError) as exc:
            await self.reset()
            raise translate(exc, self._url) from exc
        except AttributeError as exc:
            # redis-py drops a connection whose read failed (here: an earlier read-ahead's reply, read by its task)
            # from under a write in progress on it, which then finds no writer: the connection is lost, like above.
            if conn is None or conn.is_connected:
                raise
            await self.reset()
            raise RedisUnavailable(f"cannot reach the server ({redact_url(self._url)}): the connection was lost "
                                   "while writing a read-ahead") from exc
        previous = self._ahead[-1] if self._ahead else None
        task = asyncio.ensure_future(self._ahead_replies(conn, self._generation, len(commands), previous,
                                                         _confirming(settlement, refused, on_settled)))
        task.add_done_callback(_retrieved)  # an error is raised to whoever takes the batch; if nobody does, no noise
        self._ahead.append(task)
        return Ahead(self, task, settlement, refused, on_settled)

    async def _ahead_replies(self, conn: Any, generation: int, count: int, previous: asyncio.Future[Any] | None,
                             first: Callable[[list[Any]], None]) -> list[Any]:
        try:
            if previous is not None:
                await asyncio.wait([previous])
            if generation != self._generation or self.broken:
                raise RedisUnavailable("the connection was lost before a read-ahead's reply came")
            return await _replies(conn, count, first)
        except (rex.RedisError, OSError) as exc:
            # Only the channel's owner drops the connection (its next call does): dropping it here, while the
            # owner may be writing the next read on it, would pull the socket from under that write.
            if generation == self._generation:
                self.broken = True
            raise translate(exc, self._url) from exc
        finally:
            if self._ahead and self._ahead[0] is asyncio.current_task():
                self._ahead.popleft()

    async def _entries(self, reply: Any, settlement: Settlement | None, refused: list[Exception],
                       on_settled: Callable[[Settlement], None] | None) -> dict[str, list[RawEntry]]:
        """The entries of a read's reply, once the settlement sent before it is confirmed: raises SettleRefused if
        the server refused a step of it (the entries just read then stay pending), or the read's own error."""
        if settlement is not None and refused:
            if _uncached(refused):
                refused[:] = await self._with_script_text(settlement)
                if not refused and on_settled is not None:
                    on_settled(settlement)
            raise_refused(settlement, refused, self._url)
        elif settlement is not None:
            _log_skipped(settlement)
        if isinstance(reply, Exception):
            raise translate(reply, self._url)
        return _stream_entries(reply)

    async def settle(self, settlement: Settlement) -> None:
        """Write a settlement on its own (the last batch before stopping, or a reclaimed batch)."""
        if settlement and not settlement.done:
            errors = settlement.confirm(await self._exchange(settlement.commands()))
            if _uncached(errors):
                errors = await self._with_script_text(settlement)
            raise_refused(settlement, errors, self._url)

    async def _with_script_text(self, settlement: Settlement) -> list[Exception]:
        """Send the steps refused for an empty script cache again, with their scripts' text; the server's refusals."""
        settlement.with_script_text()
        return settlement.confirm(await self._exchange(settlement.commands()))

    async def script(self, command: Command) -> Any:
        """The reply of a script call (an EVALSHA from `fastworker.settlement.script_call`), sent again with the
        script's text if the server's script cache did not know it."""
        reply = (await self._exchange([command]))[0]
        if isinstance(reply, rex.NoScriptError):
            reply = (await self._exchange([with_text(command)]))[0]
        if isinstance(reply, Exception):
            raise translate(reply, self._url)
        return reply

    async def autoclaim(self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str,
                        count: int) -> tuple[str, list[RawEntry], list[str]]:
        """One XAUTOCLAIM step: (next cursor, claimed entries, ids deleted while pending)."""
        reply = (await self.roundtrip([("XAUTOCLAIM", stream, group, consumer, min_idle_ms, cursor,
                                        "COUNT", count)]))[0]
        deleted = [text(i) for i in reply[2]] if len(reply) > 2 else []
        return text(reply[0]), reply[1], deleted

    async def pending_idle(self, stream: str, group: str, min_idle_ms: int, start: str, count: int,
                           consumer: str | None = None) -> list[tuple[bytes, str, int]]:
        """Pending entries idle at least `min_idle_ms`, from id `start` on (XPENDING ... IDLE): (raw id, owner,
        deliveries) each, at most `count`, optionally of one consumer only."""
        rows = (await self.roundtrip([("XPENDING", stream, group, "IDLE", min_idle_ms, start, "+", count,
                                       *((consumer,) if consumer else ()))]))[0]
        return [(row[0], text(row[1]), int(row[3])) for row in rows]

    async def claim(self, stream: str, group: str, consumer: str, min_idle_ms: int, ids: Sequence[str | bytes],
                    settlement: Settlement | None = None) -> list[RawEntry]:
        """Settle `settlement` (if any), then XCLAIM `ids` still idle at least `min_idle_ms` into `consumer`, in one
        round trip. Returns the claimed entries (a delivery counted for each); ids that were deleted from the stream
        meanwhile are dropped from the PEL by the server and missing from the reply, like those claimed elsewhere."""
        settle = settlement.commands() if settlement else []
        replies = await self._exchange([*settle, ("XCLAIM", stream, group, consumer, min_idle_ms, *ids)])
        if settlement is not None:
            errors = settlement.confirm(replies[:-1])
            if _uncached(errors):
                errors = await self._with_script_text(settlement)
            raise_refused(settlement, errors, self._url)
        if isinstance(replies[-1], Exception):
            raise translate(replies[-1], self._url)
        return [entry for entry in replies[-1] if entry]

    async def take_due(self, stream: str, group: str, claimer: str, count: int
                       ) -> tuple[list[RawEntry], dict[str, int], list[str], float | None]:
        """Claim up to `count` retries of `stream` that are due into `claimer` (TAKE_DUE_SCRIPT): (entries, their
        delivery counts by id, ids deleted while parked, seconds until the next retry is due or None)."""
        reply = await self.script(script_call(TAKE_DUE_SCRIPT, [stream, retry_key(stream, group)],
                                              [group, RETRY_CONSUMER, claimer, count]))
        entries, counts, gone, wait = reply
        deliveries = {text(entry[0]): int(n) for entry, n in zip(entries, counts, strict=True)}
        return entries, deliveries, [text(i) for i in gone], (None if int(wait) < 0 else int(wait) / 1000)

    async def consumers(self, stream: str, group: str) -> list[tuple[str, int]]:
        """(name, pending count) of every consumer of `group` (XINFO CONSUMERS)."""
        rows = (await self.roundtrip([("XINFO", "CONSUMERS", stream, group)]))[0]
        found = []
        for row in rows:
            info = row if isinstance(row, dict) else dict(zip(row[::2], row[1::2], strict=True))
            found.append((text(info[b"name"]), int(info[b"pending"])))
        return found

    async def unscheduled(self, stream: str, group: str, ids: Sequence[str | bytes]) -> list[str | bytes]:
        """Which of `ids` have no due time in the group's retry set (ZMSCORE)."""
        scores = (await self.roundtrip([("ZMSCORE", retry_key(stream, group), *ids)]))[0]
        return [entry_id for entry_id, score in zip(ids, scores, strict=True) if score is None]

    async def existing(self, stream: str, ids: Sequence[str | bytes]) -> set[str]:
        """Which of `ids` are still in the stream (one XRANGE per id, in one round trip)."""
        replies = await self.roundtrip([("XRANGE", stream, entry_id, entry_id) for entry_id in ids])
        return {text(entry_id) for entry_id, reply in zip(ids, replies, strict=True) if reply}

    async def set_deliveries(self, stream: str, group: str, consumer: str, counts: Mapping[str, int]) -> None:
        """Set the delivery counts of entries pending for `consumer` (XCLAIM ... JUSTID RETRYCOUNT, one command
        per distinct count, in one round trip): for a re-read that was not a new attempt."""
        by_count: dict[int, list[str]] = {}
        for entry_id, count in counts.items():
            by_count.setdefault(count, []).append(entry_id)
        await self.roundtrip([("XCLAIM", stream, group, consumer, 0, *ids, "RETRYCOUNT", count, "JUSTID")
                              for count, ids in by_count.items()])

    async def deliveries(self, stream: str, group: str, consumer: str, entries: Sequence[RawEntry]) -> dict[str, int]:
        """Delivery counts of `entries`, pending for `consumer` (XPENDING extended form over their id range).

        The range may hold other pending entries of the same consumer (earlier retries): pages on until every id
        is found, so a count is never missed and taken for a first delivery. Usually one round trip.
        """
        wanted = {text(entry[0]) for entry in entries}
        counts: dict[str, int] = {}
        start, last = text(entries[0][0]), text(entries[-1][0])
        while not wanted <= counts.keys():
            rows = (await self.roundtrip([("XPENDING", stream, group, start, last, len(entries), consumer)]))[0]
            counts.update((text(row[0]), int(row[3])) for row in rows)
            if len(rows) < len(entries):
                break  # the range is exhausted: the rest were settled or claimed meanwhile
            start = "(" + text(rows[-1][0])
        return counts

    async def reset(self) -> None:
        """Drop the connection (after an error, or to abandon a blocked read), and the replies of read-aheads still
        to come with it; the next call reconnects."""
        self.client_id = None
        self._generation += 1
        self.broken = False
        while self._ahead:
            waiting = self._ahead.popleft()
            if waiting is not asyncio.current_task():
                waiting.cancel()
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        self._generation += 1
        while self._ahead:
            self._ahead.popleft().cancel()
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
            await self._pool.release(self._conn)
            self._conn = None


class Ahead:
    """A settlement and a read written before the batch in hand was handled (`Channel.settle_and_read_ahead`)."""

    __slots__ = ("_channel", "_on_settled", "_refused", "sent_at", "settlement", "task")

    def __init__(self, channel: Channel, task: asyncio.Task[list[Any]], settlement: Settlement | None,
                 refused: list[Exception], on_settled: Callable[[Settlement], None] | None) -> None:
        self._channel = channel
        self.task = task
        self.settlement = settlement  # written with the read: its fate is the read's
        self._refused = refused
        self._on_settled = on_settled
        self.sent_at = time.monotonic()  # when the read was written: its entries' idle time runs from about then

    def delivered(self) -> dict[str, list[str | bytes]]:
        """The ids of the entries the read delivered, by stream, once its reply is in (else empty): entries this
        consumer holds although it has not started them, to keep claimed while a long batch is handled."""
        if not self.task.done() or self.task.cancelled() or self.task.exception() is not None:
            return {}
        return {stream: [entry[0] for entry in entries]
                for stream, entries in _stream_entries(self.task.result()[-1]).items()}

    async def entries(self) -> dict[str, list[RawEntry]]:
        """The batch the read brought, as `Channel.settle_and_read` gives it, and raising as it would;
        RedisUnavailable if the connection was dropped before its reply came (by an error elsewhere on the channel)."""
        await asyncio.wait([self.task])  # the caller's own cancellation still propagates; the task's does not
        if self.task.cancelled():
            raise RedisUnavailable("the connection was dropped before a read-ahead's reply came")
        replies = self.task.result()
        return await self._channel._entries(replies[-1], self.settlement, self._refused, self._on_settled)

    def cancel(self) -> None:
        self.task.cancel()


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _replies(conn: Any, count: int, first: Callable[[list[Any]], None] | None) -> list[Any]:
    replies: list[Any] = []
    for index in range(count):
        if first is not None and index == count - 1:
            first(replies)
        try:
            replies.append(await conn.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


def _read_command(group: str, consumer: str, ids: Mapping[str, str], count: int, block_ms: int | None) -> Command:
    return ("XREADGROUP", "GROUP", group, consumer, "COUNT", count,
            *(("BLOCK", block_ms) if block_ms is not None else ()), "STREAMS", *ids, *ids.values())


def _confirming(settlement: Settlement | None, refused: list[Exception],
                on_settled: Callable[[Settlement], None] | None) -> Callable[[list[Any]], None]:
    """The callback that confirms `settlement` from the replies before a read's (collecting refusals in `refused`)."""
    def confirm(replies: list[Any]) -> None:
        if settlement is not None:
            refused.extend(settlement.confirm(replies))
            if not refused and on_settled is not None:
                on_settled(settlement)
    return confirm


def _stream_entries(reply: Any) -> dict[str, list[RawEntry]]:
    if not reply:
        return {}
    if isinstance(reply, dict):  # RESP3
        return {text(stream): entries for stream, entries in reply.items() if entries}
    return {text(stream): entries for stream, entries in reply if entries}  # RESP2


class Recorder:
    """Writes idempotency records as soon as they are asked for, many to a round trip, on a connection of its own.

    `record()` queues a SET and returns a future; the queue is flushed on the loop's next turn, and every record
    that arrives while a flush is in flight goes with the next one. A handler call's record is thus on the wire
    within microseconds of the call returning, without a round trip per call.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._queue: list[tuple[Command, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    def record(self, key: str, value: bytes, ttl_s: float) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((("SET", key, value, "PX", max(1, int(ttl_s * 1000))), done))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())
        return done

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                replies = await self.channel.roundtrip_values([command for command, _ in batch])
            except FastworkerError as exc:
                replies = [exc] * len(batch)
            for (_, done), reply in zip(batch, replies, strict=True):
                if done.done():
                    continue
                if isinstance(reply, Exception):
                    done.set_exception(translate(reply))
                else:
                    done.set_result(None)

    async def aclose(self) -> None:
        await self.channel.aclose()


class Streams:
    """Connections to one server: an admin client for occasional commands and dedicated channels for loops."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.redis_url
        # Retries are ours (backoff with jitter in the loops): redis-py's own would hide an outage for ~15 s.
        self.redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=min(settings.socket_timeout_s, 5.0),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    def channel(self) -> Channel:
        return Channel(self.redis.connection_pool, self.url)

    async def ping(self) -> float:
        """Round-trip time of a PING in seconds; raises RedisUnavailable or RedisAuthError."""
        with translated(self.url):
            started = time.perf_counter()
            await self.redis.ping()
            return time.perf_counter() - started

    async def server_version(self) -> tuple[str, str]:
        """(server name, version), e.g. ("valkey", "9.1.2")."""
        with translated(self.url):
            info = await self.redis.info("server")
        if "valkey_version" in info:
            return "valkey", str(info["valkey_version"])
        return str(info.get("server_name") or "redis"), str(info.get("redis_version", "?"))

    async def xackdel_refusal(self, stream: str) -> str | None:
        """Why XACKDEL (Redis 8.2+) cannot ack `stream`'s entries for this user, or None when it can.

        Tried, not looked up: on `stream` with a group name nobody uses (the reply is [-1]: nothing is acked or
        deleted), so one call answers both whether the server has the command and whether the user may run it.
        Any refusal (unknown command, NOPERM) is the reason, as the server worded it."""
        with translated(self.url):
            try:
                await self.redis.xackdel(stream, "fastworker-xackdel-probe", "0-1", ref_policy="ACKED")
            except rex.ResponseError as exc:  # NoPermissionError is one
                return str(exc).strip() or type(exc).__name__
        return None

    async def ensure_groups(self, pairs: Iterable[tuple[str, str]], start_id: str) -> list[tuple[str, str]]:
        """Create every missing (stream, group), with its stream if needed; return those that were created."""
        created = []
        with translated(self.url):
            for stream, group in pairs:
                try:
                    await self.redis.xgroup_create(stream, group, id=start_id, mkstream=True)
                    created.append((stream, group))
                except rex.ResponseError as exc:
                    if not is_busy_group(exc):
                        raise
        return created

    async def keep_claimed(self, group: str, consumer: str, ids: Mapping[str, Sequence[str | bytes]]) -> None:
        """Reset the idle time of entries still being handled or settled (XCLAIM ... JUSTID to their own consumer,
        which does not count a delivery), so that no reclaimer takes live work."""
        with translated(self.url):
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, entry_ids in ids.items():
                    if entry_ids:
                        pipe.xclaim(stream, group, consumer, 0, list(entry_ids), justid=True)
                await pipe.execute()

    async def done_marks(self, keys: Sequence[str]) -> list[bytes | None]:
        """The idempotency records of `keys` (None where there is none), in one round trip."""
        with translated(self.url):
            values = await self.redis.mget(keys)
        return [value.encode() if isinstance(value, str) else value for value in values]

    def recorder(self) -> Recorder:
        return Recorder(self.channel())

    async def unblock(self, client_id: int | None) -> None:
        """Make a blocked XREADGROUP of another channel return now, as if its BLOCK had run out."""
        if client_id is None:
            return
        try:
            await self.redis.client_unblock(client_id)
        except (rex.RedisError, OSError) as exc:  # best effort: the read also ends after block_ms
            logger.debug("CLIENT UNBLOCK %s failed: %s", client_id, exc)

    async def aclose(self) -> None:
        await self.redis.aclose()
