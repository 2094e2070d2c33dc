"""`fastworker status`: streams, groups, consumers, lag, pending and dead letters, as tables or JSON.

The data comes from `fastworker.ops.inspect.snapshot`; this module only chooses the streams and renders. It also
holds the small rendering helpers (tables, ages, sizes, JSON) and the connection runner that the other operating
commands share, so that every command prints ages and sizes the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastworker.app import load_app
from fastworker.cli import CONNECTION_FIELDS, add_settings_flags, settings_from_args
from fastworker.config import Settings
from fastworker.errors import ExitCode, FastworkerError
from fastworker.ops.inspect import Snapshot, snapshot
from fastworker.streams import Streams

T = TypeVar("T")
CLEAR_SCREEN = "\x1b[H\x1b[2J"


# --- helpers shared by the operating commands ---------------------------------------------------------------------

class UsageError(FastworkerError):
    """Options that do not fit together, or a destructive action without its confirmation."""

    exit_code = ExitCode.USAGE


def add_common_flags(parser: argparse.ArgumentParser, json_help: str = "print JSON for scripts") -> None:
    parser.add_argument("--json", action="store_true", help=json_help)
    add_settings_flags(parser, (*CONNECTION_FIELDS, "dead_letter_suffix"))


def run_with_streams(settings: Settings, work: Callable[[Streams], Awaitable[T]]) -> T:
    """Run `work` with a connection to the server, in a fresh event loop, and close the connection after."""
    async def main() -> T:
        streams = Streams(settings)
        try:
            return await work(streams)
        finally:
            await streams.aclose()

    return asyncio.run(main())


def format_age(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = ms // 1000
    if seconds < 1:
        return f"{ms}ms"
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; trailing blanks stripped."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]
    lines = ["  ".join(text.ljust(widths[i]) for i, text in enumerate(row)).rstrip()
             for row in [list(headers), *cells]]
    return "\n".join(lines)


def print_json(data: Any, compact: bool = False) -> None:
    print(json.dumps(data, indent=None if compact else 2, default=str), flush=True)


def app_pairs(reference: str | None) -> list[tuple[str, str]]:
    """(stream, group) of every handler of the app named by `module:attr` (none without a reference)."""
    if not reference:
        return []
    return [(handler.stream, handler.group) for handler in load_app(reference).handlers]


# --- status -------------------------------------------------------------------------------------------------------

def register(sub: Any) -> None:
    parser = sub.add_parser(
        "status", help="streams, groups, consumers, pending, lag and dead letters",
        description="Show streams (length, first and last entry, memory, dead letters), their groups (consumers, "
                    "pending, lag, oldest pending entry) and consumers. Default: every stream on the server.")
    parser.add_argument("--app", metavar="MODULE:ATTR", help="the streams of this app")
    parser.add_argument("--stream", action="append", default=[], metavar="STREAM",
                        help="a stream to show (repeatable)")
    parser.add_argument("--dead-after-s", type=float, default=3600.0, metavar="S",
                        help="a consumer with zero pending idle longer than this is dead (default 3600)")
    parser.add_argument("--watch", type=float, default=None, metavar="S",
                        help="refresh every S seconds until Ctrl-C (with --json: one JSON document a line)")
    add_common_flags(parser)
    parser.set_defaults(handler=status)


def status(args: argparse.Namespace) -> int:
    settings, _ = settings_from_args(args)
    names: list[str] | None = sorted({stream for stream, _ in app_pairs(args.app)} | set(args.stream))
    if not args.app and not args.stream:
        names = None
    dead_after_ms = int(args.dead_after_s * 1000)

    async def show(streams: Streams) -> None:
        while True:
            snap = await snapshot(streams, names, dead_letter_suffix=settings.dead_letter_suffix,
                                  dead_after_ms=dead_after_ms)
            if args.json:
                print_json({"url": settings.redacted_url(), **snap.to_dict()}, compact=args.watch is not None)
            else:
                clear = CLEAR_SCREEN if args.watch is not None and sys.stdout.isatty() else ""
                print(clear + render_status(snap, settings.redacted_url()) + "\n", flush=True)
            if args.watch is None:
                return
            await asyncio.sleep(args.watch)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how --watch ends
        run_with_streams(settings, show)
    return ExitCode.OK


def render_status(snap: Snapshot, url: str) -> str:
    header = f"{snap.server} {snap.version}  {url}  {len(snap.streams)} stream(s)"
    if not snap.streams:
        return header + "\nno streams"
    return "\n\n".join((header, _streams_table(snap), _groups_table(snap), _consumers_table(snap)))


def _entry(entry_id: str | None, age: int | None) -> str:
    return "-" if entry_id is None else f"{entry_id} ({format_age(age)} ago)"


def _streams_table(snap: Snapshot) -> str:
    rows = []
    for s in snap.streams:
        kind = "missing" if not s.exists else ("dead-letter" if s.is_dead_letter else "stream")
        dead = "-" if s.dead_letters is None else str(s.dead_letters)
        rows.append((s.name, kind, s.length, format_bytes(s.memory_bytes), _entry(s.first_id, s.first_age_ms),
                     _entry(s.last_id, s.last_age_ms), dead))
    return render_table(("STREAM", "KIND", "LENGTH", "MEMORY", "FIRST ENTRY", "LAST ENTRY", "DEAD LETTERS"), rows)


def _groups_table(snap: Snapshot) -> str:
    rows = []
    for s in snap.streams:
        for g in s.groups:
            oldest = "-"
            if g.oldest_pending_id is not None:
                oldest = (f"{g.oldest_pending_id} ({format_age(g.oldest_pending_age_ms)} old, idle "
                          f"{format_age(g.oldest_pending_idle_ms)}, delivered {g.oldest_pending_deliveries}x, "
                          f"{g.oldest_pending_consumer})")
            rows.append((s.name, g.name, len(g.consumers), g.pending, "unknown" if g.lag is None else g.lag,
                         g.last_delivered_id, oldest))
    if not rows:
        return "no groups"
    return render_table(("STREAM", "GROUP", "CONSUMERS", "PENDING", "LAG", "LAST DELIVERED", "OLDEST PENDING"),
                        rows)


def _consumers_table(snap: Snapshot) -> str:
    rows = [(s.name, g.name, c.name, c.pending, format_age(c.idle_ms),
             f"dead (idle > {format_age(snap.dead_after_ms)}, nothing pending)" if c.dead else "")
            for s in snap.streams for g in s.groups for c in g.consumers]
    if not rows:
        return "no consumers"
    return render_table(("STREAM", "GROUP", "CONSUMER", "PENDING", "IDLE", "STATE"), rows)
