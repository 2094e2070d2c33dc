"""taskiq-redis's stream broker as the peers table runs it: `taskiq worker bench.peers.taskiq_app:broker` with a
no-op task, configured by environment so that the worker processes taskiq spawns build the same broker.

taskiq reads only its own messages (a serialized TaskiqMessage in a `data` field), so `messages()` builds them the
way `.kiq()` does (the task's kicker prepares the message, the broker's formatter serializes it), carrying the
sample job as the task's argument; the run then XADDs them pipelined, which `.kiq()` cannot do.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from taskiq_redis import RedisStreamBroker

from bench.common import payload

URL_ENV, STREAM_ENV, GROUP_ENV, COUNT_ENV = "BENCH_TASKIQ_URL", "BENCH_TASKIQ_STREAM", "BENCH_TASKIQ_GROUP", \
    "BENCH_TASKIQ_XREAD_COUNT"

broker = RedisStreamBroker(
    os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"),
    queue_name=os.environ.get(STREAM_ENV, "taskiq"),
    consumer_group_name=os.environ.get(GROUP_ENV, "taskiq"),
    # The stream is filled before the workers start: a group the broker created itself must start at the beginning.
    consumer_id="0",
    xread_count=int(os.environ.get(COUNT_ENV, "100")),  # 100 is the broker's default
)


@broker.task(task_name="bench.noop")
async def noop(job: dict[str, Any]) -> None:
    return None


def messages(start: int, stop: int) -> list[bytes]:
    """The `data` field of the messages `noop.kiq(job)` would send for the sample jobs start..stop-1."""
    kicker = noop.kicker()
    return [broker.formatter.dumps(kicker._prepare_message(orjson.loads(payload(index)))).message
            for index in range(start, stop)]
