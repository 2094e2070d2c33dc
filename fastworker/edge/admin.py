"""The admin client: the occasional commands of the operating tools, the permission check and the demo, with plain
Python values in and out and fastworker's errors raised.

It uses the connection pool of a `Streams` (one pool per process): each call borrows a connection for its round
trip. Entry ids, names and types come back as str; entry fields stay bytes (values need not be UTF-8); counts are
int and times milliseconds. Where a method says so, a stream or group that does not exist is an answer (None or
empty), so no caller has to read the server's error text; any other failure raises fastworker's errors
(RedisUnavailable, RedisAuthError, RedisCommandError, ...), translated here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis
import redis.exceptions as rex

from fastworker.edge.errors import is_missing_key, is_no_group, translate, translated
from fastworker.edge.streams import Streams
from fastworker.message import FieldValue, text

Fields = dict[bytes, bytes]
Entry = tuple[str, Fields]  # (entry id, fields)
# What `Admin.move_entry` asks its caller: given the entry's fields (None: no such entry), where to add what, or why
# not to move it.
MoveTarget = Callable[[Fields | None], tuple[str, Mapping[bytes, bytes]] | str]
ScriptCall = Callable[[Sequence[str], Sequence[FieldValue]], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class GroupRow:
    """One consumer group, as XINFO GROUPS gives it."""

    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    entries_read: int | None  # None before Redis 7
    lag: int | None  # None when the server cannot tell (after an XDEL of an entry the group has not read)


@dataclasses.dataclass(frozen=True)
class ConsumerRow:
    """One consumer of a group, as XINFO CONSUMERS gives it."""

    name: str
    pending: int
    idle_ms: int  # since its last attempted interaction


@dataclasses.dataclass(frozen=True)
class PendingEntry:
    """One pending entry, as the extended XPENDING form gives it."""

    id: str
    consumer: str
    idle_ms: int  # since it was last delivered
    deliveries: int


@dataclasses.dataclass(frozen=True)
class PendingSummary:
    """The summary form of XPENDING: how many entries are pending, and the smallest and greatest of their ids."""

    count: int
    min_id: str | None
    max_id: str | None


@dataclasses.dataclass(frozen=True)
class StreamOverview:
    """A stream's facts and the server's clock, read in one round trip (`Admin.overview`)."""

    now_ms: int  # the server's clock
    exists: bool  # False: no such key, or a key of another type (the rest is then zero or empty)
    length: int
    first_id: str | None
    last_id: str | None
    entries_added: int | None  # every entry ever added (Redis 7+)
    memory_bytes: int | None  # None when MEMORY USAGE failed
    groups: list[GroupRow]
    dead_letters: int | None  # length of the dead-letter stream asked about; None when not asked or it failed


@dataclasses.dataclass(frozen=True)
class StreamSize:
    length: int
    memory_bytes: int | None
    first_id: str | None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _group_row(info: Mapping[str, Any]) -> GroupRow:
    return GroupRow(text(info["name"]), int(info.get("consumers") or 0), int(info["pending"]),
                    text(info["last-delivered-id"]), _int_or_none(info.get("entries-read")),
                    _int_or_none(info.get("lag")))


def _consumer_row(info: Mapping[str, Any]) -> ConsumerRow:
    return ConsumerRow(text(info["name"]), int(info["pending"]), int(info["idle"]))


def _entries(reply: Any) -> list[Entry]:
    return [(text(entry_id), fields or {}) for entry_id, fields in reply or []]


def _entry_id(entry: Any) -> str | None:
    return text(entry[0]) if entry else None


def _fields(fields: Mapping[bytes, bytes]) -> dict[Any, Any]:
    """Fields as redis-py's xadd takes them (its annotation names every encodable type, not bytes alone)."""
    return dict(fields)


def _ms(reply: Any) -> int:
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


class Admin:
    """`Admin(streams)`: the occasional commands on the pool `streams` holds. Cheap to make; holds no connection."""

    def __init__(self, streams: Streams) -> None:
        self._redis = streams.redis
        self.url = streams.url

    @property
    def user(self) -> str:
        """The ACL user the pool logs in as ("default" when the URL names none)."""
        return str(self._redis.connection_pool.connection_kwargs.get("username") or "default")

    async def command(self, *args: FieldValue) -> Any:
        """One command as given (`"XADD", stream, ...`); its reply as the server sent it (bytes, ints, lists)."""
        with translated(self.url):
            return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]

    def script(self, source: str) -> ScriptCall:
        """A Lua script, sent by its SHA (loaded once when the server lacks it): `await call(keys, args)` gives its
        reply as the server sent it."""
        registered = self._redis.register_script(source)

        async def call(keys: Sequence[str], args: Sequence[FieldValue]) -> Any:
            with translated(self.url):
                return await registered(keys=list(keys), args=list(args))

        return call

    async def server_time_ms(self) -> int:
        """The server's clock in milliseconds (entry ids are stamped with it)."""
        with translated(self.url):
            return _ms(await self._redis.time())

    async def key_type(self, key: str) -> str:
        """TYPE: "stream", "hash", ..., or "none" when there is no such key."""
        with translated(self.url):
            return text(await self._redis.type(key))

    async def command_docs(self, command: str) -> object:
        """COMMAND DOCS of one command: nested maps and lists of bytes (RESP2 or RESP3 shapes)."""
        return await self.command("COMMAND DOCS", command)  # one name, so redis-py applies no reply callback

    async def scan_streams(self, match: str | None = None) -> list[str]:
        """Every stream key on the server (SCAN TYPE stream, optionally MATCH a glob), sorted."""
        with translated(self.url):
            names = {text(key) async for key in self._redis.scan_iter(match=match, count=1000, _type="stream")}
        return sorted(names)

    # --- entries ----------------------------------------------------------------------------------------------

    async def length(self, stream: str) -> int:
        """XLEN: entries in the stream (0 when it does not exist)."""
        with translated(self.url):
            return int(await self._redis.xlen(stream))

    async def entries(self, stream: str, start: str = "-", end: str = "+", count: int | None = None, *,
                      reverse: bool = False) -> list[Entry]:
        """XRANGE `start` `end` (ids, `-`, `+`, `(id` for exclusive), at most `count`, oldest first; with `reverse`,
        XREVRANGE from `start` (the greater id, `+`) down to `end`. Empty when the stream does not exist."""
        with translated(self.url):
            if reverse:
                return _entries(await self._redis.xrevrange(stream, start, end, count=count))
            return _entries(await self._redis.xrange(stream, start, end, count=count))

    async def add_entries(self, stream: str, entries: Sequence[Mapping[bytes, bytes]]) -> list[str]:
        """XADD each of `entries` (its fields) to `stream`, in order, in one pipelined round trip; their new ids.
        Raises on the first refused one (those before it are added)."""
        with translated(self.url):
            async with self._redis.pipeline(transaction=False) as pipe:
                for fields in entries:
                    pipe.xadd(stream, _fields(fields))
                return [text(entry_id) for entry_id in await pipe.execute()]

    async def delete_entries(self, stream: str, ids: Sequence[str]) -> int:
        """XDEL `ids` (one command); how many existed and were deleted."""
        with translated(self.url):
            return int(await self._redis.xdel(stream, *ids))

    async def move_entry(self, stream: str, entry_id: str, target: MoveTarget,
                         attempts: int) -> tuple[str, str] | str | None:
        """Move one entry of `stream` to the stream `target` names, atomically: the XADD there and the XDEL here in
        one MULTI/EXEC under WATCH of `stream`, the entry read after the WATCH, so that two callers moving the same
        entry cannot both add it. `target` gets the entry's fields (None: no such entry) and returns (destination,
        fields to add) or the reason not to move it; it runs again when `stream` changed meanwhile.

        Returns (destination, new entry id), `target`'s reason, or None when `stream` changed on every one of
        `attempts` tries. Writes: one XADD and one XDEL.
        """
        with translated(self.url):
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(attempts):
                    try:
                        await pipe.watch(stream)
                        found = _entries(await pipe.xrange(stream, entry_id, entry_id))
                        decision = target(found[0][1] if found else None)
                        if isinstance(decision, str):
                            return decision
                        destination, fields = decision
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.xadd(destination, _fields(fields))
                        pipe.xdel(stream, entry_id)
                        new_id, _ = await pipe.execute()
                        return destination, text(new_id)
                    except rex.WatchError:
                        continue  # the stream changed between the WATCH and the EXEC: read again
        return None

    async def size(self, stream: str) -> StreamSize:
        """Length, memory usage (bytes) and first entry id of `stream`, in one round trip."""
        with translated(self.url):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(stream)
                pipe.memory_usage(stream)
                pipe.xrange(stream, "-", "+", count=1)
                length, memory, first = await pipe.execute()
        return StreamSize(int(length), _int_or_none(memory), _entry_id(first[0]) if first else None)

    async def trim_below(self, stream: str, minid: str, *, acked: bool = False) -> int:
        """XTRIM MINID = `minid` (exact), with ACKED when asked (Redis 8.2+: the server keeps entries some group has
        not acknowledged); how many entries were removed."""
        return int(await self.command("XTRIM", stream, "MINID", "=", minid, *(("ACKED",) if acked else ())))

    # --- groups and consumers -----------------------------------------------------------------------------------

    async def groups(self, stream: str) -> list[GroupRow] | None:
        """XINFO GROUPS of `stream`; None when the stream does not exist."""
        with translated(self.url):
            try:
                return [_group_row(info) for info in await self._redis.xinfo_groups(stream)]
            except rex.ResponseError as exc:
                if is_missing_key(exc):
                    return None
                raise

    async def consumers(self, stream: str, group: str) -> list[ConsumerRow] | None:
        """XINFO CONSUMERS of `group`; None when the stream or the group does not exist."""
        with translated(self.url):
            try:
                return [_consumer_row(info) for info in await self._redis.xinfo_consumers(stream, group)]
            except rex.ResponseError as exc:
                if is_no_group(exc) or is_missing_key(exc):
                    return None
                raise

    async def pending_summary(self, stream: str, group: str) -> PendingSummary | None:
        """XPENDING `stream` `group` (the summary form); None when the stream or the group does not exist."""
        with translated(self.url):
            try:
                summary = await self._redis.xpending(stream, group)
            except rex.ResponseError as exc:
                if is_no_group(exc) or is_missing_key(exc):
                    return None
                raise
        low, high = summary.get("min"), summary.get("max")
        return PendingSummary(int(summary["pending"]), None if low is None else text(low),
                              None if high is None else text(high))

    async def set_group_cursor(self, stream: str, group: str, entry_id: str) -> None:
        """XGROUP SETID: the group's next read returns the entries after `entry_id` (`$`: only new ones)."""
        with translated(self.url):
            await self._redis.xgroup_setid(stream, group, entry_id)

    async def overview(self, stream: str, dead_stream: str | None = None) -> StreamOverview:
        """The stream's type, XINFO STREAM and GROUPS, memory usage, the server's clock and the length of
        `dead_stream`, in one round trip. A stream deleted meanwhile (or a key of another type) is `exists=False`."""
        with translated(self.url):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.type(stream)
                pipe.xinfo_stream(stream)
                pipe.xinfo_groups(stream)
                pipe.memory_usage(stream)
                pipe.time()
                if dead_stream is not None:
                    pipe.xlen(dead_stream)
                replies = await pipe.execute(raise_on_error=False)
        kind, info, groups, memory, now = replies[:5]
        dead = None if dead_stream is None or isinstance(replies[5], Exception) else int(replies[5])
        now_ms = _ms(self._value(now))
        if self._gone(kind) or text(kind) != "stream" or self._gone(info) or self._gone(groups):
            return StreamOverview(now_ms, False, 0, None, None, None, None, [], dead)
        return StreamOverview(now_ms, True, int(info["length"]), _entry_id(info.get("first-entry")),
                              _entry_id(info.get("last-entry")), _int_or_none(info.get("entries-added")),
                              None if isinstance(memory, Exception) else _int_or_none(memory),
                              [_group_row(group) for group in groups], dead)

    async def group_details(self, stream: str, groups: Sequence[str]
                            ) -> dict[str, tuple[list[ConsumerRow], PendingEntry | None]]:
        """Per group: its consumers and its oldest pending entry (None when nothing is pending), in one round
        trip. A group deleted meanwhile is left out."""
        if not groups:
            return {}
        with translated(self.url):
            async with self._redis.pipeline(transaction=False) as pipe:
                for group in groups:
                    pipe.xinfo_consumers(stream, group)
                    pipe.xpending_range(stream, group, "-", "+", 1)
                replies = await pipe.execute(raise_on_error=False)
        details = {}
        for index, group in enumerate(groups):
            consumers, oldest = replies[2 * index], replies[2 * index + 1]
            failed = [reply for reply in (consumers, oldest) if isinstance(reply, Exception)]
            if any(is_no_group(reply) for reply in failed):
                continue
            if failed:
                raise translate(failed[0], self.url)
            first = oldest[0] if oldest else None
            details[group] = ([_consumer_row(info) for info in consumers], None if first is None else PendingEntry(
                text(first["message_id"]), text(first["consumer"]), int(first["time_since_delivered"]),
                int(first["times_delivered"])))
        return details

    def _gone(self, reply: Any) -> bool:
        """True when a reply says the key does not exist (deleted since the previous command); raises any other
        error reply."""
        if not isinstance(reply, Exception):
            return False
        if is_missing_key(reply):
            return True
        raise translate(reply, self.url)

    def _value(self, reply: Any) -> Any:
        if isinstance(reply, Exception):
            raise translate(reply, self.url)
        return reply


def server_info(url: str, section: str = "server") -> dict[str, Any]:
    """INFO `section` of the server at `url` as a dict (e.g. "valkey_version": "9.1.2"), on a connection of its own
    that is closed after. Blocking: for a start-up probe outside an event loop (the embedded server's version)."""
    with translated(url), redis.Redis.from_url(url) as client:
        return dict(client.info(section))
