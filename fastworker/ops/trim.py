"""Safe trimming: remove the entries of a stream that every consumer group is done with, and nothing else.

Invariant: an entry some group has not acknowledged is never removed. Per group, the oldest entry it still needs is
the smaller of its oldest pending entry and the first entry after its last delivered id (everything after the
cursor is undelivered, or will be when it arrives). That bound does not depend on `lag`, which the server cannot
always compute. The trim point (MINID, exact, never `~`) is the smallest of those bounds and of the retention
window (keep the newest N entries, or those newer than S seconds); XTRIM MINID removes only ids below it.

Output streams (where handlers' results go) have a retention policy instead of a window: at most the newest N
entries (`max_len`) and nothing older than S seconds (`max_age_ms`). An entry goes when it breaks either limit, so
the policy is one bound, the later of the two cut points; the length cut is the exact id of the entry at that
position, never a blind MAXLEN. Groups' bounds still clamp it: a policy never removes an entry a group needs. A
stream without groups (an app reading with plain XREAD) has nothing to clamp it, so it is trimmed by the policy
alone; that takes `force`, which the fleet passes only for the output streams it was told about.

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
from collections.abc import Iterable
from typing import Any

from fastworker.config import Settings
from fastworker.edge.admin import Admin
from fastworker.edge.streams import Streams
from fastworker.errors import FastworkerError
from fastworker.ops.inspect import format_id, groups_info, min_id, next_id, parse_id, server_time_ms

logger = logging.getLogger(__name__)

COUNT_CAP = 100_000
PAGE = 1000  # entries per XRANGE / XREVRANGE page while walking a stream
# A length limit reads entries to find its cut point: from whichever end is nearer, and at most this many per trim.
# A trim that runs every few seconds reads about what was added since the last one; a stream far over its limit
# loses this many entries per trim until it is within it.
SCAN_CAP = 100_000
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


@dataclasses.dataclass(frozen=True)
class Policy:
    """How the fleet's housekeeping trims one stream: `safe_trim`'s arguments."""

    retain_ms: int = 0  # window: keep at least what was added this recently (job streams)
    max_len: int = 0  # output policy: keep at most this many newest entries
    max_age_ms: int = 0  # output policy: keep nothing older than this
    force: bool = False  # trim without groups, by the window and policy alone


def housekeeping_plan(job_streams: Iterable[str], settings: Settings) -> dict[str, Policy]:
    """What the fleet's trim timer does to each stream.

    Job streams (the app's handlers read them): everything every group is done with, keeping `trim_retain_s`.
    Output streams (`output_streams`, named by the operator): the output policy, clamped by any group on them,
    and trimmed by the policy alone when they have no group (an app reading them with plain XREAD). A stream that
    is both keeps the job window too, and is never trimmed without a group. Nothing else is touched, dead-letter
    streams included (they are the operator's to-do list) unless they are named as output streams.
    """
    retain_ms = int(settings.trim_retain_s * 1000)
    plan = {stream: Policy(retain_ms=retain_ms) for stream in job_streams}
    for stream in settings.output_streams:
        plan[stream] = Policy(retain_ms=retain_ms if stream in plan else 0, max_len=settings.output_max_len,
                              max_age_ms=int(settings.output_max_age_s * 1000), force=stream not in plan)
    return plan


async def supports_acked_trim(streams: Streams) -> bool:
    """Whether the server takes `XTRIM key MINID id ACKED` (Redis 8.2+), from its COMMAND DOCS."""
    if streams.url not in _ACKED_SUPPORT:
        try:
            docs = await Admin(streams).command_docs("XTRIM")
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
    admin = Admin(streams)
    bounds = []
    for group in groups:
        undelivered = next_id(group.last_delivered_id)
        bounds.append(Bound(f"group {group.name}: entries after its last delivered id", undelivered))
        if group.pending:
            # None, or no min id: the group was deleted, or its entries settled, since XINFO GROUPS
            summary = await admin.pending_summary(stream, group.name)
            if summary is not None and summary.min_id is not None:
                bounds.append(Bound(f"group {group.name}: oldest pending entry", summary.min_id))
    return bounds


async def retention_bounds(streams: Streams, stream: str, retain_count: int, retain_ms: int) -> list[Bound]:
    """The retention window: each bound keeps at least what it names, even when every group acknowledged it."""
    bounds = []
    if retain_count > 0:
        # Fewer entries than the window: keep them all (0-1 is below every real id but 0-0).
        keep_from = await nth_entry(streams, stream, retain_count, newest=True) or "0-0"
        bounds.append(Bound(f"retain the newest {retain_count} entries", keep_from))
    if retain_ms > 0:
        bounds.append(Bound(f"retain entries newer than {retain_ms / 1000:g} s", await _newer_than(streams, retain_ms)))
    return bounds


async def policy_bound(streams: Streams, stream: str, max_len: int, max_age_ms: int, *, needed: str | None = None,
                       scan_cap: int = SCAN_CAP) -> Bound | None:
    """An output stream's retention policy as one bound: keep at most the newest `max_len` entries and nothing
    older than `max_age_ms`. An entry breaking either limit goes, so the later cut point wins. None: no policy.
    `needed`: the oldest entry some group needs, if any; the trim stops there whatever the policy says."""
    limits = []
    if max_len > 0:
        keep_from, exact = await length_cut(streams, stream, max_len, scan_cap, needed=needed)
        reason = f"keep at most the newest {max_len} entries"
        limits.append(Bound(reason if exact else f"{reason} (at most {scan_cap} removed per trim)", keep_from))
    if max_age_ms > 0:
        limits.append(Bound(f"keep nothing older than {max_age_ms / 1000:g} s", await _newer_than(streams, max_age_ms)))
    return max(limits, key=lambda bound: parse_id(bound.keep_from)) if limits else None


async def length_cut(streams: Streams, stream: str, max_len: int, scan_cap: int = SCAN_CAP, *,
                     needed: str | None = None) -> tuple[str, bool]:
    """(keep_from, exact): keeping the entries from `keep_from` on leaves at most `max_len` of them.

    The exact cut is the oldest of the newest `max_len` entries, or, counted from the other end, the entry right
    after the excess; it is read from the nearer end. When both walks are longer than `scan_cap`, the cut is the
    entry right after the oldest `scan_cap` entries instead (not exact: more is removed at the next trim). Entries
    added meanwhile only make it keep more; an entry deleted meanwhile at most makes it keep fewer than `max_len`.
    A walk from the oldest end stops at `needed` (no trim goes past it), which is then the cut.
    """
    length = await Admin(streams).length(stream)
    excess = length - max_len
    if excess <= 0:
        return "0-0", True
    if max_len <= min(excess, scan_cap):  # the newest end is nearer, and near enough
        return await nth_entry(streams, stream, max_len, newest=True) or "0-0", True
    walk = min(excess, scan_cap)  # the excess from the oldest end, at most scan_cap of it
    end = "(" + needed if needed is not None else "+"
    keep_from = await nth_entry(streams, stream, walk + 1, newest=False, end=end)
    if keep_from is None:  # reached what a group needs first (or the stream shrank meanwhile)
        return needed or "0-0", True
    return keep_from, walk == excess


async def nth_entry(streams: Streams, stream: str, n: int, *, newest: bool, end: str | None = None) -> str | None:
    """The id of the `n`-th entry (from 1) counted from the newest or the oldest end; None when there are fewer
    (up to `end`, an XRANGE / XREVRANGE bound, when given).

    Pages of PAGE entries (XREVRANGE or XRANGE ... COUNT), so no reply holds more than a page."""
    admin = Admin(streams)
    cursor, found, last = "+" if newest else "-", 0, None
    end = end or ("-" if newest else "+")
    while found < n:
        page = await admin.entries(stream, cursor, end, min(PAGE, n - found), reverse=newest)
        if not page:
            return None
        found += len(page)
        last = page[-1][0]
        cursor = "(" + last
    return last


async def _newer_than(streams: Streams, age_ms: int) -> str:
    """The smallest id of an entry added less than `age_ms` ago, by the server's clock (ids carry its time)."""
    now_ms = await server_time_ms(streams)
    return format_id((max(0, now_ms - age_ms), 0))


async def safe_trim(streams: Streams, stream: str, retain_count: int = 0, retain_ms: int = 0, *,
                    max_len: int = 0, max_age_ms: int = 0, force: bool = False,
                    dry_run: bool = False) -> TrimResult:
    """Trim `stream` up to the oldest entry a group still needs, keeping the retention window.

    `retain_count` / `retain_ms` keep at least that much (a window); `max_len` / `max_age_ms` are an output
    stream's policy: keep at most that much. Without a policy, everything the groups are done with goes; with one,
    only what is outside it. The trim point is never past a group's needs, nor into the window.
    Refuses (TrimRefused) when the stream does not exist, and when it has no groups unless `force` (then only
    the window and the policy, one of which must be given, bound the trim). Writes: one XTRIM MINID, unless
    `dry_run`.
    """
    bounds = await group_bounds(streams, stream)
    if bounds is None:
        raise TrimRefused(f"stream {stream!r} does not exist")
    if not bounds and not force:
        raise TrimRefused(f"stream {stream!r} has no consumer group, so nothing says which entries are done "
                          "with; pass --force with --retain, --retain-s, --max-len or --max-age-s to trim by "
                          "retention alone")
    if not bounds and not (retain_count > 0 or retain_ms > 0 or max_len > 0 or max_age_ms > 0):
        raise TrimRefused(f"stream {stream!r} has no consumer group and no retention was given: "
                          "that would remove every entry")
    before = await _facts(streams, stream)
    first_id = before[2]
    needed = min_id(b.keep_from for b in bounds) if bounds else None
    if first_id is None or (needed is not None and parse_id(needed) <= parse_id(first_id)):
        # Nothing can go (e.g. a group is behind): the window and the policy need not be read.
        return TrimResult(stream, None, bounds, 0, before[0], before[0], before[1], before[1], False, dry_run)
    bounds += await retention_bounds(streams, stream, retain_count, retain_ms)
    policy = await policy_bound(streams, stream, max_len, max_age_ms, needed=needed)
    if policy is not None:
        bounds.append(policy)
    minid = min_id(b.keep_from for b in bounds)
    if parse_id(minid) <= parse_id(first_id):
        return TrimResult(stream, None, bounds, 0, before[0], before[0], before[1], before[1], False, dry_run)
    if dry_run:
        removed = await count_below(streams, stream, minid)
        return TrimResult(stream, minid, bounds, removed, before[0], before[0] - removed, before[1], None, False,
                          True)
    acked = await supports_acked_trim(streams)
    removed = await Admin(streams).trim_below(stream, minid, acked=acked)
    after = await _facts(streams, stream)
    logger.debug("trimmed stream=%s minid=%s removed=%d acked_option=%s", stream, minid, removed, acked)
    return TrimResult(stream, minid, bounds, removed, before[0], after[0], before[1], after[1], acked, False)


async def _facts(streams: Streams, stream: str) -> tuple[int, int | None, str | None]:
    """(length, memory usage, first entry id)."""
    size = await Admin(streams).size(stream)
    return size.length, size.memory_bytes, size.first_id


async def count_below(streams: Streams, stream: str, minid: str, cap: int = COUNT_CAP) -> int:
    """Entries with ids below `minid`, counted by paging (up to `cap`: a dry run should stay cheap)."""
    admin = Admin(streams)
    count, cursor = 0, "-"
    end = "(" + minid
    while count < cap:
        page = await admin.entries(stream, cursor, end, min(1000, cap - count))
        count += len(page)
        if not page:
            break
        cursor = "(" + page[-1][0]
    return count
