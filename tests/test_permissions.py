"""The start-up permission check, and the documented ACL (deploy/acl/users.acl), on real servers.

The check must name what the ACL denies (exit 6, one line), change nothing on the server, and ask for exactly what
the fleet uses: users.acl's fleet user is the check's set, and the fleet runs under it with nothing refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fastworker import App, EmbeddedServer, ExitCode, Message, RedisAuthError, Settings
from fastworker.edge.streams import Streams
from fastworker.permissions import PROBE_NAME, _needs, check_permissions
from fastworker.server import free_port
from tests.conftest import RunningWorker, make_settings

REPO = Path(__file__).resolve().parent.parent
USERS_ACL = REPO / "deploy" / "acl" / "users.acl"
APP = "tests.acl_app:app"
PASSWORD = "test-password"
# redis-py greets every connection with CLIENT SETINFO (Valkey, Redis 7.2+) and ignores a refusal. users.acl cannot
# grant it, since Redis 7.0 refuses to load a file naming a subcommand it does not have.
IGNORED_REFUSALS = {("command", "client|setinfo")}


def acl_users() -> dict[str, list[str]]:
    """users.acl: each user's rules, as written."""
    users = {}
    for line in USERS_ACL.read_text().splitlines():
        if line.startswith("user "):
            _, name, *rules = line.split()
            users[name] = rules
    return users


def commands_of(rules: list[str]) -> list[str]:
    return [rule for rule in rules if rule.startswith("+")]


def refusals(r: redis.Redis) -> list[tuple[str, str, str]]:
    """What the ACL refused since the log was last reset (the harmless CLIENT SETINFO aside)."""
    entries = [(entry["reason"], entry["context"], entry["object"]) for entry in r.acl_log(count=1000)]
    return [entry for entry in entries if (entry[0], entry[2]) not in IGNORED_REFUSALS]


def fastworker(*argv: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fastworker", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def cli_env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": url, "ACL_APP_PREFIX": prefix, "PYTHONPATH": str(REPO), **extra}


def user_url(server: EmbeddedServer, user: str) -> str:
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"


def wait_until(condition: Callable[[], bool], what: str, process: subprocess.Popen[str] | None = None,
               timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the fleet exited with {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def everything_settings(url: str = "redis://localhost:6379/0") -> Settings:
    """Settings that switch on everything the fleet can do: its check covers them all."""
    return Settings(redis_url=url, http_port=9464, trim_interval_s=60)


# --- the check ----------------------------------------------------------------------------------------------------

def test_permissions_fleet_user_of_users_acl_is_what_the_check_asks() -> None:
    from tests.acl_app import app

    asked = {need.rule for need in _needs(app, everything_settings(), monitor=True)}
    assert set(commands_of(acl_users()["fastworker-fleet"])) == asked


def snapshot(r: redis.Redis, prefix: str) -> dict[str, Any]:
    """Everything a probe could change: keys and their types, and per stream its entries, groups, consumers and
    pending entries (ids, owners, delivery counts)."""
    state: dict[str, Any] = {}
    for key in sorted(r.scan_iter(match=f"{prefix}*")) + sorted(r.scan_iter(match="fw:done:*")):
        kind = r.type(key).decode()
        state[key.decode()] = kind
        if kind != "stream":
            continue
        groups = r.xinfo_groups(key)
        state[f"{key.decode()} entries"] = r.xrange(key)
        state[f"{key.decode()} groups"] = [(g["name"], g["pending"], g["last-delivered-id"], g.get("entries-read"))
                                           for g in groups]
        for group in groups:
            consumers = r.xinfo_consumers(key, group["name"])
            state[f"{key.decode()} {group['name']} consumers"] = sorted((c["name"], c["pending"]) for c in consumers)
            state[f"{key.decode()} {group['name']} pending"] = [
                (p["message_id"], p["consumer"], p["times_delivered"])
                for p in r.xpending_range(key, group["name"], "-", "+", 1000)]
    return state


def probe_app(prefix: str) -> App:
    app = App()

    @app.handler(f"{prefix}:jobs", group="g")
    async def jobs(msg: Message) -> None: ...

    @app.handler(f"{prefix}:absent", group="g", dedup=True)  # a stream that does not exist: still nothing created
    async def absent(msg: Message) -> None: ...

    return app


async def test_permissions_check_changes_nothing_on_the_server(server: EmbeddedServer, r: redis.Redis,
                                                               uid: str) -> None:
    stream = f"{uid}:jobs"
    ids = [r.xadd(stream, {"data": json.dumps({"n": n})}) for n in range(6)]
    r.xgroup_create(stream, "g", id="0")
    r.xreadgroup("g", "c1", {stream: ">"}, count=3)  # 3 pending for c1, 3 undelivered
    r.xack(stream, "g", ids[0])
    r.xadd(f"{stream}:dead", {"data": "{}"})
    before = snapshot(r, uid)
    app = probe_app(uid)
    r.execute_command("ACL", "SETUSER", f"{uid}-none", "reset", "on", f">{PASSWORD}", "+ping")  # refused all else
    for user in (None, f"{uid}-none"):
        url = user_url(server, user) if user else server.url
        streams = Streams(everything_settings(url))
        try:
            if user is None:
                await check_permissions(streams, app, everything_settings(url))
            else:
                with pytest.raises(RedisAuthError):
                    await check_permissions(streams, app, everything_settings(url))
        finally:
            await streams.aclose()
    after = snapshot(r, uid)
    assert after == before
    assert PROBE_NAME.encode() not in str(after).encode()


@pytest.mark.parametrize(("missing", "named"), [
    ("+eval", "the command EVAL (the settle script needs it); what the fleet runs inside scripts could not be checked"
              " without it"),
    ("+type", "the command TYPE on keys '{p}:data-jobs', '{p}:data-jobs:dead', '{p}:user-notifications', "
              "'{p}:user-notifications:dead' (the settle script calls it)"),
    ("+xautoclaim", "the command XAUTOCLAIM on keys '{p}:data-jobs', '{p}:user-notifications' (the reclaimer needs "
                    "it)"),
])
def test_permissions_missing_command_stops_the_fleet_with_exit_6_and_one_line(
        server: EmbeddedServer, r: redis.Redis, uid: str, missing: str, named: str) -> None:
    user = f"{uid}-app"
    rules = [rule for rule in commands_of(acl_users()["fastworker-fleet"]) if rule != missing]
    r.execute_command("ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", f"~{uid}:*", "~fw:done:*", *rules)
    done = fastworker("run", APP, "--processes", "1", env=cli_env(user_url(server, user), uid))
    assert done.returncode == ExitCode.REDIS_AUTH, done.stderr
    line = done.stderr
    assert line.startswith(f"fastworker: error: the server's ACL denies user '{user}' the command ")
    assert named.format(p=uid) in line and line.endswith("; see README 'Permissions'\n") and line.count("\n") == 1
    assert not r.exists(f"{uid}:data-jobs")  # refused before the groups were created


@pytest.mark.parametrize(("rule", "said"), [
    ("+xreadgroup", "the command XREADGROUP on keys '{uid}:jobs', '{uid}:absent' (consumers read with it)"),
    # Settle scripts go by digest: a user allowed EVAL only would have every settle refused. Said at start instead.
    ("+evalsha", "the command EVALSHA on keys '{uid}:jobs', "),
])
async def test_permissions_worker_refuses_to_start_without_a_permission(server: EmbeddedServer, r: redis.Redis,
                                                                       uid: str, rule: str, said: str) -> None:
    user = f"{uid}-app"
    rules = [granted for granted in commands_of(acl_users()["fastworker-fleet"]) if granted != rule]
    r.execute_command("ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", f"~{uid}:*", "~fw:done:*", *rules)
    settings = make_settings(server, uid, redis_url=user_url(server, user))
    with pytest.raises(RedisAuthError) as refused:
        async with RunningWorker(probe_app(uid), settings):
            pass
    assert str(refused.value).startswith(f"the server's ACL denies user '{user}' {said.format(uid=uid)}")


# --- users.acl, end to end ----------------------------------------------------------------------------------------

PREFIX = "betterbundle"
JOBS, NOTIFICATIONS, RESULTS = f"{PREFIX}:data-jobs", f"{PREFIX}:user-notifications", f"{PREFIX}:analysis-results"


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of its own, with users.acl as its ACL file and a password for each of its users."""
    with EmbeddedServer(data_dir=tmp_path / "data", options={"aclfile": str(USERS_ACL)}) as server:
        admin = redis.Redis.from_url(server.url)
        for user in acl_users():
            admin.execute_command("ACL", "SETUSER", user, f">{PASSWORD}")
        yield server


def run_fleet(server: EmbeddedServer, admin: redis.Redis, tmp_path: Path) -> None:
    """The fleet as fastworker-fleet, with every housekeeping timer on, until each has done its work."""
    admin.xgroup_create(JOBS, "data-processors", id="0", mkstream=True)
    admin.execute_command("XGROUP", "CREATECONSUMER", JOBS, "data-processors", "ghost")  # for the cleanup to remove
    for n in range(20):
        admin.xadd(JOBS, {"data": json.dumps({"job_id": f"job-{n}", "reject": n % 5 == 0})})
        admin.xadd(NOTIFICATIONS, {"data": json.dumps({"job_id": f"note-{n}"})})
    port = free_port()
    argv = [sys.executable, "-m", "fastworker", "run", APP, "--processes", "1", "--block-ms", "200",
            "--http-port", str(port), "--http-host", "127.0.0.1", "--trim-interval-s", "0.2",
            "--trim-retain-s", "0", "--dead-consumer-idle-s", "0.001"]
    with (tmp_path / "fleet.log").open("w") as log:
        fleet = subprocess.Popen(argv, env=cli_env(user_url(server, "fastworker-fleet"), PREFIX), cwd=REPO,
                                 stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        def settled() -> bool:
            groups = {g["name"]: g for stream in (JOBS, NOTIFICATIONS) for g in admin.xinfo_groups(stream)}
            return (admin.xlen(f"{JOBS}:dead") == 4 and admin.xlen(RESULTS) == 36
                    and all(g["pending"] == 0 and g["lag"] == 0 for g in groups.values()) and len(groups) == 2)

        def sampled() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return f'fastworker_stream_length{{stream="{JOBS}"}}' in response.read().decode()

        wait_until(lambda: admin.exists(NOTIFICATIONS) == 1 and settled(), "every job settled", fleet)
        wait_until(lambda: admin.xlen(JOBS) == 0, "the trim timer", fleet)
        wait_until(lambda: "ghost" not in {c["name"].decode() for c in admin.xinfo_consumers(JOBS, "data-processors")},
                   "the dead consumer cleanup", fleet)
        wait_until(sampled, "metrics sampled", fleet)
    finally:
        fleet.send_signal(signal.SIGTERM)
        code = fleet.wait(60)
    assert code == ExitCode.OK, (tmp_path / "fleet.log").read_text()


def operating_commands(admin: redis.Redis) -> list[tuple[str, list[str]]]:
    """(user, argv) of every operating command, in an order that leaves each something to do."""
    dead = [entry_id.decode() for entry_id, _ in admin.xrange(f"{JOBS}:dead")]
    results = [entry_id.decode() for entry_id, _ in admin.xrange(RESULTS)]
    return [
        ("fastworker-status", ["status"]),
        ("fastworker-status", ["status", "--app", APP, "--json"]),
        ("fastworker-health", ["health", "--app", APP]),
        ("fastworker-dlq-read", ["dlq", "list", JOBS]),
        ("fastworker-dlq-read", ["dlq", "show", JOBS, dead[0]]),
        ("fastworker-dlq", ["dlq", "list", JOBS, "--count", "1"]),
        ("fastworker-dlq", ["dlq", "show", JOBS, dead[0]]),
        ("fastworker-dlq", ["dlq", "requeue", JOBS, dead[0]]),
        ("fastworker-dlq", ["dlq", "purge", JOBS, "--yes"]),
        ("fastworker-replay", ["replay", RESULTS, "--from", results[0], "--to", results[2], "--to-stream",
                               f"{PREFIX}:replayed", "--yes"]),
        ("fastworker-replay", ["replay", JOBS, "--group", "data-processors", "--reset-to", "0", "--yes"]),
        ("fastworker-trim", ["trim", JOBS, "--retain", "1"]),
        ("fastworker-trim", ["trim", RESULTS, "--max-len", "5", "--force"]),
        ("fastworker-publish", ["publish", JOBS, "--json", '{"job_id": "published"}']),
        ("fastworker-tail", ["tail", RESULTS, "--count", "2"]),
    ]


def tail_follow(server: EmbeddedServer, admin: redis.Redis) -> None:
    """`tail --follow` as fastworker-tail: it prints the newest entry, then one added after that."""
    argv = [sys.executable, "-m", "fastworker", "tail", RESULTS, "--count", "1", "--follow"]
    follower = subprocess.Popen(argv, env=cli_env(user_url(server, "fastworker-tail"), PREFIX), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline(), follower.communicate(timeout=10)[1]  # the newest entry: it is reading
        admin.xadd(RESULTS, {"data": '{"job_id": "followed"}'})
        assert "followed" in follower.stdout.readline()  # followed from the entry it showed
    finally:
        follower.terminate()
        follower.communicate(timeout=10)


@pytest.mark.server
@pytest.mark.slow
def test_users_acl_runs_the_fleet_and_every_command_with_nothing_refused(acl_server: EmbeddedServer,
                                                                         tmp_path: Path) -> None:
    admin = redis.Redis.from_url(acl_server.url)
    admin.execute_command("ACL", "LOG", "RESET")
    run_fleet(acl_server, admin, tmp_path)
    assert refusals(admin) == []
    for user, argv in operating_commands(admin):
        done = fastworker(*argv, env=cli_env(user_url(acl_server, user), PREFIX))
        assert (done.returncode, refusals(admin)) == (ExitCode.OK, []), (user, argv, done.stderr)
    tail_follow(acl_server, admin)
    assert refusals(admin) == []
