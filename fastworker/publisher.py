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
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import uvloop

from fastworker.config import Settings
from fastworker.edge.admin import Admin
from fastworker.edge.errors import is_wrong_type, translate
from fastworker.edge.link import Link
from fastworker.edge.wire import argument, head, pack
from fastworker.errors import FastworkerError, RedisCommandError
from fastworker.message import DEFAULT_PAYLOAD_FIELD, FieldValue, text
from fastworker.streams import Streams
from fastworker.tracing import current_trace_fields

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1000
CHUNK_BYTES = 4 * 1024 * 1024
IN_FLIGHT = 2

Fields = Mapping[str, FieldValue] | Mapping[bytes, FieldValue]
IdsCallback = Callable[[list[str]], object]
ProgressCallback = Callable[[int], object]


FLUSH_AFTER_S = 0.05  # an async source slower than this has what it gave so far sent anyway (publish_stream)

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

    Safe to share between tasks: every bulk publish uses a connection of its own, single publishes use the pool.

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

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self.streams.aclose()

    async def publish(self, stream: str, payload: Any = None, *, fields: Fields | None = None,
                      maxlen: int | None = None, minid: str | None = None, approximate: bool = True) -> str:
        """XADD one entry: `payload` as JSON in the `data` field and/or flat `fields`; returns its entry id.

        Raises PayloadError (not serialisable), StreamTypeError (the key is not a stream), RedisUnavailable.
        """
        try:
            flat = _flat(fields) + current_trace_fields()
            if payload is not None:
                flat += [DEFAULT_PAYLOAD_FIELD.encode(), orjson.dumps(payload)]
        except (TypeError, ValueError) as exc:
            raise PayloadError(0, str(exc)) from exc
        if not flat:
            raise ValueError("publish() needs a payload or at least one field")
        try:
            reply = await self._admin.command("XADD", stream, *trim_args(maxlen, minid, approximate), "*", *flat)
        except FastworkerError as exc:
            raise await explain(self.streams, stream, exc) from exc
        return text(reply)

    async def publish_many(self, stream: str, payloads: Iterable[Any] | AsyncIterable[Any], *,
                           fields: Fields | None = None, on_progress: ProgressCallback | None = None,
                           maxlen: int | None = None, minid: str | None = None,
                           approximate: bool = True) -> list[str]:
        """Publish every payload, in order; returns their entry ids.

        The ids list grows with the payloads (about 90 bytes an id): for millions of payloads use
        `publish_stream`, which keeps memory flat. See `publish_stream` for the payloads and the errors.
        """
        ids: list[str] = []
        await self.publish_stream(stream, payloads, fields=fields, on_ids=ids.extend, on_progress=on_progress,
                                  maxlen=maxlen, minid=minid, approximate=approximate)
        return ids

    async def publish_stream(self, stream: str, payloads: Iterable[Any] | AsyncIterable[Any], *,
                             fields: Fields | None = None, on_ids: IdsCallback | None = None,
                             on_progress: ProgressCallback | None = None, maxlen: int | None = None,
                             minid: str | None = None, approximate: bool = True) -> int:
        """Publish every payload, in order, keeping memory flat; returns how many were published.

        Each payload is a JSON document (published in the `data` field, with `fields` added to every entry) or an
        `Entry` with fields of its own; an `orjson.Fragment` is published as the JSON text it holds. `on_ids`
        receives the entry ids of each confirmed chunk, in order; `on_progress` the running count.

        Raises PayloadError (with `.index` and `.published`) when a payload cannot be serialised: the payloads
        before it are published, none after it. An exception from the payload iterator propagates the same way.
        """
        encoder = _Encoder(stream, fields, trim_args(maxlen, minid, approximate), self.chunk_size, self.chunk_bytes)
        sender = _Sender(self.streams, stream, self.in_flight, on_ids, on_progress)
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


async def _feed(encoder: _Encoder, sender: _Sender, iterator: Iterator[Any]) -> None:
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

    def __init__(self, encoder: _Encoder, sender: _Sender) -> None:
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


async def _feed_async(encoder: _Encoder, sender: _Sender, payloads: AsyncIterable[Any]) -> None:
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
                maxlen: int | None = None, minid: str | None = None, approximate: bool = True) -> str:
        """See Publisher.publish."""
        return self._runner.run(self._publisher.publish(stream, payload, fields=fields, maxlen=maxlen, minid=minid,
                                                        approximate=approximate))

    def publish_many(self, stream: str, payloads: Iterable[Any], *, fields: Fields | None = None,
                     on_progress: ProgressCallback | None = None, maxlen: int | None = None,
                     minid: str | None = None, approximate: bool = True) -> list[str]:
        """See Publisher.publish_many."""
        return self._runner.run(self._publisher.publish_many(
            stream, payloads, fields=fields, on_progress=on_progress, maxlen=maxlen, minid=minid,
            approximate=approximate))

    def publish_stream(self, stream: str, payloads: Iterable[Any], *, fields: Fields | None = None,
                       on_ids: IdsCallback | None = None, on_progress: ProgressCallback | None = None,
                       maxlen: int | None = None, minid: str | None = None, approximate: bool = True) -> int:
        """See Publisher.publish_stream."""
        return self._runner.run(self._publisher.publish_stream(
            stream, payloads, fields=fields, on_ids=on_ids, on_progress=on_progress, maxlen=maxlen, minid=minid,
            approximate=approximate))
