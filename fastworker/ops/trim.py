"""Safe trimming: remove the entries of a stream that every consumer group is done with, and nothing else.

Invariant: an entry some group has not acknowledged is never removed. Per group, the oldest entry it still needs is
the smaller of its oldest pending entry and the first entry after its last delivered id (everything after the
cursor is undelivered, or will be when it arrives). That bound does not depend on `lag`, which the server cannot
always compute. The trim point (MINID, exact, never `~`) is the smallest of those bounds and of the retention
window (keep the newest N entries, or those newer than S seconds); XTRIM MINID removes only ids below it.

A producer-side `MAXLEN` knows nothing of groups: under a backlog it drops entries no worker has read yet. That is
why trimming belongs here and a producer should not trim at all.

The plan and the trim are separate commands, so a group created (or a cursor moved back) in between could want
entries the plan let go. Where the server has `XTRIM ... ACKED` (Redis 8.2+), the trim carries it and the server
itself keeps any entry some group has not acknowledged, which closes that window; elsewhere (Redis 7, Valkey 9.1)
the window is the milliseconds between two commands.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastworker.errors import FastworkerError
from fastworker.ops.inspect import format_id, groups_info, min_id, next_id, parse_id, server_time_ms, text
from fastworker.streams import Streams, translated

logger = logging.getLogger(__name__)

COUNT_CAP = 100_000
_ACKED_SUPPORT: dict[str, bool] = {}  # per server URL: detected once per process


class TrimRefused(FastworkerError):
    """Trimming this stream would not be safe, or the stream does not exist."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """One reason to keep entries: everything from `keep_from` on is kept for it."""

    reason: str
    keep_from: str


@dataclasses.dataclass(frozen=True)
class TrimResult:
    stream: str
    minid: str | None  # entries below this id were (or would be) removed; None when there was nothing to trim
    bounds: list[Bound]  # every constraint considered; the smallest keep_from won
    removed: int  # entries removed (in a dry run: entries that would be, counted up to COUNT_CAP)
    length_before: int
    length_after: int
    memory_before: int | None
    memory_after: int | None
    acked_option: bool  # the trim used XTRIM ... ACKED
    dry_run: bool

    @property
    def limited_by(self) -> str | None:
        return min(self.bounds, key=lambda b: parse_id(b.keep_from)).reason if self.bounds else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "limited_by": self.limited_by}


async def supports_acked_trim(streams: Streams) -> bool:
    """Whether the server takes `XTRIM key MINID id ACKED` (Redis 8.2+), from its COMMAND DOCS."""
    if streams.url not in _ACKED_SUPPORT:
        try:
            with translated(streams.url):
                docs = await _command(streams, "COMMAND DOCS", "XTRIM")
            _ACKED_SUPPORT[streams.url] = has_token(docs, b"ACKED")
        except FastworkerError as exc:  # a server without COMMAND DOCS (before 7.0) has no ACKED either
            logger.debug("COMMAND DOCS XTRIM failed: %s", exc)
            _ACKED_SUPPORT[streams.url] = False
    return _ACKED_SUPPORT[streams.url]


def has_token(reply: Any, token: bytes) -> bool:
    """Whether a COMMAND DOCS reply (nested maps and lists, RESP2 or RESP3) names the argument token."""
    if isinstance(reply, bytes | str):
        return (reply.encode() if isinstance(reply, str) else reply).upper() == token
    if isinstance(reply, dict):
        return any(has_token(key, token) or has_token(value, token) for key, value in reply.items())
    if isinstance(reply, list | tuple):
        return any(has_token(item, token) for item in reply)
    return False


async def group_bounds(streams: Streams, stream: str) -> list[Bound] | None:
    """What each group of `stream` still needs; None when the stream does not exist."""
    groups = await groups_info(streams, stream)
    if groups is None:
        return None
    with translated(streams.url):
        bounds = []
        for group in groups:
            name = text(group["name"])
            undelivered = next_id(text(group["last-delivered-id"]))
            bounds.append(Bound(f"group {name}: entries after its last delivered id", undelivered))
            if int(group["pending"]):
                summary = await streams.redis.xpending(stream, name)
                bounds.append(Bound(f"group {name}: oldest pending entry", text(summary["min"])))
    return bounds


async def retention_bounds(streams: Streams, stream: str, retain_count: int, retain_ms: int) -> list[Bound]:
    bounds = []
    if retain_count > 0:
        with translated(streams.url):
            newest = await streams.redis.xrevrange(stream, "+", "-", count=retain_count) or []
        # Fewer entries than the window: keep them all (0-1 is below every real id but 0-0).
        keep_from = text(newest[-1][0]) if len(newest) == retain_count else "0-0"
        bounds.append(Bound(f"retain the newest {retain_count} entries", keep_from))
    if retain_ms > 0:
        now_ms = await server_time_ms(streams)
        bounds.append(Bound(f"retain entries newer than {retain_ms / 1000:g} s",
                            format_id((max(0, now_ms - retain_ms), 0))))
    return bounds


async def safe_trim(streams: Streams, stream: str, retain_count: int = 0, retain_ms: int = 0, *,
                    force: bool = False, dry_run: bool = False) -> TrimResult:
    """Trim `stream` up to the oldest entry a group still needs, keeping the retention window.

    Refuses (TrimRefused) when the stream does not exist, and when it has no groups unless `force` (then only
    the retention window, which must be given, bounds the trim). Writes: one XTRIM MINID, unless `dry_run`.
    """
    bounds = await group_bounds(streams, stream)
    if bounds is None:
        raise TrimRefused(f"stream {stream!r} does not exist")
    if not bounds and not force:
        raise TrimRefused(f"stream {stream!r} has no consumer group, so nothing says which entries are done "
                          "with; pass --force with --retain or --retain-s to trim by retention alone")
    retention = await retention_bounds(streams, stream, retain_count, retain_ms)
    if not bounds and not retention:
        raise TrimRefused(f"stream {stream!r} has no consumer group and no retention was given: "
                          "that would remove every entry")
    bounds += retention
    before = await _facts(streams, stream)
    minid = min_id(b.keep_from for b in bounds)
    first_id = before[2]
    if first_id is None or parse_id(minid) <= parse_id(first_id):
        return TrimResult(stream, None, bounds, 0, before[0], before[0], before[1], before[1], False, dry_run)
    if dry_run:
        removed = await count_below(streams, stream, minid)
        return TrimResult(stream, minid, bounds, removed, before[0], before[0] - removed, before[1], None, False,
                          True)
    acked = await supports_acked_trim(streams)
    with translated(streams.url):
        removed = int(await _command(streams, "XTRIM", stream, "MINID", "=", minid, *(("ACKED",) if acked else ())))
    after = await _facts(streams, stream)
    logger.debug("trimmed stream=%s minid=%s removed=%d acked_option=%s", stream, minid, removed, acked)
    return TrimResult(stream, minid, bounds, removed, before[0], after[0], before[1], after[1], acked, False)


async def _facts(streams: Streams, stream: str) -> tuple[int, int | None, str | None]:
    """(length, memory usage, first entry id)."""
    with translated(streams.url):
        async with streams.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.memory_usage(stream)
            pipe.xrange(stream, "-", "+", count=1)
            length, memory, first = await pipe.execute()
    return int(length), None if memory is None else int(memory), text(first[0][0]) if first else None


async def count_below(streams: Streams, stream: str, minid: str, cap: int = COUNT_CAP) -> int:
    """Entries with ids below `minid`, counted by paging (up to `cap`: a dry run should stay cheap)."""
    count, cursor = 0, "-"
    end = "(" + minid
    while count < cap:
        with translated(streams.url):
            page = await streams.redis.xrange(stream, cursor, end, count=min(1000, cap - count)) or []
        count += len(page)
        if not page:
            break
        cursor = "(" + text(page[-1][0])
    return count


async def _command(streams: Streams, *args: Any) -> Any:
    return await streams.redis.execute_command(*args)  # type: ignore[no-untyped-call]
