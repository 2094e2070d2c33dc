"""`fastworker trim` and `safe_trim` on a real server: never an entry some group has not acknowledged."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from fastworker import EmbeddedServer, ExitCode
from fastworker.edge.streams import Streams
from fastworker.ops.trim import has_token, safe_trim, supports_acked_trim
from tests.conftest import cli, make_settings


@pytest.fixture
async def streams(server: EmbeddedServer, uid: str) -> AsyncIterator[Streams]:
    connection = Streams(make_settings(server, uid))
    yield connection
    await connection.aclose()


def add(r: redis.Redis, stream: str, n: int) -> list[str]:
    with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {"data": json.dumps({"n": i, "pad": "x" * 100})})
        return [entry_id.decode() for entry_id in pipe.execute()]


def read_and_ack(r: redis.Redis, stream: str, group: str, read: int, ack: int) -> None:
    """Group `group` reads the first `read` undelivered entries and acknowledges the first `ack` of them."""
    [[_, delivered]] = r.xreadgroup(group, "c1", {stream: ">"}, count=read)
    if ack:
        r.xack(stream, group, *[entry_id for entry_id, _ in delivered[:ack]])


def server_takes_acked_trim(r: redis.Redis, uid: str) -> bool:
    """Whether the server accepts `XTRIM ... ACKED`, found by trying it (on a scratch stream, removing nothing):
    the product reads COMMAND DOCS, so the test asks the command itself rather than trusting a version number."""
    scratch = f"{uid}:acked-probe"
    r.xadd(scratch, {"f": "v"}, id="5-0")
    try:
        r.execute_command("XTRIM", scratch, "MINID", "=", "1-0", "ACKED")
    except redis.ResponseError:
        return False
    finally:
        r.delete(scratch)
    return True


def ids_of(r: redis.Redis, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in r.xrange(stream)]


def two_groups(r: redis.Redis, stream: str, n: int = 10) -> list[str]:
    """n entries; group a read all and acked 6 (4 pending); group b read 4 and acked them (6 undelivered)."""
    ids = add(r, stream, n)
    for group in ("a", "b"):
        r.xgroup_create(stream, group, id="0")
    read_and_ack(r, stream, "a", n, 6)
    read_and_ack(r, stream, "b", 4, 4)
    return ids


def test_trim_removes_only_what_every_group_acknowledged(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = two_groups(r, stream)
    code, out, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--yes")
    assert code == ExitCode.OK
    assert out.splitlines()[0] == (f"removed 4 entries of {stream} below {ids[4]} "
                                   "(limited by: group b: entries after its last delivered id)")
    assert out.splitlines()[1].startswith("length 10 -> 6, memory ")
    assert ids_of(r, stream) == ids[4:]


def test_trim_json_reports_length_and_memory_freed(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = add(r, stream, 3000)
    r.xgroup_create(stream, "g", id="0")
    read_and_ack(r, stream, "g", 2500, 2000)
    code, out, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--yes", "--json")
    doc = json.loads(out)
    assert code == ExitCode.OK
    assert (doc["minid"], doc["removed"], doc["length_before"], doc["length_after"]) == (ids[2000], 2000, 3000, 1000)
    assert doc["memory_after"] < doc["memory_before"]
    assert doc["limited_by"] == "group g: oldest pending entry"
    assert doc["acked_option"] is server_takes_acked_trim(r, uid)  # Redis 8.2+; not Valkey 9.1 or Redis 7


def test_trim_retain_keeps_the_newest_entries(server: EmbeddedServer, r: redis.Redis, uid: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = add(r, stream, 10)
    r.xgroup_create(stream, "g", id="0")
    read_and_ack(r, stream, "g", 10, 10)
    code, out, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--retain", "3")
    assert code == ExitCode.OK
    assert "(limited by: retain the newest 3 entries)" in out
    assert ids_of(r, stream) == ids[7:]


def test_trim_retain_s_keeps_recent_entries(server: EmbeddedServer, r: redis.Redis, uid: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    for ms in (1000, 2000, 3000):  # ids from 1970: far outside any window
        r.xadd(stream, {"data": "{}"}, id=f"{ms}-0")
    recent = add(r, stream, 2)
    r.xgroup_create(stream, "g", id="0")
    read_and_ack(r, stream, "g", 5, 5)
    code, _, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--retain-s", "3600")
    assert code == ExitCode.OK
    assert ids_of(r, stream) == recent


def test_trim_dry_run_removes_nothing(server: EmbeddedServer, r: redis.Redis, uid: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = two_groups(r, stream)
    code, out, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--dry-run")
    assert code == ExitCode.OK
    assert out.splitlines()[:2] == [
        f"would remove 4 entries of {stream} below {ids[4]} (limited by: group b: entries after its last delivered "
        "id); length 10 -> 6", "dry run: nothing changed"]
    assert ids_of(r, stream) == ids


def test_trim_refuses_a_stream_without_groups(server: EmbeddedServer, r: redis.Redis, uid: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = add(r, stream, 5)
    code, _, err = cli(capsys, "trim", stream, "--redis-url", server.url, "--retain", "2")
    assert code == ExitCode.FAILURE
    assert "has no consumer group" in err and "--force" in err
    assert ids_of(r, stream) == ids


def test_trim_force_without_groups_keeps_the_retention_window(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = add(r, stream, 5)
    code, _, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--retain", "2", "--force")
    assert code == ExitCode.OK
    assert ids_of(r, stream) == ids[3:]


def test_trim_missing_stream_is_refused(server: EmbeddedServer, uid: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "trim", f"{uid}:none", "--redis-url", server.url)
    assert code == ExitCode.FAILURE
    assert err == f"fastworker: error: stream '{uid}:none' does not exist\n"


def test_trim_with_unknown_lag_keeps_undelivered_entries(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = add(r, stream, 6)
    r.xgroup_create(stream, "g", id="0")
    read_and_ack(r, stream, "g", 3, 3)
    r.xdel(stream, ids[4])  # undelivered: the group's lag becomes unknown
    assert r.xinfo_groups(stream)[0]["lag"] is None
    code, _, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--yes")
    assert code == ExitCode.OK
    assert ids_of(r, stream) == [ids[3], ids[5]]


async def test_supports_acked_trim_matches_the_server(streams: Streams, r: redis.Redis, uid: str) -> None:
    assert await supports_acked_trim(streams) is server_takes_acked_trim(r, uid)


def test_has_token_finds_an_argument_token_in_command_docs() -> None:
    docs = {b"xtrim": {b"arguments": [{b"name": b"key"}, {b"name": b"condition", b"arguments": [
        {b"name": b"keepref", b"token": b"KEEPREF"}, {b"name": b"acked", b"token": b"ACKED"}]}]}}
    assert has_token(docs, b"ACKED")
    assert not has_token({b"xtrim": {b"arguments": [{b"token": b"MINID"}]}}, b"ACKED")


async def test_safe_trim_never_removes_an_entry_some_group_has_not_acked(streams: Streams, rc: aioredis.Redis,
                                                                         uid: str) -> None:
    model = TrimModel(rc, f"{uid}:jobs", random.Random(20261125))
    await model.start()
    removed = 0
    for _ in range(400):
        step = model.rng.choices(["produce", "read", "ack", "crash", "restart", "claim", "xdel", "trim"],
                                 weights=[4, 5, 5, 0.5, 1, 1, 0.3, 2])[0]
        if step != "trim":
            await getattr(model, step)()
            continue
        retain = model.rng.choice([0, 0, 0, 3])
        removed += (await safe_trim(streams, model.stream, retain_count=retain)).removed
        await model.check(retain)
    assert removed > 0  # the run trimmed, so the check above was not vacuous


class TrimModel:
    """Random produce / read / ack / crash / claim steps over two groups, and what each group has acknowledged."""

    GROUPS = ("a", "b")
    CONSUMERS = ("c1", "c2")

    def __init__(self, rc: aioredis.Redis, stream: str, rng: random.Random) -> None:
        self.rc, self.stream, self.rng = rc, stream, rng
        self.produced: set[str] = set()
        self.acked: dict[str, set[str]] = {group: set() for group in self.GROUPS}
        self.crashed: set[tuple[str, str]] = set()  # consumers that stopped acknowledging

    async def start(self) -> None:
        for group in self.GROUPS:
            await self.rc.xgroup_create(self.stream, group, id="0", mkstream=True)

    def _pick(self) -> tuple[str, str]:
        return self.rng.choice(self.GROUPS), self.rng.choice(self.CONSUMERS)

    async def produce(self) -> None:
        for _ in range(self.rng.randint(1, 5)):
            self.produced.add((await self.rc.xadd(self.stream, {"data": "{}"})).decode())

    async def read(self) -> None:
        group, consumer = self._pick()
        await self.rc.xreadgroup(group, consumer, {self.stream: ">"}, count=self.rng.randint(1, 6))

    async def ack(self) -> None:
        group, consumer = self._pick()
        if (group, consumer) in self.crashed:
            return
        pending = await self.rc.xpending_range(self.stream, group, "-", "+", 100, consumername=consumer)
        chosen = [p["message_id"] for p in pending if self.rng.random() < 0.7]
        if chosen:
            await self.rc.xack(self.stream, group, *chosen)
            self.acked[group].update(entry_id.decode() for entry_id in chosen)

    async def crash(self) -> None:
        self.crashed.add(self._pick())  # it stops acknowledging; its pending entries stay pending

    async def restart(self) -> None:
        if self.crashed:
            self.crashed.discard(self.rng.choice(sorted(self.crashed)))

    async def claim(self) -> None:
        """A live consumer takes over pending entries, as the reclaimer does after a crash."""
        group, consumer = self._pick()
        if (group, consumer) not in self.crashed:
            await self.rc.xautoclaim(self.stream, group, consumer, min_idle_time=0, count=10)

    async def xdel(self) -> None:
        if self.produced:
            victim = self.rng.choice(sorted(self.produced))
            await self.rc.xdel(self.stream, victim)
            self.produced.discard(victim)

    async def check(self, retain: int) -> None:
        present = {entry_id.decode() for entry_id, _ in await self.rc.xrange(self.stream)}
        for group in self.GROUPS:
            unacked = self.produced - self.acked[group]
            assert unacked <= present, f"group {group} lost unacknowledged entries {sorted(unacked - present)}"
        if retain == 0 and present:
            # Nothing more could have gone: the oldest entry left is still needed by some group.
            oldest = min(present, key=lambda i: tuple(map(int, i.split("-"))))
            assert any(oldest not in self.acked[group] for group in self.GROUPS)
