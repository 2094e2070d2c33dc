"""What every benchmark shares: the embedded server, the sample payload, filling a stream, timing a drain."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata

import orjson
import redis

JOB = {"job_id": "job_01J9", "shop_id": "shop_4821", "shop_domain": "acme.myshopify.com", "type": "analysis",
       "trigger": "scheduled", "requested_at": "2026-11-25T10:00:00Z", "params": {"days": 90, "min_support": 0.01}}


def payload(index: int) -> bytes:
    return orjson.dumps({**JOB, "job_id": f"job_{index:010d}"})


def fill(client: redis.Redis, stream: str, n: int, chunk: int = 5000) -> None:
    """XADD n sample jobs (about 250 bytes each) in the app's convention: JSON in a `data` field."""
    for start in range(0, n, chunk):
        pipe = client.pipeline(transaction=False)
        for index in range(start, min(start + chunk, n)):
            pipe.xadd(stream, {"data": payload(index)})
        pipe.execute()


def reset(client: redis.Redis, stream: str, group: str, n: int, create_group: bool = True) -> None:
    client.delete(stream, stream + ":dead")
    fill(client, stream, n)
    if create_group:
        client.xgroup_create(stream, group, id="0")


def group_state(client: redis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(entries read by the group, entries pending) from XINFO GROUPS."""
    for info in client.xinfo_groups(stream):
        if info["name"].decode() == group:
            return int(info["entries-read"] or 0), int(info["pending"])
    return 0, 0


def time_drain(client: redis.Redis, stream: str, group: str, n: int, timeout_s: float = 300,
               alive: Callable[[], bool] = lambda: True) -> float:
    """Seconds from the group's first read to the moment all n entries are read and none is pending.

    Polled every 2 ms from the side, so the figure carries up to a few ms of slack: negligible over 200,000
    entries, which is why the runs are that long.
    """
    deadline = time.monotonic() + timeout_s
    while group_state(client, stream, group)[0] == 0:
        if time.monotonic() > deadline or not alive():
            raise RuntimeError("the consumer never started reading")
        time.sleep(0.0005)
    started = time.perf_counter()
    while True:
        read, pending = group_state(client, stream, group)
        if read >= n and pending == 0:
            return time.perf_counter() - started
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"drain incomplete: read={read} pending={pending}")
        time.sleep(0.002)


def median(values: list[float]) -> float:
    return statistics.median(values)


def versions(server_version: str) -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "-"

    cpu = "?"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as cpuinfo:
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {cpu}",
        "python": platform.python_version(),
        "server": server_version,
        **{package: version(package) for package in
           ("fastworker", "redis", "hiredis", "orjson", "uvloop", "faststream", "taskiq",
            "taskiq-redis")},
    }


def fastworker_fleet(url: str, app: str, processes: int, batch: int, env: dict[str, str],
                     extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "fastworker", "run", app, "--redis-url", url, "--processes", str(processes),
            "--batch-size", str(batch), "--log-level", "WARNING", "--consumer-prefix", "bench", *extra]
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
