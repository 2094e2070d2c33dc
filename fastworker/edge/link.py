"""A link: one connection of the pool, held for a series of pipelined exchanges outside redis-py's command layer.

Bytes go out as `wire.pack` (or a caller's own RESP) makes them; replies are parsed by the edge's `ReplyReader`
straight off the connection's byte stream: redis-py's read_response costs about 3 us per reply (a timeout context
and several awaits), which would triple the cost of a bulk publish. Where the connection does not expose its byte
stream (another redis-py layout), replies are read one by one through redis-py instead, with the same results.

Invariants: a connection goes back to the pool only in step (every reply that was sent for read, no byte of a
later one buffered); otherwise it is dropped, since its next user would read our replies. Server error replies
are values (redis-py's exception for each); I/O errors raise fastworker's, translated, and break the link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex

from fastworker.edge.errors import translate
from fastworker.edge.streams import Streams
from fastworker.edge.wire import Command, ReplyReader, pack

logger = logging.getLogger(__name__)

READ_SIZE = 65536  # bytes per socket read, as redis-py reads them
CLOSED = "Connection closed by server."  # redis-py's words for it, so the message is the same on either path


def _byte_stream(conn: Any) -> asyncio.StreamReader | None:
    """The connection's byte stream, once connected: redis-py keeps it as `_reader` (since 4.2). None when this
    redis-py keeps it elsewhere: replies are then read through its parser."""
    stream = getattr(conn, "_reader", None)
    return stream if isinstance(stream, asyncio.StreamReader) else None


class Link:
    """`async with Link(streams) as link: await link.send(data); replies = await link.replies(count)`.

    Not safe to share between tasks: one sender, one reader, in order.
    """

    def __init__(self, streams: Streams | None = None, *, pool: aioredis.ConnectionPool | None = None,
                 url: str = "") -> None:
        """On the pool of `streams`, or on `pool` (a redis-py asyncio ConnectionPool: a cluster node's) with `url`
        naming its server in errors."""
        if streams is not None:
            pool = streams.redis.connection_pool
        if pool is None:
            raise ValueError("a Link needs streams or a pool")
        self._pool: aioredis.ConnectionPool = pool
        self.url = url if streams is None else streams.url
        self._conn: Any = None
        self._reader = ReplyReader()
        self._timeout_s: float | None = None
        self.broken = False  # an I/O error: what was sent may or may not have been applied

    @property
    def fast(self) -> bool:
        """Whether replies are parsed off the byte stream (else one by one through redis-py)."""
        return _byte_stream(self._conn) is not None

    async def open(self) -> Link:
        """Take a connection from the pool and connect it. Raises RedisUnavailable, RedisAuthError, RedisTLSError."""
        try:
            self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            if not self._conn.is_connected:
                await self._conn.connect()
        except (rex.RedisError, OSError) as exc:
            if self._conn is not None:
                await self._pool.release(self._conn)
                self._conn = None
            raise translate(exc, self.url) from exc
        self._timeout_s = getattr(self._conn, "socket_timeout", None)
        return self

    async def __aenter__(self) -> Link:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose(discard=exc is not None)

    async def send(self, data: bytes) -> None:
        """Write `data` (RESP commands). Raises fastworker's errors (RedisUnavailable, ...) on an I/O error: part of
        it may have reached the server."""
        try:
            await self._conn.send_packed_command(data, check_health=False)
        except (rex.RedisError, OSError) as exc:
            self.broken = True
            raise translate(exc, self.url) from exc

    async def replies(self, count: int) -> list[Any]:
        """The next `count` replies in order, server errors as values (redis-py exceptions: see
        `errors.reply_error`). Raises fastworker's errors on an I/O error or after socket_timeout without data."""
        try:
            stream = _byte_stream(self._conn)  # looked up each time: a reconnect makes a new one
            if stream is None:
                return await self._replies_each(count)
            return await self._replies_fast(stream, count)
        except (rex.RedisError, OSError) as exc:  # asyncio's TimeoutError is an OSError
            self.broken = True
            raise translate(exc, self.url) from exc

    async def exchange(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write and read every reply, server errors as values."""
        await self.send(pack(commands))
        return await self.replies(len(commands))

    async def _replies_fast(self, stream: asyncio.StreamReader, count: int) -> list[Any]:
        replies: list[Any] = []
        reader = self._reader
        while not reader.take(replies, count):
            async with asyncio.timeout(self._timeout_s):
                data = await stream.read(READ_SIZE)
            if not data:
                raise rex.ConnectionError(CLOSED)
            reader.feed(data)
        return replies

    async def _replies_each(self, count: int) -> list[Any]:
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await self._conn.read_response())
            except rex.ResponseError as exc:
                replies.append(exc)
        return replies

    async def aclose(self, *, discard: bool = False) -> None:
        """Give the connection back to the pool; drop it first when `discard` (replies may still be due on it), when
        the link broke, or when bytes of a reply nobody took are buffered."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            if discard or self.broken or self._reader.buffered():
                await conn.disconnect(nowait=True)
        finally:
            await self._pool.release(conn)
