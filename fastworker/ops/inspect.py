"""Read-only inspection of a server: streams, groups, consumers, dead-letter streams, and the health probe.

This module owns the typed snapshot that `fastworker status`, `fastworker health` and the metrics gauges read.
It never writes to the server. Every age is measured against the server's clock (TIME), not the local one,
because entry ids carry the server's milliseconds: an operator's laptop with a skewed clock would otherwise show
negative or inflated ages. A group's `lag` may be null (the server cannot compute it after an XDEL of an entry the
group has not read yet): it stays `None` here and callers show it as unknown.

The oldest pending entry of a group is found with the extended XPENDING form (`- + 1`): one call gives its id
(whose millisecond part is the time it was added, so its age is `now - ms`), how long since it was last delivered
(idle) and how many times it was delivered. The summary form would give the id only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastworker.edge.admin import Admin, ConsumerRow, GroupRow, PendingEntry
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode, FastworkerError

logger = logging.getLogger(__name__)

DEFAULT_DEAD_AFTER_MS = 3_600_000
MAX_SEQ = 2**64 - 1


def text(value: Any) -> str:
    """A reply value as str, undecodable bytes replaced: for showing, never for deciding."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# --- entry ids ------------------------------------------------------------------------------------------------

class InvalidEntryId(FastworkerError):
    """A stream entry id given by a person or a script is malformed."""

    exit_code = ExitCode.USAGE


def parse_id(entry_id: str) -> tuple[int, int]:
    """(milliseconds, sequence) of an entry id; `1700000000000` alone means sequence 0."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise InvalidEntryId(f"not a stream entry id: {entry_id!r} (expected MS-SEQ)") from None


def format_id(parts: tuple[int, int]) -> str:
    return f"{parts[0]}-{parts[1]}"


def id_ms(entry_id: str) -> int:
    return parse_id(entry_id)[0]


def next_id(entry_id: str) -> str:
    """The smallest id greater than `entry_id`."""
    ms, seq = parse_id(entry_id)
    return format_id((ms + 1, 0) if seq == MAX_SEQ else (ms, seq + 1))


def min_id(ids: Iterable[str]) -> str:
    return format_id(min(parse_id(i) for i in ids))


def age_ms(entry_id: str | None, now_ms: int) -> int | None:
    """Milliseconds since the entry was added (its id's time part), never negative."""
    return None if entry_id is None else max(0, now_ms - id_ms(entry_id))


async def server_time_ms(streams: Streams) -> int:
    """The server's clock in milliseconds (entry ids are stamped with it)."""
    return await Admin(streams).server_time_ms()


# --- snapshot types -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int  # since its last attempted interaction (a read, even an empty one, resets it)
    dead: bool  # zero pending and idle longer than the snapshot's dead_after_ms


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    name: str
    consumers: list[ConsumerInfo]
    pending: int
    lag: int | None  # entries not yet delivered to the group; None when the server cannot tell
    last_delivered_id: str
    entries_read: int | None
    oldest_pending_id: str | None
    oldest_pending_age_ms: int | None  # since the entry was added to the stream
    oldest_pending_idle_ms: int | None  # since it was last delivered
    oldest_pending_deliveries: int | None
    oldest_pending_consumer: str | None

    @property
    def dead_consumers(self) -> list[str]:
        return [consumer.name for consumer in self.consumers if consumer.dead]


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    name: str
    exists: bool
    is_dead_letter: bool  # a dead-letter stream (its name ends with the dead-letter suffix)
    length: int
    first_id: str | None
    last_id: str | None
    first_age_ms: int | None
    last_age_ms: int | None
    memory_bytes: int | None
    groups: list[GroupInfo]
    dead_letter_stream: str | None  # for a source stream: where its dead letters go
    dead_letters: int | None  # length of that stream (0 when it does not exist)
    entries_added: int | None = None  # every entry ever added (XINFO STREAM entries-added; Redis 7+): rates


@dataclasses.dataclass(frozen=True)
class Snapshot:
    taken_at_ms: int  # server clock
    server: str
    version: str
    dead_after_ms: int
    streams: list[StreamInfo]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON, with each group's dead consumers listed."""
        data = dataclasses.asdict(self)
        for stream_data, stream in zip(data["streams"], self.streams, strict=True):
            for group_data, group in zip(stream_data["groups"], stream.groups, strict=True):
                group_data["dead_consumers"] = group.dead_consumers
        return data


# --- gathering ----------------------------------------------------------------------------------------------------

async def list_streams(streams: Streams, match: str | None = None) -> list[str]:
    """Every stream key on the server (SCAN TYPE stream), sorted."""
    return await Admin(streams).scan_streams(match)


def is_dead_letter_stream(name: str, dead_letter_suffix: str) -> bool:
    return name.endswith(dead_letter_suffix) and len(name) > len(dead_letter_suffix)


async def snapshot(streams: Streams, stream_names: Sequence[str] | None = None, *,
                   dead_letter_suffix: str = ":dead", dead_after_ms: int = DEFAULT_DEAD_AFTER_MS) -> Snapshot:
    """Everything `fastworker status` shows, for the named streams (default: every stream on the server).

    A named stream that does not exist is reported with `exists=False` rather than raising, so a status of an
    app whose producers have not written yet still works.
    """
    names = list(stream_names) if stream_names is not None else await list_streams(streams)
    server, version = await streams.server_version()
    now_ms = await server_time_ms(streams)
    infos = [await inspect_stream(streams, name, dead_letter_suffix, dead_after_ms) for name in names]
    return Snapshot(now_ms, server, version, dead_after_ms, infos)


async def inspect_stream(streams: Streams, name: str, dead_letter_suffix: str = ":dead",
                         dead_after_ms: int = DEFAULT_DEAD_AFTER_MS) -> StreamInfo:
    """One stream's StreamInfo, in two round trips (stream facts with the server's clock, then every group's
    consumers and oldest pending entry)."""
    is_dead = is_dead_letter_stream(name, dead_letter_suffix)
    dead_stream = None if is_dead else name + dead_letter_suffix
    admin = Admin(streams)
    facts = await admin.overview(name, dead_stream)
    if not facts.exists:
        return StreamInfo(name, False, is_dead, 0, None, None, None, None, None, [], dead_stream, facts.dead_letters)
    details = await admin.group_details(name, [group.name for group in facts.groups])
    group_infos = [_group(group, *details[group.name], dead_after_ms, facts.now_ms)
                   for group in facts.groups if group.name in details]  # one deleted meanwhile is left out
    now_ms = facts.now_ms
    return StreamInfo(name, True, is_dead, facts.length, facts.first_id, facts.last_id,
                      age_ms(facts.first_id, now_ms), age_ms(facts.last_id, now_ms), facts.memory_bytes, group_infos,
                      dead_stream, facts.dead_letters, facts.entries_added)


def _group(group: GroupRow, consumers: list[ConsumerRow], oldest: PendingEntry | None, dead_after_ms: int,
           now_ms: int) -> GroupInfo:
    consumer_infos = [ConsumerInfo(c.name, c.pending, c.idle_ms, c.pending == 0 and c.idle_ms > dead_after_ms)
                      for c in consumers]
    oldest_id = oldest.id if oldest else None
    return GroupInfo(
        name=group.name,
        consumers=consumer_infos,
        pending=group.pending,
        lag=group.lag,
        last_delivered_id=group.last_delivered_id,
        entries_read=group.entries_read,
        oldest_pending_id=oldest_id,
        oldest_pending_age_ms=age_ms(oldest_id, now_ms),
        oldest_pending_idle_ms=oldest.idle_ms if oldest else None,
        oldest_pending_deliveries=oldest.deliveries if oldest else None,
        oldest_pending_consumer=oldest.consumer if oldest else None,
    )


async def groups_info(streams: Streams, stream: str) -> list[GroupRow] | None:
    """The consumer groups of `stream` (XINFO GROUPS), or None when the stream does not exist."""
    return await Admin(streams).groups(stream)


class StreamNotFound(FastworkerError):
    """A stream named by the user does not exist (exit 1: a name that does not exist is a failure, not an empty
    answer)."""


async def stream_exists(streams: Streams, name: str) -> bool:
    return await Admin(streams).key_type(name) == "stream"


async def require_stream(streams: Streams, name: str, hint: str = "") -> None:
    """Raise StreamNotFound (saying `hint`, e.g. which streams do exist) unless `name` is a stream on the server."""
    kind = await Admin(streams).key_type(name)
    if kind == "none":
        raise StreamNotFound(f"stream {name!r} does not exist{hint}")
    if kind != "stream":
        raise StreamNotFound(f"key {name!r} holds a {kind}, not a stream")


async def group_names(streams: Streams, stream: str) -> list[str] | None:
    """The consumer groups of `stream`, or None when the stream does not exist."""
    groups = await groups_info(streams, stream)
    return None if groups is None else [group.name for group in groups]


# --- health -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str | None  # one line, when not healthy
    latency_ms: float
    server: str
    version: str
    missing_groups: list[tuple[str, str]]  # (stream, group)


async def missing_groups(streams: Streams, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (stream, group) pairs that do not exist on the server, in the order given."""
    pairs = list(pairs)
    present: dict[str, set[str]] = {}
    for stream in dict.fromkeys(stream for stream, _ in pairs):
        present[stream] = set(await group_names(streams, stream) or ())
    return [(stream, group) for stream, group in pairs if group not in present[stream]]


async def check_health(streams: Streams, required: Iterable[tuple[str, str]] = (),
                       max_latency_ms: float | None = None) -> Health:
    """PING latency, server name and version, and whether the required groups exist.

    An unreachable server or refused credentials raise (RedisUnavailable, RedisAuthError): those have exit codes
    of their own, distinct from "reachable but unhealthy".
    """
    latency_ms = await streams.ping() * 1000
    server, version = await streams.server_version()
    missing = await missing_groups(streams, required)
    reason = None
    if missing:
        reason = "missing group(s): " + ", ".join(f"{group} on {stream}" for stream, group in missing)
    elif max_latency_ms is not None and latency_ms > max_latency_ms:
        reason = f"PING took {latency_ms:.1f} ms, over the limit of {max_latency_ms:g} ms"
    return Health(reason is None, reason, latency_ms, server, version, missing)
