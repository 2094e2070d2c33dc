"""`fastworker inspect` against a running fleet, and `fastworker check` before one runs: the real CLI in
subprocesses, on the session's embedded server."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from fastworker import EmbeddedServer, ExitCode
from fastworker.server import free_port
from tests.test_fleet import Fleet

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "check-password"


@pytest.fixture
def fleet(server: EmbeddedServer, uid: str, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(server, uid, tmp_path)
    yield running
    running.close()


def cli(fleet: Fleet, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastworker", *argv], env={**fleet.env, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def until(condition: Callable[[], Any], what: str, fleet: Fleet, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert fleet.process is None or fleet.process.poll() is None, fleet.output()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def inspected(fleet: Fleet, port: int) -> dict[str, Any]:
    """The fleet's answer; no workers while it does not answer yet (its HTTP server starts with it)."""
    done = cli(fleet, "inspect", "--http-port", str(port), "--json")
    if done.returncode == ExitCode.FAILURE and "cannot reach the fleet" in done.stderr:
        return {"workers": []}
    assert done.returncode == ExitCode.OK, done.stderr
    answer: dict[str, Any] = orjson.loads(done.stdout)
    return answer


@pytest.mark.slow
def test_inspect_shows_each_worker_process_and_the_call_in_flight(fleet: Fleet) -> None:
    [entry_id] = fleet.publish(1)
    fleet.env["FLEET_DELAY_S"] = "4"
    port = free_port()
    fleet.start("--processes", "2", "--http-port", str(port), "--http-host", "127.0.0.1")

    def call_in_flight() -> dict[str, Any] | None:
        workers = inspected(fleet, port)["workers"]
        return next((c for w in workers for c in w["in_flight"]), None) if len(workers) == 2 else None

    call = until(call_in_flight, "the call in flight", fleet)
    assert call["id"] == entry_id
    assert (call["stream"], call["handler"], call["deliveries"]) == (fleet.stream, "handle", 1)
    answer = inspected(fleet, port)
    assert [w["state"] for w in answer["workers"]] == ["ready", "ready"]
    assert answer["workers"][0]["consumers"] == [f"{fleet.prefix}-0", f"{fleet.prefix}-0.claim"]
    assert answer["workers"][1]["handlers"] == [
        {"handler": "handle", "stream": fleet.stream, "group": fleet.group, "kind": "async"}]
    table = cli(fleet, "inspect", "--http-url", f"http://127.0.0.1:{port}")
    assert table.returncode == ExitCode.OK
    assert "IN FLIGHT (1)" in table.stdout and entry_id in table.stdout
    assert f"handle ({fleet.stream}, group {fleet.group}, async)" in table.stdout
    assert fleet.stop() == ExitCode.OK


@pytest.mark.slow
def test_inspect_shows_recent_failures(fleet: Fleet) -> None:
    ids = fleet.publish(3)
    fleet.env["FLEET_REJECT_EVERY"] = "1"  # every job is rejected: dead-lettered at once
    port = free_port()
    fleet.start("--processes", "1", "--http-port", str(port), "--http-host", "127.0.0.1")

    def reported() -> list[dict[str, Any]] | None:
        failures = [f for w in inspected(fleet, port)["workers"] for f in w["recent_failures"]]
        return failures if len(failures) == 3 else None

    failures = until(reported, "the three failures to be reported", fleet)
    assert sorted(f["id"] for f in failures) == sorted(ids)
    assert {(f["handler"], f["error_class"], f["error"], f["action"]) for f in failures} == {
        ("handle", "Reject", "rejected by the test", "dead")}
    table = cli(fleet, "inspect", "--http-port", str(port))
    assert "RECENT FAILURES" in table.stdout and "Reject: rejected by the test" in table.stdout
    assert fleet.stop() == ExitCode.OK


def test_inspect_without_a_fleet_is_one_line_and_exit_1(fleet: Fleet) -> None:
    port = free_port()
    done = cli(fleet, "inspect", "--http-url", f"http://127.0.0.1:{port}")
    assert done.returncode == ExitCode.FAILURE
    assert done.stderr.startswith(f"fastworker: error: cannot reach the fleet at http://127.0.0.1:{port}/inspect: ")
    assert len(done.stderr.splitlines()) == 1


def test_inspect_without_an_address_is_a_usage_error(fleet: Fleet) -> None:
    done = cli(fleet, "inspect")
    assert done.returncode == ExitCode.USAGE
    assert "--http-url" in done.stderr and len(done.stderr.splitlines()) == 1


def test_check_prints_the_config_and_each_handler_and_writes_nothing(fleet: Fleet) -> None:
    done = cli(fleet, "check", "tests.fleet_app:app", "--processes", "3")
    assert done.returncode == ExitCode.OK, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "app          tests.fleet_app:app: 1 handler in 1 group"
    assert lines[1].startswith(f"settings     redis_url={fleet.env['REDIS_URL']} (env:REDIS_URL), processes=3 (flag)")
    assert lines[2].startswith("server       ")
    assert lines[3].startswith("permissions  user 'default' may run every command")
    assert f"  handle (async): stream {fleet.stream}, group {fleet.group}: the stream does not exist yet" in lines[5]
    assert lines[-1] == "ok: `fastworker run tests.fleet_app:app` can start with these settings"
    assert fleet.client.exists(fleet.stream) == 0  # a dry run: no group, no stream made


def test_check_names_an_existing_group_with_its_backlog(fleet: Fleet) -> None:
    fleet.publish(2)
    fleet.client.xgroup_create(fleet.stream, fleet.group, id="0")
    done = cli(fleet, "check", "tests.fleet_app:app")
    assert done.returncode == ExitCode.OK, done.stderr
    assert f"stream {fleet.stream}, group {fleet.group}: exists, 0 pending, lag 2" in done.stdout


@pytest.mark.parametrize(("argv", "env", "code", "start"), [
    (("tests.no_such_module:app",), {}, ExitCode.APP_IMPORT, "fastworker: error: cannot import module"),
    (("tests.fleet_app:app", "--handler-timeout-s", "100"), {}, ExitCode.CONFIG, "fastworker: error: "),
    (("tests.fleet_app:app",), {"REDIS_URL": "redis://127.0.0.1:1/0"}, ExitCode.REDIS_UNREACHABLE,
     "fastworker: error: cannot reach the server"),
])
def test_check_fails_with_one_line_and_the_documented_exit_code(fleet: Fleet, argv: tuple[str, ...],
                                                                 env: dict[str, str], code: int, start: str) -> None:
    done = cli(fleet, "check", *argv, **env)
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith(start)
    assert len(done.stderr.splitlines()) == 1


def test_check_names_a_permission_the_acl_denies_and_exits_6(fleet: Fleet, server: EmbeddedServer,
                                                            uid: str) -> None:
    admin = redis.Redis.from_url(server.url)
    user = f"{uid}-reader"
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", f"~{uid}:*", "+@read", "+ping",
                          "+client|id", "+client|unblock", "+eval", "+info")
    admin.close()
    done = cli(fleet, "check", "tests.fleet_app:app",
               REDIS_URL=f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0")
    assert done.returncode == ExitCode.REDIS_AUTH, done.stdout + done.stderr
    assert done.stderr.startswith(f"fastworker: error: the server's ACL denies user '{user}' ")
    assert "XGROUP CREATE" in done.stderr
    assert done.stdout.splitlines()[-1].startswith("server       ")  # how far it got
