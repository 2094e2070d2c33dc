"""The handler contract on a real server: retry backoff kept on the server, Retry(delay_s=), errors not worth
retrying, typed payloads, tracebacks in dead letters, and a failure log that does not flood."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from typing import TypedDict

import msgspec
import orjson
import pydantic
import pytest
import redis.asyncio as aioredis

from fastworker import App, Backoff, EmbeddedServer, Message, Retry
from fastworker.dispatch import FailureLog
from fastworker.settlement import retry_key
from tests.conftest import JOB, RunningWorker, cli, make_settings, pending_count, publish, wait_for


async def _true(value: bool) -> bool:
    return value


async def _dead(rc: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await rc.xrange(f"{stream}:dead")]


async def _dead_count_is(rc: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await rc.xlen(f"{stream}:dead")) == n


# -- backoff --------------------------------------------------------------------------------------------------------

# A retry runs when it is due by the server's clock: never earlier than its delay after the failure, and later by
# the settle that parks it, the local timer, one claim round trip and the dispatch: milliseconds here, up to a few
# hundred on a loaded 2-core machine. Hence the tolerance: [delay - 20 ms, delay + 400 ms] between calls.
EARLY_S, LATE_S = 0.02, 0.4


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_backoff_spaces_the_retries_of_a_failing_entry(server: EmbeddedServer, rc: aioredis.Redis,
                                                              uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    calls: list[float] = []
    app = App()

    @app.handler(stream, group=group, retry=Backoff(first_s=0.5, factor=2, max_s=10, jitter=0))
    async def flaky(msg: Message) -> None:
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise ConnectionError("the shop's API is down")

    await publish(rc, stream, [JOB])
    async with RunningWorker(app, make_settings(server, uid, claim_idle_ms=30_000, handler_timeout_s=5)):
        await wait_for(lambda: _true(len(calls) == 4), timeout_s=15, what="four calls")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="the ack")
    for gap, delay in zip(_gaps(calls), [0.5, 1.0, 2.0], strict=True):
        assert delay - EARLY_S <= gap <= delay + LATE_S, (_gaps(calls), "expected about 0.5, 1.0, 2.0 s")


async def _pending_is(rc: aioredis.Redis, stream: str, group: str, n: int) -> bool:
    return await pending_count(rc, stream, group) == n


async def test_backoff_schedule_survives_a_restart(server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    calls: list[tuple[float, int]] = []
    app = App()

    @app.handler(stream, group=group, retry=Backoff(first_s=1.5, factor=2, max_s=10, jitter=0))
    async def flaky(msg: Message) -> None:
        calls.append((time.monotonic(), msg.deliveries))
        if len(calls) <= 2:
            raise ConnectionError("still down")

    await publish(rc, stream, [JOB])
    settings = make_settings(server, uid, claim_idle_ms=30_000, handler_timeout_s=5)
    async with RunningWorker(app, settings):
        await wait_for(lambda: _true(len(calls) == 1), what="the first call")
        await wait_for(lambda: _scheduled(rc, stream, group), what="its retry on the server")
    # the fleet is down between the first failure and its retry: the due time is kept on the server
    async with RunningWorker(app, settings):
        await wait_for(lambda: _true(len(calls) == 3), timeout_s=15, what="two retries after the restart")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="the ack")
    times = [t for t, _ in calls]
    assert [n for _, n in calls] == [1, 2, 3]  # the attempt count went on: the backoff was not reset
    for gap, delay in zip(_gaps(times), [1.5, 3.0], strict=True):
        assert delay - EARLY_S <= gap <= delay + LATE_S, (_gaps(times), "expected about 1.5, 3.0 s")


async def _scheduled(rc: aioredis.Redis, stream: str, group: str) -> bool:
    return int(await rc.zcard(retry_key(stream, group))) == 1


async def test_retry_delay_from_the_handler_wins_over_the_backoff(server: EmbeddedServer, rc: aioredis.Redis,
                                                                  uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    calls: list[float] = []
    app = App()

    @app.handler(stream, group=group, retry=Backoff(first_s=20, jitter=0))
    async def rate_limited(msg: Message) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise Retry("HTTP 429", delay_s=0.3)  # the API's Retry-After

    await publish(rc, stream, [JOB])
    async with RunningWorker(app, make_settings(server, uid, claim_idle_ms=30_000, handler_timeout_s=5)):
        await wait_for(lambda: _true(len(calls) == 2), timeout_s=10, what="the retry")
    assert 0.3 - EARLY_S <= _gaps(calls)[0] <= 0.3 + LATE_S


async def test_dead_on_classes_are_dead_lettered_at_the_first_failure(server: EmbeddedServer, rc: aioredis.Redis,
                                                                      uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    calls: list[str] = []
    app = App()

    @app.handler(stream, group=group, dead_on=(KeyError,))
    async def analyse(msg: Message) -> None:
        calls.append(msg.id)
        msg.payload["jobId"]  # a Node producer named it job_id: no retry will change that

    await publish(rc, stream, [JOB])
    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _dead_count_is(rc, stream, 1), what="the dead letter")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="the ack")
    [dead] = await _dead(rc, stream)
    assert len(calls) == 1
    assert dead[b"fw:error_class"] == b"KeyError" and dead[b"fw:deliveries"] == b"1"
    assert b'msg.payload["jobId"]' in dead[b"fw:traceback"] and b"in analyse" in dead[b"fw:traceback"]


async def test_dead_letter_carries_the_last_failures_traceback(server: EmbeddedServer, rc: aioredis.Redis,
                                                                uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    app = App()

    @app.handler(stream, group=group, max_deliveries=2, retry=Backoff(first_s=0.05, jitter=0))
    async def broken(msg: Message) -> None:
        raise ValueError(f"attempt {msg.deliveries} failed")

    await publish(rc, stream, [JOB])
    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _dead_count_is(rc, stream, 1), what="the dead letter")
    [dead] = await _dead(rc, stream)
    assert dead[b"fw:error_class"] == b"ValueError" and dead[b"fw:deliveries"] == b"2"
    assert dead[b"fw:error"] == b"attempt 2 failed"
    assert dead[b"fw:traceback"].startswith(b"Traceback (most recent call last)")
    assert dead[b"fw:traceback"].rstrip().endswith(b"ValueError: attempt 2 failed")


# -- typed payloads -------------------------------------------------------------------------------------------------

class Params(msgspec.Struct):
    days: int
    min_support: float


class AnalysisJob(msgspec.Struct):
    job_id: str
    shop_id: str
    params: Params
    type: str = "analysis"


class AnalysisResult(msgspec.Struct):
    job_id: str
    status: str


@dataclasses.dataclass
class Notification:
    shop_id: str
    kind: str
    urgent: bool = False
    retries: int = 0


class TrainingJob(TypedDict):
    job_id: str
    model: str


class PydanticJob(pydantic.BaseModel):
    job_id: str
    params: dict[str, int]


async def _run_typed(server: EmbeddedServer, rc: aioredis.Redis, uid: str, app: App, stream: str,
                     expected: int) -> None:
    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _pending_is(rc, stream, f"{uid}-g", 0), what="every entry settled")
        await wait_for(lambda: _settled_all(rc, stream, expected), what="the expected entries")


async def _settled_all(rc: aioredis.Redis, stream: str, n: int) -> bool:
    info = await rc.xinfo_groups(stream)
    return bool(info) and int(info[0]["entries-read"] or 0) >= n


async def test_typed_payload_from_json_and_a_typed_result(server: EmbeddedServer, rc: aioredis.Redis,
                                                          uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    seen: list[AnalysisJob] = []
    app = App()

    @app.handler(stream, group=group)
    async def analyse(msg: Message[AnalysisJob]) -> None:
        seen.append(msg.payload)
        msg.emit(results, AnalysisResult(job_id=msg.payload.job_id, status="completed"))

    await publish(rc, stream, [JOB])
    await _run_typed(server, rc, uid, app, stream, 1)
    assert seen == [AnalysisJob("job_01J9", "shop_4821", Params(90, 0.01))]
    [(_, result)] = await rc.xrange(results)
    assert orjson.loads(result[b"data"]) == {"job_id": "job_01J9", "status": "completed"}


async def test_typed_payload_that_does_not_fit_is_dead_lettered_at_once_with_its_path(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    calls: list[str] = []
    app = App()

    @app.handler(stream, group=group)
    async def analyse(msg: Message[AnalysisJob]) -> None:
        calls.append(msg.id)

    await publish(rc, stream, [{**JOB, "params": {"days": "90", "min_support": 0.01}},
                               {"jobId": "job_01J9", "shopId": "shop_4821"}, JOB])
    await _run_typed(server, rc, uid, app, stream, 3)
    dead = await _dead(rc, stream)
    assert len(calls) == 1  # only the valid one reached the handler
    assert [d[b"fw:error_class"] for d in dead] == [b"PayloadInvalid", b"PayloadInvalid"]
    assert [d[b"fw:deliveries"] for d in dead] == [b"1", b"1"]
    assert dead[0][b"fw:error"] == b"AnalysisJob: $.params.days: expected int, got str"
    assert dead[1][b"fw:error"] == b"AnalysisJob: $: object missing required field job_id"


async def test_typed_payload_from_flat_fields_converts_strings(server: EmbeddedServer, rc: aioredis.Redis,
                                                              uid: str) -> None:
    stream, group = f"{uid}:notes", f"{uid}-g"
    seen: list[Notification] = []
    app = App()

    @app.handler(stream, group=group, payload_type=Notification)
    def notify(msg: Message) -> None:
        seen.append(msg.payload)

    await rc.xadd(stream, {"shop_id": "shop_4821", "kind": "analysis_complete", "urgent": "true", "retries": "2"})
    await rc.xadd(stream, {"shop_id": "shop_4821", "kind": "x", "retries": "two"})
    await _run_typed(server, rc, uid, app, stream, 2)
    assert seen == [Notification("shop_4821", "analysis_complete", True, 2)]
    [dead] = await _dead(rc, stream)
    assert dead[b"fw:error"] == b"Notification: $.retries: expected int, got str ('two')"


async def test_typed_payload_as_typeddict_and_pydantic_model(server: EmbeddedServer, rc: aioredis.Redis,
                                                             uid: str) -> None:
    stream, other, group = f"{uid}:ml", f"{uid}:p", f"{uid}-g"
    seen: list[object] = []
    app = App()

    @app.handler(stream, group=group)
    async def train(msg: Message[TrainingJob]) -> None:
        seen.append(msg.payload)

    @app.handler(other, group=group)
    async def validated(msg: Message[PydanticJob]) -> None:
        seen.append(msg.payload)

    await publish(rc, stream, [{"job_id": "j1", "model": "bundle-recommender", "dataset": {"orders": 18234}}])
    await publish(rc, other, [{"job_id": "j2", "params": {"days": 90}}, {"job_id": "j3", "params": {"days": "x"}}])
    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _true(len(seen) == 2), what="both valid entries")
        await wait_for(lambda: _dead_count_is(rc, other, 1), what="the invalid one")
    assert {"job_id": "j1", "model": "bundle-recommender"} in seen
    assert PydanticJob(job_id="j2", params={"days": 90}) in seen
    [dead] = await _dead(rc, other)
    assert dead[b"fw:error_class"] == b"PayloadInvalid"
    assert dead[b"fw:error"].startswith(b"PydanticJob: $.params.days: input should be a valid integer")


def test_typed_handler_rejects_a_type_it_cannot_build() -> None:
    app = App()
    with pytest.raises(TypeError, match="not supported"):
        @app.handler("s", group="g", payload_type=int)
        async def handle(msg: Message) -> None: ...


# -- the failure log --------------------------------------------------------------------------------------------------

async def test_a_flood_of_one_failure_is_one_log_line(server: EmbeddedServer, rc: aioredis.Redis, uid: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    app = App()

    @app.handler(stream, group=group, retry=Backoff(first_s=60, jitter=0))
    async def down(msg: Message) -> None:
        raise ConnectionError("the shop's API is down")

    await publish(rc, stream, [JOB] * 200)
    with caplog.at_level(logging.WARNING, logger="fastworker.dispatch"):
        async with RunningWorker(app, make_settings(server, uid, batch_size=20)) as worker:
            await wait_for(lambda: _true(worker.stats.total("retried") == 200), what="every entry retried")
    lines = [r for r in caplog.records if r.name == "fastworker.dispatch"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING and lines[0].exc_info is not None  # the first, with its traceback


def test_failure_log_says_how_many_it_held_back(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    log = FailureLog()
    message = Message("s", "1-0", [b"k", b"v"], None, 1)
    with caplog.at_level(logging.INFO, logger="fastworker.dispatch"):
        for _ in range(5):
            log.seen("handle", message, "ConnectionError", "down", None, logging.WARNING)
        clock[0] += FailureLog.LOG_EVERY_S
        log.seen("handle", message, "ConnectionError", "down", None, logging.WARNING)
        log.seen("handle", message, "KeyError", "'x'", None, logging.WARNING)  # another class: its own first line
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "(4 more since the last line)" in messages[1]
    assert "KeyError" in messages[2]


async def test_retry_sleeps_until_due_not_claim_interval(server: EmbeddedServer, rc: aioredis.Redis,
                                                         uid: str) -> None:
    # A retry due in 0.2 s runs in about 0.2 s even with a 20 s claim interval: the reclaimer wakes for it.
    stream, group = f"{uid}:jobs", f"{uid}-g"
    calls: list[float] = []
    app = App()

    @app.handler(stream, group=group, retry=Backoff(first_s=0.2, jitter=0))
    async def once(msg: Message) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("blip")

    await publish(rc, stream, [JOB])
    settings = make_settings(server, uid, claim_interval_ms=20_000, claim_idle_ms=30_000, handler_timeout_s=5)
    async with RunningWorker(app, settings):
        await wait_for(lambda: _true(len(calls) == 2), timeout_s=10, what="the retry")
    assert 0.2 - EARLY_S <= _gaps(calls)[0] <= 0.2 + LATE_S


async def test_dlq_show_prints_the_traceback(server: EmbeddedServer, rc: aioredis.Redis, uid: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    app = App()

    @app.handler(stream, group=group, dead_on=(ZeroDivisionError,))
    async def divide(msg: Message) -> None:
        msg.payload["n"] / 0

    await publish(rc, stream, [{"n": 1}])
    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _dead_count_is(rc, stream, 1), what="the dead letter")
    [(letter, _)] = await rc.xrange(f"{stream}:dead")
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "show", stream, letter.decode(), "--redis-url",
                                           server.url)
    assert code == 0
    shown = out.split("traceback of the last failure\n", 1)[1]
    assert 'msg.payload["n"] / 0' in shown and shown.rstrip().endswith("ZeroDivisionError: division by zero")


async def test_retry_from_an_error_is_dead_lettered_under_that_error(server: EmbeddedServer, rc: aioredis.Redis,
                                                                     uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    app = App()

    @app.handler(stream, group=group, max_deliveries=1)
    async def limited(msg: Message) -> None:
        try:
            raise TimeoutError("the shop's API did not answer")
        except TimeoutError as exc:
            raise Retry("try later", delay_s=0) from exc

    await publish(rc, stream, [JOB])
    async with RunningWorker(app, make_settings(server, uid)):
        await wait_for(lambda: _dead_count_is(rc, stream, 1), what="the dead letter")
    [dead] = await _dead(rc, stream)
    assert dead[b"fw:error_class"] == b"TimeoutError"
    assert dead[b"fw:error"] == b"try later: the shop's API did not answer"
