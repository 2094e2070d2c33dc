"""Replay: re-publish a range of entries, or move a group's cursor (XGROUP SETID), for debugging and recovery.

Both come in two steps, a plan (read-only: what would happen) and its execution, so the command can show the plan
and act only when told to. Invariants:
- A replay into the same stream reads no further than the range's last entry as it was when planned: the entries
  it appends itself are never replayed again (the range would otherwise grow as fast as it is copied).
- Replayed entries get the original fields verbatim and new ids; the originals stay where they are.
- Moving a cursor touches neither the stream nor the PEL: entries pending in the group stay pending.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastworker.edge.admin import Admin
from fastworker.edge.streams import Streams
from fastworker.errors import FastworkerError, RedisCommandError
from fastworker.ops.inspect import format_id, parse_id

logger = logging.getLogger(__name__)

PAGE = 500


class GroupNotFound(FastworkerError):
    """The stream or the consumer group does not exist."""


def check_id(entry_id: str, specials: tuple[str, ...] = ()) -> str:
    """`entry_id` normalised to MS-SEQ (or one of `specials`); raises a one-line error when malformed."""
    if entry_id in specials:
        return entry_id
    return format_id(parse_id(entry_id))


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    stream: str
    to_stream: str
    start: str
    end: str
    count: int  # entries in the range now
    first_id: str | None
    last_id: str | None  # the replay stops here, whatever is appended meanwhile


async def plan_replay(streams: Streams, stream: str, start: str, end: str, to_stream: str | None = None) -> ReplayPlan:
    """Count the entries of `stream` in [start, end] (read-only)."""
    start, end = check_id(start, ("-",)), check_id(end, ("+",))
    admin = Admin(streams)
    count, first, last = 0, None, None
    cursor = start
    while True:
        page = await admin.entries(stream, cursor, end, PAGE)
        if not page:
            break
        page_last = page[-1][0]
        first, last, count = first or page[0][0], page_last, count + len(page)
        if len(page) < PAGE:
            break
        cursor = "(" + page_last
    return ReplayPlan(stream, to_stream or stream, start, end, count, first, last)


async def replay(streams: Streams, plan: ReplayPlan) -> list[str]:
    """Append a copy of every entry of the plan's range to `plan.to_stream`; return the new ids.

    Writes: one XADD per entry, pipelined per page of PAGE entries.
    """
    if plan.first_id is None or plan.last_id is None:
        return []
    admin = Admin(streams)
    new_ids: list[str] = []
    cursor = plan.first_id
    while True:
        page = await admin.entries(plan.stream, cursor, plan.last_id, PAGE)
        if not page:
            break
        new_ids += await admin.add_entries(plan.to_stream, [fields for _, fields in page])
        if len(page) < PAGE:
            break
        cursor = "(" + page[-1][0]
    logger.debug("replayed stream=%s first=%s last=%s to=%s count=%d", plan.stream, plan.first_id, plan.last_id,
                plan.to_stream, len(new_ids))
    return new_ids


@dataclasses.dataclass(frozen=True)
class ResetPlan:
    stream: str
    group: str
    current_id: str  # the group's last delivered id now
    new_id: str
    pending: int
    lag: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def plan_reset(streams: Streams, stream: str, group: str, new_id: str) -> ResetPlan:
    """Where `group`'s cursor is now and where it would go (read-only)."""
    new_id = check_id(new_id, ("$", "0"))
    try:
        groups = await Admin(streams).groups(stream)
    except RedisCommandError as exc:  # a key of another type: no stream by that name
        raise GroupNotFound(f"stream {stream!r} does not exist") from exc
    if groups is None:
        raise GroupNotFound(f"stream {stream!r} does not exist")
    for info in groups:
        if info.name == group:
            return ResetPlan(stream, group, info.last_delivered_id, new_id, info.pending, info.lag)
    raise GroupNotFound(f"stream {stream!r} has no group {group!r}")


async def reset_group(streams: Streams, plan: ResetPlan) -> None:
    """XGROUP SETID: the group's next read returns the entries after `plan.new_id`."""
    await Admin(streams).set_group_cursor(plan.stream, plan.group, plan.new_id)
    logger.debug("moved group cursor stream=%s group=%s from=%s to=%s", plan.stream, plan.group, plan.current_id,
                plan.new_id)
