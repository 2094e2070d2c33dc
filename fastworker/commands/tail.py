"""`fastworker tail STREAM`: print a stream's entries as JSON lines, and optionally follow it.

Each entry is one line `{"id": ..., "fields": {...}, "payload": ...}`. The `data` field, when it holds valid JSON,
is decoded into `payload` and left out of `fields`; otherwise `payload` is null and the field stays in `fields`.
Field values that are not UTF-8 are shown as `{"base64": "..."}` (a string value is always a JSON string, so the
two cannot be confused); field names that are not UTF-8 are shown with backslash escapes (`\\xff`). No entry makes
it crash. Reads go page by page (1000 entries), so memory stays flat whatever `--count` is.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import sys
from collections.abc import Coroutine, Iterable
from typing import IO, Any

import orjson
import uvloop

from fastworker.cli import add_connection_flags, settings_from_args
from fastworker.config import Settings
from fastworker.edge.streams import Channel, Streams
from fastworker.errors import ExitCode, FastworkerError
from fastworker.message import DEFAULT_PAYLOAD_FIELD, RawEntry, text
from fastworker.ops.inspect import require_stream, stream_exists
from fastworker.publisher import explain
from fastworker.signals import StopSignals

PAGE = 1000
ENTRY_ID = re.compile(r"-|\d+(-\d+)?")
MAX_SEQ = 2**64 - 1

EPILOG = """\
which entries:
  without --from, the last N entries (N = --count, default 10), oldest first, like tail(1);
  with --from ID, the first N entries at or after ID (ID: - for the start of the stream, MS or MS-SEQ).
  --follow then keeps printing every entry after the last one shown, as it arrives, until Ctrl-C or SIGTERM
  (exit code 0). --count 0 shows no history: with --follow, only entries that arrive from now on.
  A stream that does not exist is an error (exit 1); with --follow, a note on stderr, then its first entries.

output:
  one JSON object a line: {"id": ..., "fields": {...}, "payload": ...}. A `data` field holding valid JSON is
  decoded into payload (and left out of fields); otherwise payload is null and the field is kept in fields.
  Values that are not UTF-8 are shown as {"base64": "..."}, names that are not UTF-8 with backslash escapes.
"""


def _entry_id(text: str) -> str:
    if not ENTRY_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected an entry id (-, MS or MS-SEQ), got {text!r}")
    return text


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def register(sub: Any) -> None:
    parser = sub.add_parser("tail", help="print a stream's entries as JSON lines; --follow for new ones",
                            description="Print a stream's entries as JSON lines, and optionally follow it.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stream", metavar="STREAM", help="the stream to read")
    parser.add_argument("--from", dest="start", type=_entry_id, metavar="ID",
                        help="start at this entry id, going forward (default: the last --count entries)")
    parser.add_argument("--count", "-n", type=_count, default=10, metavar="N", help="entries to print (default 10)")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="then print new entries as they arrive (blocking XREAD) until Ctrl-C or SIGTERM")
    parser.add_argument("--payload-field", default=DEFAULT_PAYLOAD_FIELD, metavar="NAME",
                        help=f"the field holding the JSON document (default {DEFAULT_PAYLOAD_FIELD})")
    add_connection_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings, _ = settings_from_args(args)
    try:
        with StopSignals(ending=True) as signals:  # to the end: a signal during the teardown follows the rule
            return int(uvloop.run(_tail(args, settings, signals)))
    except BrokenPipeError:
        # The reader went away (`| head`): that is the end of the job, not an error. Python's exit flush would
        # complain about the closed pipe, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK


async def _tail(args: argparse.Namespace, settings: Settings, signals: StopSignals) -> int:
    streams = Streams(settings)
    tail = Tail(streams, args.stream, sys.stdout.buffer, args.payload_field, settings.block_ms)
    try:
        await _check_name(streams, args.stream, args.follow)
        if args.follow:
            await _until_signalled(tail.follow(args.start, args.count), signals)
            return ExitCode.OK  # a signal is how --follow ends
        stopped = await _until_signalled(tail.history(args.start, args.count), signals)
        return ExitCode.INTERRUPTED if stopped else ExitCode.OK
    finally:
        await tail.aclose()
        await streams.aclose()


async def _check_name(streams: Streams, stream: str, follow: bool) -> None:
    """A stream that does not exist is an error (StreamNotFound, exit 1), unless following: then it is said on
    stderr, and the first entry added to it is printed when it comes."""
    if follow and not await stream_exists(streams, stream):
        print(f"fastworker: stream {stream!r} does not exist yet: waiting for its first entry", file=sys.stderr,
              flush=True)
    elif not follow:
        await require_stream(streams, stream)


async def _until_signalled(work: Coroutine[Any, Any, Any], signals: StopSignals) -> bool:
    """Run `work` until it ends or a stop signal arrives; True when a signal ended it. The handlers stay: a signal
    during what follows (closing the connection) is the same stop, or, later, leaves at once (exit 130)."""
    stop = asyncio.Event()
    signals.bind(stop.set, None)
    if signals.received is not None:
        stop.set()
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # raises what the work failed with, if it ended on its own
    return stop.is_set()


class Tail:
    """Reads one stream's entries and writes them to `out` as JSON lines."""

    def __init__(self, streams: Streams, stream: str, out: IO[bytes], payload_field: str, block_ms: int) -> None:
        self._streams = streams
        self._channel: Channel = streams.channel()
        self.stream = stream
        self._out = out
        self._payload_field = payload_field.encode()
        self._block_ms = block_ms

    async def aclose(self) -> None:
        await self._channel.aclose()

    async def history(self, start: str | None, count: int) -> str | None:
        """Print the last `count` entries, or the first `count` from `start`; the id of the last one printed."""
        if count == 0:
            return None
        if start is not None:
            return await self._forward(start, count)
        if count <= PAGE:
            newest_first = await self._call("XREVRANGE", self.stream, "+", "-", "COUNT", count)
            self._write(reversed(newest_first))
            return text(newest_first[0][0]) if newest_first else None
        # Walk back to the first of the last `count` entries, then print forward: one page in memory at a time.
        first, seen, end = None, 0, "+"
        while seen < count:
            page = await self._call("XREVRANGE", self.stream, end, "-", "COUNT", min(PAGE, count - seen))
            if not page:
                break
            seen += len(page)
            first = text(page[-1][0])
            end = "(" + first
        return await self._forward(first, count) if first else None

    async def follow(self, start: str | None, count: int) -> None:
        """Print the history, then every entry after the last one shown, as it arrives, until cancelled."""
        cursor = await self.history(start, count) or await self._cursor_before(start)
        while True:
            reply = await self._call("XREAD", "COUNT", PAGE, "BLOCK", self._block_ms, "STREAMS", self.stream, cursor)
            entries = _xread_entries(reply)
            if entries:
                self._write(entries)
                cursor = text(entries[-1][0])

    async def _forward(self, start: str, count: int) -> str | None:
        last, left, low = None, count, start
        while left > 0:
            page = await self._call("XRANGE", self.stream, low, "+", "COUNT", min(PAGE, left))
            if not page:
                break
            self._write(page)
            left -= len(page)
            last = text(page[-1][0])
            low = "(" + last
        return last

    async def _cursor_before(self, start: str | None) -> str:
        """The XREAD cursor when no history was printed: just before `start`, or else the stream's last entry."""
        if start is not None:
            return id_before(start)
        newest = await self._call("XREVRANGE", self.stream, "+", "-", "COUNT", 1)
        return text(newest[0][0]) if newest else "0-0"

    async def _call(self, *command: str | int) -> Any:
        try:
            return (await self._channel.roundtrip([command]))[0]
        except FastworkerError as exc:
            raise await explain(self._streams, self.stream, exc) from exc

    def _write(self, entries: Iterable[RawEntry]) -> None:
        write, field = self._out.write, self._payload_field
        for entry_id, fields in entries:
            write(render(entry_id, fields, field))
            write(b"\n")
        self._out.flush()


def id_before(start: str) -> str:
    """The greatest entry id below `start` (XREAD's cursor is exclusive, --from is inclusive)."""
    if start == "-":
        return "0-0"
    ms_text, _, seq_text = start.partition("-")
    ms, seq = int(ms_text), int(seq_text or 0)
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{MAX_SEQ}" if ms else "0-0"


def render(entry_id: bytes | str, raw: Any, payload_field: bytes = b"data") -> bytes:
    """One entry as a JSON line (without the newline)."""
    if isinstance(raw, dict):  # RESP3 may send a map
        raw = [item for pair in raw.items() for item in pair]
    raw = raw or []
    fields: dict[str, Any] = {}
    payload: Any = None
    decoded = False
    for name, value in zip(raw[::2], raw[1::2], strict=True):
        if name == payload_field and not decoded:
            with contextlib.suppress(orjson.JSONDecodeError):
                payload, decoded = orjson.loads(value), True
                continue
        fields[_name(name)] = _shown(value)
    return orjson.dumps({"id": text(entry_id), "fields": fields, "payload": payload})


def _name(name: bytes) -> str:
    return name.decode(errors="backslashreplace")


def _shown(value: bytes) -> str | dict[str, str]:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}


def _xread_entries(reply: Any) -> list[RawEntry]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return [entry for entries in reply.values() for entry in entries]
    return [entry for _, entries in reply for entry in entries]  # RESP2
