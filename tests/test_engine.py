"""The consumer engine against a real server: throughput of the contract, results, pending recovery."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis

from fastworker import App, Backoff, Dedup, EmbeddedServer, Message, Reject, Retry
from fastworker.errors import RedisCommandError
from fastworker.settlement import Settlement
from tests.conftest import JOB, RunningWorker, make_settings, pending_count, publish, settle_once, wait_for


async def test_engine_handles_every_entry_and_publishes_results(server: EmbeddedServer, rc: aioredis.Redis,
                                                                uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    n = 20_000
    payloads = [{**JOB, "job_id": f"job-{i}"} for i in range(n)]
    await publish(rc, stream, payloads)
    seen: list[str] = []
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        seen.append(msg.payload["job_id"])
        msg.emit(results, {"job_id": msg.payload["job_id"], "shop_id": msg.payload["shop_id"], "status": "completed"})

    async with RunningWorker(app, make_settings(server, uid, batch_size=500)):
        await wait_for(lambda: _length_is(rc, results, n), what="all results")
    assert sorted(seen) == sorted(p["job_id"] for p in payloads)
    assert await pending_count(rc, stream, group) == 0
    assert await rc.xlen(results) == n


async def _length_is(rc: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await rc.xlen(stream)) >= n


async def _read_as(rc: aioredis.Redis, stream: str, group: str, consumer: str, count: int) -> list[str]:
    """Deliver entries to `consumer` and never ack them: a consumer that crashed mid-batch."""
    await rc.xgroup_create(stream, group, id="0", mkstream=True)
    reply = await rc.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in reply[0][1]]


def _recording_app(stream: str, group: str, seen: list[Message]) -> App:
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        seen.append(msg)

    return app


async def test_consumer_recovers_its_own_pending_entries_at_once(server: EmbeddedServer, rc: aioredis.Redis,
                                                                  uid: str) -> None:
    stream, group, name = f"{uid}:jobs", f"{uid}-g", f"{uid}-0"
    await publish(rc, stream, [{"n": i} for i in range(30)])
    stranded = await _read_as(rc, stream, group, name, 20)
    seen: list[Message] = []
    # claim_idle_ms is an hour: only the consumer's own history read can hand these entries out again.
    settings = make_settings(server, uid, claim_idle_ms=3_600_000)
    async with RunningWorker(_recording_app(stream, group, seen), settings, [name]):
        await wait_for(lambda: _pending_is(rc, stream, group, 0), timeout_s=10, what="empty PEL")
        await wait_for(lambda: _true(len(seen) >= 30), what="all handled")
    recovered = {m.id: m.deliveries for m in seen if m.id in stranded}
    assert set(recovered) == set(stranded)
    assert set(recovered.values()) == {2}
    assert len(seen) == 30


async def test_reclaimer_takes_over_a_dead_consumers_idle_entries(server: EmbeddedServer, rc: aioredis.Redis,
                                                                   uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": i} for i in range(50)])
    stranded = await _read_as(rc, stream, group, f"{uid}-crashed", 50)
    seen: list[Message] = []
    settings = make_settings(server, uid, claim_idle_ms=300, handler_timeout_s=0.1)
    async with RunningWorker(_recording_app(stream, group, seen), settings) as worker:
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    assert sorted(m.id for m in seen) == sorted(stranded)
    assert {m.deliveries for m in seen} == {2}
    assert worker.stats.total("claimed") == 50


async def test_failing_entry_is_dead_lettered_after_max_deliveries_with_provenance(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    [entry_id] = await publish(rc, stream, [{"job_id": "poison"}])
    attempts: list[int] = []
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        attempts.append(msg.deliveries)
        raise ValueError("cannot analyse shop")

    settings = make_settings(server, uid, claim_idle_ms=200, handler_timeout_s=0.1, max_deliveries=3)
    async with RunningWorker(app, settings):
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 1), what="dead letter")
    [(_, fields)] = await rc.xrange(f"{stream}:dead")
    assert attempts == [1, 2, 3]
    assert orjson.loads(fields[b"data"]) == {"job_id": "poison"}
    assert fields[b"fw:stream"] == stream.encode() and fields[b"fw:group"] == group.encode()
    assert fields[b"fw:id"] == entry_id.encode() and fields[b"fw:deliveries"] == b"3"
    assert fields[b"fw:error_class"] == b"ValueError" and fields[b"fw:error"] == b"cannot analyse shop"
    assert int(fields[b"fw:dead_at_ms"]) > 0
    assert await pending_count(rc, stream, group) == 0


async def test_reject_dead_letters_on_first_delivery(server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": 1}, {"n": 2}])
    app = App()

    @app.handler(stream, group=group)
    def handle(msg: Message) -> None:  # a sync handler: runs in a thread
        if msg.payload["n"] == 2:
            raise Reject("shop uninstalled the app")

    async with RunningWorker(app, make_settings(server, uid)) as worker:
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 1), what="dead letter")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    [(_, fields)] = await rc.xrange(f"{stream}:dead")
    assert fields[b"fw:error_class"] == b"Reject" and fields[b"fw:deliveries"] == b"1"
    assert fields[b"fw:error"] == b"shop uninstalled the app"
    assert worker.stats.total("acked") == 1


async def test_malformed_entries_are_dead_lettered_with_reason(server: EmbeddedServer, rc: aioredis.Redis,
                                                               uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    bad = {
        (await rc.xadd(stream, {"data": b"{truncated"})).decode(): "malformed JSON",
        (await rc.xadd(stream, {"data": b"\xff\xfe\x00"})).decode(): "malformed JSON",
        (await rc.xadd(stream, {"jobId": b"\xc3\x28"})).decode(): "not UTF-8",
    }
    good = (await rc.xadd(stream, {"jobId": "j1", "shopId": "s1"})).decode()
    seen: list[Message] = []
    async with RunningWorker(_recording_app(stream, group, seen), make_settings(server, uid)):
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 3), what="dead letters")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    assert [(m.id, m.payload) for m in seen] == [(good, {"jobId": "j1", "shopId": "s1"})]
    dead = {f[b"fw:id"].decode(): f for _, f in await rc.xrange(f"{stream}:dead")}
    assert set(dead) == set(bad)
    for entry_id, reason in bad.items():
        assert dead[entry_id][b"fw:error_class"] == b"DecodeError"
        assert reason in dead[entry_id][b"fw:error"].decode()
        assert dead[entry_id][b"fw:deliveries"] == b"1"
    original = dead[next(iter(bad))]
    assert original[b"data"] == b"{truncated"


async def test_missing_payload_field_is_dead_lettered_in_json_mode(server: EmbeddedServer, rc: aioredis.Redis,
                                                                   uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await rc.xadd(stream, {"jobId": "j1"})
    app = App()
    app.handler(stream, group=group, payload="json")(lambda msg: None)
    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 1), what="dead letter")
    [(_, fields)] = await rc.xrange(f"{stream}:dead")
    assert b"missing payload field 'data'" in fields[b"fw:error"]


async def test_entries_deleted_while_pending_are_acked_and_counted(server: EmbeddedServer, rc: aioredis.Redis,
                                                                   uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": i} for i in range(6)])
    stranded = await _read_as(rc, stream, group, f"{uid}-crashed", 6)
    await rc.xdel(stream, *stranded[:4])
    seen: list[Message] = []
    settings = make_settings(server, uid, claim_idle_ms=200, handler_timeout_s=0.1)
    async with RunningWorker(_recording_app(stream, group, seen), settings) as worker:
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
        await wait_for(lambda: _true(len(seen) == 2), what="the two surviving entries")
    assert sorted(m.id for m in seen) == stranded[4:]
    assert worker.stats.total("deleted") == 4


async def test_own_history_entry_deleted_while_pending_is_dead_lettered(server: EmbeddedServer,
                                                                        rc: aioredis.Redis, uid: str) -> None:
    stream, group, name = f"{uid}:jobs", f"{uid}-g", f"{uid}-0"
    await publish(rc, stream, [{"n": 1}])
    [entry_id] = await _read_as(rc, stream, group, name, 1)
    await rc.xdel(stream, entry_id)
    seen: list[Message] = []
    settings = make_settings(server, uid, claim_idle_ms=3_600_000)
    async with RunningWorker(_recording_app(stream, group, seen), settings, [name]):
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 1), what="dead letter")
    [(_, fields)] = await rc.xrange(f"{stream}:dead")
    assert (fields[b"fw:id"].decode(), fields[b"fw:error_class"]) == (entry_id, b"EntryDeleted")
    assert seen == []
    assert await pending_count(rc, stream, group) == 0


async def test_batch_handler_gets_the_batch_and_fails_single_entries(server: EmbeddedServer, rc: aioredis.Redis,
                                                                     uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    ids = await publish(rc, stream, [{"n": i} for i in range(10)])
    sizes: list[int] = []
    app = App()

    @app.handler(stream, group=group, batch=True)
    async def handle(batch: list[Message]) -> dict[str, Exception]:
        sizes.append(len(batch))
        return {m.id: Reject("odd") for m in batch if m.payload["n"] % 2}

    async with RunningWorker(app, make_settings(server, uid, batch_size=100)):
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 5), what="dead letters")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    assert sizes == [10]
    assert sorted(f[b"fw:id"].decode() for _, f in await rc.xrange(f"{stream}:dead")) == ids[1::2]


async def _pending_is(rc: aioredis.Redis, stream: str, group: str, n: int) -> bool:
    return await pending_count(rc, stream, group) == n


async def _true(value: bool) -> bool:
    return value



def _settlement(group: str, stream: str, ok_id: str, bad_id: str, results: str) -> Settlement:
    settlement = Settlement(group)
    ok = Message(stream, ok_id.encode(), [b"data", b"1"], 1, 1)
    ok.emit(results, {"job": 1})
    settlement.ack(ok)
    settlement.dead_letter(Message(stream, bad_id.encode(), [b"data", b"x"], None, 3), f"{stream}:dead",
                           "ValueError", "boom")
    return settlement


async def test_settle_writes_results_dead_letters_and_acks_together(server: EmbeddedServer, rc: aioredis.Redis,
                                                                    uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    ok_id, bad_id = await publish(rc, stream, [1, "x"])
    await _read_as(rc, stream, group, "c", 2)
    assert await settle_once(server, _settlement(group, stream, ok_id, bad_id, results)) == 2
    assert await pending_count(rc, stream, group) == 0
    assert orjson.loads((await rc.xrange(results))[0][1][b"data"]) == {"job": 1}
    [(_, dead)] = await rc.xrange(f"{stream}:dead")
    assert dead[b"data"] == b"x" and dead[b"fw:id"] == bad_id.encode() and dead[b"fw:deliveries"] == b"3"


async def test_settle_writes_results_only_for_the_first_settlement(server: EmbeddedServer, rc: aioredis.Redis,
                                                                  uid: str) -> None:
    # Two consumers handled the same entries (one claimed them while the other was still busy): the second
    # settlement must not publish the results or dead letters again.
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    ok_id, bad_id = await publish(rc, stream, [1, "x"])
    await _read_as(rc, stream, group, "c", 2)
    assert await settle_once(server, _settlement(group, stream, ok_id, bad_id, results)) == 2
    assert await settle_once(server, _settlement(group, stream, ok_id, bad_id, results)) == 0
    assert await rc.xlen(results) == 1
    assert await rc.xlen(f"{stream}:dead") == 1


async def test_settle_refuses_an_output_key_of_the_wrong_type(server: EmbeddedServer, rc: aioredis.Redis,
                                                              uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    ok_id, bad_id = await publish(rc, stream, [1, "x"])
    await _read_as(rc, stream, group, "c", 2)
    await rc.set(results, "not a stream")
    with pytest.raises(RedisCommandError, match="WRONGTYPE"):
        await settle_once(server, _settlement(group, stream, ok_id, bad_id, results))
    assert await pending_count(rc, stream, group) == 2  # nothing was acked, nothing is lost
    assert await rc.xlen(f"{stream}:dead") == 0


def _side_effect_app(stream: str, group: str, results: str, effects: list[str], dedup: Dedup,
                     crash_after_effect: set[str]) -> App:
    app = App()

    @app.handler(stream, group=group, dedup=dedup)
    async def charge(msg: Message) -> None:
        effects.append(msg.payload["job_id"])  # the outside side effect (a payment, an e-mail)
        msg.emit(results, {"job_id": msg.payload["job_id"]})
        if msg.payload["job_id"] in crash_after_effect:
            crash_after_effect.discard(msg.payload["job_id"])
            raise RuntimeError("crashed after the side effect, before the acknowledgement")

    return app


async def test_dedup_skips_a_redelivered_entry_whose_side_effect_happened(server: EmbeddedServer,
                                                                         rc: aioredis.Redis, uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    await publish(rc, stream, [{"job_id": f"job-{i}"} for i in range(5)])
    effects: list[str] = []
    app = _side_effect_app(stream, group, results, effects, Dedup(), set())
    # A first run did the work of job-2 and recorded it, then died before acknowledging: simulate the record.
    entry_ids = [entry_id.decode() for entry_id, _ in await rc.xrange(stream)]
    record = Message(stream, entry_ids[2], [], {"job_id": "job-2"}, 1)
    record.emit(results, {"job_id": "job-2"})
    from fastworker.message import encode_record

    await rc.set(Dedup().key(group, record), encode_record(record))
    async with RunningWorker(app, make_settings(server, uid)) as worker:
        await wait_for(lambda: _true(worker.stats.total("acked") == 5), what="all five acked")
    assert await pending_count(rc, stream, group) == 0
    assert sorted(effects) == ["job-0", "job-1", "job-3", "job-4"]  # job-2's side effect did not happen again
    assert sorted(orjson.loads(f[b"data"])["job_id"] for _, f in await rc.xrange(results)) == \
        [f"job-{i}" for i in range(5)]  # but its recorded result was published
    assert worker.stats.total("deduplicated") == 1


async def test_dedup_by_payload_field_skips_a_producer_duplicate(server: EmbeddedServer, rc: aioredis.Redis,
                                                                uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    await publish(rc, stream, [{"job_id": "job-1"}, {"job_id": "job-2"}, {"job_id": "job-1"}])  # a retried XADD
    effects: list[str] = []
    app = _side_effect_app(stream, group, results, effects, Dedup(field="job_id", ttl_s=60), set())
    # The twin in the same batch is left pending and skipped on its redelivery, after claim idle.
    settings = make_settings(server, uid, claim_idle_ms=200, handler_timeout_s=0.1)
    async with RunningWorker(app, settings) as worker:
        await wait_for(lambda: _true(worker.stats.total("acked") == 3), what="all three acked")
    assert await pending_count(rc, stream, group) == 0
    assert sorted(effects) == ["job-1", "job-2"]
    assert await rc.xlen(results) == 2  # the duplicate published nothing
    assert worker.stats.total("deduplicated") == 1
    assert 0 < await rc.pttl(f"fw:done:{group}:job_id:job-1") <= 60_000


async def test_without_dedup_a_failure_after_the_side_effect_repeats_it(server: EmbeddedServer,
                                                                       rc: aioredis.Redis, uid: str) -> None:
    # The control for the tests above: the retry of a call that failed after its side effect repeats the effect.
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"job_id": "job-1"}])
    effects: list[str] = []
    app = App()

    @app.handler(stream, group=group)
    async def charge(msg: Message) -> None:
        effects.append(msg.payload["job_id"])
        if msg.deliveries == 1:
            raise RuntimeError("crashed after the side effect")

    settings = make_settings(server, uid, claim_idle_ms=200, handler_timeout_s=0.1)
    async with RunningWorker(app, settings) as worker:
        await wait_for(lambda: _true(worker.stats.total("acked") == 1), what="the retry to succeed")
    assert effects == ["job-1", "job-1"]


async def test_reclaimer_counts_deliveries_of_claims_among_its_own_pending(server: EmbeddedServer,
                                                                           rc: aioredis.Redis, uid: str) -> None:
    # Poison entries (delivered 10 times by crashing workers) interleaved with entries the claimer itself holds:
    # every poison entry must be seen as exhausted and dead-lettered, none handed to the handler as a first try.
    stream, group = f"{uid}:jobs", f"{uid}-g"
    ids = await publish(rc, stream, [{"n": i} for i in range(20)])
    await rc.xgroup_create(stream, group, id="0")
    await rc.xreadgroup(group, f"{uid}-crashed", {stream: ">"}, count=20)
    poison, own = ids[0::2], ids[1::2]
    await rc.xclaim(stream, group, f"{uid}-crashed", 0, poison, idle=60_000, retrycount=10)  # claimable now
    await rc.xclaim(stream, group, f"{uid}-0.claim", 0, own)  # fresh: not claimable for claim_idle_ms
    seen: list[Message] = []
    settings = make_settings(server, uid, claim_idle_ms=1_000, handler_timeout_s=0.1, max_deliveries=5)
    async with RunningWorker(_recording_app(stream, group, seen), settings):
        await wait_for(lambda: _length_is(rc, f"{stream}:dead", 10), what="ten dead letters")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    assert not {m.id for m in seen} & set(poison)
    assert {m.id for m in seen} == set(own)
    dead = [f for _, f in await rc.xrange(f"{stream}:dead")]
    assert {f[b"fw:error_class"] for f in dead} == {b"KilledWorker"}


async def test_long_batch_is_not_claimed_while_it_is_handled(server: EmbeddedServer, rc: aioredis.Redis,
                                                             uid: str) -> None:
    # Ten calls of 80 ms one after another: the last entries wait 0.8 s, twice the claim idle time.
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": i} for i in range(10)])
    calls: list[int] = []
    app = App()

    @app.handler(stream, group=group)
    async def slow(msg: Message) -> None:
        calls.append(msg.payload["n"])
        await asyncio.sleep(0.08)

    settings = make_settings(server, uid, claim_idle_ms=400, claim_interval_ms=50, handler_timeout_s=0.2,
                             concurrency=1)
    async with RunningWorker(app, settings) as worker:
        await wait_for(lambda: _true(worker.stats.total("acked") >= 10), what="all ten acked")
    assert sorted(calls) == list(range(10))  # each handled once: nothing was claimed from under the batch
    assert worker.stats.total("claimed") == 0


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_handler_past_its_timeout_is_retried(server: EmbeddedServer, rc: aioredis.Redis, uid: str,
                                                   kind: str) -> None:
    import time

    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"n": 1}])
    calls: list[int] = []

    async def stuck_once_async(msg: Message) -> None:  # cancelled by the timeout watchdog
        calls.append(msg.deliveries)
        if msg.deliveries == 1:
            await asyncio.sleep(10)

    def stuck_once_sync(msg: Message) -> None:  # a thread: no timeout can interrupt it, its consumer moves on
        calls.append(msg.deliveries)
        if msg.deliveries == 1:
            time.sleep(1.0)

    app = App()
    app.handler(stream, group=group)(stuck_once_async if kind == "async" else stuck_once_sync)
    settings = make_settings(server, uid, claim_idle_ms=300, handler_timeout_s=0.15)
    async with RunningWorker(app, settings) as worker:
        await wait_for(lambda: _true(worker.stats.total("acked") == 1), what="the retry to succeed")
    assert calls == [1, 2]
    assert worker.stats.total("retried") == 1


async def test_dedup_records_the_work_of_sync_handlers(server: EmbeddedServer, rc: aioredis.Redis,
                                                       uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [{"job_id": f"job-{i}"} for i in range(200)])
    app = App()
    app.handler(stream, group=group, dedup=Dedup(field="job_id", ttl_s=60))(lambda msg: None)
    async with RunningWorker(app, make_settings(server, uid)) as worker:
        await wait_for(lambda: _true(worker.stats.total("acked") == 200), what="all acked")
    keys = [f"fw:done:{group}:job_id:job-{i}" for i in range(200)]
    assert all(await rc.mget(keys))


async def test_scripts_survive_an_emptied_script_cache(server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    # Scripts go by digest (EVALSHA). A server restart or SCRIPT FLUSH empties its script cache: every call
    # refused with NOSCRIPT did nothing and is sent again with the script's text, so results, retries and acks
    # all still happen exactly once.
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    n = 3_000
    await publish(rc, stream, list(range(n)))
    calls: dict[int, int] = {}
    app = App()

    @app.handler(stream, group=group, retry=Backoff(first_s=0.01, jitter=0))
    async def handle(msg: Message) -> None:
        calls[msg.payload] = calls.get(msg.payload, 0) + 1
        if msg.payload % 100 == 0 and msg.deliveries == 1:
            raise Retry("once", delay_s=0.01)  # parked by one script, handed out again by another
        msg.emit(results, {"job": msg.payload})

    async def noscript_replies() -> int:
        return int((await rc.info("errorstats")).get("errorstat_NOSCRIPT", {}).get("count", 0))

    async def flush_scripts() -> None:
        while True:
            await rc.script_flush()
            await asyncio.sleep(0.005)

    before = await noscript_replies()

    flusher = asyncio.create_task(flush_scripts())
    try:
        async with RunningWorker(app, make_settings(server, uid, batch_size=100)):
            await wait_for(lambda: _length_is(rc, results, n), what="all results")
    finally:
        flusher.cancel()
    assert await noscript_replies() - before >= 3  # the cache was found empty, again and again
    assert await rc.xlen(results) == n
    assert sorted(orjson.loads(fields[b"data"])["job"] for _, fields in await rc.xrange(results)) == list(range(n))
    assert {job: count for job, count in calls.items() if count != (2 if job % 100 == 0 else 1)} == {}
    assert await pending_count(rc, stream, group) == 0
