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

import redis.exceptions as rex

from fastworker.edge.errors import translated
from fastworker.errors import FastworkerError
from fastworker.ops.inspect import format_id, parse_id, text
from fastworker.streams import Streams

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
    count, first, last = 0, None, None
    cursor = start
    while True:
        with translated(streams.url):
            page = await streams.redis.xrange(stream, cursor, end, count=PAGE)
        if not page:
            break
        page_last: str = text(page[-1][0])
        first, last, count = first or text(page[0][0]), page_last, count + len(page)
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
    new_ids: list[str] = []
    cursor = plan.first_id
    while True:
        with translated(streams.url):
            page = await streams.redis.xrange(plan.stream, cursor, plan.last_id, count=PAGE)
            if not page:
                break
            async with streams.redis.pipeline(transaction=False) as pipe:
                for _, fields in page:
                    copy: dict[Any, Any] = fields or {}
                    pipe.xadd(plan.to_stream, copy)
                new_ids += [text(i) for i in await pipe.execute()]
        if len(page) < PAGE:
            break
        cursor = "(" + text(page[-1][0])
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
    with translated(streams.url):
        try:
            groups = await streams.redis.xinfo_groups(stream)
        except rex.ResponseError as exc:
            raise GroupNotFound(f"stream {stream!r} does not exist") from exc
    for info in groups:
        if text(info["name"]) == group:
            lag = info.get("lag")
            return ResetPlan(stream, group, text(info["last-delivered-id"]), new_id, int(info["pending"]),
                             None if lag is None else int(lag))
    raise GroupNotFound(f"stream {stream!r} has no group {group!r}")


async def reset_group(streams: Streams, plan: ResetPlan) -> None:
    """XGROUP SETID: the group's next read returns the entries after `plan.new_id`."""
    with translated(streams.url):
        await streams.redis.xgroup_setid(plan.stream, plan.group, plan.new_id)
    logger.debug("moved group cursor stream=%s group=%s from=%s to=%s", plan.stream, plan.group, plan.current_id,
                plan.new_id)
