"""Dead consumer cleanup: remove consumers of a group that own nothing and have been idle for long.

Each crash of a worker that used a fresh consumer name leaves that name behind in its group; they pile up and
clutter XINFO. Invariant: a consumer that owns pending entries is never deleted. XGROUP DELCONSUMER drops the
consumer's pending entries from the PEL along with it, so those entries could never be claimed again: that would
be a silent loss. The pending check and the delete therefore run in one Lua script, atomically: a consumer that
reads an entry between a separate check and the delete would otherwise lose it.
"""

from __future__ import annotations

import logging

from fastworker.edge.admin import Admin
from fastworker.edge.streams import Streams
from fastworker.ops.inspect import ConsumerInfo

logger = logging.getLogger(__name__)

# Returns -1 (kept: it owns pending entries) or the DELCONSUMER reply (pending entries it had: always 0 here).
DELETE_IF_IDLE_EMPTY = """
local owned = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #owned > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


async def dead_consumers(streams: Streams, stream: str, group: str, idle_ms: int) -> list[ConsumerInfo]:
    """Consumers of `group` with zero pending entries, idle for longer than `idle_ms` (none when the stream or
    group does not exist)."""
    consumers = await Admin(streams).consumers(stream, group) or []
    return [ConsumerInfo(consumer.name, consumer.pending, consumer.idle_ms, True) for consumer in consumers
            if consumer.pending == 0 and consumer.idle_ms > idle_ms]


async def remove_dead_consumers(streams: Streams, stream: str, group: str, idle_ms: int) -> list[str]:
    """Delete the consumers of `group` that have zero pending entries and have been idle longer than `idle_ms`;
    return the names deleted. A consumer that took an entry since it was listed is kept (checked atomically)."""
    removed = []
    delete_if_idle_empty = Admin(streams).script(DELETE_IF_IDLE_EMPTY)
    for consumer in await dead_consumers(streams, stream, group, idle_ms):
        reply = int(await delete_if_idle_empty([stream], [group, consumer.name]))
        if reply < 0:
            logger.debug("kept consumer stream=%s group=%s consumer=%s: it took pending entries", stream, group,
                        consumer.name)
            continue
        removed.append(consumer.name)
        logger.debug("removed dead consumer stream=%s group=%s consumer=%s idle_ms=%d", stream, group, consumer.name,
                    consumer.idle_ms)
    return removed
