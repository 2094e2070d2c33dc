"""Output streams' retention policy (age and length), on a real server: never past what a group still needs.

Output streams are where handlers' results go. The operator names them (`output_streams`); housekeeping keeps at
most `output_max_len` newest entries and nothing older than `output_max_age_s`, clamped by any group on them.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from fastworker import App, ConfigError, EmbeddedServer, ExitCode, Settings, load_settings
from fastworker.edge.streams import Streams
from fastworker.monitor import Monitor
from fastworker.ops import trim as trim_ops
from fastworker.ops.trim import Policy, housekeeping_plan, length_cut, nth_entry, safe_trim
from tests.conftest import IdleFleet, cli, make_settings
from tests.test_ops_trim import TrimModel, add, ids_of, read_and_ack

DAY_S = 86400.0


@pytest.fixture
async def streams(server: EmbeddedServer, uid: str) -> AsyncIterator[Streams]:
    connection = Streams(make_settings(server, uid))
    yield connection
    await connection.aclose()


def add_old(r: redis.Redis, stream: str, n: int) -> list[str]:
    """n entries with ids from 1970 (1000-0, 2000-0, ...): older than any age limit."""
    return [r.xadd(stream, {"data": "{}"}, id=f"{1000 * (i + 1)}-0").decode() for i in range(n)]


# ---- settings ------------------------------------------------------------------------------------------------

def test_output_retention_is_off_by_default() -> None:
    settings = Settings(processes=1)
    assert (settings.output_streams, settings.output_max_age_s, settings.output_max_len) == ((), DAY_S, 0)
    assert housekeeping_plan(["jobs"], settings) == {"jobs": Policy(retain_ms=3_600_000)}


@pytest.mark.parametrize(("raw", "names"), [
    ("betterbundle:analysis-results", ("betterbundle:analysis-results",)),
    (" a:results , b:results,,a:results ", ("a:results", "b:results")),
    ("", ()),
])
def test_output_streams_are_a_comma_list_from_flag_or_environment(raw: str, names: tuple[str, ...]) -> None:
    flagged, sources = load_settings({"output_streams": raw, "trim_interval_s": "5"}, {}, processes=1)
    assert (flagged.output_streams, sources["output_streams"]) == (names, "flag")
    env = {"FASTWORKER_OUTPUT_STREAMS": raw, "FASTWORKER_TRIM_INTERVAL_S": "5"}
    from_env, _ = load_settings({}, env, processes=1)
    assert from_env.output_streams == (names if raw else ())


def test_output_streams_given_in_code_as_text_or_list_become_a_tuple() -> None:
    assert Settings(processes=1, trim_interval_s=5, output_streams="a, b").output_streams == ("a", "b")  # type: ignore[arg-type]
    assert Settings(processes=1, trim_interval_s=5, output_streams=["a"]).output_streams == ("a",)  # type: ignore[arg-type]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"output_streams": ("r",)}, "output_streams needs trim_interval_s above 0"),
    ({"output_streams": ("r",), "trim_interval_s": 5, "output_max_age_s": 0},
     "needs output_max_age_s or output_max_len"),
    ({"output_max_len": -1}, "output_max_len must not be negative"),
    ({"output_max_age_s": -1.0}, "output_max_age_s must not be negative"),
])
def test_output_settings_refuse_a_policy_that_would_never_run_or_keep_everything(overrides: dict[str, Any],
                                                                                  message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(processes=1, **overrides)
    assert message in str(caught.value)


def test_housekeeping_plan_trims_named_output_streams_only() -> None:
    settings = Settings(processes=1, trim_interval_s=5, trim_retain_s=60, output_max_age_s=600, output_max_len=100,
                        output_streams=("results", "jobs2", "jobs:dead"))
    assert housekeeping_plan(["jobs", "jobs2"], settings) == {
        "jobs": Policy(retain_ms=60_000),
        "jobs2": Policy(retain_ms=60_000, max_len=100, max_age_ms=600_000),  # a job stream too: never forced
        "results": Policy(max_len=100, max_age_ms=600_000, force=True),
        "jobs:dead": Policy(max_len=100, max_age_ms=600_000, force=True),  # named, so trimmed
    }


# ---- the policy on a real server -----------------------------------------------------------------------------

async def test_length_limit_on_a_stream_without_groups_keeps_exactly_the_newest(streams: Streams, r: redis.Redis,
                                                                                uid: str) -> None:
    stream = f"{uid}:results"
    ids = add(r, stream, 10)
    result = await safe_trim(streams, stream, max_len=4, force=True)
    assert ids_of(r, stream) == ids[6:]
    assert (result.removed, result.minid, result.limited_by) == (6, ids[6], "keep at most the newest 4 entries")


async def test_age_limit_on_a_stream_without_groups_removes_only_older_entries(streams: Streams, r: redis.Redis,
                                                                              uid: str) -> None:
    stream = f"{uid}:results"
    add_old(r, stream, 3)
    recent = add(r, stream, 2)
    result = await safe_trim(streams, stream, max_age_ms=3_600_000, force=True)
    assert ids_of(r, stream) == recent
    assert result.limited_by == "keep nothing older than 3600 s"


async def test_an_entry_breaking_either_limit_goes(streams: Streams, r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:results"
    add_old(r, stream, 3)
    recent = add(r, stream, 5)
    # The age limit alone would keep 5, the length limit alone 6 (one old one): together, 5.
    assert (await safe_trim(streams, stream, max_len=6, max_age_ms=3_600_000, force=True)).removed == 3
    assert ids_of(r, stream) == recent
    # Now the length limit cuts deeper than the age limit.
    result = await safe_trim(streams, stream, max_len=2, max_age_ms=3_600_000, force=True)
    assert ids_of(r, stream) == recent[3:]
    assert result.limited_by == "keep at most the newest 2 entries"


async def test_policy_never_passes_a_groups_oldest_pending_entry(streams: Streams, r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:results"
    ids = add_old(r, stream, 4) + add(r, stream, 4)
    r.xgroup_create(stream, "app", id="0")
    read_and_ack(r, stream, "app", 8, 1)  # the app's group read all, acknowledged only the first: 1..7 pending
    result = await safe_trim(streams, stream, max_len=2, max_age_ms=3_600_000)
    assert ids_of(r, stream) == ids[1:]
    assert result.limited_by == "group app: oldest pending entry"


async def test_policy_never_passes_a_groups_first_undelivered_entry(streams: Streams, r: redis.Redis,
                                                                    uid: str) -> None:
    stream = f"{uid}:results"
    ids = add(r, stream, 10)
    r.xgroup_create(stream, "app", id="0")
    read_and_ack(r, stream, "app", 3, 3)  # acked 3; 7 never delivered (the app is behind)
    result = await safe_trim(streams, stream, max_len=2)
    assert ids_of(r, stream) == ids[3:]
    assert result.limited_by == "group app: entries after its last delivered id"


async def test_policy_keeps_acknowledged_entries_within_its_limits(streams: Streams, r: redis.Redis, uid: str) -> None:
    # A group that acknowledged everything does not shrink the stream below the policy: results stay readable.
    stream = f"{uid}:results"
    ids = add(r, stream, 10)
    r.xgroup_create(stream, "app", id="0")
    read_and_ack(r, stream, "app", 10, 10)
    await safe_trim(streams, stream, max_len=4)
    assert ids_of(r, stream) == ids[6:]


async def test_policy_never_removes_an_entry_some_group_has_not_acked(streams: Streams, rc: aioredis.Redis,
                                                                      uid: str) -> None:
    model = TrimModel(rc, f"{uid}:results", random.Random(20261126))
    await model.start()
    removed = 0
    for _ in range(400):
        step = model.rng.choices(["produce", "read", "ack", "crash", "restart", "claim", "xdel", "trim"],
                                 weights=[4, 5, 5, 0.5, 1, 1, 0.3, 2])[0]
        if step != "trim":
            await getattr(model, step)()
            continue
        max_len = model.rng.choice([1, 2, 5])
        removed += (await safe_trim(streams, model.stream, max_len=max_len)).removed
        await model.check(retain=max_len)
        present = ids_of_sorted(await rc.xrange(model.stream))
        # Either within the limit, or the trim stopped at an entry some group still needs.
        assert len(present) <= max_len or any(present[0] not in model.acked[g] for g in model.GROUPS)
    assert removed > 0


def ids_of_sorted(entries: list[Any]) -> list[str]:
    return [entry_id.decode() for entry_id, _ in entries]


async def test_length_cut_reads_from_the_nearer_end_and_pages(streams: Streams, r: redis.Redis, uid: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trim_ops, "PAGE", 3)  # several pages per walk
    stream = f"{uid}:results"
    ids = add(r, stream, 20)
    assert await length_cut(streams, stream, 5) == (ids[15], True)  # from the newest end: 5 entries
    assert await length_cut(streams, stream, 17) == (ids[3], True)  # from the oldest end: 3 + 1 entries
    assert await length_cut(streams, stream, 20) == ("0-0", True)
    assert await nth_entry(streams, stream, 21, newest=True) is None
    # Both walks longer than the scan cap: cut after the oldest scan_cap entries; the next trim goes on.
    assert await length_cut(streams, stream, 10, scan_cap=4) == (ids[4], False)
    result = await trim_ops.safe_trim(streams, stream, max_len=10, force=True)
    assert ids_of(r, stream) == ids[10:] and result.removed == 10


async def test_policy_reads_nothing_when_a_group_needs_the_oldest_entry(streams: Streams, r: redis.Redis, uid: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stream = f"{uid}:results"
    ids = add(r, stream, 10)
    r.xgroup_create(stream, "app", id="0")  # the app is down: it has read nothing
    walks: list[int] = []
    real_nth_entry = trim_ops.nth_entry

    async def counting_nth_entry(*args: Any, **kwargs: Any) -> str | None:
        walks.append(args[2])
        return await real_nth_entry(*args, **kwargs)

    monkeypatch.setattr(trim_ops, "nth_entry", counting_nth_entry)
    result = await safe_trim(streams, stream, max_len=2, max_age_ms=1)
    assert (result.minid, result.limited_by, walks) == (None, "group app: entries after its last delivered id", [])
    assert ids_of(r, stream) == ids


async def test_length_walk_from_the_oldest_end_stops_where_a_group_needs_entries(streams: Streams, r: redis.Redis,
                                                                                 uid: str) -> None:
    stream = f"{uid}:results"
    ids = add(r, stream, 20)
    r.xgroup_create(stream, "app", id="0")
    read_and_ack(r, stream, "app", 5, 5)
    assert await length_cut(streams, stream, 12) == (ids[8], True)
    assert await length_cut(streams, stream, 12, needed=ids[5]) == (ids[5], True)  # read 5 entries, not 9
    result = await safe_trim(streams, stream, max_len=12)
    assert (result.removed, result.limited_by) == (5, "group app: entries after its last delivered id")
    assert ids_of(r, stream) == ids[5:]


# ---- the fleet's housekeeping --------------------------------------------------------------------------------

async def test_housekeeping_trims_named_output_streams_and_nothing_else(server: EmbeddedServer, r: redis.Redis,
                                                                       uid: str) -> None:
    jobs, results, other, dead = f"{uid}:jobs", f"{uid}:results", f"{uid}:other", f"{uid}:jobs:dead"
    app = App()
    app.handler(jobs, group="workers")(lambda message: None)
    job_ids = add(r, jobs, 5)
    r.xgroup_create(jobs, "workers", id="0")
    read_and_ack(r, jobs, "workers", 5, 5)
    result_ids = add(r, results, 10)  # read by the app with plain XREAD: no group
    grouped = f"{uid}:grouped-results"
    grouped_ids = add(r, grouped, 10)
    r.xgroup_create(grouped, "app", id="0")
    read_and_ack(r, grouped, "app", 8, 2)  # the app's own group: 6 pending, 2 undelivered
    other_ids, dead_ids = add(r, other, 10), add(r, dead, 10)
    settings = make_settings(server, uid, trim_interval_s=5, trim_retain_s=0,
                             output_streams=(results, grouped, f"{uid}:missing"), output_max_len=3)
    monitor = Monitor(IdleFleet(), app, settings)
    monitor._streams = Streams(settings)
    try:
        await monitor._trim()
    finally:
        await monitor.aclose()
    assert job_ids and ids_of(r, jobs) == []  # job stream: everything acked (retention 0) is gone
    assert ids_of(r, results) == result_ids[7:]  # no group: the policy alone
    assert ids_of(r, grouped) == grouped_ids[2:]  # clamped at the app group's oldest pending entry
    assert ids_of(r, other) == other_ids  # not named: untouched
    assert ids_of(r, dead) == dead_ids  # dead letters: untouched unless named


# ---- fastworker trim -----------------------------------------------------------------------------------------

def test_trim_command_applies_the_output_policy(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:results"
    add_old(r, stream, 2)
    ids = add(r, stream, 6)
    code, out, _ = cli(capsys, "trim", stream, "--redis-url", server.url, "--max-len", "4", "--max-age-s", "3600",
                       "--force", "--json")
    assert code == ExitCode.OK
    doc = json.loads(out)
    assert (doc["removed"], doc["limited_by"]) == (4, "keep at most the newest 4 entries")
    assert ids_of(r, stream) == ids[2:]


def test_trim_command_needs_force_for_a_stream_without_groups(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:results"
    ids = add(r, stream, 5)
    code, _, err = cli(capsys, "trim", stream, "--redis-url", server.url, "--max-len", "2")
    assert code == ExitCode.FAILURE
    assert "--force" in err and "--max-len" in err
    assert ids_of(r, stream) == ids


def test_trim_command_refuses_a_negative_limit(server: EmbeddedServer, uid: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:  # refused while parsing: the command never starts
        cli(capsys, "trim", f"{uid}:results", "--redis-url", server.url, "--max-len", "-1")
    assert caught.value.code == ExitCode.USAGE
    assert "argument --max-len: must not be negative, got -1" in capsys.readouterr().err
