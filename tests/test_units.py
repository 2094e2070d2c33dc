"""Pure logic as table tests: decoding, outcome decisions, sharding, backoff, config, settle commands."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import orjson
import pytest

from fastworker import App, ConfigError, Message, Reject, Retry, Settings, config, load_settings
from fastworker.message import decode_entries
from fastworker.policy import Action, backoff_s, decide, exhausted, shard
from fastworker.settlement import SCRIPT_MAX_VALUES, Settlement

JOB = orjson.dumps({"job_id": "job_01J9", "shop_id": "shop_4821"})


@pytest.mark.parametrize(("raw", "mode", "payload", "error"), [
    ([b"data", JOB], "auto", {"job_id": "job_01J9", "shop_id": "shop_4821"}, None),
    ([b"jobId", b"j1", b"data", b"[1, 2]"], "auto", [1, 2], None),
    ([b"jobId", b"j1", b"shopId", b"s1"], "auto", {"jobId": "j1", "shopId": "s1"}, None),
    ([b"data", b"{not json"], "auto", None, "malformed JSON in field 'data'"),
    ([b"data", b"\xff\xfe"], "auto", None, "malformed JSON in field 'data'"),
    ([b"jobId", b"\xff"], "auto", None, "not UTF-8"),
    ([b"jobId", b"j1"], "json", None, "missing payload field 'data'"),
    ([b"data", JOB], "fields", {"data": JOB.decode()}, None),
    ([b"data", b"{not json"], "raw", None, None),
    ([], "auto", None, "entry deleted before it was handled"),
])
def test_decode_entries_payload_or_reason(raw: list[bytes], mode: str, payload: object, error: str | None) -> None:
    [message] = decode_entries("s", [[b"1-0", raw]], 1, mode)  # type: ignore[arg-type]
    assert message.payload == payload
    if error is None:
        assert message.error is None
    else:
        assert message.error is not None and error in message.error


def test_decode_entries_keeps_order_ids_and_delivery_counts() -> None:
    entries = [[b"1-0", [b"data", b"1"]], [b"2-0", None], [b"3-0", [b"data", b"3"]]]
    messages = decode_entries("s", entries, {"1-0": 4, "3-0": 2})
    assert [(m.id, m.payload, m.deliveries) for m in messages] == [("1-0", 1, 4), ("2-0", None, 1), ("3-0", 3, 2)]


@pytest.mark.parametrize(("error", "deliveries", "action"), [
    (None, 1, Action.ACK),
    (None, 9, Action.ACK),
    (ValueError("x"), 1, Action.RETRY),
    (Retry(), 2, Action.RETRY),
    (ValueError("x"), 3, Action.DEAD),
    (ValueError("x"), 4, Action.DEAD),
    (Reject("poison"), 1, Action.DEAD),
])
def test_decide_fate_of_a_delivery(error: BaseException | None, deliveries: int, action: Action) -> None:
    assert decide(error, deliveries, max_deliveries=3) is action


@pytest.mark.parametrize(("deliveries", "expected"), [(1, False), (3, False), (4, True)])
def test_exhausted_only_past_max(deliveries: int, expected: bool) -> None:
    assert exhausted(deliveries, 3) is expected


def test_shard_spreads_names_round_robin() -> None:
    assert shard(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]


def test_shard_refuses_more_processes_than_names() -> None:
    with pytest.raises(ValueError, match="cannot spread"):
        shard(["a"], 2)


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff_s(attempt, 0.1, 2.0, rng) for attempt in range(12)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert delays[-1] >= 1.0  # reached the cap's half
    assert len(set(delays)) == len(delays)


BASE = {"processes": 1, "consumer_prefix": "h"}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"handler_timeout_s": 60.0, "claim_idle_ms": 60_000}, "must be shorter than claim_idle_ms"),
    ({"socket_timeout_s": 2.0, "block_ms": 1500}, "must exceed block_ms"),
    ({"redis_url": "http://localhost"}, "must start with redis://"),
    ({"redis_url": "redis://localhost:99999/0"}, "malformed"),
    ({"redis_url": "redis://localhost:6379/x"}, "database must be a number"),
    ({"redis_url": "redis://:secret@localhost:bad/0"}, "***"),
    ({"group_start_id": "1-0"}, "group_start_id must be 0 or $"),
    ({"dead_letter_suffix": ""}, "dead_letter_suffix must not be empty"),
    ({"consumers": 1, "processes": 2}, "consumers (1) must be 0 or at least processes (2)"),
    ({"log_format": "xml"}, "log_format must be text or json"),
    ({"shutdown_grace_s": 0.0}, "shutdown_grace_s must be positive"),
])
def test_settings_reject_malformed_or_hazardous_values(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        Settings(**{**BASE, **overrides})  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_settings_defaults_are_sound_and_picklable() -> None:
    import pickle

    settings = Settings(**BASE)  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(settings)) == settings


@pytest.mark.parametrize(("environ", "url"), [
    ({"REDIS_URL": "rediss://u:p@cache:6380/2"}, "rediss://u:p@cache:6380/2"),
    ({"REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_DB": "3"}, "redis://cache:6380/3"),
    ({"REDIS_HOST": "cache", "REDIS_PASSWORD": "p@ss/word"}, "redis://:p%40ss%2Fword@cache:6379/0"),
    ({"REDIS_HOST": "cache", "REDIS_USERNAME": "app", "REDIS_PASSWORD": "pw", "REDIS_TLS": "true"},
     "rediss://app:pw@cache:6379/0"),
    ({"FASTWORKER_REDIS_URL": "redis://a:1/0", "REDIS_URL": "redis://b:2/0"}, "redis://a:1/0"),
    ({}, "redis://localhost:6379/0"),
])
def test_load_settings_connection_from_app_environment(environ: dict[str, str], url: str) -> None:
    settings, _ = load_settings({}, environ, processes=1)
    assert settings.redis_url == url


def test_load_settings_precedence_flag_over_env_over_default() -> None:
    settings, sources = load_settings({"batch_size": "100"},
                                      {"FASTWORKER_BATCH_SIZE": "200", "FASTWORKER_BLOCK_MS": "300"})
    assert (settings.batch_size, sources["batch_size"]) == (100, "flag")
    assert (settings.block_ms, sources["block_ms"]) == (300, "env:FASTWORKER_BLOCK_MS")
    assert (settings.claim_idle_ms, sources["claim_idle_ms"]) == (60_000, "default")


def test_load_settings_names_the_bad_flag_value() -> None:
    with pytest.raises(ConfigError, match="--block-ms: expected a whole number of milliseconds, got 'soon'"):
        load_settings({"block_ms": "soon"}, {})


def test_every_setting_has_exactly_one_flag_and_back() -> None:
    from fastworker.cli import build_parser, flag_values

    names = [field.name for field in dataclasses.fields(Settings)]
    flags = [config.flag_name(name) for name in names]
    assert len(set(flags)) == len(flags)
    # valid for every setting ("7" in range for the numbers, the first choice for the rest, a fraction for jitter)
    values = {name: config.CHOICES.get(name, ("0.5" if name == "retry_jitter" else "7",))[0] for name in names}
    argv = ["run", "x:app"]
    for name, value in values.items():
        argv += [config.flag_name(name), value]
    args = build_parser().parse_args(argv)
    assert flag_values(args) == values


def test_app_refuses_two_handlers_for_one_stream_and_group() -> None:
    app = App()
    app.handler("s", group="g")(lambda m: None)
    with pytest.raises(ValueError, match="already has a handler"):
        app.handler("s", group="g")(lambda m: None)


def test_message_emit_needs_something_to_publish() -> None:
    message = Message("s", "1-0", [b"data", b"1"], 1, 1)
    with pytest.raises(ValueError, match="needs a payload"):
        message.emit("out")


def test_settlement_commands_ack_only_without_outputs() -> None:
    settlement = Settlement("g")
    settlement.ack(Message("s", "1-0", [b"k", b"v"], None, 1))
    assert settlement.commands() == [("XACK", "s", "g", "1-0")]


def _mixed_settlement() -> Settlement:
    settlement = Settlement("g")
    with_result = Message("s", "1-0", [b"k", b"v"], None, 1)
    with_result.emit("out", {"x": 1})
    settlement.ack_all("s", [with_result, Message("s", "2-0", [b"k", b"v"], None, 1)])
    settlement.dead_letter(Message("s", "3-0", [b"k", b"v"], None, 5), "s:dead", "ValueError", "boom")
    settlement.deleted("t", ["9-0"])
    settlement.retry(Message("s", "4-0", [b"k", b"v"], None, 1), 1.5)
    return settlement


def test_settlement_counts_only_what_the_server_confirmed() -> None:
    settlement = _mixed_settlement()
    assert [command[0] for command in settlement.commands()] == ["XACK", "XACK", "EVALSHA", "EVALSHA"]
    assert settlement.acked_by_stream == {}  # nothing is counted before the replies
    # the plain ack of 2-0 found it already acked (0); the script settled 1-0 but 3-0 was settled elsewhere first
    assert settlement.confirm([0, 0, 1, [1, 0]]) == []
    assert settlement.done
    assert settlement.acked_by_stream == {"s": 1}
    assert settlement.dead_by_stream == {}
    assert settlement.deleted_by_stream == {"t": 1}
    assert settlement.retried_by_stream == {"s": 1}
    assert settlement.skipped == 1


def test_settlement_sends_again_only_the_steps_the_server_refused() -> None:
    settlement = _mixed_settlement()
    settlement.commands()
    refused = Exception("NOPERM this user may not XADD to out")
    assert settlement.confirm([1, 0, 1, refused]) == [refused]
    assert not settlement.done
    assert [command[0] for command in settlement.commands()] == ["EVALSHA"]
    assert settlement.confirm([[1, 1]]) == []
    assert settlement.done
    assert settlement.acked_by_stream == {"s": 2} and settlement.dead_by_stream == {"s": 1}


def test_settlement_flags_map_to_entries_sent_in_runs_of_one_shape() -> None:
    # Entries of two output shapes, interleaved: the script gets them in runs (A, A, B), and its flags, in that order,
    # are counted for the right entries.
    settlement = Settlement("g")
    messages = []
    for number, shape in enumerate("ABA", start=1):
        message = Message("s", f"{number}-0", [b"k", b"v"], None, 1)
        message.emit("out-a" if shape == "A" else "out-b", fields={"n": str(number)})
        messages.append(message)
    settlement.ack_all("s", messages)
    (call,) = settlement.commands()
    args = [a.decode() if isinstance(a, bytes) else str(a) for a in call]
    assert args[3:5] == ["s", "out-a"] and args[5] == "out-b"  # sources first, then outputs
    assert args[6:] == ["g", "1", "s", "2", "1", "out-a", "2", "1-0", "n", "1", "3-0", "n", "3",
                        "s", "1", "1", "out-b", "2", "2-0", "n", "2"]
    assert settlement.confirm([[1, 1, 0]]) == []  # 1-0 and 3-0 settled here, 2-0 elsewhere first
    assert settlement.acked_by_stream == {"s": 2} and settlement.skipped == 1


def test_settlement_sends_script_text_after_noscript() -> None:
    settlement = _mixed_settlement()
    settlement.commands()
    uncached = Exception("NOSCRIPT No matching script")
    assert settlement.confirm([1, 0, uncached, uncached]) == [uncached, uncached]
    settlement.with_script_text()
    commands = settlement.commands()
    assert [command[0] for command in commands] == ["EVAL", "EVAL"]
    assert all("redis.call" in str(command[1]) for command in commands)


def test_settlement_sends_outputs_too_large_for_the_script_as_a_transaction() -> None:
    settlement = Settlement("g")
    big = Message("s", "1-0", [b"k", b"v"], None, 1)
    big.emit("out", fields={f"f{i}": "v" for i in range(SCRIPT_MAX_VALUES // 2 + 1)})
    settlement.ack(big)
    assert [command[0] for command in settlement.commands()] == ["MULTI", "XADD", "EVAL", "EXEC"]
    assert settlement.confirm([b"OK", b"QUEUED", b"QUEUED", [b"1-1", 1]]) == []
    assert settlement.acked_by_stream == {"s": 1}


def test_pack_speaks_resp() -> None:
    from fastworker.edge.wire import pack

    assert pack([("XACK", "s", b"g", 7, 1.5)]) == b"*5\r\n$4\r\nXACK\r\n$1\r\ns\r\n$1\r\ng\r\n$1\r\n7\r\n$3\r\n1.5\r\n"


async def test_dispatcher_in_flight_lists_the_calls_running_now() -> None:
    from fastworker.app import Handler
    from fastworker.dispatch import Dispatcher

    release, all_started = asyncio.Event(), asyncio.Event()
    started: list[str] = []

    async def wait(msg: Message) -> None:
        started.append(msg.id)
        if len(started) == 3:
            all_started.set()
        await release.wait()

    dispatcher = Dispatcher(8, 30.0, 5, ":dead")
    messages = [Message("s", f"{i}-0", [b"k", b"v"], None, 1) for i in range(3)]
    handling = asyncio.ensure_future(dispatcher.dispatch("g", {"s": Handler("s", "g", wait)}, {"s": messages}))
    await asyncio.wait_for(all_started.wait(), 5)
    calls = dispatcher.in_flight()
    assert sorted(call["id"] for call in calls) == ["0-0", "1-0", "2-0"]
    assert {call["handler"] for call in calls} == {wait.__qualname__}
    release.set()
    await handling
    assert dispatcher.in_flight() == []
