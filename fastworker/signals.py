"""Stop signals of every long-running command (`run` and its worker processes, `demo`, `tail --follow`,
`status --watch`, `fastworker.run()`): one rule, kept here.

- The first SIGTERM or SIGINT asks for a graceful stop.
- A repeat within REPEAT_WINDOW_S of the first is the same stop. One keypress or one `timeout` can deliver a signal
  to a process more than once: `timeout` signals its command and then the command's whole process group, and a
  terminal's Ctrl-C reaches every process of the foreground group, as does systemd's KillMode=control-group.
- A later one leaves at once, with exit code 130: what was in flight stays pending, so nothing is lost.

The handlers are the process's own (`signal.signal`), not an event loop's, and stay installed until the command has
returned: a signal that arrives while a loop tears down, or after it closed, follows the same rule instead of raising
KeyboardInterrupt in the middle of the teardown ("Cannot close a running event loop"). While a loop runs, the
callbacks run in it (`call_soon_threadsafe`), never inside whatever the handler interrupted; with no loop running,
the first signal is only recorded (`received`) for the command to look at, and a later one exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Any

from fastworker.errors import ExitCode

logger = logging.getLogger(__name__)

REPEAT_WINDOW_S = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _nothing() -> None:
    pass


class StopSignals:
    """The stop rule for one process: `stop` on the first signal, `leave` on a later one (None: exit at once)."""

    def __init__(self, stop: Callable[[], None] = _nothing, leave: Callable[[], None] | None = None,
                 signals: Sequence[int] = STOP_SIGNALS, doing: str = "stopping", ending: bool = False) -> None:
        self._stop = stop
        self._leave = leave
        self.signals = tuple(signals)
        self.doing = doing  # what the first signal starts, for the log line
        self.ending = ending  # the process ends when the command does (a CLI command): see restore()
        self.received: int | None = None  # the first signal, once one came
        self.first_at = 0.0
        self.left = False  # a later signal asked to leave at once
        self.stop_requested = False  # a stop came by other means (request_stop)
        self._previous: dict[int, Any] = {}

    def bind(self, stop: Callable[[], None], leave: Callable[[], None] | None) -> None:
        """Set what the signals do (when the handlers had to be installed before those existed)."""
        self._stop, self._leave = stop, leave

    def install(self) -> StopSignals:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers found at install (for code that goes on after the command: `fastworker.run()`
        from a program, the tests). For a command that ends the process (`ending`) and was stopped by a signal,
        repeats are ignored instead: the process is on its way out, and a repeat must not find Python's default
        handler (a KeyboardInterrupt traceback) or, during the interpreter's shutdown, the default action (death
        by the signal), which is all that Python leaves of a handler then."""
        ignore = self.ending and self.received is not None
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if ignore else handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.restore()

    def request_stop(self) -> None:
        """A stop asked for by other means than a signal (a supervisor's message): not counted as a signal."""
        self.stop_requested = True
        self._stop()

    def request_leave(self) -> None:
        self.left = True
        (self._leave or leave_now)()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        loop = _running_loop()
        if self.received is None:
            self.received, self.first_at = signum, now
            if loop is not None:
                loop.call_soon_threadsafe(self._first, signum)
        elif now - self.first_at < REPEAT_WINDOW_S:
            return  # the same stop, delivered twice
        elif loop is not None:
            loop.call_soon_threadsafe(self._later, signum)
        else:
            self._later(signum)  # no loop to drain in: nothing is left to wait for

    def _first(self, signum: int) -> None:
        logger.info("received %s: %s (send it again to leave at once)", signal.Signals(signum).name, self.doing)
        self._stop()

    def _later(self, signum: int) -> None:
        logger.warning("received %s again: leaving at once", signal.Signals(signum).name)
        if _running_loop() is None:
            leave_now()
        self.request_leave()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    with contextlib.suppress(RuntimeError):
        loop = asyncio.get_running_loop()
        if not loop.is_closed():
            return loop
    return None


def leave_now() -> None:
    """Exit the process at once with INTERRUPTED, after flushing what was printed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(ExitCode.INTERRUPTED)
