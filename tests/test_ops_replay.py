"""`fastworker replay`: re-publishing a range and moving a group's cursor, dry run first, on a real server."""

from __future__ import annotations

import json

import pytest
import redis

from fastworker import EmbeddedServer, ExitCode
from tests.conftest import cli


def prepare(r: redis.Redis, stream: str, n: int = 5) -> list[str]:
    """n entries, and a group `g` that has read and acknowledged the first two."""
    with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {"data": json.dumps({"n": i})})
        ids = [entry_id.decode() for entry_id in pipe.execute()]
    r.xgroup_create(stream, "g", id="0")
    r.xreadgroup("g", "c1", {stream: ">"}, count=2)
    r.xack(stream, "g", *ids[:2])
    return ids


def entries(r: redis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return r.xrange(stream)  # type: ignore[no-any-return]


def group(r: redis.Redis, stream: str) -> dict[str, object]:
    [info] = r.xinfo_groups(stream)
    return info  # type: ignore[no-any-return]


def test_replay_dry_run_changes_nothing(server: EmbeddedServer, r: redis.Redis, uid: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = prepare(r, stream)
    before, group_before = entries(r, stream), group(r, stream)
    code, out, _ = cli(capsys, "replay", stream, "--from", ids[1], "--to", ids[3], "--redis-url", server.url)
    assert code == ExitCode.OK
    assert out.splitlines() == [
        f"would replay 3 entries of {stream} [{ids[1]} .. {ids[3]}] to {stream} (copies with new ids; originals stay)",
        "dry run: nothing changed; pass --yes to do it"]
    assert entries(r, stream) == before
    assert group(r, stream) == group_before


def test_replay_yes_appends_copies_of_the_range(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = prepare(r, stream)
    code, _, _ = cli(capsys, "replay", stream, "--from", ids[1], "--to", ids[3], "--redis-url", server.url, "--yes")
    after = entries(r, stream)
    assert code == ExitCode.OK
    assert [fields for _, fields in after[5:]] == [fields for _, fields in after[1:4]]
    assert len(after) == 8


def test_replay_to_another_stream_json(server: EmbeddedServer, r: redis.Redis, uid: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    stream, target = f"{uid}:jobs", f"{uid}:debug"
    ids = prepare(r, stream)
    _, out, _ = cli(capsys, "replay", stream, "--from", "-", "--to", ids[1], "--to-stream", target,
                    "--redis-url", server.url, "--yes", "--json")
    doc = json.loads(out)
    assert (doc["dry_run"], doc["replayed"], doc["plan"]["count"]) == (False, 2, 2)
    assert [entry_id.decode() for entry_id, _ in entries(r, target)] == doc["new_ids"]
    assert [fields for _, fields in entries(r, target)] == [fields for _, fields in entries(r, stream)[:2]]
    assert r.xlen(stream) == 5


def test_replay_whole_stream_into_itself_copies_each_entry_once(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream, n=1200)  # more than one page: the copies must not extend the range being read
    code, _, _ = cli(capsys, "replay", stream, "--from", "-", "--to", "+", "--redis-url", server.url, "--yes")
    after = entries(r, stream)
    assert code == ExitCode.OK
    assert len(after) == 2400
    assert [fields for _, fields in after[1200:]] == [fields for _, fields in after[:1200]]


def test_replay_reset_dry_run_leaves_the_cursor(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = prepare(r, stream)
    code, out, _ = cli(capsys, "replay", stream, "--group", "g", "--reset-to", "0", "--redis-url", server.url)
    assert code == ExitCode.OK
    assert out.splitlines()[0] == f"would move group g on {stream} from {ids[1]} to 0 (pending 0, lag 3)"
    assert "entries after 0 will be delivered to the group again" in out
    assert group(r, stream)["last-delivered-id"] == ids[1].encode()


def test_replay_reset_yes_moves_the_cursor_back(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = prepare(r, stream)
    code, out, _ = cli(capsys, "replay", stream, "--group", "g", "--reset-to", ids[0], "--redis-url", server.url,
                       "--yes", "--json")
    assert code == ExitCode.OK
    assert json.loads(out)["plan"]["current_id"] == ids[1]
    [[_, delivered]] = r.xreadgroup("g", "c2", {stream: ">"})
    assert [entry_id.decode() for entry_id, _ in delivered] == ids[1:]


def test_replay_reset_unknown_group_fails(server: EmbeddedServer, r: redis.Redis, uid: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    prepare(r, stream)
    code, _, err = cli(capsys, "replay", stream, "--group", "nope", "--reset-to", "0", "--redis-url", server.url,
                       "--yes")
    assert code == ExitCode.FAILURE
    assert err == f"fastworker: error: stream {stream!r} has no group 'nope'\n"


@pytest.mark.parametrize("argv", [
    ["--from", "0"], ["--group", "g"], ["--from", "-", "--to", "+", "--group", "g", "--reset-to", "0"], [],
    ["--group", "g", "--reset-to", "not-an-id"],
])
def test_replay_incomplete_or_mixed_options_fail(server: EmbeddedServer, uid: str, argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "replay", f"{uid}:jobs", "--redis-url", server.url, *argv)
    assert code == ExitCode.USAGE
    assert err.startswith("fastworker: error: ") and err.count("\n") == 1
