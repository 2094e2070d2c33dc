"""`fastworker status`: streams, groups, consumers, lag, pending and dead letters, as tables or JSON.

The data comes from `fastworker.ops.inspect.snapshot`; this module chooses the streams, names each consumer's
state and, with --watch, the rates between two refreshes, and renders. It also holds the connection runner and the
flags that the other operating commands share (rendering helpers are in `fastworker.commands.output`).

STATE, from what the server knows of a consumer (its pending count and idle time: since it last read or claimed):
`active` (read within ACTIVE_MS), `quiet` (nothing pending, no read for longer), `stalled` (holds pending entries
and has not read for longer: its worker may be gone; the reclaimer claims them after claim idle), `dead` (nothing
pending, idle longer than --dead-after-s: housekeeping removes it); two names are not workers: `fastworker.retry`
holds the failed entries waiting for their retry, and `<name>.claim` is the reclaimer's, where claimed entries are
handled.

Rates (--watch only: they need two snapshots), per second of the server's clock between two refreshes: ADDED/S
from the stream's entries-added counter; READ/S from the group's entries-read counter (entries delivered to the
group for the first time); ACKED/S = READ/S minus the growth of the group's pending count, i.e. entries that left
the pending list (acknowledged, dead-lettered, or deleted while pending). Shown as `-` where the server does not
keep the counter (before Redis 7) or it went back (a group moved with SETID, a stream re-created).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastworker import config
from fastworker.app import load_app
from fastworker.cli import CONNECTION_FIELDS, add_settings_flags, flag_values, number
from fastworker.commands.output import (
    Styled,
    UsageError,
    format_age,
    format_bytes,
    format_rate,
    is_terminal,
    print_json,
    render_table,
)
from fastworker.config import Settings
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode
from fastworker.ops.inspect import ConsumerInfo, GroupInfo, Snapshot, snapshot
from fastworker.settlement import RETRY_CONSUMER

# The shared helpers are importable from here as before; new code imports them from fastworker.commands.output.
__all__ = ["UsageError", "add_common_flags", "app_pairs", "format_age", "format_bytes", "print_json", "register",
           "render_table", "run_with_streams", "status"]

T = TypeVar("T")
CLEAR_SCREEN = "\x1b[H\x1b[2J"
ACTIVE_MS = 60_000  # a live consumer reads at least every block_ms, or as soon as a slow batch lets it
MIN_WATCH_S = 0.5  # each refresh is a few round trips per stream: no faster than this
Rates = dict[tuple[str, str | None], dict[str, float | None]]  # (stream, group or None) -> rate name -> per second


# --- helpers shared by the operating commands ---------------------------------------------------------------------

def add_common_flags(parser: argparse.ArgumentParser, json_help: str = "print JSON for scripts",
                     settings: tuple[str, ...] = ()) -> None:
    """--json, and the flags of the connection settings, the dead-letter suffix and the `settings` named."""
    parser.add_argument("--json", action="store_true", help=json_help)
    add_settings_flags(parser, (*CONNECTION_FIELDS, "dead_letter_suffix", *settings))


def run_with_streams(settings: Settings, work: Callable[[Streams], Awaitable[T]]) -> T:
    """Run `work` with a connection to the server, in a fresh event loop, and close the connection after."""
    async def main() -> T:
        streams = Streams(settings)
        try:
            return await work(streams)
        finally:
            await streams.aclose()

    return asyncio.run(main())


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
                    "pending, lag, oldest pending entry) and consumers with their state. Default: every stream on "
                    "the server. With --watch, also the rates: entries added, read and acked per second.")
    parser.add_argument("--app", metavar="MODULE:ATTR",
                        help="the streams of this app: its handlers' streams, their dead-letter streams, and the "
                             "result streams named by --output-streams")
    parser.add_argument("--stream", action="append", default=[], metavar="STREAM",
                        help="a stream to show (repeatable)")
    parser.add_argument("--dead-after-s", type=number(above=True), default=3600.0, metavar="S",
                        help="a consumer with zero pending idle longer than this many seconds is dead")
    parser.add_argument("--watch", type=number(MIN_WATCH_S), default=None, metavar="S",
                        help=f"refresh every S seconds (at least {MIN_WATCH_S:g}) until Ctrl-C, with rates (with "
                             "--json: one JSON document a line)")
    add_common_flags(parser, settings=("output_streams",))
    parser.set_defaults(handler=status)


def status(args: argparse.Namespace) -> int:
    flags = flag_values(args)
    # Result streams are only listed here: the fleet's rules for them (a trim interval) are not status's concern.
    results = config.split_list(flags.pop("output_streams", None) or config.environ_value("output_streams") or "")
    settings, _ = config.load_settings(flags, output_streams=())
    names: list[str] | None = None
    if args.app or args.stream:
        names = list(dict.fromkeys(app_streams(args.app, settings.dead_letter_suffix, results) + args.stream))
    dead_after_ms = int(args.dead_after_s * 1000)

    async def show(streams: Streams) -> None:
        previous: Snapshot | None = None
        while True:
            snap = await snapshot(streams, names, dead_letter_suffix=settings.dead_letter_suffix,
                                  dead_after_ms=dead_after_ms)
            rates = None if args.watch is None else measure(previous, snap)
            if args.json:
                print_json({"url": settings.redacted_url(), **status_dict(snap, rates)},
                           compact=args.watch is not None)
            else:
                clear = CLEAR_SCREEN if args.watch is not None and is_terminal() else ""
                print(clear + render_status(snap, settings.redacted_url(), rates) + "\n", flush=True)
            if args.watch is None:
                return
            previous = snap
            await asyncio.sleep(args.watch)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how --watch ends
        run_with_streams(settings, show)
    return ExitCode.OK


def app_streams(reference: str | None, dead_letter_suffix: str, results: tuple[str, ...]) -> list[str]:
    """An app's streams, in order: each handler's stream and its dead-letter stream, then the result streams."""
    if not reference:
        return []
    sources = list(dict.fromkeys(stream for stream, _ in app_pairs(reference)))
    return [name for stream in sources for name in (stream, stream + dead_letter_suffix)] + list(results)


def consumer_state(consumer: ConsumerInfo, dead_after_ms: int) -> tuple[str, str, str]:
    """(state word, what the STATE column says, its colour) of one consumer; see the module docstring."""
    if consumer.name == RETRY_CONSUMER:
        return "retries", f"retries waiting ({consumer.pending})", "cyan"
    if consumer.name.endswith(".claim"):
        return "reclaimer", "reclaimer" + (f", handling {consumer.pending}" if consumer.pending else ""), "cyan"
    if consumer.dead:
        return "dead", f"dead (idle > {format_age(dead_after_ms)}, nothing pending)", "red"
    if consumer.idle_ms <= ACTIVE_MS:
        return "active", "active", "green"
    if consumer.pending:
        return "stalled", f"stalled (holds pending, no read for > {format_age(ACTIVE_MS)})", "yellow"
    return "quiet", f"quiet (nothing pending, no read for > {format_age(ACTIVE_MS)})", "dim"


def measure(previous: Snapshot | None, snap: Snapshot) -> Rates:
    """Rates per second of server time between two snapshots (none at the first refresh); see the docstring."""
    rates: Rates = {}
    before = {s.name: s for s in previous.streams} if previous else {}
    seconds = (snap.taken_at_ms - previous.taken_at_ms) / 1000 if previous else 0.0
    for stream in snap.streams:
        old = before.get(stream.name)
        rates[(stream.name, None)] = {"added": _rate(old.entries_added if old else None, stream.entries_added,
                                                     seconds)}
        old_groups = {g.name: g for g in old.groups} if old else {}
        for group in stream.groups:
            was = old_groups.get(group.name)
            read = _rate(_entries_read(was) if was else None, _entries_read(group), seconds)
            pending_growth = _rate(was.pending if was else None, group.pending, seconds, may_fall=True)
            acked = None if read is None or pending_growth is None else max(0.0, read - pending_growth)
            rates[(stream.name, group.name)] = {"read": read, "acked": acked}
    return rates


def _entries_read(group: GroupInfo) -> int | None:
    """The group's entries-read counter; a group that never read anything has none yet, but it read 0."""
    if group.entries_read is None and group.last_delivered_id == "0-0":
        return 0
    return group.entries_read


def _rate(before: int | None, after: int | None, seconds: float, may_fall: bool = False) -> float | None:
    if before is None or after is None or seconds <= 0 or (after < before and not may_fall):
        return None
    return (after - before) / seconds


def status_dict(snap: Snapshot, rates: Rates | None) -> dict[str, Any]:
    """The snapshot as plain data, each consumer with its state word, and (with --watch) the rates."""
    data = snap.to_dict()
    for stream_data, stream in zip(data["streams"], snap.streams, strict=True):
        if rates is not None:
            stream_data["rates"] = {f"{k}_per_s": v for k, v in rates[(stream.name, None)].items()}
        for group_data, group in zip(stream_data["groups"], stream.groups, strict=True):
            if rates is not None:
                group_data["rates"] = {f"{k}_per_s": v for k, v in rates[(stream.name, group.name)].items()}
            for consumer_data, consumer in zip(group_data["consumers"], group.consumers, strict=True):
                consumer_data["state"] = consumer_state(consumer, snap.dead_after_ms)[0]
    return data


def render_status(snap: Snapshot, url: str, rates: Rates | None = None) -> str:
    header = f"{snap.server} {snap.version}  {url}  {len(snap.streams)} stream(s)"
    if not snap.streams:
        return header + "\nno streams"
    return "\n\n".join((header, _streams_table(snap, rates), _groups_table(snap, rates), _consumers_table(snap)))


def _entry(entry_id: str | None, age: int | None) -> str:
    return "-" if entry_id is None else f"{entry_id} ({format_age(age)} ago)"


def _streams_table(snap: Snapshot, rates: Rates | None) -> str:
    headers = ["STREAM", "KIND", "LENGTH", "MEMORY", "FIRST ENTRY", "LAST ENTRY", "DEAD LETTERS"]
    rows = []
    for s in snap.streams:
        kind = Styled("missing", "yellow") if not s.exists else ("dead-letter" if s.is_dead_letter else "stream")
        dead = "-" if s.dead_letters is None else Styled(str(s.dead_letters), "red" if s.dead_letters else "")
        row: list[Any] = [s.name, kind, s.length, format_bytes(s.memory_bytes), _entry(s.first_id, s.first_age_ms),
                          _entry(s.last_id, s.last_age_ms), dead]
        if rates is not None:
            row.append(format_rate(rates[(s.name, None)]["added"]))
        rows.append(row)
    return render_table(headers + (["ADDED/S"] if rates is not None else []), rows)


def _groups_table(snap: Snapshot, rates: Rates | None) -> str:
    rows = []
    for s in snap.streams:
        for g in s.groups:
            oldest = "-"
            if g.oldest_pending_id is not None:
                oldest = (f"{g.oldest_pending_id} ({format_age(g.oldest_pending_age_ms)} old, idle "
                          f"{format_age(g.oldest_pending_idle_ms)}, delivered {g.oldest_pending_deliveries}x, "
                          f"{g.oldest_pending_consumer})")
            row: list[Any] = [s.name, g.name, len(g.consumers), g.pending, "unknown" if g.lag is None else g.lag,
                              g.last_delivered_id, oldest]
            if rates is not None:
                row += [format_rate(rates[(s.name, g.name)][name]) for name in ("read", "acked")]
            rows.append(row)
    if not rows:
        return "no groups"
    headers = ["STREAM", "GROUP", "CONSUMERS", "PENDING", "LAG", "LAST DELIVERED", "OLDEST PENDING"]
    return render_table(headers + (["READ/S", "ACKED/S"] if rates is not None else []), rows)


def _consumers_table(snap: Snapshot) -> str:
    rows = []
    for s in snap.streams:
        for g in s.groups:
            for c in g.consumers:
                _, state, colour = consumer_state(c, snap.dead_after_ms)
                rows.append((s.name, g.name, c.name, c.pending, format_age(c.idle_ms), Styled(state, colour)))
    if not rows:
        return "no consumers"
    return render_table(("STREAM", "GROUP", "CONSUMER", "PENDING", "IDLE", "STATE"), rows)
