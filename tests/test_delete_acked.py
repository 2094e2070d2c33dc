"""Delete-on-ack (`delete_acked=True`): XACKDEL ... ACKED where the server has it (Redis 8.2+), plain XACK elsewhere.

The command building is tested without a server. The server tests run on whichever server the session started
(FASTWORKER_SERVER_BIN): those of XACKDEL skip on a server without it, those of the fallback on a server with it,
each saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from fastworker import App, EmbeddedServer, Message
from fastworker.errors import RedisCommandError
from fastworker.settlement import SCRIPT_MAX_VALUES, SETTLE_DELETE_SCRIPT, SETTLE_SCRIPT, Settlement, script_call
from tests.conftest import RunningWorker, make_settings, pending_count, publish, settle_once, wait_for


def _message(stream: str, entry_id: str, result_stream: str | None = None, values: int = 1) -> Message:
    message = Message(stream, entry_id.encode(), [b"data", b"1"], 1, 1)
    if result_stream is not None:
        message.emit(result_stream, fields={f"f{i}": "v" for i in range(values)})
    return message


def _sha(script: str) -> str:
    return str(script_call(script, [], [])[1])


# -- command building ----------------------------------------------------------------------------------------------

def test_settlement_acks_a_deleting_stream_with_xackdel_acked() -> None:
    settlement = Settlement("g", {"s"})
    settlement.ack_all("s", [_message("s", "1-0"), _message("s", "2-0"), _message("s", "3-0")])
    assert settlement.commands() == [("XACKDEL", "s", "g", "ACKED", "IDS", 3, b"1-0", b"2-0", b"3-0")]


def test_settlement_counts_xackdel_codes_1_and_2_as_acked() -> None:
    # 1 acked and deleted, 2 acked and kept for another group, -1 not pending here (settled before)
    settlement = Settlement("g", {"s"})
    settlement.ack_all("s", [_message("s", "1-0"), _message("s", "2-0"), _message("s", "3-0")])
    settlement.commands()
    assert settlement.confirm([[1, 2, -1]]) == []
    assert settlement.acked_by_stream == {"s": 2}


def test_settlement_acks_streams_without_delete_acked_with_xack() -> None:
    settlement = Settlement("g", {"s"})
    settlement.ack(_message("t", "1-0"))
    assert settlement.commands() == [("XACK", "t", "g", b"1-0")]
    assert settlement.confirm([1]) == [] and settlement.acked_by_stream == {"t": 1}


def test_settlement_sends_results_of_deleting_streams_through_the_xackdel_script() -> None:
    settlement = Settlement("g", {"s"})
    settlement.ack(_message("s", "1-0", "out"))
    settlement.ack(_message("t", "2-0", "out"))
    settlement.ack(_message("s", "3-0", "out"))
    kept, deleted = settlement.commands()
    assert kept[:5] == ("EVALSHA", _sha(SETTLE_SCRIPT), 2, "t", "out")
    assert deleted[:5] == ("EVALSHA", _sha(SETTLE_DELETE_SCRIPT), 2, "s", "out")
    assert settlement.confirm([[0], [1, 1]]) == []  # 2-0 was settled elsewhere first
    assert settlement.acked_by_stream == {"s": 2} and settlement.skipped == 1


def test_settlement_without_deleting_streams_sends_one_plain_script_call() -> None:
    settlement = Settlement("g")
    settlement.ack(_message("s", "1-0", "out"))
    (call,) = settlement.commands()
    assert call[:2] == ("EVALSHA", _sha(SETTLE_SCRIPT))


def test_settle_delete_script_checks_like_the_settle_script_and_acks_with_xackdel_only() -> None:
    checks = SETTLE_SCRIPT.partition("local i, flags = 3, {}")[0]
    delete_checks = SETTLE_DELETE_SCRIPT.partition("local i, flags = 3, {}")[0]
    assert delete_checks.replace("'XACKDEL', key, group, 'ACKED', 'IDS', '1', '0-1'", "'XACK', key, group, '0-1'"
                                 ).replace("may not XACKDEL", "may not XACK") == checks
    assert "'XACK'" not in SETTLE_DELETE_SCRIPT and SETTLE_DELETE_SCRIPT.count("'XACKDEL'") == 2


def test_settlement_passes_the_delete_flag_to_the_large_output_script() -> None:
    for deleting, flag in (({"s"}, "1"), ((), "0")):
        settlement = Settlement("g", deleting)
        settlement.ack(_message("s", "1-0", "out", SCRIPT_MAX_VALUES // 2 + 1))
        multi, _, script, _ = settlement.commands()
        assert multi == ("MULTI",) and script[0] == "EVAL"
        assert script[3:7] == ("s", "out", "g", b"1-0") and script[7] == flag


def test_settlement_keeps_plain_xack_for_entries_deleted_while_pending() -> None:
    settlement = Settlement("g", {"s"})
    settlement.deleted("s", ["1-0"])
    assert settlement.commands() == [("XACK", "s", "g", "1-0")]


def test_handler_delete_acked_must_be_the_same_for_every_group_of_a_stream() -> None:
    app = App()
    app.handler("s", group="a", delete_acked=True)(lambda msg: None)
    app.handler("other", group="b")(lambda msg: None)
    with pytest.raises(ValueError, match="same delete_acked"):
        app.handler("s", group="b")(lambda msg: None)
    app.handler("s", group="c", delete_acked=True)(lambda msg: None)
    assert [(h.stream, h.group, h.delete_acked) for h in app.handlers] == [
        ("s", "a", True), ("other", "b", False), ("s", "c", True)]


# -- on a server ---------------------------------------------------------------------------------------------------

def _xackdel_refusal(server: EmbeddedServer) -> str | None:
    with redis.Redis.from_url(server.url) as client:
        try:
            client.xackdel("fastworker-test-probe", "nobody", "0-1", ref_policy="ACKED")
        except redis.ResponseError as exc:
            return str(exc)
    return None


@pytest.fixture
def xackdel(server: EmbeddedServer) -> Iterator[None]:
    """Skips the test on a server without XACKDEL."""
    refusal = _xackdel_refusal(server)
    if refusal is not None:
        pytest.skip(f"the server ({server.binary}) has no XACKDEL, Redis 8.2+: {refusal}")
    yield


@pytest.fixture
def no_xackdel(server: EmbeddedServer) -> Iterator[None]:
    """Skips the test on a server with XACKDEL: it is about the fallback."""
    if _xackdel_refusal(server) is None:
        pytest.skip(f"the server ({server.binary}) has XACKDEL: the fallback needs one without (Valkey, Redis < 8.2)")
    yield


async def _read(rc: aioredis.Redis, stream: str, group: str, count: int = 100, create: bool = True) -> list[bytes]:
    if create:
        await rc.xgroup_create(stream, group, id="0", mkstream=True)
    reply = await rc.xreadgroup(group, "c", {stream: ">"}, count=count)
    return [entry_id for entry_id, _ in reply[0][1]] if reply else []


def _acks(group: str, stream: str, ids: list[bytes]) -> Settlement:
    settlement = Settlement(group, {stream})
    settlement.ack_all(stream, [Message(stream, entry_id, [b"data", b"1"], 1, 1) for entry_id in ids])
    return settlement


@pytest.mark.usefixtures("xackdel")
async def test_delete_acked_deletes_entries_acked_by_the_only_group(server: EmbeddedServer, rc: aioredis.Redis,
                                                                     uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    await publish(rc, stream, [1, 2, 3])
    ids = await _read(rc, stream, group)
    assert await settle_once(server, _acks(group, stream, ids)) == 3
    assert await rc.xlen(stream) == 0
    assert await pending_count(rc, stream, group) == 0


@pytest.mark.usefixtures("xackdel")
async def test_delete_acked_keeps_entries_until_the_second_group_acked(server: EmbeddedServer, rc: aioredis.Redis,
                                                                       uid: str) -> None:
    stream, first, second = f"{uid}:jobs", f"{uid}-a", f"{uid}-b"
    await publish(rc, stream, [1, 2, 3])
    ids = await _read(rc, stream, first)
    await rc.xgroup_create(stream, second, id="0")
    assert await _read(rc, stream, second, count=2, create=False) == ids[:2]  # the third: not read by `second` yet
    assert await settle_once(server, _acks(first, stream, ids)) == 3
    assert await rc.xlen(stream) == 3  # pending in `second`, or not yet delivered to it
    assert await settle_once(server, _acks(second, stream, ids[:2])) == 2
    assert await rc.xlen(stream) == 1
    assert await _read(rc, stream, second, create=False) == ids[2:]
    assert await settle_once(server, _acks(second, stream, ids[2:])) == 1
    assert await rc.xlen(stream) == 0


def _results_settlement(group: str, stream: str, ok_id: str, bad_id: str, results: str,
                        values: int = 1) -> Settlement:
    settlement = Settlement(group, {stream})
    settlement.ack(_message(stream, ok_id, results, values))
    settlement.dead_letter(Message(stream, bad_id.encode(), [b"data", b"x"], None, 3), f"{stream}:dead",
                           "ValueError", "boom")
    return settlement


@pytest.mark.usefixtures("xackdel")
@pytest.mark.parametrize("values", [1, SCRIPT_MAX_VALUES // 2 + 1], ids=["script", "large"])
async def test_delete_acked_writes_results_only_for_the_first_settlement(server: EmbeddedServer,
                                                                         rc: aioredis.Redis, uid: str,
                                                                         values: int) -> None:
    # Two consumers handled the same entries: the second settlement must not publish the results or dead letters
    # again, and the entries are deleted from the source stream; results and dead letters are kept.
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    ok_id, bad_id = await publish(rc, stream, [1, "x"])
    await _read(rc, stream, group)
    first = _results_settlement(group, stream, ok_id, bad_id, results, values)
    assert await settle_once(server, first) == 2
    assert first.acked_by_stream == {stream: 1} and first.dead_by_stream == {stream: 1}
    second = _results_settlement(group, stream, ok_id, bad_id, results, values)
    assert await settle_once(server, second) == 0  # both skipped: settled by the first
    assert await rc.xlen(results) == 1
    assert await rc.xlen(f"{stream}:dead") == 1
    assert await rc.xlen(stream) == 0
    assert await pending_count(rc, stream, group) == 0


@pytest.mark.usefixtures("xackdel")
async def test_delete_acked_script_settles_runs_longer_than_one_xackdel_slice(server: EmbeddedServer,
                                                                             rc: aioredis.Redis, uid: str) -> None:
    # One run of 2,500 entries is acked by three XACKDEL calls; the first 1,200 were settled before: their codes
    # (-1) must skip their results, and those of the others write theirs, each at its own entry.
    stream, group, results, n, before = f"{uid}:jobs", f"{uid}-g", f"{uid}:results", 2_500, 1_200
    await publish(rc, stream, list(range(n)))
    ids = await _read(rc, stream, group, count=n)

    def settlement(chosen: list[bytes]) -> Settlement:
        settling = Settlement(group, {stream})
        for entry_id in chosen:
            message = Message(stream, entry_id, [b"data", b"1"], 1, 1)
            message.emit(results, fields={"id": entry_id})
            settling.ack(message)
        return settling

    assert await settle_once(server, settlement(ids[:before])) == before
    assert await settle_once(server, settlement(ids)) == n - before
    assert [fields[b"id"] for _, fields in await rc.xrange(results)] == ids
    assert await rc.xlen(stream) == 0


@pytest.mark.usefixtures("xackdel")
async def test_delete_acked_worker_deletes_what_every_group_handled(server: EmbeddedServer, rc: aioredis.Redis,
                                                                    uid: str, caplog: pytest.LogCaptureFixture
                                                                    ) -> None:
    stream, results, n = f"{uid}:jobs", f"{uid}:results", 300
    app = App()

    @app.handler(stream, group=f"{uid}-a", delete_acked=True)
    async def first(msg: Message) -> None:
        msg.emit(results, {"n": msg.payload})

    @app.handler(stream, group=f"{uid}-b", delete_acked=True)
    async def second(msg: Message) -> None:
        return None

    await publish(rc, stream, list(range(n)))
    with caplog.at_level(logging.INFO, logger="fastworker.worker"):
        async with RunningWorker(app, make_settings(server, uid, batch_size=50)) as worker:
            await wait_for(lambda: _length_is(rc, stream, 0), what="every entry deleted")
            await wait_for(lambda: _length_is(rc, results, n), what="every result")
    assert worker.stats.total("acked") == 2 * n
    assert "delete_acked on for streams=" + stream in caplog.text


@pytest.mark.usefixtures("no_xackdel")
async def test_delete_acked_falls_back_to_xack_without_xackdel(server: EmbeddedServer, rc: aioredis.Redis,
                                                               uid: str, caplog: pytest.LogCaptureFixture) -> None:
    stream, group, n = f"{uid}:jobs", f"{uid}-g", 200
    app = App()

    @app.handler(stream, group=group, delete_acked=True)
    async def handle(msg: Message) -> None:
        return None

    await publish(rc, stream, list(range(n)))
    with caplog.at_level(logging.INFO, logger="fastworker.worker"):
        async with RunningWorker(app, make_settings(server, uid, batch_size=50)) as worker:
            await wait_for(lambda: _acked(worker.stats.total("acked"), n), what="every entry acked")
    assert await pending_count(rc, stream, group) == 0
    assert await rc.xlen(stream) == n  # acked with XACK: the entries stay, for the trim
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "XACKDEL" in r.getMessage()]
    assert len(warnings) == 1 and f"stream={stream}" in warnings[0]


@pytest.mark.usefixtures("no_xackdel")
async def test_delete_script_is_refused_whole_by_a_server_without_xackdel(server: EmbeddedServer,
                                                                         rc: aioredis.Redis, uid: str) -> None:
    # Were XACKDEL used anyway (a failover to an older server), nothing is acked and no output written.
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    ok_id, bad_id = await publish(rc, stream, [1, "x"])
    await _read(rc, stream, group)
    for values in (1, SCRIPT_MAX_VALUES // 2 + 1):
        with pytest.raises(RedisCommandError):
            await settle_once(server, _results_settlement(group, stream, ok_id, bad_id, results, values))
        assert await pending_count(rc, stream, group) == 2
        assert await rc.xlen(results) == 0 and await rc.xlen(f"{stream}:dead") == 0


async def _length_is(rc: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await rc.xlen(stream)) == n


async def _acked(count: int, n: int) -> bool:
    return count >= n
