"""One HTTP/1.1 request on a connection the fleet's monitor accepted, answered by an ASGI app.

The monitor (`fastworker.monitor`) serves `/healthz`, `/readyz` and `/metrics` with plain asyncio streams and hands
the connections of paths it mounted to a callable; this module is that callable for the dashboard, so that the
fleet serves it on its own `--http-port` without a second server. It does what the dashboard needs and no more:
one request per connection (`Connection: close`), a body only with Content-Length (at most MAX_BODY_BYTES), the
response streamed as the app sends it and delimited by closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Message

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
BODY_TIMEOUT_S = 10.0
REASONS = {200: "OK", 204: "No Content", 301: "Moved Permanently", 304: "Not Modified", 307: "Temporary Redirect",
           400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[bytes, bytes]]]:
    """(method, raw path, query string, headers as lower-cased name and value) of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, _ = parts
    path, _, query = target.partition("?")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise BadRequest(400, "malformed header")
        headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
    return method, path, query, headers


async def read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]]) -> bytes:
    values = dict(headers)
    if b"transfer-encoding" in values:
        raise BadRequest(400, "chunked request bodies are not supported: send Content-Length")
    try:
        length = int(values.get(b"content-length", b"0"))
    except ValueError:
        raise BadRequest(400, "malformed Content-Length") from None
    if length < 0 or length > MAX_BODY_BYTES:
        raise BadRequest(413, "request body too large")
    return await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT_S) if length else b""


def _address(info: Any) -> tuple[str, int] | None:
    return (str(info[0]), int(info[1])) if isinstance(info, tuple) and len(info) >= 2 else None


async def serve_asgi(app: ASGIApp, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the request whose head (up to the blank line) was read already, then close the connection."""
    try:
        method, path, query, headers = parse_head(head)
        body = await read_body(reader, headers)
    except (BadRequest, asyncio.IncompleteReadError, TimeoutError) as exc:
        status = exc.status if isinstance(exc, BadRequest) else 400
        await _close(writer, _head(status, [(b"content-type", b"text/plain")]) + f"{exc}\n".encode())
        return
    except ConnectionError:
        writer.close()
        return
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": unquote(path), "raw_path": path.encode("latin-1"),
             "query_string": query.encode("latin-1"), "root_path": "", "headers": headers,
             "client": _address(writer.get_extra_info("peername")),
             "server": _address(writer.get_extra_info("sockname")), "state": {}}
    response = _Response(writer)
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await reader.read()  # returns at EOF: the client went away
        return {"type": "http.disconnect"}

    try:
        await app(scope, receive, response.send)
    except ConnectionError:  # the client went away mid-answer
        writer.close()
        return
    except Exception:
        logger.exception("dashboard request failed method=%s path=%s", method, path)
        if not response.started:
            await _close(writer, _head(500, [(b"content-type", b"text/plain")]) + b"internal error\n")
            return
    await _close(writer, b"" if response.started else _head(500, []))


class _Response:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.started = False
        self._start: Message | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = message
        elif message["type"] == "http.response.body":
            if not self.started and self._start is not None:
                self.started = True
                self.writer.write(_head(self._start["status"], self._start.get("headers", [])))
            self.writer.write(message.get("body", b""))
            await self.writer.drain()


def _head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}".encode()]
    lines += [name + b": " + value for name, value in headers if name.lower() != b"connection"]
    return b"\r\n".join([*lines, b"connection: close", b"", b""])


async def _close(writer: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        if data:
            writer.write(data)
            await writer.drain()
    writer.close()
