"""`fastworker publish` and `fastworker tail` against a real server, in-process and as subprocesses."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from fastworker import EmbeddedServer, ExitCode
from fastworker.cli import main
from fastworker.commands.publish import Progress
from fastworker.commands.tail import id_before, render
from fastworker.publisher import SyncPublisher
from fastworker.server import free_port
from tests.conftest import JOB


@pytest.fixture
def rc(server: EmbeddedServer) -> Iterator[redis.Redis]:
    """A blocking client: these tests run the CLI in-process, which runs its own event loop."""
    with redis.Redis.from_url(server.url) as client:
        yield client


def _cli(capsys: pytest.CaptureFixture[str], server: EmbeddedServer, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--redis-url", server.url])
    out, err = capsys.readouterr()
    return code, out, err


def _lines(out: str) -> list[dict[str, Any]]:
    # split on newlines only: str.splitlines() would also split inside strings holding U+2028
    return [orjson.loads(line) for line in out.split("\n") if line]


def _fastworker(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "fastworker", *args], input=stdin, capture_output=True,
                          timeout=60, check=False)


class LineReader:
    """Complete stdout lines of a running process, with a deadline instead of a blocking readline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._buffer = b""

    def next(self, timeout_s: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no line within {timeout_s} s (have {self._buffer[:200]!r})")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise AssertionError(f"stdout closed (have {self._buffer[:200]!r})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


# publish


def test_publish_json_prints_the_entry_id(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                rc: redis.Redis, uid: str) -> None:
    code, out, _ = _cli(capsys, server, "publish", uid, "--json", orjson.dumps(JOB).decode())
    assert code == ExitCode.OK
    assert rc.xrange(uid) == [(out.strip().encode(), {b"data": orjson.dumps(JOB)})]


def test_publish_fields_combine_with_json_in_one_entry(capsys: pytest.CaptureFixture[str],
                                                             server: EmbeddedServer, rc: redis.Redis,
                                                             uid: str) -> None:
    code, _, _ = _cli(capsys, server, "publish", uid, "--json", '{"a": 1}', "--field", "type=analysis",
                      "--field", "expr=a=b", "--field", "empty=")
    assert code == ExitCode.OK
    [(_, fields)] = rc.xrange(uid)
    assert fields == {b"type": b"analysis", b"expr": b"a=b", b"empty": b"", b"data": b'{"a": 1}'}


def test_publish_fields_alone_make_a_flat_entry(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                      rc: redis.Redis, uid: str) -> None:
    code, out, _ = _cli(capsys, server, "publish", uid, "--field", "jobId=j1", "--field", "shopId=s1", "--quiet")
    assert (code, out) == (ExitCode.OK, "1\n")
    assert [fields for _, fields in rc.xrange(uid)] == [{b"jobId": b"j1", b"shopId": b"s1"}]


def test_publish_malformed_json_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                      server: EmbeddedServer, uid: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["publish", uid, "--json", "{nope", "--redis-url", server.url])
    assert caught.value.code == ExitCode.USAGE
    assert "--json: not valid JSON" in capsys.readouterr().err


def test_publish_without_input_says_what_to_give(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                 uid: str) -> None:
    code, _, err = _cli(capsys, server, "publish", uid)
    assert code == ExitCode.USAGE
    assert err.startswith("fastworker: error: nothing to publish") and err.count("\n") == 1


def test_publish_file_prints_ids_in_line_order(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                     rc: redis.Redis, uid: str, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b"".join(orjson.dumps({**JOB, "job_id": f"job-{i}"}) + b"\n\n" for i in range(2_500)))
    code, out, _ = _cli(capsys, server, "publish", uid, "--file", str(path), "--field", "source=file")
    assert code == ExitCode.OK
    stored = rc.xrange(uid)
    assert out.split() == [entry_id.decode() for entry_id, _ in stored]
    assert [orjson.loads(f[b"data"])["job_id"] for _, f in stored] == [f"job-{i}" for i in range(2_500)]
    assert all(f[b"source"] == b"file" for _, f in stored)


def test_publish_file_bad_line_names_it_and_keeps_the_lines_before(
        capsys: pytest.CaptureFixture[str], server: EmbeddedServer, rc: redis.Redis, uid: str,
        tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"i": 1}\n\n{"i": 2}\n{"i": 3,\n{"i": 4}\n')
    code, out, err = _cli(capsys, server, "publish", uid, "--file", str(path))
    assert code == ExitCode.FAILURE
    assert err.count("\n") == 1 and "line 4: not valid JSON" in err
    assert "the 2 entries before it were published" in err
    assert len(out.split()) == 2 and rc.xlen(uid) == 2


def test_publish_check_validates_without_publishing(capsys: pytest.CaptureFixture[str],
                                                          server: EmbeddedServer, rc: redis.Redis, uid: str,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"i": 1}\n[2]\n"three"\n')
    code, out, _ = _cli(capsys, server, "publish", uid, "--file", str(path), "--check")
    assert (code, out) == (ExitCode.OK, "3\n")
    assert rc.exists(uid) == 0


def test_publish_stdin_quiet_prints_the_count(server: EmbeddedServer, rc: redis.Redis, uid: str) -> None:
    lines = b"".join(b'{"i": %d}\n' % i for i in range(1_200))
    done = _fastworker("publish", uid, "--file", "-", "--quiet", "--redis-url", server.url, stdin=lines)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"1200\n", b"")
    assert rc.xlen(uid) == 1_200


def test_publish_unreachable_server_is_one_line_and_its_exit_code(capsys: pytest.CaptureFixture[str],
                                                                  uid: str) -> None:
    code = main(["publish", uid, "--json", "{}", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    err = capsys.readouterr().err
    assert code == ExitCode.REDIS_UNREACHABLE
    assert err.startswith("fastworker: error: cannot reach the server") and err.count("\n") == 1


def test_publish_to_a_key_of_another_type_is_one_line(capsys: pytest.CaptureFixture[str],
                                                            server: EmbeddedServer, rc: redis.Redis,
                                                            uid: str) -> None:
    rc.set(uid, "x")
    code, _, err = _cli(capsys, server, "publish", uid, "--json", "{}")
    assert code == ExitCode.FAILURE
    assert f"key '{uid}' holds a string, not a stream" in err and err.count("\n") == 1


# tail


def _publish(server: EmbeddedServer, stream: str, payloads: list[Any]) -> list[str]:
    with SyncPublisher(server.url) as publisher:
        return publisher.publish_many(stream, payloads)


def test_tail_count_prints_the_last_entries_oldest_first(capsys: pytest.CaptureFixture[str],
                                                               server: EmbeddedServer, uid: str) -> None:
    ids = _publish(server, uid, [{"i": i} for i in range(30)])
    code, out, _ = _cli(capsys, server, "tail", uid, "--count", "3")
    assert code == ExitCode.OK
    assert _lines(out) == [{"id": ids[i], "fields": {}, "payload": {"i": i}} for i in (27, 28, 29)]


def test_tail_defaults_to_the_last_ten(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                             uid: str) -> None:
    ids = _publish(server, uid, [{"i": i} for i in range(30)])
    _, out, _ = _cli(capsys, server, "tail", uid)
    assert [line["id"] for line in _lines(out)] == ids[-10:]


def test_tail_count_beyond_a_page_prints_them_all_in_order(capsys: pytest.CaptureFixture[str],
                                                                 server: EmbeddedServer, uid: str) -> None:
    ids = _publish(server, uid, [{"i": i} for i in range(2_600)])
    _, out, _ = _cli(capsys, server, "tail", uid, "--count", "2_100".replace("_", ""))
    assert [line["id"] for line in _lines(out)] == ids[-2_100:]


def test_tail_from_reads_forward_from_that_id(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                    uid: str) -> None:
    ids = _publish(server, uid, [{"i": i} for i in range(1_500)])
    _, out, _ = _cli(capsys, server, "tail", uid, "--from", ids[100], "--count", "1200")
    assert [line["id"] for line in _lines(out)] == ids[100:1_300]
    _, out, _ = _cli(capsys, server, "tail", uid, "--from", "-", "--count", "2")
    assert [line["id"] for line in _lines(out)] == ids[:2]


def test_tail_shows_odd_entries_escaped(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                              rc: redis.Redis, uid: str) -> None:
    rc.xadd(uid, {"data": b"\xff\xfe not utf-8"})
    rc.xadd(uid, {"data": b"{not json", "type": "x"})
    rc.xadd(uid, {b"\xc3(": b"\x80", "empty": b"", "uni": "日本語".encode()})
    rc.xadd(uid, {"data": "null"})
    code, out, _ = _cli(capsys, server, "tail", uid)
    assert code == ExitCode.OK
    assert [{k: v for k, v in line.items() if k != "id"} for line in _lines(out)] == [
        {"fields": {"data": {"base64": "//4gbm90IHV0Zi04"}}, "payload": None},
        {"fields": {"data": "{not json", "type": "x"}, "payload": None},
        {"fields": {"\\xc3(": {"base64": "gA=="}, "empty": "", "uni": "日本語"}, "payload": None},
        {"fields": {}, "payload": None},
    ]


def test_publish_tail_round_trip_keeps_odd_payloads(capsys: pytest.CaptureFixture[str],
                                                          server: EmbeddedServer, uid: str,
                                                          tmp_path: Path) -> None:
    payloads: list[Any] = [{"s": "café ☕ 😀 \u2028"}, {"blob": "x" * (8 * 1024 * 1024)}, "", [], {"n": None}]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in payloads))
    assert _cli(capsys, server, "publish", uid, "--file", str(path), "--quiet")[:2] == (ExitCode.OK, "5\n")
    _, out, _ = _cli(capsys, server, "tail", uid)
    assert [line["payload"] for line in _lines(out)] == payloads


def test_tail_of_a_key_of_another_type_is_one_line(capsys: pytest.CaptureFixture[str],
                                                         server: EmbeddedServer, rc: redis.Redis,
                                                         uid: str) -> None:
    rc.hset(uid, "a", "b")
    code, _, err = _cli(capsys, server, "tail", uid)
    assert code == ExitCode.FAILURE and f"key '{uid}' holds a hash" in err and err.count("\n") == 1


def test_tail_rejects_a_malformed_from_id(capsys: pytest.CaptureFixture[str], server: EmbeddedServer) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["tail", "s", "--from", "yesterday", "--redis-url", server.url])
    assert caught.value.code == ExitCode.USAGE
    assert "expected an entry id" in capsys.readouterr().err


@pytest.mark.parametrize(("start", "before"), [
    ("-", "0-0"), ("0", "0-0"), ("0-0", "0-0"), ("5-3", "5-2"), ("5-0", f"4-{2**64 - 1}"), ("5", f"4-{2**64 - 1}"),
])
def test_id_before_is_the_greatest_id_below(start: str, before: str) -> None:
    assert id_before(start) == before


def test_render_keeps_a_second_data_field_and_escapes_names() -> None:
    line = orjson.loads(render(b"1-1", [b"data", b"[1]", b"data", b"2", b"\xff", b"v"]))
    assert line == {"id": "1-1", "fields": {"data": "2", "\\xff": "v"}, "payload": [1]}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_tail_follow_prints_new_entries_and_exits_0_on_a_signal(server: EmbeddedServer, uid: str,
                                                                      signum: signal.Signals) -> None:
    [first] = _publish(server, uid, [{"i": 0}])
    with subprocess.Popen([sys.executable, "-m", "fastworker", "tail", uid, "--follow", "--count", "1",
                           "--redis-url", server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            lines = LineReader(proc)
            assert orjson.loads(lines.next())["id"] == first
            later = _publish(server, uid, [{"i": 1}, {"i": 2}])
            assert [orjson.loads(lines.next()) for _ in later] == [
                {"id": later[0], "fields": {}, "payload": {"i": 1}},
                {"id": later[1], "fields": {}, "payload": {"i": 2}}]
            proc.send_signal(signum)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()


def test_tail_follow_from_an_id_prints_everything_after_it(server: EmbeddedServer, uid: str) -> None:
    ids = _publish(server, uid, [{"i": i} for i in range(5)])
    with subprocess.Popen([sys.executable, "-m", "fastworker", "tail", uid, "--follow", "--from", ids[1],
                           "--count", "2", "--redis-url", server.url], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        try:
            lines = LineReader(proc)
            assert [orjson.loads(lines.next())["id"] for _ in range(4)] == ids[1:]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_progress_without_a_terminal_is_one_final_line() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress(1000)
    progress(2000)
    progress.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and "published 2,000 entries (" in text and "\x1b[" not in text


def test_publish_json_null_is_a_document(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                         rc: redis.Redis, uid: str) -> None:
    code, _, _ = _cli(capsys, server, "publish", uid, "--json", " null ")
    assert code == ExitCode.OK
    assert [fields for _, fields in rc.xrange(uid)] == [{b"data": b"null"}]
