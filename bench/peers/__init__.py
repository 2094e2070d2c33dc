"""The peers of the throughput table: other ways to consume the same stream, timed exactly as fastworker is.

Every `run_<peer>(url, stream, group, n, processes=1) -> float` takes a stream already filled with n sample jobs
(bench.common.reset) and a group that has read none of them, starts the peer's consumers in `processes`
subprocesses (one consumer name each, same group), and returns the seconds from the group's first read to the
last ack as bench.common.time_drain sees them, after checking that all n entries were read and none is pending.
The consumers are stopped however the run ends. A peer whose optional package is missing raises PeerUnavailable.

taskiq reads only its own message format: its runs replace the stream's entries with the same jobs as taskiq
messages (and create the group) before timing. server_limit ignores `processes` (see its module).
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from bench.peers.harness import PeerFailed, PeerUnavailable, drain, python, require
from bench.peers.server_limit import run_server_limit

__all__ = ["PEERS", "PeerFailed", "PeerUnavailable", "run_faststream_batch", "run_faststream_single",
           "run_handwritten", "run_naive", "run_server_limit", "run_sync_batch", "run_taskiq",
           "run_taskiq_defaults"]

# The tuned taskiq worker: XREADGROUP COUNT 1000 instead of 100, and more tasks in flight per process, so that
# the per-message XACK round trips overlap (the broker acks each message on its own).
TASKIQ_TUNED_XREAD_COUNT = 1000
TASKIQ_TUNED_ARGS = ("--max-async-tasks", "1000", "--max-prefetch", "1000")


def _consumers(module: str, mode: str, url: str, stream: str, group: str, processes: int) -> list[list[str]]:
    return [python("-m", module, mode, url, stream, group, f"{mode}-{index}") for index in range(processes)]


def run_naive(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    """redis-py sync: XREADGROUP COUNT 1, json.loads, XACK, per entry."""
    return drain(url, stream, group, n, _consumers("bench.peers.loops", "naive", url, stream, group, processes))


def run_sync_batch(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    """redis-py sync: XREADGROUP COUNT 1000, orjson per entry, one XACK per batch."""
    return drain(url, stream, group, n, _consumers("bench.peers.loops", "sync_batch", url, stream, group, processes))


def run_handwritten(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    """redis.asyncio raw connection + hiredis + uvloop + orjson, COUNT 1000, XACK pipelined with the next read."""
    return drain(url, stream, group, n, _consumers("bench.peers.loops", "handwritten", url, stream, group, processes))


def run_faststream_single(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    """FastStream StreamSub with a consumer group, one message per handler call."""
    require("faststream.redis", "faststream[redis]")
    return drain(url, stream, group, n,
                 _consumers("bench.peers.faststream_app", "single", url, stream, group, processes))


def run_faststream_batch(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    """FastStream StreamSub with a consumer group, batch=True, max_records=1000."""
    require("faststream.redis", "faststream[redis]")
    return drain(url, stream, group, n,
                 _consumers("bench.peers.faststream_app", "batch", url, stream, group, processes))


def run_taskiq_defaults(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    """`taskiq worker` on taskiq-redis's RedisStreamBroker, its defaults but the worker count."""
    return _taskiq(url, stream, group, n, processes, xread_count=100, args=())


def run_taskiq(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    """`taskiq worker` on taskiq-redis's RedisStreamBroker, tuned (TASKIQ_TUNED_*)."""
    return _taskiq(url, stream, group, n, processes, TASKIQ_TUNED_XREAD_COUNT, TASKIQ_TUNED_ARGS)


def _taskiq(url: str, stream: str, group: str, n: int, processes: int, xread_count: int,
            args: tuple[str, ...]) -> float:
    require("taskiq_redis", "taskiq-redis")
    from bench.peers import taskiq_app

    client = redis.Redis.from_url(url)
    try:
        fill_taskiq(client, stream, group, n)
    finally:
        client.close()
    env = {taskiq_app.URL_ENV: url, taskiq_app.STREAM_ENV: stream, taskiq_app.GROUP_ENV: group,
           taskiq_app.COUNT_ENV: str(xread_count)}
    argv = python("-m", "taskiq", "worker", "bench.peers.taskiq_app:broker", "--workers", str(processes),
                  "--log-level", "WARNING", *args)
    # taskiq's CLI forks its workers itself: no start handshake, each worker starts reading when it is up. Its
    # graceful shutdown waits out blocked reads and in-flight tasks: the drain is verified by then, so it is cut short.
    return drain(url, stream, group, n, [argv], env, handshake=False, stop_timeout_s=2.0)


def fill_taskiq(client: redis.Redis, stream: str, group: str, n: int, chunk: int = 5000) -> None:
    """Replace the stream's entries with n sample jobs as taskiq messages, and a group at the start."""
    from bench.peers import taskiq_app

    client.delete(stream)
    for start in range(0, n, chunk):
        pipe = client.pipeline(transaction=False)
        for data in taskiq_app.messages(start, min(start + chunk, n)):
            pipe.xadd(stream, {b"data": data})
        pipe.execute()
    client.xgroup_create(stream, group, id="0")


PEERS: dict[str, Callable[..., float]] = {
    "naive": run_naive,
    "faststream_single": run_faststream_single,
    "taskiq_defaults": run_taskiq_defaults,
    "taskiq": run_taskiq,
    "faststream_batch": run_faststream_batch,
    "sync_batch": run_sync_batch,
    "handwritten": run_handwritten,
    "server_limit": run_server_limit,
}
