"""Stopping the fleet as people and tools do: Ctrl-C in a terminal, `timeout`, a group-wide signal, a second one.

The rule (fastworker.signals): one stop, however many processes of the group the signal reached and however many
times it was delivered, drains; only a later signal leaves at once; the supervisor's exit code says how its workers
ended. Each test runs the real CLI in a subprocess against the session's embedded server, with a job that takes
4 s, and looks at the job, its entry and the exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fastworker import EmbeddedServer, ExitCode
from fastworker.signals import REPEAT_WINDOW_S
from tests.test_fleet import Fleet, children

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
JOB_S = 4.0
# Makes the pseudo-terminal on stdin the controlling terminal of the new session, then becomes the command: as a
# shell starts a foreground job, so that the terminal's Ctrl-C reaches the command's whole process group.
SHIM = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


class Terminal:
    """A command on a pseudo-terminal of its own: its own session, in the terminal's foreground process group."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        self.process = subprocess.Popen([sys.executable, "-c", SHIM, *argv], stdin=slave, stdout=slave,
                                        stderr=slave, env=env, cwd=REPO, start_new_session=True)
        os.close(slave)
        self._master = master
        self._output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: every process holding the terminal is gone
                return
            if not data:
                return
            self._output += data

    def type(self, keys: bytes) -> None:
        os.write(self._master, keys)

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout_s)
        self._reader.join(5)
        return code

    def output(self) -> str:
        return self._output.decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(5)
        os.close(self._master)


@pytest.fixture
def fleet(server: EmbeddedServer, uid: str, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(server, uid, tmp_path, FLEET_DELAY_S=str(JOB_S))
    yield running
    running.close()


def _argv(fleet: Fleet, *flags: str) -> list[str]:
    return ["-m", "fastworker", "run", "tests.fleet_app:app", "--consumer-prefix", fleet.prefix, "--processes", "2",
            "--block-ms", "200", *flags]


def _in_flight(fleet: Fleet, process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Wait until the one job was delivered and its handler is running (it takes JOB_S)."""
    deadline = time.monotonic() + 60
    while not _pending(fleet.client, fleet.stream, fleet.group):
        assert process.poll() is None, f"the fleet exited with {process.returncode}"
        assert time.monotonic() < deadline, "the job was never delivered"
        time.sleep(0.02)


def _pending(client: redis.Redis, stream: str, group: str) -> int:
    try:
        return int(client.xpending(stream, group)["pending"])
    except redis.ResponseError:  # the group is not there yet
        return 0


def _job_done(fleet: Fleet) -> bool:
    return fleet.client.xlen(fleet.results) == 1 and _pending(fleet.client, fleet.stream, fleet.group) == 0


def test_fleet_one_ctrl_c_in_a_terminal_drains_the_job_in_flight(fleet: Fleet) -> None:
    fleet.publish(1)
    terminal = Terminal(_argv(fleet), fleet.env)
    try:
        _in_flight(fleet, terminal.process)
        started = time.monotonic()
        terminal.type(b"\x03")  # the terminal sends SIGINT to the whole foreground group: supervisor and workers
        assert terminal.wait(60) == ExitCode.OK, terminal.output()
    finally:
        terminal.close()
    assert _job_done(fleet), terminal.output()  # the job got its result and its entry was acked
    assert time.monotonic() - started < JOB_S + 10
    output = terminal.output()
    assert "cannot reach the server" not in output
    assert "leaving at once" not in output
    assert output.count("received SIGINT: draining") == 1  # the supervisor's: the workers leave it to it


def test_fleet_group_wide_sigterm_delivered_twice_drains_like_one_sigterm(fleet: Fleet) -> None:
    # As `timeout` stops its command: SIGTERM to the command, then to its whole process group, so the supervisor
    # gets it twice and every worker once, directly, before the supervisor's own order to drain.
    fleet.publish(1)
    with fleet.log.open("w") as log:
        process = subprocess.Popen([sys.executable, *_argv(fleet)], env=fleet.env, cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, text=True)
    fleet.process = process
    _in_flight(fleet, process)
    os.kill(process.pid, signal.SIGTERM)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(60) == ExitCode.OK, fleet.output()
    assert _job_done(fleet), fleet.output()
    output = fleet.output()
    assert "leaving at once" not in output
    assert "cannot reach the server" not in output


def test_fleet_a_later_second_signal_leaves_at_once_with_130(fleet: Fleet) -> None:
    fleet.publish(1)
    process = fleet.start("--processes", "1")
    _in_flight(fleet, process)
    process.send_signal(signal.SIGTERM)
    fleet.wait(lambda: "draining 1 worker process " in fleet.output(), what="the drain to begin")
    time.sleep(REPEAT_WINDOW_S)  # a second signal counts once this much time has passed since the first
    process.send_signal(signal.SIGTERM)
    assert process.wait(JOB_S) == ExitCode.INTERRUPTED  # before the job could end
    assert _pending(fleet.client, fleet.stream, fleet.group) == 1  # left pending, recoverable
    assert fleet.client.xlen(fleet.results) == 0


def test_fleet_exit_code_is_1_when_a_worker_dies_while_draining(fleet: Fleet) -> None:
    fleet.publish(1)
    process = fleet.start("--processes", "1")
    _in_flight(fleet, process)
    [worker] = children(process.pid)
    process.send_signal(signal.SIGTERM)
    fleet.wait(lambda: "draining 1 worker process " in fleet.output(), what="the drain to begin")
    os.kill(worker, signal.SIGKILL)
    assert process.wait(30) == ExitCode.FAILURE
    assert f"worker process index=0 pid={worker} killed by SIGKILL" in fleet.output()


def test_fleet_sigterm_to_one_worker_twice_later_makes_the_fleet_exit_130(fleet: Fleet) -> None:
    # An operator's signals straight to a worker while the fleet drains: the worker leaves at once on the later one,
    # and the supervisor's exit code says so.
    fleet.publish(1)
    process = fleet.start("--processes", "1")
    _in_flight(fleet, process)
    [worker] = children(process.pid)
    process.send_signal(signal.SIGTERM)
    fleet.wait(lambda: "draining 1 worker process " in fleet.output(), what="the drain to begin")
    os.kill(worker, signal.SIGTERM)  # the worker's first signal: it is draining already
    time.sleep(REPEAT_WINDOW_S)
    os.kill(worker, signal.SIGTERM)
    assert process.wait(JOB_S) == ExitCode.INTERRUPTED
    assert _pending(fleet.client, fleet.stream, fleet.group) == 1


def test_tail_follow_signals_during_its_shutdown_are_the_same_stop(server: EmbeddedServer, uid: str) -> None:
    # `timeout -s INT` signals tail twice; Ctrl-C may repeat. Signals that land while it closes its connection
    # must neither print a traceback nor change the exit code.
    client = redis.Redis.from_url(server.url)
    client.xadd(uid, {"data": "{}"})
    client.close()
    with subprocess.Popen([sys.executable, "-m", "fastworker", "tail", uid, "--follow", "--count", "1",
                           "--redis-url", server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=REPO) as process:
        try:
            assert process.stdout is not None
            process.stdout.readline()  # following now
            burst_until = time.monotonic() + REPEAT_WINDOW_S * 0.8
            while process.poll() is None and time.monotonic() < burst_until:
                process.send_signal(signal.SIGINT)
                time.sleep(0.001)
            code = process.wait(15)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.stderr is not None
        errors = process.stderr.read().decode()
    assert code == ExitCode.OK, errors
    assert "Traceback" not in errors
