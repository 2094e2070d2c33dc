"""`fastworker status` and `fastworker health`, and the inspection functions behind them, on a real server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from fastworker import EmbeddedServer, ExitCode
from fastworker.edge.streams import Streams
from fastworker.ops.consumers import remove_dead_consumers
from fastworker.ops.inspect import check_health, next_id, snapshot
from fastworker.server import free_port
from tests.conftest import cli, make_settings, wait_for


def row(out: str, *first: str) -> list[str]:
    """The cells of the first table line starting with the given cells."""
    for line in out.splitlines():
        cells = line.split()
        if cells[:len(first)] == list(first):
            return cells
    raise AssertionError(f"no line starting with {first} in:\n{out}")


def prepare(r: redis.Redis, stream: str) -> list[str]:
    """5 entries; group `busy` read 3 of them as consumer c1 (pending 3); group `idle` read none; 2 dead letters."""
    ids = [r.xadd(stream, {"data": f'{{"n": {n}}}'}).decode() for n in range(5)]
    r.xgroup_create(stream, "busy", id="0")
    r.xgroup_create(stream, "idle", id="0")
    r.xreadgroup("busy", "c1", {stream: ">"}, count=3)
    for n in range(2):
        r.xadd(stream + ":dead", {"data": "{}", "fw:error_class": "ValueError", "fw:id": ids[n]})
    return ids


def test_status_table_shows_stream_groups_and_consumers(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = prepare(r, stream)
    code, out, _ = cli(capsys, "status", "--redis-url", server.url, "--stream", stream)
    assert code == ExitCode.OK
    assert row(out, stream, "stream")[2] == "5"
    assert row(out, stream, "stream")[-1] == "2"  # dead letters
    assert row(out, stream, "busy")[2:6] == ["1", "3", "2", ids[2]]  # consumers, pending, lag, last delivered
    assert row(out, stream, "busy")[6] == ids[0]  # oldest pending
    assert row(out, stream, "idle")[2:6] == ["0", "0", "5", "0-0"]
    assert row(out, stream, "busy", "c1")[3] == "3"


def test_status_json_reports_groups_and_oldest_pending(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = prepare(r, stream)
    code, out, _ = cli(capsys, "status", "--redis-url", server.url, "--stream", stream, "--json")
    assert code == ExitCode.OK
    [info] = json.loads(out)["streams"]
    assert (info["length"], info["first_id"], info["last_id"], info["dead_letters"]) == (5, ids[0], ids[4], 2)
    assert info["memory_bytes"] > 0
    busy = {g["name"]: g for g in info["groups"]}["busy"]
    assert (busy["pending"], busy["lag"], busy["last_delivered_id"]) == (3, 2, ids[2])
    assert (busy["oldest_pending_id"], busy["oldest_pending_deliveries"], busy["oldest_pending_consumer"]) == (
        ids[0], 1, "c1")
    assert busy["consumers"] == [{"name": "c1", "pending": 3, "idle_ms": busy["consumers"][0]["idle_ms"],
                                  "dead": False, "state": "active"}]


def test_status_default_lists_every_stream_and_marks_dead_letter_streams(
        server: EmbeddedServer, r: redis.Redis, uid: str, capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    r.set(f"{uid}:not-a-stream", "x")
    code, out, _ = cli(capsys, "status", "--redis-url", server.url)
    assert code == ExitCode.OK
    assert row(out, stream)[1] == "stream"
    assert row(out, stream + ":dead")[1:3] == ["dead-letter", "2"]
    assert f"{uid}:not-a-stream" not in out


def test_status_shows_unknown_lag_after_xdel_of_undelivered_entry(
        server: EmbeddedServer, r: redis.Redis, uid: str, capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = prepare(r, stream)
    r.xdel(stream, ids[3])  # not yet delivered to either group: the server can no longer count the lag
    _, table, _ = cli(capsys, "status", "--redis-url", server.url, "--stream", stream)
    _, doc, _ = cli(capsys, "status", "--redis-url", server.url, "--stream", stream, "--json")
    assert row(table, stream, "busy")[4] == "unknown"
    assert {g["name"]: g["lag"] for g in json.loads(doc)["streams"][0]["groups"]} == {"busy": None, "idle": None}


def test_status_marks_idle_consumer_without_pending_as_dead(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    r.xgroup_createconsumer(stream, "busy", "gone")
    deadline = time.monotonic() + 10
    while min(int(c["idle"]) for c in r.xinfo_consumers(stream, "busy")) <= 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    _, table, _ = cli(capsys, "status", "--redis-url", server.url, "--stream", stream, "--dead-after-s", "0.05")
    _, doc, _ = cli(capsys, "status", "--redis-url", server.url, "--stream", stream, "--dead-after-s", "0.05",
                    "--json")
    assert row(table, stream, "busy", "gone")[5] == "dead"
    assert row(table, stream, "busy", "c1")[5] == "active"  # pending entries: never dead, whatever its idle time
    busy = {g["name"]: g for g in json.loads(doc)["streams"][0]["groups"]}["busy"]
    assert busy["dead_consumers"] == ["gone"]


def test_status_app_shows_its_streams_even_when_missing(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    module = f"app_{uid.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from fastworker import App
        app = App()
        app.handler({stream!r}, group="busy")(lambda msg: None)
        app.handler({uid + ':never'!r}, group="g")(lambda msg: None)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = cli(capsys, "status", "--redis-url", server.url, "--app", f"{module}:app")
    assert code == ExitCode.OK
    assert row(out, stream)[1:3] == ["stream", "5"]
    assert row(out, f"{uid}:never")[1] == "missing"


def test_status_watch_refreshes_until_interrupted(server: EmbeddedServer, r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    with subprocess.Popen([sys.executable, "-m", "fastworker", "status", "--redis-url", server.url,
                           "--stream", stream, "--watch", "0.5"], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        refreshes = 0
        while refreshes < 2:
            line = proc.stdout.readline()
            assert line, "status --watch ended by itself"
            refreshes += line.startswith("STREAM  ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == ExitCode.OK


async def test_snapshot_oldest_pending_idle_and_age(server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    first = (await rc.xadd(stream, {"data": "{}"})).decode()
    await rc.xgroup_create(stream, "g", id="0")
    await rc.xreadgroup("g", "c1", {stream: ">"})
    streams = Streams(make_settings(server, uid))
    try:
        await wait_for(lambda: _oldest_idle_over(rc, stream, 30), what="pending entry idle 30 ms")
        snap = await snapshot(streams, [stream])
    finally:
        await streams.aclose()
    [group] = snap.streams[0].groups
    assert group.oldest_pending_id == first
    assert group.oldest_pending_idle_ms is not None and group.oldest_pending_idle_ms >= 30
    assert group.oldest_pending_age_ms is not None and group.oldest_pending_age_ms >= 30


async def _oldest_idle_over(rc: aioredis.Redis, stream: str, ms: int) -> bool:
    [entry] = await rc.xpending_range(stream, "g", "-", "+", 1)
    return int(entry["time_since_delivered"]) > ms


async def _all_idle_over(rc: aioredis.Redis, stream: str, group: str, ms: int) -> bool:
    return all(int(c["idle"]) > ms for c in await rc.xinfo_consumers(stream, group))


async def test_remove_dead_consumers_deletes_only_idle_consumers_without_pending(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    await rc.xadd(stream, {"data": "{}"})
    await rc.xgroup_create(stream, "g", id="0")
    await rc.xreadgroup("g", "owner", {stream: ">"})  # idle, but owns a pending entry
    await rc.xgroup_createconsumer(stream, "g", "gone-1")
    await rc.xgroup_createconsumer(stream, "g", "gone-2")
    await wait_for(lambda: _all_idle_over(rc, stream, "g", 50), what="consumers idle 50 ms")
    await rc.xgroup_createconsumer(stream, "g", "fresh")
    streams = Streams(make_settings(server, uid))
    try:
        removed = await remove_dead_consumers(streams, stream, "g", idle_ms=50)
    finally:
        await streams.aclose()
    assert sorted(removed) == ["gone-1", "gone-2"]
    assert sorted(c["name"].decode() for c in await rc.xinfo_consumers(stream, "g")) == ["fresh", "owner"]
    assert int((await rc.xpending(stream, "g"))["pending"]) == 1


async def test_remove_dead_consumers_never_deletes_a_consumer_with_pending(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    await rc.xadd(stream, {"data": "{}"})
    await rc.xgroup_create(stream, "g", id="0")
    await rc.xreadgroup("g", "owner", {stream: ">"})
    await wait_for(lambda: _all_idle_over(rc, stream, "g", 20), what="consumer idle 20 ms")
    streams = Streams(make_settings(server, uid))
    try:
        assert await remove_dead_consumers(streams, stream, "g", idle_ms=0) == []
    finally:
        await streams.aclose()
    assert [c["name"] for c in await rc.xinfo_consumers(stream, "g")] == [b"owner"]


async def test_remove_dead_consumers_of_a_missing_group_is_a_no_op(server: EmbeddedServer, rc: aioredis.Redis,
                                                                   uid: str) -> None:
    stream = f"{uid}:jobs"
    streams = Streams(make_settings(server, uid))
    try:
        assert await remove_dead_consumers(streams, stream, "g", idle_ms=0) == []  # no stream yet
        await rc.xadd(stream, {"data": "{}"})
        assert await remove_dead_consumers(streams, stream, "g", idle_ms=0) == []  # no group yet
    finally:
        await streams.aclose()


def test_health_exits_zero_when_required_groups_exist(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    code, out, _ = cli(capsys, "health", "--redis-url", server.url, "--stream", stream, "--group", "busy",
                       "--group", "idle")
    assert code == ExitCode.OK
    assert out.startswith("healthy: valkey ") or out.startswith("healthy: redis ")


def test_health_json_reports_server_and_latency(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    code, out, _ = cli(capsys, "health", "--redis-url", server.url, "--stream", stream, "--group", "busy", "--json")
    doc = json.loads(out)
    assert code == ExitCode.OK
    assert (doc["healthy"], doc["reason"], doc["missing_groups"]) == (True, None, [])
    assert doc["latency_ms"] > 0 and doc["version"] == server.version().split()[1]


def test_health_missing_group_is_unhealthy_with_reason(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    code, _, err = cli(capsys, "health", "--redis-url", server.url, "--stream", stream, "--group", "busy",
                       "--group", "nope")
    assert code == ExitCode.UNHEALTHY
    assert err.count("\n") == 1 and f"missing group(s): nope on {stream}" in err


def test_health_json_missing_group_is_unhealthy(server: EmbeddedServer, uid: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "health", "--redis-url", server.url, "--stream", f"{uid}:none", "--group", "g",
                       "--json")
    doc = json.loads(out)
    assert code == ExitCode.UNHEALTHY
    assert (doc["healthy"], doc["missing_groups"]) == (False, [[f"{uid}:none", "g"]])


def test_health_unreachable_server_keeps_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = cli(capsys, "health", "--redis-url", url)
    code_json, out, _ = cli(capsys, "health", "--redis-url", url, "--json")
    assert (code, code_json) == (ExitCode.REDIS_UNREACHABLE, ExitCode.REDIS_UNREACHABLE)
    assert err.startswith("fastworker: error: cannot reach the server")
    assert json.loads(out)["healthy"] is False


async def test_check_health_slow_ping_is_unhealthy(server: EmbeddedServer, uid: str) -> None:
    streams = Streams(make_settings(server, uid))
    try:
        result = await check_health(streams, max_latency_ms=0.0)
    finally:
        await streams.aclose()
    assert not result.healthy and result.reason is not None and "PING took" in result.reason


@pytest.mark.parametrize(("entry_id", "following"), [
    ("5-0", "5-1"), ("0-0", "0-1"), (f"7-{2**64 - 1}", "8-0"), ("12", "12-1"),
])
def test_next_id_is_the_smallest_greater_id(entry_id: str, following: str) -> None:
    assert next_id(entry_id) == following
