"""The fleet supervisor: spreads consumer names over worker processes and keeps them running.

Each worker is an aiomultiprocess `Process` (spawned, uvloop, its own asyncio loop) running a `Worker` for a fixed
shard of consumer names. Not `aiomultiprocess.Pool`: a pool never answers for a coroutine whose child was killed.
The supervisor watches each child's exit sentinel (no polling), restarts a dead child under the same names after
a short backoff (so it resumes its own pending entries at once), and gives up with CRASH_LOOP when children keep
dying, leaving the decision to systemd or Kubernetes.

Signals: the first SIGTERM/SIGINT is forwarded as SIGTERM and the children drain within shutdown_grace_s; the
supervisor SIGKILLs stragglers after that and exits 0. A second signal is forwarded too (children leave at once)
and the supervisor exits with 130. Children ignore SIGINT (a terminal's Ctrl-C reaches the whole process group;
only the supervisor decides) and get PR_SET_PDEATHSIG, so they drain and exit when the supervisor is SIGKILLed.

Each child reports over a pipe: once when ready, then a heartbeat with its counters every second. That feeds
readiness (systemd READY=1, /readyz), liveness (/healthz: every child alive and its loop turning) and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.managers import SyncManager
from typing import Any

import aiomultiprocess
import aiomultiprocess.core
import uvloop

from fastworker import logs
from fastworker.app import App, load_app
from fastworker.config import Settings
from fastworker.errors import CrashLoop, ExitCode, FastworkerError
from fastworker.monitor import Monitor
from fastworker.policy import backoff_s, shard
from fastworker.proc import die_with_parent, set_process_name
from fastworker.streams import Streams
from fastworker.worker import Worker, install_signal_handlers, serve

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STALE_AFTER_S = 10.0  # a child whose loop has not reported for this long is not healthy
KILL_MARGIN_S = 5.0  # after the grace, how long before stragglers are SIGKILLed


@dataclass
class Slot:
    """One worker process position: its names are fixed, the process behind it may be replaced."""

    index: int
    names: list[str]
    process: Any = None
    conn: Connection | None = None
    ready: bool = False
    last_beat: float = 0.0
    restarts: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # the current process's last report
    past: list[dict[str, Any]] = field(default_factory=list)  # last reports of the processes before it

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


class Supervisor:
    """Runs `app` (importable as `app_ref`) as settings.processes worker processes."""

    def __init__(self, app_ref: str, app: App, settings: Settings) -> None:
        self.app_ref = app_ref
        self.app = app
        self.settings = settings
        self.slots = [Slot(index, names)
                      for index, names in enumerate(shard(settings.consumer_names(), settings.processes))]
        self.crashes: deque[float] = deque()
        self.restarts_total = 0
        self._stopping = False
        self._done: asyncio.Future[int] | None = None
        self.all_ready = asyncio.Event()  # set once every worker process has reported ready
        self._fail: FastworkerError | None = None
        self.on_started: list[Any] = []  # callables run once the loop is up (the HTTP server hooks in here)

    def run(self) -> int:
        """Check the server, start the fleet, and block until it has stopped; returns the exit code."""
        asyncio.run(preflight(self.app, self.settings))
        _own_manager()
        return uvloop.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        install_signal_handlers(self.stop, self._leave_now)
        for slot in self.slots:
            self._spawn(slot)
        monitor = Monitor(self, self.app, self.settings)
        await monitor.start()
        for hook in self.on_started:
            await hook(self)
        logger.info("supervisor started processes=%d consumers=%s", len(self.slots),
                    ",".join(name for slot in self.slots for name in slot.names))
        try:
            return await self._done
        finally:
            await monitor.aclose()

    # -- children -------------------------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        receiver, sender = aiomultiprocess.core.get_context().Pipe(duplex=False)
        process = aiomultiprocess.Process(
            target=worker_process, args=(self.app_ref, self.settings, slot.names, sender, os.getpid()),
            name=f"fastworker-{slot.index}", initializer=_child_init, initargs=(self.settings, slot.index),
            loop_initializer=uvloop.new_event_loop, process_target=_child_main)
        process.start()
        sender.close()
        slot.process, slot.conn, slot.ready, slot.last_beat = process, receiver, False, time.monotonic()
        loop = asyncio.get_running_loop()
        loop.add_reader(process.aio_process.sentinel, self._exited, slot, process)
        loop.add_reader(receiver.fileno(), self._report, slot, receiver)
        logger.info("started worker process index=%d pid=%s consumers=%s", slot.index, process.pid,
                    ",".join(slot.names))

    def _report(self, slot: Slot, conn: Connection) -> None:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            return
        slot.last_beat = time.monotonic()
        slot.stats = payload
        if kind == "ready" and not slot.ready:
            slot.ready = True
            if not self.all_ready.is_set() and all(s.ready for s in self.slots):
                self.all_ready.set()
                notify_systemd("READY=1")
                logger.info("all %d worker processes ready", len(self.slots))

    def _drain_reports(self, slot: Slot, conn: Connection) -> None:
        """Read what an exited child sent last (its final counters) before the pipe is closed."""
        with contextlib.suppress(EOFError, OSError):
            while conn.poll():
                _, slot.stats = conn.recv()

    def _exited(self, slot: Slot, process: Any) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.aio_process.sentinel)
        process.aio_process.join(2)  # the sentinel fires at exit; reap it so exitcode is set
        code = process.exitcode
        if slot.conn is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(slot.conn.fileno())
            self._drain_reports(slot, slot.conn)
            slot.conn.close()
            slot.conn = None
        if slot.stats:
            slot.past.append(slot.stats)  # counters stay monotonic across restarts
            slot.stats = {}
        slot.ready = False
        if self._stopping:
            logger.info("worker process index=%d exited code=%s", slot.index, code)
            if not any(s.alive for s in self.slots):
                self._finish(ExitCode.OK)
            return
        self._crashed(slot, code)

    def _crashed(self, slot: Slot, code: int | None) -> None:
        now = time.monotonic()
        window = self.settings.crash_loop_window_s
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - window:
            self.crashes.popleft()
        if len(self.crashes) >= self.settings.crash_loop_restarts:
            logger.error("crash loop: %d worker exits within %.0f s (last code=%s); giving up",
                         len(self.crashes), window, code)
            self._fail = CrashLoop(f"worker processes died {len(self.crashes)} times within {window:g} s; "
                                   "see the log for the cause")
            self.stop()
            return
        delay = backoff_s(slot.restarts, base_s=0.2, cap_s=5.0)
        slot.restarts += 1
        self.restarts_total += 1
        logger.warning("worker process index=%d died code=%s; restarting in %.2f s under the same names",
                       slot.index, code, delay)
        asyncio.get_running_loop().call_later(delay, self._respawn, slot)

    def _respawn(self, slot: Slot) -> None:
        if not self._stopping:
            self._spawn(slot)

    # -- stopping -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful stop: forward SIGTERM, give the children the grace period, then SIGKILL what is left."""
        if self._stopping:
            return
        self._stopping = True
        notify_systemd("STOPPING=1")
        alive = [slot for slot in self.slots if slot.alive]
        logger.info("stopping: draining %d worker processes (grace %.0f s)", len(alive),
                    self.settings.shutdown_grace_s)
        for slot in alive:
            slot.process.terminate()
        if not alive:
            self._finish(ExitCode.OK)
            return
        asyncio.get_running_loop().call_later(self.settings.shutdown_grace_s + KILL_MARGIN_S, self._kill_all)

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.alive:
                logger.warning("worker process index=%d did not drain in time; killing it", slot.index)
                slot.process.kill()

    def _leave_now(self) -> None:
        for slot in self.slots:
            if slot.alive:
                slot.process.terminate()  # the child's second signal: it leaves at once
        if self._done is not None and not self._done.done():
            self._done.set_result(ExitCode.INTERRUPTED)

    def _finish(self, code: int) -> None:
        if self._done is not None and not self._done.done():
            if self._fail is not None:
                self._done.set_exception(self._fail)
            else:
                self._done.set_result(code)

    # -- health ---------------------------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        """Every child alive and its loop reporting; the reason when not."""
        now = time.monotonic()
        for slot in self.slots:
            if not slot.alive:
                return False, f"worker process {slot.index} is not running"
            if now - slot.last_beat > STALE_AFTER_S:
                return False, f"worker process {slot.index} has not reported for {now - slot.last_beat:.0f} s"
        return True, "ok"

    def ready(self) -> bool:
        return all(slot.ready for slot in self.slots)

    def alive_count(self) -> int:
        return sum(slot.alive for slot in self.slots)

    def reports(self) -> list[dict[str, Any]]:
        """Every counter report there is: current processes and the ones they replaced."""
        return [report for slot in self.slots for report in (*slot.past, slot.stats) if report]

    def totals(self) -> dict[tuple[str, str, str], int]:
        """(stream, group, outcome) -> count, over every worker process this supervisor ran."""
        totals: dict[tuple[str, str, str], int] = {}
        for report in self.reports():
            for stream, group, outcome, value in report.get("counts", ()):
                totals[stream, group, outcome] = totals.get((stream, group, outcome), 0) + value
        return totals


async def preflight(app: App, settings: Settings) -> None:
    """Fail fast, with one readable line, on what a fleet cannot fix by retrying: no server, wrong password."""
    streams = Streams(settings)
    try:
        await streams.ping()
        pairs = [(handler.stream, handler.group) for handler in app.handlers]
        for stream, group in await streams.ensure_groups(pairs, settings.group_start_id):
            logger.info("created group %s on stream %s at id %s", group, stream, settings.group_start_id)
    finally:
        await streams.aclose()


def _own_manager() -> None:
    """Start aiomultiprocess's manager process ourselves, with the parent-death signal set, so that even a
    SIGKILLed supervisor leaves no process behind (the library's own would outlive it)."""
    if aiomultiprocess.core._manager is None:
        sync = SyncManager(ctx=aiomultiprocess.core.get_context())
        sync.start(initializer=_manager_init)
        aiomultiprocess.core._manager = sync


def _manager_init() -> None:
    die_with_parent(signal.SIGKILL)
    set_process_name("fw-manager")


def _child_init(settings: Settings, index: int) -> None:
    """Runs first in every worker process: die with the supervisor, leave Ctrl-C to it, log like it."""
    die_with_parent(signal.SIGTERM)  # drain, like a normal stop
    set_process_name(f"fw-worker-{index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(settings.log_level, settings.log_format)


def _child_main(unit: Any) -> None:
    """aiomultiprocess process target: run the coroutine, then exit with the code it returned.

    Exits with os._exit: the interpreter's normal exit joins the handler thread pool, and a sync handler stuck past
    its timeout would keep the process alive after its drain (its entries are pending, nothing is lost).
    """
    code = aiomultiprocess.Process.run_async(unit)
    logging.shutdown()
    os._exit(code)


async def worker_process(app_ref: str, settings: Settings, names: list[str], conn: Connection,
                         parent_pid: int) -> int:
    """The body of one worker process: run a Worker for `names` and report to the supervisor."""
    try:
        app = load_app(app_ref)
    except FastworkerError as exc:
        logger.error("%s", exc)
        return int(exc.exit_code)
    worker = Worker(app, settings, names)
    reporter = asyncio.create_task(_report_loop(worker, conn, parent_pid))
    try:
        return await serve(worker, wait_for_server=True)
    finally:
        reporter.cancel()
        with contextlib.suppress(OSError, ValueError):
            conn.send(("final", worker.stats.snapshot()))


async def _report_loop(worker: Worker, conn: Connection, parent_pid: int) -> None:
    await worker.ready.wait()
    kind = "ready"
    while True:
        if os.getppid() != parent_pid:  # PDEATHSIG's fallback: the supervisor is gone
            logger.warning("supervisor %d is gone; draining", parent_pid)
            worker.stop()
            return
        try:
            conn.send((kind, worker.stats.snapshot()))
        except (OSError, ValueError):
            worker.stop()
            return
        kind = "beat"
        await asyncio.sleep(HEARTBEAT_S)


def notify_systemd(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, when systemd gave us one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logger.warning("systemd notification %s failed: %s", state, exc)
