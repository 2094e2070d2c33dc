"""Failures of the server and the connection: nothing is lost, nothing spins, start-up errors are one line."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from fastworker import App, EmbeddedServer, ExitCode, Message
from tests.conftest import JOB, RunningWorker, make_settings, pending_count, publish, wait_for


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own, on a persistent data dir, for flushing and restarting."""
    with EmbeddedServer(data_dir=tmp_path / "data", appendonly=True) as srv:
        yield srv


def _results_app(stream: str, group: str, results: str, seen: list[str]) -> App:
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:
        seen.append(msg.payload["job_id"])
        msg.emit(results, {"job_id": msg.payload["job_id"], "status": "completed"})

    return app


async def test_worker_recreates_group_after_flushall(own_server: EmbeddedServer, uid: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    rc = aioredis.Redis.from_url(own_server.url)
    seen: list[str] = []
    app = _results_app(stream, group, f"{uid}:results", seen)
    async with RunningWorker(app, make_settings(own_server, uid)):
        await publish(rc, stream, [{**JOB, "job_id": f"before-{i}"} for i in range(10)])
        await wait_for(lambda: _true(len(seen) == 10), what="first jobs")
        await rc.flushall()
        await publish(rc, stream, [{**JOB, "job_id": f"after-{i}"} for i in range(10)])
        await wait_for(lambda: _true(len(seen) == 20), what="jobs published after FLUSHALL")
        assert await pending_count(rc, stream, group) == 0
    await rc.aclose()
    assert sorted(seen[10:]) == sorted(f"after-{i}" for i in range(10))
    recreations = [r for r in caplog.records if "recreated groups" in r.getMessage()]
    assert len(recreations) == 1
    assert recreations[0].levelno == logging.WARNING


async def test_server_restart_mid_run_loses_nothing(own_server: EmbeddedServer, uid: str) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    rc = aioredis.Redis.from_url(own_server.url)
    n = 20_000
    await publish(rc, stream, [{**JOB, "job_id": f"job-{i}"} for i in range(n)])
    seen: list[str] = []
    settings = make_settings(own_server, uid, batch_size=100)
    async with RunningWorker(_results_app(stream, group, results, seen), settings) as worker:
        await wait_for(lambda: _true(len(seen) > 2_000), what="a good part handled")
        own_server.restart()  # graceful: the AOF is flushed, every connection drops
        await rc.aclose()
        rc = aioredis.Redis.from_url(own_server.url)
        await wait_for(lambda: _true(len(set(seen)) == n), timeout_s=60, what="every job handled")
        await wait_for(lambda: _pending_is(rc, stream, group, 0), what="empty PEL")
    result_ids = {f[b"data"] for _, f in await rc.xrange(results)}
    await rc.aclose()
    assert len(set(seen)) == n
    assert len(result_ids) == n  # every job has a result
    # Counts come only from replies: a settlement whose reply the restart cut is not counted, though it was applied
    # (its entries are no longer pending, so they are not re-read either). In flight at once: the settlement sent
    # with the read in hand and one with each read ahead, a batch each.
    uncounted = n - worker.stats.total("acked")
    assert 0 <= uncounted <= (1 + settings.read_ahead) * settings.batch_size


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastworker", *args], check=False, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_cli_wrong_password_is_one_line_and_exit_code(tmp_path: Path) -> None:
    with EmbeddedServer(password="right") as srv:
        url = srv.url.replace(":right@", ":wrong@")
        done = _run_cli("run", "fastworker.demo:app", "--redis-url", url, "--processes", "1")
    assert done.returncode == ExitCode.REDIS_AUTH
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "refused our credentials" in done.stderr and "wrong" not in done.stderr


def test_cli_unreachable_server_is_one_line_and_exit_code() -> None:
    from fastworker.server import free_port

    done = _run_cli("run", "fastworker.demo:app", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
                    "--processes", "1")
    assert done.returncode == ExitCode.REDIS_UNREACHABLE
    assert done.stderr.startswith("fastworker: error: cannot reach the server")
    assert done.stderr.count("\n") == 1


async def _pending_is(rc: aioredis.Redis, stream: str, group: str, n: int) -> bool:
    return await pending_count(rc, stream, group) == n


async def _true(value: bool) -> bool:
    return value


def test_programmatic_run_drains_on_sigterm_and_exits_0(server: EmbeddedServer, uid: str, tmp_path: Path) -> None:
    import os
    import signal
    import time

    import redis

    stream, group = f"{uid}:jobs", f"{uid}-g"
    script = tmp_path / "one_process.py"
    script.write_text(
        "import sys\n"
        "from fastworker import App, Settings, run\n"
        "app = App()\n"
        f"app.handler({stream!r}, group={group!r})(lambda msg: None)\n"
        f"sys.exit(run(app, Settings(redis_url={server.url!r}, processes=1, consumer_prefix={uid!r})))\n")
    client = redis.Redis.from_url(server.url)
    process = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(Path.cwd())},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not _has_consumer(client, stream, group):  # it has read once: up and blocking on the stream
            assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == ExitCode.OK
        assert "Traceback" not in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()
        client.close()


def _has_consumer(client: object, stream: str, group: str) -> bool:
    import redis

    assert isinstance(client, redis.Redis)
    try:
        return bool(client.xinfo_consumers(stream, group))
    except redis.ResponseError:
        return False
