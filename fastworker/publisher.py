"""Publishing: the producer side of a stream, one entry or millions, with the app's conventions.

An entry holds the JSON document in a `data` field (orjson), plus optional flat fields (str, bytes, int or float;
bytes need not be UTF-8). Bulk publishing is pipelined on one dedicated connection: XADDs are written in chunks
(1000 entries or 4 MiB, whichever comes first) and at most `in_flight` chunks are on the wire without their replies,
so memory stays flat however many payloads a generator yields, and entries land in the stream in payload order.

Invariant: a bulk publish publishes a prefix. When a payload cannot be serialised, or the payload iterator raises,
every payload before it is published and confirmed and none after it; the error says how many were published. A
server or connection error stops the publish too and says how many entries were confirmed before it, and how many
were sent without a reply (a timed-out XADD may still have been applied). Redis errors are translated at the I/O
edge (`fastworker.edge`); a key of another type gives `StreamTypeError`.

Partitioned streams (`fastworker.partitions`), a cluster, or `wait_replicas` take the routed path: each chunk's
XADDs are tagged with their partition's slot and exchanged through `edge.cluster.Router`, one pipeline per master,
one chunk on the wire while the next is encoded. Chunks are exchanged one after the other, so one key's entries
reach their partition in payload order; a command is sent again only when the server said it did not run it
(MOVED, ASK, TRYAGAIN, CLUSTERDOWN), never after a lost reply. One partition on one server without WAIT keeps the
single-connection path above, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import orjson
import uvloop

from fastworker.config import Settings
from fastworker.edge.admin import Admin
from fastworker.edge.cluster import Exchange, Node, Routed, Router
from fastworker.edge.errors import is_no_permission, is_wrong_type, translate
from fastworker.edge.link import Link
from fastworker.edge.streams import Streams
from fastworker.edge.wire import argument, head, pack
from fastworker.errors import FastworkerError, RedisAuthError, RedisCommandError
from fastworker.message import DEFAULT_PAYLOAD_FIELD, FieldValue, text
from fastworker.partitions import Partitioning, RoundRobin, key_slot, parse_record
from fastworker.tracing import current_trace_fields

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1000
CHUNK_BYTES = 4 * 1024 * 1024
IN_FLIGHT = 2

Fields = Mapping[str, FieldValue] | Mapping[bytes, FieldValue]
IdsCallback = Callable[[list[str]], object]
ProgressCallback = Callable[[int], object]
KeyValue = str | bytes | int  # what picks a partition: an int as its decimal text, str as UTF-8
# publish_many's `key`: the name of the payload field holding the key, or a function of the payload giving it
KeySource = str | Callable[[Any], KeyValue]
# A count no record holds is read again after this long, so that a stream partitioned while a Publisher lives is
# seen within a second (a recorded count never changes, and is kept).
ABSENT_RECHECK_S = 1.0


FLUSH_AFTER_S = 0.05  # an async source slower than this has what it gave so far sent anyway (publish_stream)


class _Chunks(Protocol):
    """What the feeders fill: `_Encoder` (one stream, one connection) or `_RoutedEncoder` (partitions)."""

    count: int

    def add(self, item: Any) -> bool: ...

    def fill(self, iterator: Iterator[Any]) -> bool: ...

    def take(self) -> tuple[Any, int]: ...


class _Sends(Protocol):
    """What sends the chunks: `_Sender` or `_RoutedSender`, used as an async context manager."""

    confirmed: int
    usable: bool

    async def send(self, chunk: Any, count: int) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...


class PayloadError(FastworkerError):
    """A payload could not be published (not serialisable by orjson, or a field value of an unsupported type).

    `index` is its position among the payloads; `published` how many entries were published before it (all of
    those before it, none after it).
    """

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason
        self.published = 0

    def __str__(self) -> str:
        return (f"payload {self.index} cannot be published: {self.reason}; "
                f"{self.published} entries were published before it, none after it")


class StreamTypeError(RedisCommandError):
    """The key exists and holds another type than a stream (the server said WRONGTYPE)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry with its own flat fields, for bulk publishing: `payload` (JSON in `data`, or None) and `fields`."""

    payload: Any = None
    fields: Fields | None = None
    key: KeyValue | None = None  # picks its partition, before any `key=` given to publish_many


def _value(value: FieldValue | str) -> bytes:
    """A field name or value as the bytes the server stores."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"field values must be str, bytes, int or float, not {type(value).__name__}")


def _flat(fields: Fields | None) -> list[bytes]:
    flat: list[bytes] = []
    for name, value in (fields or {}).items():
        flat += (_value(name), _value(value))
    return flat


def trim_args(maxlen: int | None, minid: str | None, approximate: bool) -> list[bytes]:
    """XADD's trimming arguments; none unless asked for."""
    if maxlen is not None and minid is not None:
        raise ValueError("give maxlen or minid, not both")
    how = b"~" if approximate else b"="
    if maxlen is not None:
        if maxlen < 0:
            raise ValueError(f"maxlen must be >= 0, got {maxlen}")
        return [b"MAXLEN", how, b"%d" % maxlen]
    if minid is not None:
        return [b"MINID", how, minid.encode()]
    return []


class _Encoder:
    """Builds one chunk of XADD commands as RESP bytes.

    With the edge's packer, not redis-py's pack_command (about 1.5 us per entry, a third of the client's time when
    publishing): what every entry shares is packed once per call, so a JSON payload costs one `argument`. Each entry
    is encoded completely before it is added, so a bad payload never leaves half an entry.
    """

    def __init__(self, stream: str, fields: Fields | None, trim: list[bytes], max_count: int, max_bytes: int) -> None:
        self._head = [b"XADD", stream.encode(), *trim, b"*"]
        self._common = _flat(fields) + current_trace_fields()  # the caller's span, once per call: not per entry
        # every JSON payload's command, but for the JSON value that follows
        self._json_prefix = head([*self._head, *self._common, DEFAULT_PAYLOAD_FIELD.encode()], more=1)
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._parts: list[bytes] = []
        self.count = 0
        self.size = 0
        self.index = 0  # position of the next payload among all of them

    def add(self, item: Any) -> bool:
        """Add one payload (a JSON document or an Entry); True when the chunk is full."""
        try:
            if type(item) is Entry:
                command = self._entry(item)
                self._parts.append(command)
                self.size += len(command)
            else:
                data = orjson.dumps(item)
                self._parts += (self._json_prefix, argument(data))
                self.size += len(data)
        except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            raise PayloadError(self.index, str(exc)) from exc
        self.index += 1
        self.count += 1
        return self.count >= self._max_count or self.size >= self._max_bytes

    def _entry(self, entry: Entry) -> bytes:
        extra = _flat(entry.fields)
        if entry.payload is not None:
            extra += [DEFAULT_PAYLOAD_FIELD.encode(), orjson.dumps(entry.payload)]
        if not extra and not self._common:
            raise ValueError("an entry needs a payload or at least one field")
        return pack([(*self._head, *self._common, *extra)])

    def fill(self, iterator: Iterator[Any]) -> bool:
        """Add payloads until the chunk is full (True) or the iterator is exhausted (False)."""
        add = self.add
        return any(add(item) for item in iterator)

    def take(self) -> tuple[bytes, int]:
        """The chunk's bytes and entry count; the encoder starts a new chunk."""
        chunk, count = b"".join(self._parts), self.count
        self._parts, self.count, self.size = [], 0, 0
        return chunk, count


class _Sender:
    """Writes chunks on one dedicated connection (a Link), keeping at most `depth` of them unconfirmed."""

    def __init__(self, streams: Streams, stream: str, depth: int, on_ids: IdsCallback | None,
                 on_progress: ProgressCallback | None) -> None:
        self._streams = streams
        self._stream = stream
        self._depth = depth
        self._on_ids = on_ids
        self._on_progress = on_progress
        self._link = Link(streams)
        self._unconfirmed: deque[int] = deque()
        self.confirmed = 0
        self.usable = True

    async def __aenter__(self) -> _Sender:
        await self._link.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            # After a bad payload or a failing iterator, what was sent is still confirmed (and counted).
            if self.usable and (exc_type is None or issubclass(exc_type, Exception)):
                await self.drain()
        finally:
            # Replies still due on this connection would be read by its next user: drop it instead.
            await self._link.aclose(discard=bool(self._unconfirmed) or not self.usable)

    async def send(self, chunk: bytes, count: int) -> None:
        if not count:
            return
        try:
            await self._link.send(chunk)
        except FastworkerError as exc:
            self._unconfirmed.append(count)  # part of it may have reached the server
            raise self._failed(exc) from exc
        self._unconfirmed.append(count)
        while len(self._unconfirmed) >= self._depth:
            await self._confirm()

    async def drain(self) -> None:
        while self._unconfirmed:
            await self._confirm()

    async def _confirm(self) -> None:
        try:
            replies = await self._link.replies(self._unconfirmed[0])
        except FastworkerError as exc:
            raise self._failed(exc) from exc
        self._unconfirmed.popleft()
        ids = [reply for reply in replies if type(reply) is bytes]
        self.confirmed += len(ids)
        if self._on_ids is not None:
            self._on_ids([entry_id.decode() for entry_id in ids])
        if self._on_progress is not None:
            self._on_progress(self.confirmed)
        if len(ids) < len(replies):
            error = next(reply for reply in replies if type(reply) is not bytes)
            await self._server_error(error)

    async def _server_error(self, error: Any) -> None:
        """Read what is still due (those entries may be published too), then raise the first error."""
        self.usable = False
        while self._unconfirmed:
            try:
                replies = await self._link.replies(self._unconfirmed[0])
            except FastworkerError:
                break
            self._unconfirmed.popleft()
            self.confirmed += sum(type(reply) is bytes for reply in replies)
        if not isinstance(error, Exception):
            error = RedisCommandError(f"unexpected reply to XADD: {error!r}")
        raise await explain(self._streams, self._stream, error, self.confirmed)

    def _failed(self, exc: BaseException) -> FastworkerError:
        self.usable = False
        error = translate(exc, self._streams.url)
        unconfirmed = sum(self._unconfirmed)
        return type(error)(f"{error}; {self.confirmed} entries were confirmed, {unconfirmed} more were sent "
                           "without a reply (they may have been applied)")


class ReplicationError(RedisCommandError):
    """Fewer replicas acknowledged a chunk's writes than `wait_replicas` asked for within its timeout: the entries
    are on their master, but a failover before they reach a replica would lose them. `confirmed`: entries
    confirmed with the replicas asked for; `unreplicated`: entries written without that acknowledgement."""

    def __init__(self, message: str, confirmed: int, unreplicated: int) -> None:
        super().__init__(message)
        self.confirmed = confirmed
        self.unreplicated = unreplicated


def _key_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    raise TypeError(f"a partition key must be a str, bytes or int, not {type(value).__name__}")


def _field_value(item: Any, name: str) -> Any:
    """The value of the field `name` of a payload: an Entry's flat field, else its (or the payload's) JSON member."""
    if type(item) is Entry:
        fields: Mapping[Any, Any] = item.fields or {}
        for candidate in (name, name.encode()):
            if candidate in fields:
                return fields[candidate]
        item = item.payload
    if isinstance(item, Mapping) and name in item:
        return item[name]
    raise ValueError(f"it has no field {name!r} to pick its partition by")


class _Placement:
    """Which partition of `parts` each payload goes to: its Entry's own `key`, else the key `source` gives
    (`key_slot(key) % count`), else the next of `rotation` (round-robin)."""

    CACHE_SIZE = 65536  # keys remembered with their partition: a shop's key is hashed once, not per job

    def __init__(self, parts: Partitioning, source: KeySource | None, rotation: RoundRobin) -> None:
        self.parts = parts
        self._source = source
        self._rotation = rotation
        self._known: dict[Any, int] = {}

    def index(self, item: Any) -> int:
        count = self.parts.count
        if count == 1:
            return 0
        source = self._source
        if type(item) is Entry and item.key is not None:
            value: Any = item.key
        elif source is None:
            return next(self._rotation)
        elif type(source) is str:
            value = item[source] if type(item) is dict and source in item else _field_value(item, source)
        else:
            value = source(item)  # type: ignore[operator]
        kind = type(value)
        if kind is not str and kind is not int and kind is not bytes:  # 1.0 == 1, True == 1: never from the cache
            return key_slot(_key_bytes(value)) % count
        known = self._known.get(value)
        if known is None:
            known = key_slot(_key_bytes(value)) % count
            if len(self._known) >= self.CACHE_SIZE:
                self._known.clear()
            self._known[value] = known
        return known


class _RoutedEncoder:
    """Builds chunks of XADDs to the partitions of a logical stream: each command packed for its partition's key
    and tagged with that key's slot, for the router to group by master. Same chunk bounds and prefix rule as
    `_Encoder`; a payload whose key cannot be read is a PayloadError, like one that cannot be serialised."""

    def __init__(self, placement: _Placement, fields: Fields | None, trim: list[bytes], max_count: int,
                 max_bytes: int) -> None:
        keys = placement.parts.keys
        common = _flat(fields) + current_trace_fields()
        self._placement = placement
        self._heads = [[b"XADD", key.encode(), *trim, b"*", *common] for key in keys]
        self._prefixes = [head([*cmd, DEFAULT_PAYLOAD_FIELD.encode()], more=1) for cmd in self._heads]
        self._slots = [key_slot(key) for key in keys]
        self.keys_by_slot = dict(zip(self._slots, keys, strict=True))
        self._has_common = bool(common)
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._commands: list[Routed] = []
        self.count = 0
        self.size = 0
        self.index = 0

    def add(self, item: Any) -> bool:
        """Add one payload (a JSON document or an Entry); True when the chunk is full."""
        try:
            partition = self._placement.index(item)
            if type(item) is Entry:
                command = self._entry(item, partition)
            else:
                data = orjson.dumps(item)  # one format: the command's head, then the JSON as its last argument
                command = b"%b$%d\r\n%b\r\n" % (self._prefixes[partition], len(data), data)
        except (TypeError, ValueError) as exc:
            raise PayloadError(self.index, str(exc)) from exc
        self._commands.append((self._slots[partition], command))
        self.index += 1
        self.count += 1
        self.size += len(command)
        return self.count >= self._max_count or self.size >= self._max_bytes

    def _entry(self, entry: Entry, partition: int) -> bytes:
        extra = _flat(entry.fields)
        if entry.payload is not None:
            extra += [DEFAULT_PAYLOAD_FIELD.encode(), orjson.dumps(entry.payload)]
        if not extra and not self._has_common:
            raise ValueError("an entry needs a payload or at least one field")
        return pack([(*self._heads[partition], *extra)])

    def fill(self, iterator: Iterator[Any]) -> bool:
        add = self.add
        return any(add(item) for item in iterator)

    def take(self) -> tuple[list[Routed], int]:
        commands, count = self._commands, self.count
        self._commands, self.count, self.size = [], 0, 0
        return commands, count


def _tally(chunk: list[Routed], result: Exchange, short: Mapping[Node, Any]
           ) -> tuple[list[str], list[tuple[int, Exception]], int]:
    """A chunk's outcome: the new entry ids (in payload order) of entries confirmed, the (slot, error) of those the
    server refused, and how many were written on a master whose WAIT fell short."""
    replies = result.replies
    if not short:
        ids = [reply.decode() for reply in replies if type(reply) is bytes]
        if len(ids) == len(replies):
            return ids, [], 0
    ids, errors, unreplicated = [], [], 0
    for (slot, _), reply, node in zip(chunk, replies, result.nodes, strict=True):
        if type(reply) is bytes:
            if node in short:
                unreplicated += 1
            else:
                ids.append(reply.decode())
        elif isinstance(reply, Exception):
            errors.append((slot, reply))
    return ids, errors, unreplicated


class _RoutedSender:
    """Sends chunks through a Router: each chunk one pipeline per master, concurrently, with redirections handled
    (edge.cluster). One chunk is on the wire while the next is encoded; chunks are exchanged one after the other,
    so the entries of one partition reach it in payload order. `wait_replicas` adds WAIT after each master's
    share of a chunk."""

    def __init__(self, router: Router, stream: str, keys_by_slot: Mapping[int, str], on_ids: IdsCallback | None,
                 on_progress: ProgressCallback | None, wait_replicas: tuple[int, int] | None) -> None:
        self._router = router
        self._stream = stream
        self._keys_by_slot = keys_by_slot
        self._on_ids = on_ids
        self._on_progress = on_progress
        self._wait = wait_replicas
        self._trailer = None if wait_replicas is None else pack([("WAIT", *wait_replicas)])
        self._links = router.links()
        self._pending: asyncio.Task[None] | None = None
        self.confirmed = 0
        self.usable = True

    async def __aenter__(self) -> _RoutedSender:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if self.usable and (exc_type is None or issubclass(exc_type, Exception)):
                await self.drain()
        finally:
            pending, self._pending = self._pending, None
            if pending is not None and not pending.done():
                pending.cancel()
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
            await self._links.aclose(discard=not self.usable or exc_type is not None)

    async def send(self, chunk: list[Routed], count: int) -> None:
        if not count:
            return
        await self.drain()
        self._pending = asyncio.ensure_future(self._exchange(chunk))

    async def drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def _exchange(self, chunk: list[Routed]) -> None:
        try:
            result = await self._router.exchange(chunk, self._links, self._trailer)
        except FastworkerError:
            self.usable = False
            raise
        short = self._short_nodes(result)
        ids, errors, unreplicated = _tally(chunk, result, short)
        self.confirmed += len(ids)
        if self._on_ids is not None:
            self._on_ids(ids)
        if self._on_progress is not None:
            self._on_progress(self.confirmed)
        if result.error is not None:
            raise self._lost(result)
        if errors:
            self.usable = False
            raise await self._refused(*errors[0])
        if short:
            self.usable = False
            raise self._short(short, unreplicated)

    def _short_nodes(self, result: Exchange) -> dict[Node, Any]:
        """The nodes that applied entries of this chunk and whose WAIT counted fewer replicas than asked."""
        if self._wait is None:
            return {}
        wanted = self._wait[0]
        nodes = {node for node, reply in zip(result.nodes, result.replies, strict=True)
                 if node is not None and type(reply) is bytes}
        acks = {node: result.trailers.get(node) for node in nodes}
        return {node: ack for node, ack in acks.items() if not (isinstance(ack, int) and ack >= wanted)}

    def _lost(self, result: Exchange) -> FastworkerError:
        self.usable = False
        error = result.error
        assert error is not None
        unsent = f", {result.unsent} were not applied" if result.unsent else ""
        return type(error)(f"{error}; {self.confirmed} entries were confirmed, {result.lost} more were sent without "
                           f"a reply (they may have been applied, and are not sent again){unsent}")

    async def _refused(self, slot: int, error: Exception) -> FastworkerError:
        key = self._keys_by_slot.get(slot, self._stream)
        done = f"; {self.confirmed} entries were published before it"
        if is_wrong_type(error):
            try:
                kind = text(await self._router.command(slot, ("TYPE", key)))
            except FastworkerError:
                kind = "value of another type"
            return StreamTypeError(f"key {key!r} holds a {kind}, not a stream (WRONGTYPE): use another stream "
                                   f"name or delete the key{done}")
        translated = translate(error, self._router.url)
        return type(translated)(f"{translated}{done}")

    def _short(self, short: Mapping[Node, Any], unreplicated: int) -> ReplicationError:
        assert self._wait is not None
        wanted, timeout_ms = self._wait
        acks = ", ".join(f"{node}: {ack!s}" for node, ack in sorted(short.items()))
        return ReplicationError(
            f"WAIT {wanted} {timeout_ms}: fewer replicas than asked acknowledged within {timeout_ms} ms ({acks}); "
            f"{self.confirmed} entries were confirmed with {wanted} replica(s), {unreplicated} more were written to "
            "their master without that acknowledgement (a failover now may lose them)", self.confirmed,
            unreplicated)


async def explain(streams: Streams, stream: str, exc: BaseException, confirmed: int | None = None) -> FastworkerError:
    """The fastworker error for a failed command on `stream`: WRONGTYPE names the type the key holds instead."""
    done = f"; {confirmed} entries were published before it" if confirmed is not None else ""
    if is_wrong_type(exc):
        try:
            kind = await Admin(streams).key_type(stream)
        except FastworkerError:
            kind = "value of another type"
        return StreamTypeError(f"key {stream!r} holds a {kind}, not a stream (WRONGTYPE): use another stream "
                               f"name or delete the key{done}")
    error = translate(exc, streams.url)
    return type(error)(f"{error}{done}") if done else error


class Publisher:
    """Publishes to streams. `async with Publisher(url_or_settings) as publisher: await publisher.publish(...)`.

    Safe to share between tasks: every bulk publish uses connections of its own, single publishes use the pool.

    Partitions: a logical stream recorded on the server with N partitions (`<stream>:fw-partitions`, see
    `fastworker.partitions`) is published to its N partition streams, each entry to the partition its key picks
    (`key_slot(key) % N`: one key's entries stay in one partition, in order), or round-robin without a key. No record
    means one partition: the stream itself, as before partitions existed. `partitions=N` declares the count: it is
    recorded when none is, and a different recorded count raises PartitionMismatch. On a cluster (found by INFO
    cluster) every partition's XADDs go to its master, one pipeline per master per chunk, and MOVED, ASK, TRYAGAIN
    and CLUSTERDOWN are handled at the edge; a write whose reply was lost is never sent again.

    Trimming (`maxlen=` / `minid=`) is off unless asked for, and unsafe for job streams: the server drops the
    oldest entries whether or not a consumer group has read or acknowledged them, so jobs are lost silently. Trim
    job streams with `fastworker trim`, which never drops what a group still needs. `approximate=True` (`~`) lets
    the server trim only whole nodes, which is much cheaper but may remove nothing.
    """

    def __init__(self, target: str | Settings | Streams, *, chunk_size: int = CHUNK_SIZE,
                 chunk_bytes: int = CHUNK_BYTES, in_flight: int = IN_FLIGHT) -> None:
        if min(chunk_size, chunk_bytes, in_flight) < 1:
            raise ValueError("chunk_size, chunk_bytes and in_flight must be at least 1")
        if isinstance(target, Streams):
            self.streams, self._owned = target, False
        else:
            settings = target if isinstance(target, Settings) else Settings(redis_url=target)
            self.streams, self._owned = Streams(settings), True
        self._admin = Admin(self.streams)
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.in_flight = in_flight
        self._router: Router | None = None
        self._discovering = asyncio.Lock()
        self._counts: dict[str, int] = {}  # recorded partition counts: fixed once recorded
        self._absent: dict[str, float] = {}  # streams found without a record, and when (time.monotonic)
        self._rotations: dict[str, RoundRobin] = {}

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._router is not None:
            await self._router.aclose()
        if self._owned:
            await self.streams.aclose()

    async def router(self) -> Router:
        """The router of this publisher's server, made at first use (INFO cluster, and on a cluster its slot map).
        Raises RedisUnavailable, RedisAuthError, RedisTLSError."""
        if self._router is None:
            async with self._discovering:
                if self._router is None:
                    self._router = await Router.discover(self.streams)
        return self._router

    async def partition_count(self, stream: str, partitions: int | None = None) -> int:
        """The partition count of the logical stream `stream`: the one recorded on the server (1 when none is).
        With `partitions`, that count is recorded when none is (SET NX GET, one round trip), and a different
        recorded count raises PartitionMismatch. Also ConfigError (a malformed record, a bad count, a stream name
        with `{` and a count above 1), RedisUnavailable, RedisAuthError."""
        known = self._counts.get(stream)
        if known is None and partitions is None and time.monotonic() - self._absent.get(stream, -1e9) < \
                ABSENT_RECHECK_S:
            known = 1
        if known is not None:
            if partitions is not None and partitions != known:
                Partitioning(stream, partitions).check_record(f"count={known} tags=v1")
            return known
        parts = Partitioning(stream, partitions or 1)
        command = parts.read_command() if partitions is None else parts.record_command()
        router = await self.router()
        try:
            reply = await router.command(key_slot(parts.record_key), command)
        except RedisAuthError as exc:
            if partitions is not None or not is_no_permission(exc.__cause__ or exc):
                raise
            # A producer whose ACL predates partitions (`+xadd` alone) keeps publishing as it did; said once.
            logger.warning("cannot read the partition record of stream=%s (%s): publishing to the stream itself, "
                           "as one partition; grant this user +get on key=%s so that a partitioned stream is "
                           "published to its partitions", stream, exc, parts.record_key)
            self._counts[stream] = 1
            return 1
        recorded = parse_record(stream, reply) if partitions is None else parts.check_record(reply)
        if recorded is None and partitions is None:
            self._absent[stream] = time.monotonic()
            return 1
        self._counts[stream] = count = recorded or parts.count
        return count

    def _rotation(self, stream: str, count: int) -> RoundRobin:
        rotation = self._rotations.get(stream)
        if rotation is None or rotation.count != count:
            # a random start: producers started together do not all begin on partition 0
            rotation = self._rotations[stream] = RoundRobin(count, random.randrange(count))
        return rotation

    async def _plain(self, stream: str, count: int, wait_replicas: tuple[int, int] | None) -> bool:
        """Whether today's single-server path serves this publish: one partition, no cluster, no WAIT."""
        return count == 1 and wait_replicas is None and not (await self.router()).cluster

    async def publish(self, stream: str, payload: Any = None, *, fields: Fields | None = None,
                      key: KeyValue | None = None, partitions: int | None = None,
                      wait_replicas: tuple[int, int] | None = None, maxlen: int | None = None,
                      minid: str | None = None, approximate: bool = True) -> str:
        """XADD one entry: `payload` as JSON in the `data` field and/or flat `fields`; returns its entry id.

        `key` (e.g. a shop id; an int counts as its decimal text) picks the partition of a partitioned stream;
        without it partitions take turns. `partitions`: the count to record or check (see the class).
        `wait_replicas=(n, timeout_ms)`: WAIT for n replicas after the write (timeout_ms >= 1).

        Raises PayloadError (not serialisable), StreamTypeError (the key is not a stream), PartitionMismatch,
        ReplicationError (fewer than n replicas acknowledged), RedisUnavailable (also when the reply was lost: the
        entry may have been added, and is not sent again).
        """
        _check_wait(wait_replicas)
        try:
            flat = _flat(fields) + current_trace_fields()
            if payload is not None:
                flat += [DEFAULT_PAYLOAD_FIELD.encode(), orjson.dumps(payload)]
            key_bytes = None if key is None else _key_bytes(key)
        except (TypeError, ValueError) as exc:
            raise PayloadError(0, str(exc)) from exc
        if not flat:
            raise ValueError("publish() needs a payload or at least one field")
        trim = trim_args(maxlen, minid, approximate)
        count = await self.partition_count(stream, partitions)
        if await self._plain(stream, count, wait_replicas):
            try:
                reply = await self._admin.command("XADD", stream, *trim, "*", *flat)
            except FastworkerError as exc:
                raise await explain(self.streams, stream, exc) from exc
            return text(reply)
        parts = Partitioning(stream, count)
        index = next(self._rotation(stream, count)) if key_bytes is None else key_slot(key_bytes) % count
        target = parts.key(index)
        ids: list[str] = []
        sender = _RoutedSender(await self.router(), stream, {key_slot(target): target}, ids.extend, None,
                               wait_replicas)
        async with sender:
            await sender.send([(key_slot(target), pack([("XADD", target, *trim, "*", *flat)]))], 1)
        return ids[0]

    async def publish_many(self, stream: str, payloads: Iterable[Any] | AsyncIterable[Any], *,
                           fields: Fields | None = None, key: KeySource | None = None, partitions: int | None = None,
                           wait_replicas: tuple[int, int] | None = None, on_progress: ProgressCallback | None = None,
                           maxlen: int | None = None, minid: str | None = None,
                           approximate: bool = True) -> list[str]:
        """Publish every payload, in order; returns their entry ids.

        The ids list grows with the payloads (about 90 bytes an id): for millions of payloads use
        `publish_stream`, which keeps memory flat. See `publish_stream` for the payloads, `key` and the errors.
        """
        ids: list[str] = []
        await self.publish_stream(stream, payloads, fields=fields, key=key, partitions=partitions,
                                  wait_replicas=wait_replicas, on_ids=ids.extend, on_progress=on_progress,
                                  maxlen=maxlen, minid=minid, approximate=approximate)
        return ids

    async def publish_stream(self, stream: str, payloads: Iterable[Any] | AsyncIterable[Any], *,
                             fields: Fields | None = None, key: KeySource | None = None,
                             partitions: int | None = None, wait_replicas: tuple[int, int] | None = None,
                             on_ids: IdsCallback | None = None, on_progress: ProgressCallback | None = None,
                             maxlen: int | None = None, minid: str | None = None, approximate: bool = True) -> int:
        """Publish every payload, in order, keeping memory flat; returns how many were published.

        Each payload is a JSON document (published in the `data` field, with `fields` added to every entry) or an
        `Entry` with fields of its own; an `orjson.Fragment` is published as the JSON text it holds. `on_ids`
        receives the entry ids of each confirmed chunk, in order; `on_progress` the running count.

        Partitions (see the class): `key` is the name of the field whose value picks an entry's partition (a JSON
        document's member, or an Entry's flat field, then its payload's member; str, bytes or int values), or a
        function of the payload returning that value; an Entry's own `key` comes first; without either, the
        partitions take turns. `partitions` declares the count; `wait_replicas=(n, timeout_ms)` sends WAIT n
        timeout_ms after each chunk on each master (keep timeout_ms under the socket timeout).

        Raises PayloadError (with `.index` and `.published`) when a payload cannot be serialised or has no key:
        the payloads before it are published, none after it. An exception from the payload iterator propagates
        the same way. A server error stops the publish and says how many entries were published; a lost reply
        raises RedisUnavailable saying how many were confirmed and how many were sent without a reply (never
        sent again); ReplicationError when fewer replicas acknowledged a chunk than asked; PartitionMismatch.
        """
        _check_wait(wait_replicas)
        trim = trim_args(maxlen, minid, approximate)
        count = await self.partition_count(stream, partitions)
        encoder: _Chunks
        sender: _Sends
        if await self._plain(stream, count, wait_replicas):
            encoder = _Encoder(stream, fields, trim, self.chunk_size, self.chunk_bytes)
            sender = _Sender(self.streams, stream, self.in_flight, on_ids, on_progress)
        else:
            placement = _Placement(Partitioning(stream, count), key, self._rotation(stream, count))
            encoder = _RoutedEncoder(placement, fields, trim, self.chunk_size, self.chunk_bytes)
            sender = _RoutedSender(await self.router(), stream, encoder.keys_by_slot, on_ids, on_progress,
                                   wait_replicas)
        try:
            async with sender:
                if isinstance(payloads, AsyncIterable):
                    await _feed_async(encoder, sender, payloads)
                else:
                    await _feed(encoder, sender, iter(payloads))
        except PayloadError as exc:
            exc.published = sender.confirmed
            raise
        return sender.confirmed


def _check_wait(wait_replicas: tuple[int, int] | None) -> None:
    if wait_replicas is None:
        return
    replicas, timeout_ms = wait_replicas
    if replicas < 1 or timeout_ms < 1:
        raise ValueError(f"wait_replicas=(replicas, timeout_ms) needs both >= 1 (a timeout of 0 would wait "
                         f"forever), got {wait_replicas!r}")


async def _feed(encoder: _Chunks, sender: _Sends,
                iterator: Iterator[Any]) -> None:
    try:
        while encoder.fill(iterator):
            await sender.send(*encoder.take())
    except Exception:
        if sender.usable:  # publish the payloads before the failing one
            await sender.send(*encoder.take())
        raise
    await sender.send(*encoder.take())


class _Flusher:
    """Sends the chunk an async source fills: when it is full, or FLUSH_AFTER_S after its first payload when the
    source is slower than that, so a slow or quiet source (a queue, a change feed) never keeps what it gave in the
    producer. One timer per chunk, not per payload; sends are serialised, so the order is kept."""

    def __init__(self, encoder: _Chunks, sender: _Sends) -> None:
        self.encoder = encoder
        self.sender = sender
        self.lock = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None
        self.flushes: list[asyncio.Future[None]] = []

    async def add(self, item: Any) -> None:
        for flush in [flush for flush in self.flushes if flush.done()]:
            self.flushes.remove(flush)
            flush.result()  # a failed flush fails the publish, as a failed send would
        if self.encoder.add(item):
            self.cancel()
            await self.send()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self._due)

    async def send(self) -> None:
        async with self.lock:
            if self.encoder.count:
                await self.sender.send(*self.encoder.take())

    def _due(self) -> None:
        self.timer = None
        self.flushes.append(asyncio.ensure_future(self.send()))

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def finish(self) -> None:
        self.cancel()
        await asyncio.gather(*self.flushes)
        await self.send()


async def _feed_async(encoder: _Chunks, sender: _Sends,
                      payloads: AsyncIterable[Any]) -> None:
    flusher = _Flusher(encoder, sender)
    try:
        async for item in payloads:
            await flusher.add(item)
    except Exception:
        flusher.cancel()
        if sender.usable:
            await flusher.send()
        raise
    await flusher.finish()


class SyncPublisher:
    """The Publisher for code without an event loop: `with SyncPublisher(url) as publisher: publisher.publish(...)`.

    It owns one event loop (uvloop) for its whole life, so its connections stay open between calls. Not for use
    from inside a running event loop (use Publisher there), nor from several threads at once.
    """

    def __init__(self, target: str | Settings, *, chunk_size: int = CHUNK_SIZE, chunk_bytes: int = CHUNK_BYTES,
                 in_flight: int = IN_FLIGHT) -> None:
        self._publisher = Publisher(target, chunk_size=chunk_size, chunk_bytes=chunk_bytes, in_flight=in_flight)
        self._runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        self._closed = False

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._publisher.aclose())
        finally:
            self._runner.close()

    def publish(self, stream: str, payload: Any = None, *, fields: Fields | None = None,
                key: KeyValue | None = None, partitions: int | None = None,
                wait_replicas: tuple[int, int] | None = None, maxlen: int | None = None, minid: str | None = None,
                approximate: bool = True) -> str:
        """See Publisher.publish."""
        return self._runner.run(self._publisher.publish(
            stream, payload, fields=fields, key=key, partitions=partitions, wait_replicas=wait_replicas,
            maxlen=maxlen, minid=minid, approximate=approximate))

    def publish_many(self, stream: str, payloads: Iterable[Any], *, fields: Fields | None = None,
                     key: KeySource | None = None, partitions: int | None = None,
                     wait_replicas: tuple[int, int] | None = None, on_progress: ProgressCallback | None = None,
                     maxlen: int | None = None, minid: str | None = None, approximate: bool = True) -> list[str]:
        """See Publisher.publish_many."""
        return self._runner.run(self._publisher.publish_many(
            stream, payloads, fields=fields, key=key, partitions=partitions, wait_replicas=wait_replicas,
            on_progress=on_progress, maxlen=maxlen, minid=minid, approximate=approximate))

    def publish_stream(self, stream: str, payloads: Iterable[Any], *, fields: Fields | None = None,
                       key: KeySource | None = None, partitions: int | None = None,
                       wait_replicas: tuple[int, int] | None = None, on_ids: IdsCallback | None = None,
                       on_progress: ProgressCallback | None = None, maxlen: int | None = None,
                       minid: str | None = None, approximate: bool = True) -> int:
        """See Publisher.publish_stream."""
        return self._runner.run(self._publisher.publish_stream(
            stream, payloads, fields=fields, key=key, partitions=partitions, wait_replicas=wait_replicas,
            on_ids=on_ids, on_progress=on_progress, maxlen=maxlen, minid=minid, approximate=approximate))
