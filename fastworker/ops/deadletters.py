"""Dead letters: list, show, requeue to the source stream, purge.

A dead letter is an entry of `<stream><suffix>` carrying the original entry's fields plus `fw:*` fields that say
where it came from and why it died (see `Settlement.dead_letter`). Invariants kept here:
- Requeue moves one dead letter in one atomic step: a MULTI/EXEC with the XADD to the source stream and the XDEL
  from the dead-letter stream, under WATCH of the dead-letter stream with the letter re-read after the WATCH, so
  two operators requeueing the same letter at once cannot both publish it. The requeued entry gets the original
  fields (every field outside `fw:*`) and `fw:requeues` incremented, so a later dead letter of it shows how many
  times it went round.
- A letter whose entry was deleted from the source stream before it was handled (`EntryDeleted`) has no original
  fields: it is skipped with the reason, never requeued as an empty entry.
- Purge deletes only the letters it was given (XDEL by id), never the key: new dead letters written meanwhile by
  the workers survive.

In a cluster, the source and dead-letter streams must share a hash tag for the MULTI, as for the settle step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastworker.edge.admin import Admin, Fields
from fastworker.edge.streams import DEAD_FIELD_PREFIX, Streams
from fastworker.ops.inspect import text

logger = logging.getLogger(__name__)

REQUEUES_FIELD = DEAD_FIELD_PREFIX + "requeues"
DELETED_CLASS = "EntryDeleted"
PAGE = 500
WATCH_ATTEMPTS = 10


def dead_letter_pair(name: str, suffix: str) -> tuple[str, str]:
    """(source stream, dead-letter stream) for either name."""
    if name.endswith(suffix) and len(name) > len(suffix):
        return name[: -len(suffix)], name
    return name, name + suffix


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One dead letter: its id in the dead-letter stream, the original fields, and the `fw:*` facts."""

    id: str
    original: dict[bytes, bytes]
    meta: dict[str, str]  # fw:* fields, without the prefix

    @property
    def source_stream(self) -> str | None:
        return self.meta.get("stream")

    @property
    def source_id(self) -> str | None:
        return self.meta.get("id")

    @property
    def group(self) -> str | None:
        return self.meta.get("group")

    @property
    def error_class(self) -> str:
        return self.meta.get("error_class", "")

    @property
    def error(self) -> str:
        return self.meta.get("error", "")

    @property
    def deliveries(self) -> int | None:
        return _int(self.meta.get("deliveries"))

    @property
    def traceback(self) -> str | None:
        """The end of the last failure's traceback (`fw:traceback`), when the failure raised."""
        return self.meta.get("traceback")

    @property
    def dead_at_ms(self) -> int | None:
        return _int(self.meta.get("dead_at_ms"))

    @property
    def requeues(self) -> int:
        return _int(self.meta.get("requeues")) or 0

    @property
    def requeueable(self) -> bool:
        return bool(self.original) and self.error_class != DELETED_CLASS

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source_stream": self.source_stream, "source_id": self.source_id,
                "group": self.group, "error_class": self.error_class, "error": self.error,
                "deliveries": self.deliveries, "dead_at_ms": self.dead_at_ms, "requeues": self.requeues,
                "traceback": self.traceback, "fields": {text(k): text(v) for k, v in self.original.items()}}


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def parse_dead_letter(entry_id: Any, fields: Any) -> DeadLetter:
    """A dead letter from an entry: its id and its fields (bytes), as `Admin.entries` gives them."""
    fields = fields or {}
    prefix = DEAD_FIELD_PREFIX.encode()
    original = {k: v for k, v in fields.items() if not k.startswith(prefix)}
    meta = {text(k)[len(DEAD_FIELD_PREFIX):]: text(v) for k, v in fields.items() if k.startswith(prefix)}
    return DeadLetter(text(entry_id), original, meta)


async def _pages(streams: Streams, stream: str, start: str, end: str) -> AsyncIterator[list[tuple[str, Fields]]]:
    """XRANGE in pages; the next page starts after the last id seen (exclusive range, Redis 6.2+)."""
    admin = Admin(streams)
    while True:
        page = await admin.entries(stream, start, end, PAGE)
        if not page:
            return
        yield page
        if len(page) < PAGE:
            return
        start = "(" + page[-1][0]


async def list_dead_letters(streams: Streams, dead_stream: str, *, start: str = "-", end: str = "+",
                            count: int | None = None, error_class: str | None = None) -> list[DeadLetter]:
    """Dead letters with ids in [start, end], oldest first, at most `count`, optionally of one error class."""
    found: list[DeadLetter] = []
    async for page in _pages(streams, dead_stream, start, end):
        for entry_id, fields in page:
            letter = parse_dead_letter(entry_id, fields)
            if error_class is None or letter.error_class == error_class:
                found.append(letter)
                if count is not None and len(found) >= count:
                    return found
    return found


async def get_dead_letter(streams: Streams, dead_stream: str, entry_id: str) -> DeadLetter | None:
    entries = await Admin(streams).entries(dead_stream, entry_id, entry_id)
    return parse_dead_letter(*entries[0]) if entries else None


@dataclasses.dataclass
class RequeueResult:
    requeued: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (dead id, stream, new id)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (dead id, reason)

    def to_dict(self) -> dict[str, Any]:
        return {"requeued": [{"dead_id": d, "stream": s, "id": n} for d, s, n in self.requeued],
                "skipped": [{"dead_id": d, "reason": r} for d, r in self.skipped]}


def requeue_fields(letter: DeadLetter) -> Fields:
    """The fields the requeued entry gets: the original ones and the incremented requeue count."""
    return {**letter.original, REQUEUES_FIELD.encode(): str(letter.requeues + 1).encode()}


async def requeue_dead_letters(streams: Streams, dead_stream: str, ids: Sequence[str],
                               default_source: str) -> RequeueResult:
    """Move each dead letter back to its source stream (its `fw:stream`, else `default_source`), atomically.

    Writes: one XADD to the source stream and one XDEL from the dead-letter stream per letter moved.
    """
    result = RequeueResult()
    for dead_id in ids:
        outcome = await _requeue_one(streams, dead_stream, dead_id, default_source)
        if outcome[0] == "requeued":
            result.requeued.append((dead_id, outcome[1], outcome[2]))
            logger.debug("requeued dead letter stream=%s id=%s to=%s new_id=%s", dead_stream, dead_id, outcome[1],
                         outcome[2])
        else:
            result.skipped.append((dead_id, outcome[1]))
    return result


async def _requeue_one(streams: Streams, dead_stream: str, dead_id: str, default_source: str) -> tuple[str, ...]:
    def target(fields: Fields | None) -> tuple[str, Fields] | str:
        # Called with the letter as read after the WATCH: what we publish is what the transaction's XDEL removes.
        if fields is None:
            return "not found (already requeued or purged?)"
        letter = parse_dead_letter(dead_id, fields)
        if not letter.requeueable:
            return ("the entry was deleted from its stream before it was handled: "
                    "there are no original fields to requeue")
        return letter.source_stream or default_source, requeue_fields(letter)

    # Another dead letter arriving meanwhile makes the move read again and retry, up to WATCH_ATTEMPTS times.
    moved = await Admin(streams).move_entry(dead_stream, dead_id, target, WATCH_ATTEMPTS)
    if moved is None:
        return "skipped", f"the dead-letter stream kept changing; gave up after {WATCH_ATTEMPTS} attempts"
    if isinstance(moved, str):
        return "skipped", moved
    return "requeued", *moved


async def purge_dead_letters(streams: Streams, dead_stream: str, ids: Sequence[str]) -> int:
    """XDEL the given dead letters; returns how many existed and were deleted."""
    admin = Admin(streams)
    deleted = 0
    for start in range(0, len(ids), PAGE):
        deleted += await admin.delete_entries(dead_stream, ids[start:start + PAGE])
    if deleted:
        logger.debug("purged dead letters stream=%s count=%d", dead_stream, deleted)
    return deleted
