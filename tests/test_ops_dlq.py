"""`fastworker dlq list|show|requeue|purge` on a real server, and the requeue round trip through a worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from fastworker import App, EmbeddedServer, ExitCode, Message, Reject
from tests.conftest import JOB, RunningWorker, cli, make_settings, pending_count, publish, wait_for


def dead_letter(r: redis.Redis, stream: str, n: int, error_class: str = "ValueError", requeues: int | None = None,
                original: dict[str, Any] | None = None) -> str:
    """A dead letter as the engine writes it: the original fields plus the fw:* facts."""
    fields: dict[str, Any] = {"data": json.dumps({"job_id": f"job-{n}"})} if original is None else dict(original)
    if requeues is not None:
        fields["fw:requeues"] = requeues
    fields.update({"fw:stream": stream, "fw:group": "g", "fw:id": f"{n + 1}-0", "fw:deliveries": 5,
                   "fw:error_class": error_class, "fw:error": f"boom {n}\nsecond line", "fw:dead_at_ms": 1_000})
    return r.xadd(stream + ":dead", fields).decode()


def ids_of(r: redis.Redis, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in r.xrange(stream)]


def test_dlq_list_table_shows_each_letter(server: EmbeddedServer, r: redis.Redis, uid: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = [dead_letter(r, stream, n) for n in range(3)]
    code, out, _ = cli(capsys, "dlq", "list", stream, "--redis-url", server.url)
    assert code == ExitCode.OK
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "DEAD", "FOR", "SOURCE"]
    assert [line.split()[0] for line in lines[1:]] == ids
    assert lines[1].split()[2:8] == ["1-0", "g", "5", "0", "ValueError", "boom"]
    assert "second line" in lines[1]  # the error, folded onto one line


def test_dlq_list_json_filters_by_error_class(server: EmbeddedServer, r: redis.Redis, uid: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    dead_letter(r, stream, 0, "ValueError")
    timeout_id = dead_letter(r, stream, 1, "HandlerTimeout")
    dead_letter(r, stream, 2, "ValueError")
    code, out, _ = cli(capsys, "dlq", "list", stream, "--redis-url", server.url, "--error-class", "HandlerTimeout",
                       "--json")
    doc = json.loads(out)
    assert code == ExitCode.OK
    assert (doc["stream"], doc["dead_letter_stream"]) == (stream, stream + ":dead")
    assert [(x["id"], x["error_class"], x["fields"]) for x in doc["letters"]] == [
        (timeout_id, "HandlerTimeout", {"data": '{"job_id": "job-1"}'})]


def test_dlq_list_range_and_count_select_letters(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    ids = [dead_letter(r, stream, n) for n in range(6)]
    _, out, _ = cli(capsys, "dlq", "list", stream + ":dead", "--redis-url", server.url, "--from", ids[1],
                    "--to", ids[4], "--count", "2", "--json")
    assert [x["id"] for x in json.loads(out)["letters"]] == ids[1:3]


def test_dlq_show_prints_one_letter_in_full(server: EmbeddedServer, r: redis.Redis, uid: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    letter = dead_letter(r, stream, 7, requeues=2)
    code, out, _ = cli(capsys, "dlq", "show", stream, letter, "--redis-url", server.url)
    assert code == ExitCode.OK
    assert out.splitlines()[0] == f"dead letter {letter} in {stream}:dead"
    assert f"source       {stream} 8-0 (group g)" in out
    assert "requeues     2" in out and "error class  ValueError" in out
    assert '"job_id": "job-7"' in out


def test_dlq_show_json_has_fields_and_facts(server: EmbeddedServer, r: redis.Redis, uid: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    letter = dead_letter(r, stream, 7, original={"jobId": "j7", "shopId": "s1"})
    _, out, _ = cli(capsys, "dlq", "show", stream, letter, "--redis-url", server.url, "--json")
    doc = json.loads(out)
    assert doc["fields"] == {"jobId": "j7", "shopId": "s1"}
    assert (doc["source_id"], doc["deliveries"], doc["error"], doc["requeues"]) == ("8-0", 5, "boom 7\nsecond line", 0)


def test_dlq_show_unknown_id_fails_with_one_line(server: EmbeddedServer, uid: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "dlq", "show", f"{uid}:jobs", "1-0", "--redis-url", server.url)
    assert code == ExitCode.FAILURE
    assert err == f"fastworker: error: no dead letter 1-0 in {uid}:jobs:dead\n"


def test_dlq_requeue_writes_original_fields_and_counts_requeues(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    first = dead_letter(r, stream, 0)
    second = dead_letter(r, stream, 1, requeues=2)
    code, out, _ = cli(capsys, "dlq", "requeue", stream, "--redis-url", server.url, "--yes")
    assert code == ExitCode.OK
    assert out.splitlines()[-1] == "2 requeued, 0 skipped"
    assert [fields for _, fields in r.xrange(stream)] == [
        {b"data": b'{"job_id": "job-0"}', b"fw:requeues": b"1"},
        {b"data": b'{"job_id": "job-1"}', b"fw:requeues": b"3"},
    ]
    assert r.xlen(stream + ":dead") == 0
    assert f"requeued {first} -> {stream} " in out and f"requeued {second} -> {stream} " in out


def test_dlq_requeue_by_id_json_moves_only_that_letter(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    letters = [dead_letter(r, stream, n) for n in range(3)]
    code, out, _ = cli(capsys, "dlq", "requeue", stream, letters[1], "--redis-url", server.url, "--json")
    doc = json.loads(out)
    assert code == ExitCode.OK
    assert [(x["dead_id"], x["stream"]) for x in doc["requeued"]] == [(letters[1], stream)]
    assert ids_of(r, stream) == [doc["requeued"][0]["id"]]
    assert ids_of(r, stream + ":dead") == [letters[0], letters[2]]


def test_dlq_requeue_skips_letters_of_deleted_entries(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    deleted = dead_letter(r, stream, 0, "EntryDeleted", original={})
    dead_letter(r, stream, 1)
    code, out, _ = cli(capsys, "dlq", "requeue", stream, "--redis-url", server.url, "--yes")
    assert code == ExitCode.FAILURE
    assert f"skipped {deleted}: the entry was deleted from its stream before it was handled" in out
    assert ids_of(r, stream + ":dead") == [deleted]
    assert [fields for _, fields in r.xrange(stream)] == [{b"data": b'{"job_id": "job-1"}', b"fw:requeues": b"1"}]


def test_dlq_purge_without_yes_refuses_without_a_terminal(server: EmbeddedServer, r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    letters = [dead_letter(r, stream, n) for n in range(2)]
    done = subprocess.run([sys.executable, "-m", "fastworker", "dlq", "purge", stream, "--redis-url", server.url],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ExitCode.USAGE
    assert "refusing without confirmation" in done.stderr and "--yes" in done.stderr
    assert ids_of(r, stream + ":dead") == letters


def test_dlq_purge_with_yes_deletes_only_the_selection(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    kept = dead_letter(r, stream, 0, "ValueError")
    dead_letter(r, stream, 1, "DecodeError")
    dead_letter(r, stream, 2, "DecodeError")
    code, out, _ = cli(capsys, "dlq", "purge", stream, "--redis-url", server.url, "--error-class", "DecodeError",
                       "--yes")
    assert code == ExitCode.OK
    assert out == f"purged 2 dead letters from {stream}:dead\n"
    assert ids_of(r, stream + ":dead") == [kept]


def test_dlq_purge_json_counts_purged(server: EmbeddedServer, r: redis.Redis, uid: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    stream = f"{uid}:jobs"
    letters = [dead_letter(r, stream, n) for n in range(3)]
    _, out, _ = cli(capsys, "dlq", "purge", stream, letters[0], letters[2], "--redis-url", server.url, "--yes",
                    "--json")
    assert json.loads(out) == {"dead_letter_stream": f"{stream}:dead", "purged": 2}
    assert ids_of(r, stream + ":dead") == [letters[1]]


async def test_dlq_requeue_round_trip_is_handled_and_acked(server: EmbeddedServer, rc: aioredis.Redis,
                                                           uid: str) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    state: dict[str, Any] = {"reject": True, "handled": []}
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        if state["reject"]:
            raise Reject("not yet")
        state["handled"].append(msg)

    async with RunningWorker(app, make_settings(server, uid)):
        await publish(rc, stream, [JOB])
        await wait_for(lambda: _length_is(rc, stream + ":dead", 1), what="the dead letter")
        state["reject"] = False
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastworker", "dlq", "requeue", stream, "--redis-url", server.url, "--yes",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == ExitCode.OK, err
        await wait_for(lambda: _handled_and_acked(rc, stream, group, state), what="the requeued entry acked")
    [msg] = state["handled"]
    assert msg.payload == JOB
    assert msg.fields[b"fw:requeues"] == b"1"
    assert await rc.xlen(stream + ":dead") == 0


async def _length_is(rc: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await rc.xlen(stream)) == n


async def _handled_and_acked(rc: aioredis.Redis, stream: str, group: str, state: dict[str, Any]) -> bool:
    return bool(state["handled"]) and await pending_count(rc, stream, group) == 0
