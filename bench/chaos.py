"""`python -m bench.chaos` (`make chaos`): a real fleet through the faults of the field, then one table.

A fleet (`fastworker run bench.chaos_app:app`: the demo's data-job and training handlers, each call recorded) runs
on the embedded server with AOF, connected through a fault-injecting proxy (bench/faultproxy.py). The harness
publishes N jobs at a steady rate straight to the server (explicit entry ids, so a publish retried after an outage
never adds a job twice) while it injects, at random times of the publishing window and one at a time: SIGKILLs of
worker processes and of the supervisor's manager helper (when there is one), SIGKILLs of the server restarted on
its AOF (same port), server pauses (SIGSTOP, SIGCONT), cuts of every fleet connection, and one-way delay.

Then it waits for the condition "every job has a result or a dead letter, and nothing is pending", bounded by a
deadline, stops the fleet with SIGTERM, and counts from the server and the call files:
- results: entries of the result streams, keyed by job id; duplicates: job ids with more than one output (result
  or dead letter); lost: jobs with neither;
- handler re-runs: handler calls beyond the first per job (the call files of every worker process, killed or not);
- writes the server lost: publisher-confirmed XADDs missing after a server restart (kept apart and republished,
  so that they do not count against the fleet; with `--fsync always` there should be none).

It prints whether each target held and exits 1 when one did not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions as rex

from bench.chaos_app import RESULTS, STREAMS
from bench.common import versions
from bench.faultproxy import ProxyProcess
from fastworker import demo
from fastworker.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
APP = "bench.chaos_app:app"
DEAD_SUFFIX = ":dead"
GROUPS = [demo.GROUPS[stream] for stream in STREAMS]
PREFIX = "chaos"
REDIS_ERRORS = (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, OSError)
FAULTS = ("worker_kill", "manager_kill", "server_kill", "pause", "cut", "delay")


# -- the plan -------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--jobs", type=int, default=1_000_000, help="jobs published over the data-job and training streams")
    add("--rate", type=float, default=None,
        help="jobs per second published (default: 10,000, lowered so that publishing lasts twice as long as the "
             "faults take; a rate given is kept, and faults go on after the last job when they need more time)")
    add("--processes", type=int, default=2, help="worker processes of the fleet")
    add("--batch-size", type=int, default=500, help="the fleet's --batch-size (and the re-run bound per batch)")
    add("--worker-kills", type=int, default=20, help="SIGKILLs of a random worker process")
    add("--manager-kills", type=int, default=2, help="SIGKILLs of the supervisor's fw-manager helper, if any")
    add("--server-kills", type=int, default=3, help="SIGKILLs of the server, restarted on its AOF")
    add("--pauses", type=int, default=5, help="server pauses (SIGSTOP, then SIGCONT)")
    add("--pause-s", type=float, default=10.0, help="how long each pause lasts")
    add("--cuts", type=int, default=10, help="cuts of every fleet connection at the proxy")
    add("--delays", type=int, default=3, help="episodes of one-way delay at the proxy (alternating directions)")
    add("--delay-ms", type=float, default=100.0, help="the one-way delay of an episode")
    add("--delay-s", type=float, default=3.0, help="how long each delay episode lasts")
    add("--poison-rate", type=float, default=0.001, help="share of jobs rejected by the handler (dead letters)")
    add("--fsync", choices=("everysec", "always"), default="everysec", help="the server's appendfsync")
    add("--drain-timeout-s", type=float, default=180.0,
        help="after the last job and fault, how long the fleet may take to settle everything")
    add("--seed", type=int, default=None, help="random seed of the fault times and victims (default: random)")
    add("--work-dir", type=Path, default=None, help="keep the server's AOF, the fleet log and call files here")
    add("--fleet-arg", action="append", default=[], metavar="FLAG",
        help="one more flag for `fastworker run` (repeat it; e.g. --fleet-arg=--crash-loop-restarts=100)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    return args


MIN_GAP_S = 0.5  # between the end of one fault and the start of the next


LANES = (("worker_kill", "manager_kill"), ("server_kill", "pause", "cut", "delay"))
Plan = list[list[tuple[float, str]]]


def fault_plan(args: argparse.Namespace) -> tuple[float, Plan]:
    """(the publishing rate, the faults of each lane as (seconds after the start, kind) in time order).

    Two lanes run side by side, as in the field, where a process dies whatever the server is doing: process faults
    (worker and manager kills) and server faults (kills, pauses, cuts, delay). Within a lane faults run one at a
    time, in random order, separated by random gaps (at least MIN_GAP_S) within 5% to 90% of the window, so they
    never pile up behind a long one. Without --rate, the rate is lowered when needed so that publishing lasts at
    least twice what the busiest lane takes: most faults land while jobs are flowing.
    """
    counts = {"worker_kill": args.worker_kills, "manager_kill": args.manager_kills,
              "server_kill": args.server_kills, "pause": args.pauses, "cut": args.cuts, "delay": args.delays}
    lasts = {"worker_kill": 0.1, "manager_kill": 0.1, "server_kill": 1.0, "pause": args.pause_s, "cut": 0.1,
             "delay": args.delay_s}  # about how long each takes, the server's restart included
    rng = random.Random(args.seed)
    lanes = [[kind for kind in lane for _ in range(counts[kind])] for lane in LANES]
    for kinds in lanes:
        rng.shuffle(kinds)
    busy_s = max(sum(lasts[kind] + MIN_GAP_S for kind in kinds) for kinds in lanes)
    publish_s = args.jobs / args.rate if args.rate else max(args.jobs / 10_000, 2 * busy_s, 5.0)
    window_s = max(publish_s, busy_s / 0.85 + 1)
    plan: Plan = []
    for kinds in lanes:
        gaps = sorted(rng.uniform(0, 0.85 * window_s - sum(lasts[k] + MIN_GAP_S for k in kinds)) for _ in kinds)
        spent = 0.05 * window_s
        plan.append([])
        for kind, gap in zip(kinds, gaps, strict=True):
            plan[-1].append((spent + gap, kind))
            spent += lasts[kind] + MIN_GAP_S
    return args.jobs / publish_s, plan


# -- the jobs ---------------------------------------------------------------------------------------------------------

class Jobs:
    """Job i goes to STREAMS[i % 2] with entry id `base-i` and job id `job_%08d`; a few are poison."""

    def __init__(self, n: int, poison_rate: float, seed: int) -> None:
        self.n = n
        self.base_ms = int(time.time() * 1000)
        self.poison = set(random.Random(seed).sample(range(n), round(n * poison_rate)))

    @staticmethod
    def stream_of(index: int) -> str:
        return STREAMS[index % len(STREAMS)]

    def entry_id(self, index: int) -> str:
        return f"{self.base_ms}-{index}"

    def payload(self, index: int) -> bytes:
        body = demo.sample_payload(self.stream_of(index), index)
        if index in self.poison:
            body["simulate"] = "poison"
        return orjson.dumps(body)


def job_index(data: bytes) -> int:
    """The job number of a result or a dead letter's `data` field (`{"job_id": "job_00000042", ...}`)."""
    return int(orjson.loads(data)["job_id"][4:])


async def retrying(what: Callable[[], Awaitable[Any]], deadline: float) -> Any:
    """Run `what` until it succeeds, through outages (a killed or paused server), until the deadline."""
    while True:
        try:
            return await what()
        except REDIS_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Publisher:
    """Publishes the jobs at a steady rate, straight to the server, so that each job is in its stream once.

    Entry ids are explicit and increasing, so after an outage the harness asks each stream for its last entry and
    goes on from there: an XADD whose reply was lost is neither lost nor repeated. Confirmed XADDs that the server
    no longer has after a restart are counted as `server_lost` and published again.
    """

    def __init__(self, url: str, jobs: Jobs, rate: float, timeout_s: float) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=2)
        self.jobs = jobs
        self.rate = rate
        self.next = 0
        self.top = {stream: -1 for stream in STREAMS}  # the last job index each stream is known to hold
        self.server_lost = 0
        self.outages = 0
        self.finished = 0.0  # time.monotonic() of the last job's confirmation

    async def run(self, deadline: float) -> None:
        started = time.monotonic()
        chunk = max(1, min(1000, int(self.rate / 20)))
        try:
            while self.next < self.jobs.n:
                ahead = started + self.next / self.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                try:
                    await self._send(range(self.next, min(self.next + chunk, self.jobs.n)))
                except (*REDIS_ERRORS, rex.ResponseError):
                    self.outages += 1
                    await retrying(self._resync, deadline)
            self.finished = time.monotonic()
        finally:
            await self.client.aclose()

    async def _send(self, indices: range) -> None:
        sent = [i for i in indices if i > self.top[self.jobs.stream_of(i)]]
        async with self.client.pipeline(transaction=False) as pipe:
            for i in sent:
                pipe.xadd(self.jobs.stream_of(i), {"data": self.jobs.payload(i)}, id=self.jobs.entry_id(i))
            await pipe.execute()
        for i in sent:
            self.top[self.jobs.stream_of(i)] = i
        self.next = indices.stop

    async def _resync(self) -> None:
        for stream in STREAMS:
            last: Any = await self.client.xrevrange(stream, "+", "-", count=1)
            top = int(last[0][0].split(b"-")[1]) if last else -1
            # Confirmed entries the server no longer has (appendfsync everysec can lose up to a second of them)
            self.server_lost += len(range(_after(stream, top), self.top[stream] + 1, len(STREAMS)))
            self.top[stream] = top
        self.next = min(_after(stream, self.top[stream]) for stream in STREAMS)


def _after(stream: str, top: int) -> int:
    """The first job index of `stream` after job index `top` (-1: none yet)."""
    return STREAMS.index(stream) if top < 0 else top + len(STREAMS)


# -- counting -------------------------------------------------------------------------------------------------------

@dataclass
class Ledger:
    """Outputs per job, read from the result and dead-letter streams (counts capped at 255)."""

    n: int
    results: bytearray = field(init=False)
    dead: bytearray = field(init=False)
    cursors: dict[str, bytes] = field(default_factory=dict)
    settled: int = 0  # jobs with at least one output

    def __post_init__(self) -> None:
        self.results = bytearray(self.n)
        self.dead = bytearray(self.n)

    async def read(self, client: aioredis.Redis) -> None:
        """Read what the output streams got since the last call."""
        for stream in RESULTS:
            await self._read_stream(client, stream, self.results)
        for stream in STREAMS:
            await self._read_stream(client, stream + DEAD_SUFFIX, self.dead)

    async def _read_stream(self, client: aioredis.Redis, stream: str, counts: bytearray) -> None:
        while True:
            start = b"(" + self.cursors[stream] if stream in self.cursors else b"-"
            entries: Any = await client.xrange(stream, start, "+", count=10_000)
            for entry_id, fields in entries:
                index = job_index(fields[b"data"])
                if not self.results[index] and not self.dead[index]:
                    self.settled += 1
                counts[index] = min(counts[index] + 1, 255)
                self.cursors[stream] = entry_id
            if len(entries) < 10_000:
                return

    def lost(self) -> list[int]:
        return [i for i in range(self.n) if not self.results[i] and not self.dead[i]]

    def duplicates(self) -> int:
        return sum(1 for i in range(self.n) if self.results[i] + self.dead[i] > 1)


async def pending(client: aioredis.Redis) -> int:
    total = 0
    for stream, group in zip(STREAMS, GROUPS, strict=True):
        with contextlib.suppress(rex.ResponseError):  # no group yet
            total += int((await client.xpending(stream, group))["pending"])
    return total


def entry_key(entry_id: bytes | str) -> tuple[int, int]:
    ms, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")
    return int(ms), int(seq)


async def classify(client: aioredis.Redis, jobs: Jobs, lost: list[int]) -> Counter[str]:
    """Where the jobs without an output are: not delivered yet, pending, missing from their stream (the server
    lost the XADD), or acknowledged without an output (lost by the fleet: the one the contract forbids)."""
    kinds: Counter[str] = Counter()
    delivered: dict[str, tuple[int, int]] = {}
    pending_ids: set[str] = set()
    for stream, group in zip(STREAMS, GROUPS, strict=True):
        info: Any = await client.xinfo_groups(stream)
        last = next((g["last-delivered-id"] for g in info if g["name"].decode() == group), b"0-0")
        delivered[stream] = entry_key(last)
        summary: Any = await client.xpending(stream, group)
        if summary["pending"]:
            rows: Any = await client.xpending_range(stream, group, "-", "+", summary["pending"])
            pending_ids.update(row["message_id"].decode() for row in rows)
    for start in range(0, len(lost), 1000):
        chunk = lost[start:start + 1000]
        async with client.pipeline(transaction=False) as pipe:
            for i in chunk:
                pipe.xrange(jobs.stream_of(i), jobs.entry_id(i), jobs.entry_id(i))
            found = await pipe.execute()
        for i, entries in zip(chunk, found, strict=True):
            entry_id = jobs.entry_id(i)
            kinds["missing from its stream" if not entries else
                  "pending" if entry_id in pending_ids else
                  "not delivered yet" if entry_key(entry_id) > delivered[jobs.stream_of(i)] else
                  "acked without an output"] += 1
    return kinds


def handler_calls(calls_dir: Path, n: int) -> tuple[int, int]:
    """(handler calls in all, jobs called at least once), from every worker process's call file."""
    called = bytearray(n)
    total = 0
    for path in calls_dir.glob("calls-*.txt"):
        for line in path.read_bytes().split():
            called[int(line[4:])] = 1
            total += 1
    return total, sum(called)


# -- processes --------------------------------------------------------------------------------------------------------

def children(pid: int, name: str) -> list[int]:
    """Live (non-zombie) processes named `name*` whose parent is `pid`, in name order."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, rest = (entry / "stat").read_text().split("(", 1)[1].rsplit(")", 1)
        except (OSError, IndexError):
            continue
        fields = rest.split()
        if int(fields[1]) == pid and fields[0] != "Z" and comm.startswith(name):
            found.append((comm, int(entry.name)))
    return [child for _, child in sorted(found)]


class Fleet:
    """The `fastworker run` subprocess, its log, and whether it stayed up until we stopped it."""

    def __init__(self, url: str, work: Path, args: argparse.Namespace) -> None:
        self.log_path = work / "fleet.log"
        self.calls_dir = work / "calls"
        self.calls_dir.mkdir(parents=True, exist_ok=True)
        self.argv = [sys.executable, "-m", "fastworker", "run", APP, "--redis-url", url,
                     "--processes", str(args.processes), "--batch-size", str(args.batch_size),
                     "--consumer-prefix", PREFIX, "--dead-letter-suffix", DEAD_SUFFIX, *args.fleet_arg]
        self.env = {**os.environ, "CHAOS_CALLS_DIR": str(self.calls_dir), "PYTHONPATH": str(ROOT)}
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.died: tuple[float, int] | None = None  # (seconds into the run, exit code) if it left on its own

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def workers(self) -> list[int]:
        return children(self.pid, "fw-worker-")

    def stop(self, timeout_s: float) -> int | str:
        """SIGTERM and wait; the exit code, or 'timeout' (then it is killed)."""
        assert self.process is not None
        self.stopping = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return "timeout"

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []


# -- faults -----------------------------------------------------------------------------------------------------------

@dataclass
class FaultLog:
    done: Counter[str] = field(default_factory=Counter)
    absent: Counter[str] = field(default_factory=Counter)  # planned, but there was nothing to hit
    skipped: Counter[str] = field(default_factory=Counter)  # planned, but the fleet had already exited
    connections_cut: int = 0
    restart_s: list[float] = field(default_factory=list)  # worker kill -> a new process in that slot
    not_restarted: int = 0
    server_restart_s: list[float] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


class Chaos:
    """Runs the fault plan against the fleet, the server and the proxy, one fault at a time."""

    def __init__(self, args: argparse.Namespace, server: EmbeddedServer, proxy: ProxyProcess, fleet: Fleet) -> None:
        self.args = args
        self.server, self.proxy, self.fleet = server, proxy, fleet
        self.rng = random.Random(args.seed + 1)
        self.log = FaultLog()
        self.watchers: list[asyncio.Task[None]] = []
        self.started = time.monotonic()

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:7.1f} s  {text}"
        self.log.events.append(line)
        print(f"  fault: {line}", flush=True)

    async def run(self, plan: Plan) -> None:
        await asyncio.gather(*(self._lane(lane) for lane in plan))
        await asyncio.gather(*self.watchers)

    async def _lane(self, lane: list[tuple[float, str]]) -> None:
        for at, kind in lane:  # the fault's planned time, or later when the one before it took longer
            wait = self.started + at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self.fleet.alive():
                self.log.skipped[kind] += 1
                continue
            await getattr(self, kind)()

    async def worker_kill(self) -> None:
        workers = await until(self.fleet.workers, 30)
        if not workers:
            self.log.absent["worker_kill"] += 1
            self.note("worker kill skipped: no worker process alive for 30 s")
            return
        victim = self.rng.choice(workers)
        slot = workers.index(victim)
        os.kill(victim, signal.SIGKILL)
        self.log.done["worker_kill"] += 1
        self.note(f"SIGKILL worker pid={victim}")
        await until(lambda: victim not in self.fleet.workers(), 5)  # so that the next kill cannot pick it again
        self.watchers.append(asyncio.create_task(self._watch_restart(victim, slot, time.monotonic())))

    async def _watch_restart(self, victim: int, slot: int, killed: float) -> None:
        def replaced() -> bool:
            workers = self.fleet.workers()
            return len(workers) == self.args.processes and victim not in workers

        if await until(lambda: replaced() or not self.fleet.alive(), 60) and self.fleet.alive():
            self.log.restart_s.append(time.monotonic() - killed)
        else:
            self.log.not_restarted += 1
            why = "the fleet exited" if not self.fleet.alive() else "not within 60 s"
            self.note(f"worker slot {slot} not replaced after the kill of pid={victim}: {why}")

    async def manager_kill(self) -> None:
        managers = children(self.fleet.pid, "fw-manager")
        if not managers:
            self.log.absent["manager_kill"] += 1
            return
        os.kill(managers[0], signal.SIGKILL)
        self.log.done["manager_kill"] += 1
        self.note(f"SIGKILL fw-manager pid={managers[0]}")

    async def server_kill(self) -> None:
        self.server.kill()
        killed = time.monotonic()
        self.log.done["server_kill"] += 1
        await asyncio.to_thread(self.server.start, 120)
        self.log.server_restart_s.append(time.monotonic() - killed)
        self.note(f"SIGKILL server; restarted on its AOF in {time.monotonic() - killed:.1f} s")

    async def pause(self) -> None:
        self.server.pause()
        self.log.done["pause"] += 1
        self.note(f"SIGSTOP server for {self.args.pause_s:g} s")
        try:
            await asyncio.sleep(self.args.pause_s)  # the fault's own length, not a wait for a condition
        finally:
            self.server.resume()

    async def cut(self) -> None:
        cut = await asyncio.to_thread(self.proxy.cut)
        self.log.done["cut"] += 1
        self.log.connections_cut += cut
        self.note(f"cut {cut} connections")

    async def delay(self) -> None:
        seconds = self.args.delay_ms / 1000
        up = self.log.done["delay"] % 2 == 1
        await asyncio.to_thread(self.proxy.set_delay, seconds if up else 0.0, 0.0 if up else seconds)
        self.log.done["delay"] += 1
        self.note(f"delay {self.args.delay_ms:g} ms {'to the server' if up else 'to the fleet'} "
                  f"for {self.args.delay_s:g} s")
        try:
            await asyncio.sleep(self.args.delay_s)
        finally:
            await asyncio.to_thread(self.proxy.set_delay, 0.0, 0.0)


async def until(condition: Callable[[], Any], timeout_s: float, every_s: float = 0.05) -> Any:
    """The condition's first truthy value, polled until timeout_s; falsy if it never came."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every_s)


# -- the run ----------------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    sent: int = 0
    server_lost: int = 0
    publish_outages: int = 0
    drained_s: float | None = None
    drain_error: str = ""
    results: int = 0
    dead_letters: int = 0
    lost: int = 0
    lost_sample: list[int] = field(default_factory=list)
    lost_kinds: Counter[str] = field(default_factory=Counter)  # where the lost jobs are: see classify()
    duplicates: int = 0
    calls: int = 0
    reruns: int = 0
    pending: int | None = None
    exit_code: int | str | None = None
    fleet_died: tuple[float, int] | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the harness's own failures (publisher, faults)


async def run(args: argparse.Namespace, work: Path) -> tuple[Outcome, FaultLog, Fleet, dict[str, int]]:
    rate, plan = fault_plan(args)
    print(f"publishing {args.jobs:,} jobs at {rate:,.0f}/s; {sum(map(len, plan))} faults in {len(plan)} lanes "
          f"(seed {args.seed})", flush=True)
    server = EmbeddedServer(data_dir=work / "server", appendonly=True, options={"appendfsync": args.fsync})
    server.start()
    jobs = Jobs(args.jobs, args.poison_rate, args.seed)
    with ProxyProcess(server.port, lifetime_s=args.jobs / rate * 4 + args.drain_timeout_s + 600) as proxy:
        fleet = Fleet(f"redis://127.0.0.1:{proxy.port}/0", work, args)
        try:
            outcome, faults = await _run(args, server, proxy, fleet, jobs, rate, plan)
            proxy_stats = await asyncio.to_thread(proxy.stats)
        finally:
            fleet.close()
            server.resume()
            server.stop()
    return outcome, faults, fleet, proxy_stats


async def _run(args: argparse.Namespace, server: EmbeddedServer, proxy: ProxyProcess, fleet: Fleet, jobs: Jobs,
               rate: float, plan: Plan) -> tuple[Outcome, FaultLog]:
    outcome = Outcome()
    client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=2)
    fleet.start()
    await until(lambda: len(fleet.workers()) == args.processes or not fleet.alive(), 60)
    if len(fleet.workers()) != args.processes:
        raise RuntimeError("the fleet did not start: " + "\n".join(fleet.log_lines()[-10:]))
    started = time.monotonic()
    deadline = started + args.jobs / rate * 4 + sum(args.pause_s for _ in range(args.pauses)) + 300
    publisher = Publisher(server.url, jobs, rate, args.pause_s + 10)
    chaos = Chaos(args, server, proxy, fleet)
    ledger = Ledger(args.jobs)
    tasks = [asyncio.create_task(publisher.run(deadline)), asyncio.create_task(chaos.run(plan))]
    watcher = asyncio.create_task(_watch(fleet, started))
    try:
        for failed in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(failed, BaseException):
                outcome.errors.append(f"{type(failed).__name__}: {failed}")
        outcome.drained_s, outcome.drain_error = await _drain(client, ledger, fleet, publisher, args.drain_timeout_s,
                                                              started)
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        outcome.seconds = time.monotonic() - started
        outcome.exit_code = fleet.stop(90) if fleet.alive() else None
        outcome.fleet_died = fleet.died
    outcome.sent, outcome.server_lost, outcome.publish_outages = jobs.n, publisher.server_lost, publisher.outages
    await _count(client, outcome, fleet, jobs)
    await client.aclose()
    return outcome, chaos.log


async def _watch(fleet: Fleet, started: float) -> None:
    await until(lambda: not fleet.alive(), math.inf, 0.1)
    if fleet.stopping:
        return
    assert fleet.process is not None
    fleet.died = (time.monotonic() - started, fleet.process.returncode)
    print(f"  the fleet exited on its own with code {fleet.process.returncode} after "
          f"{fleet.died[0]:.1f} s", flush=True)


async def _drain(client: aioredis.Redis, ledger: Ledger, fleet: Fleet, publisher: Publisher, timeout_s: float,
                 started: float) -> tuple[float | None, str]:
    """Wait for every job to have an output and nothing to be pending: (seconds after the last job was published,
    or None; why not)."""
    deadline = time.monotonic() + timeout_s
    shown = 0.0
    while True:
        try:
            await ledger.read(client)
            still = await pending(client)
        except REDIS_ERRORS as exc:
            still, reason = -1, f"{type(exc).__name__}: {exc}"
        if ledger.settled >= publisher.jobs.n and still == 0:
            return time.monotonic() - max(started, publisher.finished), ""
        reason = f"{publisher.jobs.n - ledger.settled:,} jobs without an output, {still} pending"
        if not fleet.alive():
            return None, f"the fleet is gone; {reason}"
        if time.monotonic() > deadline:
            return None, f"not drained within {timeout_s:g} s: {reason}"
        if time.monotonic() - shown > 5:
            shown = time.monotonic()
            print(f"  draining: {reason}", flush=True)
        await asyncio.sleep(0.2)


async def _count(client: aioredis.Redis, outcome: Outcome, fleet: Fleet, jobs: Jobs) -> None:
    """The authoritative count, from scratch, once the fleet has stopped."""
    deadline = time.monotonic() + 60
    n = jobs.n
    ledger = Ledger(n)
    await retrying(lambda: ledger.read(client), deadline)
    outcome.results = sum(1 for count in ledger.results if count)
    outcome.dead_letters = sum(1 for count in ledger.dead if count)
    lost = ledger.lost()
    outcome.lost, outcome.lost_sample = len(lost), lost[:5]
    outcome.lost_kinds = await retrying(lambda: classify(client, jobs, lost), deadline)
    outcome.duplicates = ledger.duplicates()
    outcome.pending = await retrying(lambda: pending(client), deadline)
    calls, called = handler_calls(fleet.calls_dir, n)
    outcome.calls, outcome.reruns = calls, calls - called


# -- the report -------------------------------------------------------------------------------------------------------

def rerun_bound(args: argparse.Namespace, faults: FaultLog) -> tuple[int, str]:
    """Re-runs allowed: one batch per consumer loop of a killed worker, and one per loop for each connection fault
    (a settlement whose reply was lost is not sent again: its entries are handled again, README, Settling)."""
    loops_per_process = len(GROUPS)  # one consumer name per process by default, one loop per group
    loops = loops_per_process * args.processes
    connection_faults = faults.done["cut"] + faults.done["server_kill"] + faults.done["pause"]
    bound = args.batch_size * (loops_per_process * faults.done["worker_kill"] + loops * connection_faults)
    return bound, (f"<= {bound:,} ({args.batch_size} x ({loops_per_process} loops x {faults.done['worker_kill']} "
                   f"worker kills + {loops} loops x {connection_faults} cuts/server kills/pauses))")


def table(args: argparse.Namespace, outcome: Outcome, faults: FaultLog, proxy: dict[str, int]) -> list[tuple[str, ...]]:
    """(measure, value, target, held) rows; held is '' for facts without a target."""
    bound, bound_text = rerun_bound(args, faults)
    where = ", ".join(f"{count:,} {kind}" for kind, count in outcome.lost_kinds.most_common())
    alive = outcome.fleet_died is None and not faults.not_restarted
    died = f"no: exited with {outcome.fleet_died[1]} after {outcome.fleet_died[0]:.1f} s" if outcome.fleet_died \
        else f"no: {faults.not_restarted} killed worker(s) never replaced" if faults.not_restarted else ""
    restarts = (f"{len(faults.restart_s)} replaced (max {max(faults.restart_s):.1f} s)" if faults.restart_s
                else "none replaced") + (f", {faults.not_restarted} not" if faults.not_restarted else "")
    drained = (f"{outcome.drained_s:.1f} s after the last job (run {outcome.seconds:.0f} s)"
               if outcome.drained_s is not None else f"no: {outcome.drain_error}")
    return [
        ("entries sent", f"{outcome.sent:,}", "", ""),
        ("results", f"{outcome.results:,}", "", ""),
        ("dead letters (poison jobs)", f"{outcome.dead_letters:,}", f"{round(args.jobs * args.poison_rate):,}", ""),
        ("lost", f"{outcome.lost:,}" + (f" ({where})" if where else ""), "0", yes(outcome.lost == 0)),
        ("duplicate results", f"{outcome.duplicates:,}", "0", yes(outcome.duplicates == 0)),
        ("handler re-runs", f"{outcome.reruns:,} of {outcome.calls:,} calls", bound_text,
         yes(outcome.reruns <= bound)),
        ("pending at the end", "?" if outcome.pending is None else f"{outcome.pending:,}", "0",
         yes(outcome.pending == 0)),
        ("drained", drained, f"within {args.drain_timeout_s:g} s of the last job and fault",
         yes(outcome.drained_s is not None)),
        ("fleet alive", "yes, throughout" if alive else died, "supervisor up, every killed worker replaced",
         yes(alive)),
        ("exit code on SIGTERM", "-" if outcome.exit_code is None else str(outcome.exit_code), "0",
         yes(outcome.exit_code == 0)),
        ("harness errors", "; ".join(outcome.errors) or "none", "none", yes(not outcome.errors)),
        ("worker SIGKILLs", f"{faults.done['worker_kill']}: {restarts}", "", ""),
        ("manager SIGKILLs", str(faults.done["manager_kill"]) if faults.done["manager_kill"] else
         "none (no fw-manager process)" if faults.absent["manager_kill"] else "0", "", ""),
        ("server SIGKILLs (AOF restart)", f"{faults.done['server_kill']}"
         + (f" (restart max {max(faults.server_restart_s):.1f} s)" if faults.server_restart_s else ""), "", ""),
        ("server pauses", f"{faults.done['pause']} x {args.pause_s:g} s", "", ""),
        ("connection cuts", f"{faults.done['cut']} ({faults.connections_cut} connections)", "", ""),
        ("delay episodes", f"{faults.done['delay']} x {args.delay_s:g} s at {args.delay_ms:g} ms one way", "", ""),
        ("faults not injected", f"{sum(faults.skipped.values())} (fleet gone), "
         f"{sum(v for k, v in faults.absent.items() if k != 'manager_kill')} (no worker to kill)", "", ""),
        ("writes the server lost (republished)", f"{outcome.server_lost:,} (appendfsync {args.fsync})", "", ""),
        ("publisher outages", f"{outcome.publish_outages}", "", ""),
        ("proxy connections", f"{proxy.get('accepted', 0)} accepted, {proxy.get('refused', 0)} refused", "", ""),
    ]


def yes(held: bool) -> str:
    return "yes" if held else "NO"


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("measure", "value", "target", "held")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")


LOG_LEVELS = re.compile(r" (WARNING|ERROR|CRITICAL) ")
FRAME = re.compile(r'File ".*?/(fastworker/[^"]+)", line (\d+), in (\S+)')


def problems(lines: list[str]) -> list[str]:
    """The fleet's warning and error lines, and each traceback as one line: its exception, where it was raised in
    fastworker (the innermost frame of the package)."""
    found: list[str] = []
    frame: str | None = None  # inside a traceback: the innermost fastworker frame so far
    for line in lines:
        if line.startswith("Traceback"):
            frame = ""
        elif frame is not None and line.startswith(" "):
            if match := FRAME.search(line):
                frame = f"{match[1]}:{match[2]} in {match[3]}"
        elif frame is not None:
            found.append(f"traceback: {line} (at {frame or '?'})")
            frame = None
        elif LOG_LEVELS.search(line):
            found.append(line)
    return found


def log_evidence(lines: list[str], limit: int = 12) -> list[str]:
    """The fleet's warnings, errors and tracebacks: each kind once with its count, then the last few as they were."""
    bad = problems(lines)
    kinds = Counter(re.sub(r"\d+(\.\d+)?", "N", line.split(": ", 1)[-1])[:110] for line in bad)
    summary = [f"{count:>5} x {kind}" for kind, count in kinds.most_common(limit)]
    return [*summary, "  last ones:", *bad[-limit:]] if bad else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastworker-chaos-")))
        work.mkdir(parents=True, exist_ok=True)
        with EmbeddedServer() as probe:
            info = versions(probe.version())
        for key in ("machine", "python", "server", "fastworker", "redis", "hiredis", "uvloop"):
            print(f"{key}: {info[key]}")
        print(f"fleet: {args.processes} processes, batch {args.batch_size}, through a fault proxy; server AOF "
              f"appendfsync {args.fsync}; work dir {work}", flush=True)
        outcome, faults, fleet, proxy = asyncio.run(run(args, work))
        rows = table(args, outcome, faults, proxy)
        print()
        print_table(rows)
        failed = [row[0] for row in rows if row[3] == "NO"]
        if outcome.lost_sample:
            print(f"\nlost jobs, first ones: {', '.join(f'job_{i:08d}' for i in outcome.lost_sample)}")
        evidence = log_evidence(fleet.log_lines())
        if evidence:
            print("\nfleet log, warnings and errors:")
            print("\n".join(evidence))
        print(f"\ntargets: {'all held' if not failed else 'FAILED: ' + ', '.join(failed)} "
              f"({outcome.seconds:.0f} s, seed {args.seed})")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
