"""The supervisor in the test's own event loop, with real worker processes: how it counts deaths and failed starts.

The worker processes run tests.fleet_app (configured by environment, which they inherit); the spawn itself can be
replaced to fail, which is how a lost helper process or an exhausted process table shows up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fastworker import App, EmbeddedServer, Message
from fastworker import supervisor as supervisor_module
from fastworker.errors import CrashLoop, ExitCode
from fastworker.proc import describe_exit
from fastworker.supervisor import Slot, Supervisor
from tests.conftest import make_settings

pytestmark = pytest.mark.slow


class Fleet:
    """A Supervisor running in the test's loop, and a switch that makes its next process starts fail."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.task: asyncio.Task[int] | None = None
        self.spawns = 0  # process starts attempted
        self.failing = 0  # how many of the next starts fail
        self._real = supervisor_module.start_worker_process

    def start_worker_process(self, *args: Any) -> Any:
        self.spawns += 1
        if self.failing:
            self.failing -= 1
            raise OSError("spawn refused by the test")
        return self._real(*args)

    @property
    def slot(self) -> Slot:
        return self.supervisor.slots[0]

    async def until(self, condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            assert self.task is not None
            if self.task.done():
                raise AssertionError(f"the supervisor ended while waiting for {what}: {self.task!r}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    def kill_worker(self) -> int:
        process = self.slot.process
        assert process is not None and process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        return process.pid


@pytest.fixture
async def fleet(server: EmbeddedServer, uid: str, monkeypatch: pytest.MonkeyPatch,
                tmp_path: Any) -> AsyncIterator[Fleet]:
    stream, group = f"{uid}:jobs", f"{uid}-g"
    for name, value in {"FLEET_STREAM": stream, "FLEET_GROUP": group, "FLEET_RESULTS": f"{uid}:results",
                        "FLEET_CALLS_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)  # the worker processes import tests.fleet_app with these
    app = App()

    @app.handler(stream, group=group)
    async def handle(msg: Message) -> None:  # the supervisor's side only needs the app's streams and groups
        pass

    settings = make_settings(server, uid, processes=1, dead_consumer_idle_s=0, crash_loop_restarts=3,
                             crash_loop_window_s=60)
    running = Fleet(Supervisor("tests.fleet_app:app", app, settings))
    monkeypatch.setattr(supervisor_module, "start_worker_process", running.start_worker_process)
    yield running
    if running.task is not None and not running.task.done():
        running.supervisor.stop()
        await asyncio.wait({running.task}, timeout=30)
    for slot in running.supervisor.slots:
        if slot.process is not None and slot.alive:
            slot.process.kill()
            slot.process.join(5)


async def test_supervisor_retries_a_failed_respawn_and_counts_it_as_a_crash(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastworker.supervisor")
    fleet.task = asyncio.create_task(fleet.supervisor._main())
    await fleet.until(lambda: fleet.slot.ready, "the worker to be ready")
    fleet.failing = 1
    first = fleet.kill_worker()
    await fleet.until(lambda: fleet.spawns == 3 and fleet.slot.ready, "a worker started again and ready")
    assert fleet.slot.process is not None and fleet.slot.process.pid != first
    assert len(fleet.supervisor.crashes) == 1  # the failed start; the SIGKILL of a ready worker is no crash
    assert fleet.supervisor.restarts_total == 2
    assert fleet.supervisor.healthy() == (True, "ok")
    deaths = [r for r in caplog.records if "restarting in" in r.getMessage()]
    assert [r.levelno for r in deaths] == [logging.WARNING, logging.ERROR]
    assert f"pid={first} killed by SIGKILL after it was ready" in deaths[0].getMessage()
    assert "could not be started (OSError: spawn refused by the test) (crash 1 of 3 within 60 s)" \
           in deaths[1].getMessage()
    assert deaths[1].exc_info is not None  # the cause, whatever it is, is in the log
    fleet.supervisor.stop()
    assert await asyncio.wait_for(fleet.task, 30) == ExitCode.OK


async def test_supervisor_failing_respawns_end_in_a_crash_loop(fleet: Fleet,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    fleet.task = asyncio.create_task(fleet.supervisor._main())
    await fleet.until(lambda: fleet.slot.ready, "the worker to be ready")
    fleet.failing = 100
    fleet.kill_worker()
    with pytest.raises(CrashLoop, match="worker processes died 3 times within 60 s before they were ready"):
        await asyncio.wait_for(fleet.task, 60)
    assert fleet.spawns == 4  # the first start, then three failed ones: no more after giving up
    failed = [r.getMessage() for r in caplog.records if "could not be started" in r.getMessage()]
    assert len(failed) == 3  # each failed start logged once, the last one as the crash loop
    assert failed[-1].endswith("(crash 3 of 3 within 60 s): crash loop, giving up")


async def test_supervisor_stopping_cancels_a_pending_restart(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "backoff_s", lambda *args, **kwargs: 60.0)
    fleet.task = asyncio.create_task(fleet.supervisor._main())
    await fleet.until(lambda: fleet.slot.ready, "the worker to be ready")
    pid = fleet.kill_worker()
    await fleet.until(lambda: fleet.slot.timer is not None, "a restart to be scheduled")
    ok, reason = fleet.supervisor.healthy()
    assert not ok
    assert reason.startswith(f"worker process 0 is restarting (not ready): pid={pid} killed by SIGKILL after it "
                             "was ready")
    fleet.supervisor.stop()
    assert await asyncio.wait_for(fleet.task, 10) == ExitCode.OK  # nothing alive: it does not wait for the timer
    assert fleet.slot.timer is None
    fleet.supervisor._start(fleet.slot)  # even a timer that had fired already starts nothing once stopping
    assert fleet.spawns == 1


def test_describe_exit_names_the_signal_or_the_code() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(4) == "exited with code 4"
    assert describe_exit(None) == "exited (code unknown)"
