"""Faults from the field, each on a real server: an entry that kills its worker, outputs too large for a script,
a hung sync handler, concurrency at the start of a batch, a settle the server refuses, counters of unconfirmed acks.

The rule behind them: no entry is handled twice without a crash, and never an ack without its outputs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from fastworker import App, EmbeddedServer, ExitCode, Message, Reject
from fastworker.settlement import SCRIPT_MAX_VALUES, Settlement
from tests.conftest import JOB, RunningWorker, make_settings, pending_count, publish, settle_once, wait_for

REPO = Path(__file__).resolve().parent.parent


async def _true(value: bool) -> bool:
    return value


async def _dead_letters(rc: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await rc.xrange(f"{stream}:dead")]


# -- an entry that kills its worker ------------------------------------------------------------------------------

def _calls(directory: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in directory.glob("calls-*.txt"):
        counts.update(path.read_text().split())
    return counts


@pytest.mark.slow
def test_killer_entry_is_isolated_and_dead_lettered_while_the_fleet_keeps_running(
        server: EmbeddedServer, uid: str, tmp_path: Path) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    client = redis.Redis.from_url(server.url)
    jobs = [f"job-{i}" for i in range(201)]
    killer = "job-37"
    pipe = client.pipeline(transaction=False)
    for job_id in jobs:
        pipe.xadd(stream, {"data": orjson.dumps({**JOB, "job_id": job_id})})
    pipe.execute()
    env = {**os.environ, "FAULTS_STREAM": stream, "FAULTS_GROUP": group, "FAULTS_RESULTS": results,
           "FAULTS_CALLS_DIR": str(tmp_path), "FAULTS_KILLERS": killer, "REDIS_URL": server.url,
           "PYTHONPATH": str(REPO)}
    log = tmp_path / "fleet.log"
    with log.open("w") as out:  # default flags, two processes
        fleet = subprocess.Popen([sys.executable, "-m", "fastworker", "run", "tests.faults_app:app", "--processes",
                                  "2", "--consumer-prefix", uid], env=env, cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (client.xlen(results) == 200 and client.exists(f"{stream}:dead")):
            assert fleet.poll() is None, f"the fleet exited with {fleet.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out: {log.read_text()[-3000:]}"
            time.sleep(0.05)
        assert fleet.poll() is None  # alive after its worker was killed max_deliveries times
        fleet.send_signal(signal.SIGTERM)
        assert fleet.wait(60) == ExitCode.OK
    finally:
        if fleet.poll() is None:
            fleet.kill()
    [(_, dead)] = client.xrange(f"{stream}:dead")
    assert orjson.loads(dead[b"data"])["job_id"] == killer
    assert dead[b"fw:error_class"] == b"KilledWorker"
    handled = [orjson.loads(fields[b"data"]) for _, fields in client.xrange(results)]
    assert sorted(result["job_id"] for result in handled) == sorted(set(jobs) - {killer})
    # its batch-mates were not charged for the killer: each was delivered at most twice (the batch that died,
    # then alone), whatever the number of crashes
    assert max(result["deliveries"] for result in handled) <= 2
    calls = _calls(tmp_path)
    assert calls[killer] == 5  # run max_deliveries times, then dead-lettered without running
    assert max(count for job_id, count in calls.items() if job_id != killer) <= 2
    assert int(client.xpending(stream, group)["pending"]) == 0
    client.close()


async def test_reclaimer_handles_orphans_one_at_a_time(server: EmbeddedServer, rc: aioredis.Redis,
                                                      uid: str) -> None:
    # Entries left pending by a consumer that died for good (its VM is gone): the reclaimer claims them alone, each
    # settled before the next is claimed, so that one that kills its worker takes nobody else with it.
    stream, group, dead_consumer = f"{uid}:jobs", f"{uid}-g", f"{uid}-gone"
    ids = await publish(rc, stream, [{"n": i} for i in range(12)])
    await rc.xgroup_create(stream, group, id="0")
    await rc.xreadgroup(group, dead_consumer, {stream: ">"}, count=12)
    await rc.xclaim(stream, group, dead_consumer, 0, ids, idle=60_000)  # idle long past claim_idle
    in_flight: list[int] = []
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        summary = await rc.xpending(stream, group)
        claimer = {c["name"].decode(): c["pending"] for c in summary["consumers"]}.get(f"{uid}-0.claim", 0)
        in_flight.append(claimer)
        await asyncio.sleep(0.001)

    async with RunningWorker(app, make_settings(server, uid, claim_idle_ms=2_000)):
        await wait_for(lambda: _true(len(in_flight) == 12), what="every orphan handled")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    assert in_flight == [1] * 12  # never more than the one being handled was claimed


async def _pending_is(rc: aioredis.Redis, stream: str, group: str, n: int) -> bool:
    return await pending_count(rc, stream, group) == n


# -- outputs of any size ------------------------------------------------------------------------------------------

def _wide(fields: int) -> dict[str, str]:
    return {f"field{i}": f"value{i}" for i in range(fields)}


@pytest.mark.parametrize("fields", [3_992, SCRIPT_MAX_VALUES // 2 - 9, SCRIPT_MAX_VALUES // 2 - 8,
                                    SCRIPT_MAX_VALUES // 2 - 7, 20_000])
async def test_reject_of_a_wide_entry_writes_its_dead_letter_with_the_ack(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str, fields: int) -> None:
    # A dead letter adds 8 fields (provenance, traceback): these straddle the script's limit and go far past Lua's.
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await rc.xadd(stream, _wide(fields))
    app = App()

    @app.handler(stream, group=group, payload="raw")
    async def reject(msg: Message) -> None:
        raise Reject("no good")

    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 1), what="the dead letter")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="the ack")
    [dead] = await _dead_letters(rc, stream)
    assert len(dead) == fields + 8  # its fields, the provenance and the traceback
    assert b"raise Reject" in dead[b"fw:traceback"]
    assert dead[b"field0"] == b"value0" and dead[f"field{fields - 1}".encode()] == f"value{fields - 1}".encode()
    assert dead[b"fw:error_class"] == b"Reject"


async def _length_is(rc: aioredis.Redis, key: str, n: int) -> bool:
    return int(await rc.xlen(key)) == n


@pytest.mark.parametrize("fields", [4_000, 100_000])
async def test_wide_result_is_written_with_the_ack(server: EmbeddedServer, rc: aioredis.Redis, uid: str,
                                                   fields: int) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    await publish(rc, stream, [JOB, JOB])
    app = App()

    @app.handler(stream, group=group)
    async def wide(msg: Message) -> None:
        msg.emit(results, fields=_wide(fields))
        msg.emit(results, {"small": True})

    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _length_is(rc, results, 4), what="both results of both entries")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="the acks")
    lengths = sorted(len(f) for _, f in await rc.xrange(results))
    assert lengths == [1, 1, fields, fields]


def _wide_settlement(group: str, stream: str, entry_id: str, results: str, other: str) -> Settlement:
    message = Message(stream, entry_id.encode(), [b"data", b"1"], 1, 1)
    message.emit(results, fields=_wide(SCRIPT_MAX_VALUES))
    message.emit(other, {"small": True})
    settlement = Settlement(group)
    settlement.ack(message)
    return settlement


async def test_wide_outputs_are_written_once_when_two_consumers_settle_the_same_entry(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream, group, results, other = f"{uid}:jobs", f"{uid}-g", f"{uid}:results", f"{uid}:other"
    [entry_id] = await publish(rc, stream, [JOB])
    await rc.xgroup_create(stream, group, id="0")
    await rc.xreadgroup(group, "c", {stream: ">"}, count=1)
    await rc.xadd(results, {"before": 1})
    first, second = (_wide_settlement(group, stream, entry_id, results, other) for _ in range(2))
    await settle_once(server, first)
    await settle_once(server, second)  # handled again elsewhere (a claim): its outputs must not be written again
    assert first.acked_by_stream == {stream: 1} and second.acked_by_stream == {} and second.done
    assert await rc.xlen(results) == 2 and await rc.xlen(other) == 1
    assert [len(fields) for _, fields in await rc.xrange(results)] == [1, SCRIPT_MAX_VALUES]


async def test_wide_output_to_a_key_of_the_wrong_type_writes_nothing(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream, group, results, other = f"{uid}:jobs", f"{uid}-g", f"{uid}:results", f"{uid}:other"
    [entry_id] = await publish(rc, stream, [JOB])
    await rc.xgroup_create(stream, group, id="0")
    await rc.xreadgroup(group, "c", {stream: ">"}, count=1)
    await rc.set(other, "not a stream")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await settle_once(server, _wide_settlement(group, stream, entry_id, results, other))
    assert await pending_count(rc, stream, group) == 1  # not acked
    assert await rc.xlen(results) == 0  # and the output that could be written was taken back


# -- a hung sync handler, and concurrency at the start of a batch -------------------------------------------------

async def test_hung_sync_handler_charges_only_its_own_entry(server: EmbeddedServer, rc: aioredis.Redis,
                                                           uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    release = threading.Event()
    hung_id = (await publish(rc, stream, [{"n": i} for i in range(20)]))[0]
    calls: Counter[str] = Counter()
    app = App()

    @app.handler(stream, group=group)
    def handle(msg: Message) -> None:  # a plain def: runs in a thread
        calls[msg.id] += 1
        if msg.id == hung_id:
            release.wait(90)
        msg.emit(results, {"n": msg.payload["n"]})

    settings = make_settings(server, uid, handler_timeout_s=1.0, claim_idle_ms=5_000)
    try:
        async with RunningWorker(app, settings):
            # The 19 others get their results while the hung call is still hanging, each run once.
            await wait_for(lambda: _length_is(rc, results, 19), timeout_s=10, what="the 19 results")
            assert not release.is_set() and calls[hung_id] == 1
            await wait_for(lambda: _retried(rc, stream, group, hung_id), what="the hung entry charged")
            assert {entry_id: n for entry_id, n in calls.items() if entry_id != hung_id} == \
                dict.fromkeys(set(calls) - {hung_id}, 1)
            assert len(calls) == 20
    finally:
        release.set()


async def _retried(rc: aioredis.Redis, stream: str, group: str, entry_id: str) -> bool:
    rows = await rc.xpending_range(stream, group, "-", "+", 10)
    return [(r["message_id"].decode(), r["consumer"]) for r in rows] == [(entry_id, b"fastworker.retry")]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_calls_that_wait_run_concurrently_from_the_start_of_a_batch(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str, kind: str) -> None:
    # 16 calls that each wait on I/O: all 16 must be in flight at once (default concurrency 64). A barrier only
    # opens when all 16 wait at it; run one after another, the first call would time out there.
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": i} for i in range(16)])
    done: list[int] = []
    app = App()
    if kind == "async":
        arrived = asyncio.Event()
        waiting = [0]

        @app.handler(stream, group=group)
        async def handle(msg: Message) -> None:
            waiting[0] += 1
            if waiting[0] == 16:
                arrived.set()
            await asyncio.wait_for(arrived.wait(), 5)
            done.append(msg.payload["n"])
    else:
        barrier = threading.Barrier(16, timeout=5)

        @app.handler(stream, group=group)
        def handle_sync(msg: Message) -> None:
            barrier.wait()
            done.append(msg.payload["n"])

    async with RunningWorker(app, make_settings(server, uid, handler_timeout_s=8.0, claim_idle_ms=20_000)):
        await wait_for(lambda: _true(len(done) == 16), timeout_s=15, what="all 16 calls")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="the acks")
    assert sorted(done) == list(range(16))


# -- a settle the server refuses ----------------------------------------------------------------------------------

async def test_refused_settle_backs_off_without_handling_again_until_the_key_is_fixed(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str, caplog: pytest.LogCaptureFixture) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await rc.set(f"{stream}:dead", "a string where the dead letters go")
    await publish(rc, stream, [{"n": i} for i in range(3)])
    calls: Counter[int] = Counter()
    app = App()

    @app.handler(stream, group=group)
    async def reject(msg: Message) -> None:
        calls[msg.payload["n"]] += 1
        raise Reject("no good")

    async with RunningWorker(app, make_settings(server, uid)) as worker:
        await wait_for(lambda: _true(bool(worker.stats.problems)), what="the problem reported")
        [reason] = worker.stats.problems.values()
        assert "WRONGTYPE" in reason
        refused_at = time.monotonic()
        await wait_for(lambda: _true(time.monotonic() - refused_at > 2), what="two seconds of refusals")
        assert calls == {0: 1, 1: 1, 2: 1}  # not handled again while the settle is refused
        assert await pending_count(rc, stream, group) == 3  # nothing acked
        await rc.delete(f"{stream}:dead")  # the operator fixes the key
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 3), timeout_s=40, what="the dead letters")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="the acks")
        await wait_for(lambda: _true(not worker.stats.problems), what="the problem cleared")
    assert calls == {0: 1, 1: 1, 2: 1}
    refusals = [r for r in caplog.records if "refused to settle" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(refusals) == 1  # once per outage, not once per try


# -- counters ------------------------------------------------------------------------------------------------------

async def test_acked_counts_only_what_the_server_confirmed(server: EmbeddedServer, rc: aioredis.Redis,
                                                           uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    n = 20_000
    await publish(rc, stream, [{**JOB, "job_id": f"job-{i}"} for i in range(n)])
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        msg.emit(results, {"job_id": msg.payload["job_id"]})

    async with RunningWorker(app, make_settings(server, uid, batch_size=200)) as worker:
        own = await rc.client_id()
        while await pending_count(rc, stream, group) or await rc.xlen(results) < n:
            for client in await rc.client_list():
                if int(client["id"]) != own:
                    await rc.client_kill_filter(_id=client["id"])  # cut every worker connection mid-batch
            await asyncio.sleep(0.05)
        await wait_for(lambda: _true(worker.stats.total("received") >= n), what="counters")
    assert await rc.xlen(results) == n  # exactly once
    assert worker.stats.total("acked") <= n  # an ack whose reply was cut is not counted


async def test_reclaimer_recovers_its_own_pending_entries_at_start_one_at_a_time(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    # A retry batch claimed by a reclaimer whose process then died: the next reclaimer under that name recovers
    # them at once (not after claim idle), alone.
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": i} for i in range(5)])
    await rc.xgroup_create(stream, group, id="0")
    await rc.xreadgroup(group, f"{uid}-0.claim", {stream: ">"}, count=5)
    in_flight: list[int] = []
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        summary = await rc.xpending(stream, group)
        in_flight.append({c["name"].decode(): c["pending"] for c in summary["consumers"]}[f"{uid}-0.claim"])

    async with RunningWorker(app, make_settings(server, uid, claim_idle_ms=60_000, handler_timeout_s=1.0)):
        await wait_for(lambda: _true(len(in_flight) == 5), what="the five recovered")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    assert in_flight == [5, 4, 3, 2, 1]  # each settled before the next was handled
