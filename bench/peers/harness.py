"""Running a peer's consumers and timing them the same way for every peer.

The consumers run in subprocesses of their own (so the measuring process does not take their CPU), each in its own
process group, which is terminated (then killed) however the run ends. The time is `time_drain`'s: from the
group's first read to the moment every entry is read and none is pending, polled from the side. A run starts on a
stream already filled with n entries and a group that has read none, and ends verified: all n read, PEL empty.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import redis

from bench.common import group_state, time_drain
from fastworker.proc import die_with_parent

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class PeerUnavailable(Exception):
    """A peer cannot run here: its optional package or tool is missing."""


class PeerFailed(RuntimeError):
    """A peer's run did not drain the stream, or left entries pending."""


def require(module: str, install: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        found = False
    if not found:
        raise PeerUnavailable(f"{module} is not installed (pip install '{install}')")


def drain_timeout_s(n: int) -> float:
    """Generous: the slowest peers do ~3,000 msgs/s on a quiet machine, and this one is shared."""
    return 60 + n / 500


def check_fresh(client: redis.Redis, stream: str, group: str, n: int) -> None:
    """The stream holds at least n entries and the group exists and has read none of them."""
    length = int(client.xlen(stream))
    if length < n:
        raise ValueError(f"{stream} holds {length} entries, fewer than n={n}: fill it first")
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: the caller made it
        client.xgroup_create(stream, group, id="0")
    read, pending = group_state(client, stream, group)
    if read or pending:
        raise ValueError(f"group {group} on {stream} already read {read} entries ({pending} pending)")


def verify(client: redis.Redis, stream: str, group: str, n: int) -> None:
    read, pending = group_state(client, stream, group)
    if read != n or pending:
        raise PeerFailed(f"after the run: entries read {read} (expected {n}), pending {pending} (expected 0)")


def drain(url: str, stream: str, group: str, n: int, argvs: list[list[str]], env: dict[str, str] | None = None,
          handshake: bool = True, stop_timeout_s: float = STOP_TIMEOUT_S) -> float:
    """Start one consumer process per argv, time the drain of the group, stop them, verify; seconds.

    With `handshake`, each consumer prints `ready` when it has imported everything and waits for a line on stdin,
    so that every consumer of the run starts reading together.
    """
    client = redis.Redis.from_url(url)
    try:
        check_fresh(client, stream, group, n)
        with tempfile.TemporaryFile() as errors:
            seconds = _timed(client, stream, group, n, argvs, env or {}, errors, handshake, stop_timeout_s)
        verify(client, stream, group, n)
        return seconds
    finally:
        client.close()


def _timed(client: redis.Redis, stream: str, group: str, n: int, argvs: list[list[str]], env: dict[str, str],
           errors: IO[bytes], handshake: bool, stop_timeout_s: float) -> float:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for argv in argvs:  # appended one by one: a failed spawn still stops those already started
            processes.append(spawn(argv, env, errors, handshake))
        if handshake:
            start_together(processes, errors)
        return time_drain(client, stream, group, n, drain_timeout_s(n),
                          alive=lambda: all(process.poll() is None for process in processes))
    except PeerFailed:
        raise
    except RuntimeError as exc:  # time_drain's: the drain stalled, timed out, or a consumer died
        raise PeerFailed(f"{exc}; consumer stderr: {tail(errors)}") from exc
    finally:
        stop(processes, stop_timeout_s)


def spawn(argv: list[str], env: dict[str, str], errors: IO[bytes], handshake: bool) -> subprocess.Popen[bytes]:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": pythonpath, **env},
        stdin=subprocess.PIPE if handshake else subprocess.DEVNULL,
        stdout=subprocess.PIPE if handshake else subprocess.DEVNULL, stderr=errors,
        # A group of its own, so that stop() reaches the children a peer's CLI forks (taskiq's workers).
        start_new_session=True, preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl()
    )


def start_together(processes: list[subprocess.Popen[bytes]], errors: IO[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for process in processes:
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise PeerFailed(f"a consumer did not get ready: {tail(errors)}")
            if select.select([process.stdout], [], [], 0.1)[0]:
                line += os.read(process.stdout.fileno(), 64) or b"\n"
        if line.strip() != b"ready":
            raise PeerFailed(f"a consumer said {line!r} instead of ready: {tail(errors)}")
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()


def stop(processes: list[subprocess.Popen[bytes]], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM each consumer's process group, SIGKILL what is left after `timeout_s`."""
    for process in processes:
        signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.info("consumer %s did not stop on SIGTERM: killing it", process.pid)
        signal_group(process, signal.SIGKILL)  # and whatever it forked that outlived it
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def tail(errors: IO[bytes], size: int = 2000) -> str:
    errors.flush()
    errors.seek(0, os.SEEK_END)
    errors.seek(max(0, errors.tell() - size))
    return errors.read().decode(errors="replace").strip() or "(empty)"


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
