"""The fleet supervisor: spreads consumer names over worker processes and keeps them running.

Each worker is a `multiprocessing` process of the spawn context whose target runs a `Worker` for a fixed shard of
consumer names on its own uvloop. No helper process is involved (aiomultiprocess's Process needed its manager
process for every start, so a killed manager stopped every restart). The supervisor watches each child's exit
sentinel (no polling) and restarts a dead child under the same names after a backoff, so that it resumes its own
pending entries at once.

Deaths are judged by whether the child had become ready (connected, groups checked, loops running). A child that
dies after that (an OOM kill, an operator's SIGKILL, a crash in a handler) is restarted with a per-slot backoff that
grows while it keeps dying (capped, jittered) and starts over once a child has stayed up STABLE_AFTER_S. A child
that dies before it was ready (the import, the config, a failing start-up hook) by its own failure, or that
cannot be started at all, is a crash (one killed from outside by SIGKILL or SIGTERM while it waits for the server is
not): crash_loop_restarts of those within crash_loop_window_s stop the fleet with CRASH_LOOP, leaving the decision
to systemd or Kubernetes. Each death is logged once, with its exit code or signal.

Signals (the rule of `fastworker.signals`): the first SIGTERM or SIGINT makes the supervisor tell every child to
drain, over the child's pipe, and the children drain within shutdown_grace_s; the supervisor SIGKILLs stragglers
after that. A later signal tells them to leave at once. The supervisor's orders are messages, not signals, so they
never count as a child's second signal: a terminal's Ctrl-C, `timeout` or systemd's KillMode=control-group signal
every process of the group at once, and a child that got the group's signal and then its supervisor's order still
drains. Children ignore SIGINT (the terminal's, for the whole group: only the supervisor decides), drain on
SIGTERM (an operator's, or the group's) and get PR_SET_PDEATHSIG, so they drain and exit when the supervisor is
SIGKILLed; a second, later SIGTERM makes a child leave at once.

Exit code after a stop: 0 when every child drained and exited 0; 130 (INTERRUPTED) when a later signal cut the
drain short, the supervisor's or a child's own; 1 (FAILURE) when a child ended otherwise (killed after the grace
period, died while draining). A crash loop is 7, whatever happened after.

Each child reports over its pipe: once when ready, then a heartbeat with its counters and what it is doing (for
`fastworker inspect`) every second, or why it could not start. That feeds readiness (systemd READY=1, /readyz),
liveness (/healthz: every child alive, ready and its loop turning), /metrics and /inspect. A start-up failure is
logged with the death it caused, its traceback only the first time it is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

import uvloop

from fastworker import logs
from fastworker.app import App, load_app
from fastworker.config import Settings
from fastworker.edge.streams import Streams
from fastworker.errors import CrashLoop, ExitCode, FastworkerError
from fastworker.logs import plural
from fastworker.monitor import Monitor
from fastworker.permissions import check_permissions
from fastworker.policy import backoff_s, shard
from fastworker.proc import describe_exit, die_with_parent, set_process_name
from fastworker.signals import StopSignals
from fastworker.worker import StartupFailed, Worker, serve

# Exit codes of a process stopped by a signal someone sent it (negative: multiprocessing's convention).
OUTSIDE_KILLS = frozenset({-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP})

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STALE_AFTER_S = 10.0  # a child whose loop has not reported for this long is not healthy
KILL_MARGIN_S = 5.0  # after the grace, how long before stragglers are SIGKILLed
RESTART_BASE_S = 0.2  # first restart delay of a slot (jittered: half to all of it), doubling while it keeps dying
RESTART_CAP_S = 5.0  # the longest restart delay
STABLE_AFTER_S = 30.0  # a child that stayed up this long since it was ready resets its slot's restart delay

_SPAWN = multiprocessing.get_context("spawn")
STARTING_BLOCKED = {signal.SIGINT, signal.SIGTERM}  # held back from a worker process until its handlers are set


@dataclass
class Slot:
    """One worker process position: its names are fixed, the process behind it may be replaced."""

    index: int
    names: list[str]
    process: SpawnProcess | None = None
    conn: Connection | None = None
    ready: bool = False  # the current process reported ready
    ready_at: float = 0.0  # when it reported ready
    last_beat: float = 0.0
    restarts: int = 0  # deaths since the slot last ran stable: the restart delay's exponent
    down: str | None = None  # why the slot is restarting (the last death), until its new process is ready
    timer: asyncio.TimerHandle | None = None  # the pending restart
    stats: dict[str, Any] = field(default_factory=dict)  # the current process's last report
    past: list[dict[str, Any]] = field(default_factory=list)  # last reports of the processes before it
    failure: dict[str, str] | None = None  # why the current process could not start, as it reported it

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
        self.crashes: deque[float] = deque()  # when children died before they were ready (or failed to start)
        self.restarts_total = 0
        self._stopping = False
        self._interrupted = False  # a later signal cut the drain short
        self._done: asyncio.Future[int] | None = None
        self._drain_codes: list[int | None] = []  # exit codes of the children that ended while stopping
        self._tracebacks_logged: set[str] = set()
        self.signals = StopSignals(self.stop, self._leave_now, doing="draining", ending=True)
        self.started_at = time.time()
        self.all_ready = asyncio.Event()  # set once every worker process has reported ready
        self._fail: FastworkerError | None = None
        self.on_started: list[Any] = []  # callables run once the loop is up (the HTTP server hooks in here)
        self.monitor: Monitor | None = None  # while running: its HTTP server is where hooks mount pages

    def run(self) -> int:
        """Check the server, start the fleet, and block until it has stopped; returns the exit code."""
        asyncio.run(preflight(self.app, self.settings))
        with self.signals:
            return uvloop.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self._stopping or self.signals.received is not None:  # stopped before the fleet was started
            return self._exit_code()
        for slot in self.slots:
            self._start(slot)
        self.monitor = monitor = Monitor(self, self.app, self.settings)
        await monitor.start()
        for hook in self.on_started:
            await hook(self)
        logger.info("supervisor started pid=%d processes=%d consumers=%s", os.getpid(), len(self.slots),
                    ",".join(name for slot in self.slots for name in slot.names))
        try:
            return await self._done
        finally:
            await monitor.aclose()

    # -- children -------------------------------------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        """Start the slot's process; a start that fails for any reason is a crash before ready."""
        slot.timer = None
        if self._stopping:
            return
        try:
            self._spawn(slot)
        except Exception as exc:
            self._died(slot, f"could not be started ({type(exc).__name__}: {exc})", before_ready=True,
                       exc_info=exc)

    def _spawn(self, slot: Slot) -> None:
        process, receiver = start_worker_process(self.app_ref, self.settings, slot.index, slot.names)
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(process.sentinel, self._exited, slot, process)
            loop.add_reader(receiver.fileno(), self._report, slot, receiver)
        except BaseException:
            with contextlib.suppress(Exception):
                loop.remove_reader(process.sentinel)
            process.kill()
            process.join(2)
            receiver.close()
            raise
        slot.process, slot.conn, slot.ready = process, receiver, False
        slot.last_beat = time.monotonic()
        logger.info("started worker process index=%d pid=%s consumers=%s", slot.index, process.pid,
                    ",".join(slot.names))

    def _report(self, slot: Slot, conn: Connection) -> None:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            return
        self._take(slot, kind, payload)

    def _take(self, slot: Slot, kind: str, payload: dict[str, Any], exited: bool = False) -> None:
        """One report of a child: `failed` (why it could not start), `ready`, `beat` or `final` (its counters)."""
        if kind == "failed":
            slot.failure = payload
            return
        slot.last_beat = time.monotonic()
        slot.stats = payload
        if kind != "ready" or slot.ready:
            return
        slot.ready, slot.ready_at = True, slot.last_beat  # ready, if only just before it exited: not a crash
        if exited:
            return
        slot.down = None
        if not self.all_ready.is_set() and all(s.ready for s in self.slots):
            self.all_ready.set()
            notify_systemd("READY=1")
            logger.info("%s ready", plural(len(self.slots), "worker process", "worker processes"))

    def _drain_reports(self, slot: Slot, conn: Connection) -> None:
        """Read what an exited child sent last (its ready report, its final counters) before the pipe closes."""
        with contextlib.suppress(EOFError, OSError):
            while conn.poll():
                kind, payload = conn.recv()
                self._take(slot, kind, payload, exited=True)

    def _exited(self, slot: Slot, process: SpawnProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        process.join(2)  # the sentinel fires at exit; reap it so exitcode is set
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
        was_ready, slot.ready = slot.ready, False
        failure, slot.failure = slot.failure, None
        if self._stopping:
            self._drain_codes.append(code)
            logger.log(logging.INFO if code in (0, None) else logging.WARNING,
                       "worker process index=%d pid=%s %s", slot.index, process.pid, describe_exit(code))
            if not any(s.alive for s in self.slots):
                self._finish()
            return
        if was_ready:
            uptime = time.monotonic() - slot.ready_at
            self._died(slot, f"pid={process.pid} {describe_exit(code)} after it was ready (up {uptime:.1f} s)",
                       before_ready=False, stable=uptime >= STABLE_AFTER_S)
        else:
            cause = f": {failure['reason']}" if failure else ""
            # Killed from outside (an operator, an OOM killer) while it waited for the server, say: that is not
            # the worker failing to start, so it is restarted with backoff like a ready one, never a crash loop.
            self._died(slot, f"pid={process.pid} {describe_exit(code)} before it was ready{cause}",
                       before_ready=code not in OUTSIDE_KILLS, details=(failure or {}).get("traceback") or "")

    def _died(self, slot: Slot, what: str, before_ready: bool, stable: bool = False,
              exc_info: BaseException | None = None, details: str = "") -> None:
        """One death of a slot's process (or a failed start): log it once, then restart it or give up. `details`
        (the traceback a child reported) is logged the first time it is seen only: a crash loop repeats it."""
        now = time.monotonic()
        slot.down = what
        if details in self._tracebacks_logged:
            details = ""
        elif details:
            self._tracebacks_logged.add(details)
            details = "\n" + details
        if stable:
            slot.restarts = 0
        if before_ready:
            window = self.settings.crash_loop_window_s
            self.crashes.append(now)
            while self.crashes and self.crashes[0] < now - window:
                self.crashes.popleft()
            count = f"crash {len(self.crashes)} of {self.settings.crash_loop_restarts} within {window:g} s"
            if len(self.crashes) >= self.settings.crash_loop_restarts:
                logger.error("worker process index=%d %s (%s): crash loop, giving up%s", slot.index, what, count,
                             details, exc_info=exc_info)
                cause = what.split(" before it was ready: ", 1)[1] if " before it was ready: " in what else (
                    "see the log for the cause")
                self._fail = CrashLoop(f"worker processes died {len(self.crashes)} times within {window:g} s "
                                       f"before they were ready: {cause}")
                self.stop()
                return
            what = f"{what} ({count})"
        delay = backoff_s(slot.restarts, base_s=RESTART_BASE_S, cap_s=RESTART_CAP_S)
        slot.restarts += 1
        self.restarts_total += 1
        log = logger.error if before_ready else logger.warning
        log("worker process index=%d %s; restarting in %.2f s under the same names%s", slot.index, what, delay,
            details, exc_info=exc_info)
        slot.timer = asyncio.get_running_loop().call_later(delay, self._start, slot)

    # -- stopping -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful stop: tell every child to drain, give them the grace period, then SIGKILL what is left."""
        if self._stopping:
            return
        self._stopping = True
        notify_systemd("STOPPING=1")
        for slot in self.slots:
            if slot.timer is not None:  # a pending restart: nothing more is started once stopping
                slot.timer.cancel()
                slot.timer = None
        alive = self._running()
        logger.info("stopping: draining %s (grace %g s)", plural(len(alive), "worker process", "worker processes"),
                    self.settings.shutdown_grace_s)
        for slot, process in alive:
            _order(slot, process, "stop")
        if not alive:
            self._finish()
            return
        asyncio.get_running_loop().call_later(self.settings.shutdown_grace_s + KILL_MARGIN_S, self._kill_all)

    def _kill_all(self) -> None:
        for slot, process in self._running():
            logger.warning("worker process index=%d did not drain in time; killing it", slot.index)
            process.kill()

    def _leave_now(self) -> None:
        """A later signal: every child leaves at once (what it was handling stays pending), and so do we."""
        self._stopping = self._interrupted = True
        for slot, process in self._running():
            _order(slot, process, "leave")
        self._finish()

    def _running(self) -> list[tuple[Slot, SpawnProcess]]:
        return [(slot, slot.process) for slot in self.slots if slot.process is not None and slot.alive]

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            if self._fail is not None:
                self._done.set_exception(self._fail)
            else:
                self._done.set_result(self._exit_code())

    def _exit_code(self) -> int:
        """The fleet's exit code after a stop: see the module docstring."""
        if self._interrupted or ExitCode.INTERRUPTED in self._drain_codes:
            return ExitCode.INTERRUPTED
        if any(code != 0 for code in self._drain_codes):
            return ExitCode.FAILURE
        return ExitCode.OK

    # -- health ---------------------------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        """Every child alive, ready and its loop reporting; the reason when not."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.down is not None:
                return False, f"worker process {slot.index} is restarting (not ready): {slot.down}"
            if not slot.alive:
                return False, f"worker process {slot.index} is not running"
            if not slot.ready:
                return False, f"worker process {slot.index} is starting (not ready yet)"
            if now - slot.last_beat > STALE_AFTER_S:
                return False, f"worker process {slot.index} has not reported for {now - slot.last_beat:.0f} s"
        problems = self.problems()
        return (False, problems[0]) if problems else (True, "ok")

    def problems(self) -> list[str]:
        """What keeps workers' loops from working that waiting does not cure (a settle the server refuses, a
        missing permission), as the workers last reported it."""
        return [f"worker process {slot.index}: {loop}: {reason}"
                for slot in self.slots for loop, reason in sorted(slot.stats.get("problems", {}).items())]

    def ready(self) -> bool:
        return all(slot.ready for slot in self.slots)

    def alive_count(self) -> int:
        return sum(slot.alive for slot in self.slots)

    def inspect(self) -> dict[str, Any]:
        """What the fleet is doing, from the workers' last reports: per worker process its consumers, handlers, the
        calls in flight and the recent failures (served as /inspect)."""
        now = time.monotonic()
        workers = []
        for slot in self.slots:
            process = slot.process
            state = "ready" if slot.ready else ("restarting" if slot.down else "starting")
            workers.append({
                "index": slot.index, "pid": process.pid if process is not None and slot.alive else None,
                "state": state if slot.alive or slot.down else "stopped", "down": slot.down,
                "names": slot.names, "report_age_s": round(now - slot.last_beat, 3) if slot.stats else None,
                **_inspected(slot.stats.get("inspect", {})),
            })
        return {"supervisor": {"pid": os.getpid(), "started_at": self.started_at, "stopping": self._stopping,
                               "processes": len(self.slots)},
                "workers": workers}

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


def _inspected(report: dict[str, Any]) -> dict[str, Any]:
    return {key: report.get(key, []) for key in ("consumers", "handlers", "in_flight", "recent_failures")}


def _order(slot: Slot, process: SpawnProcess, order: str) -> None:
    """Tell a child to `stop` (drain) or `leave` (at once) over its pipe: a message, never a signal, so that it
    cannot be taken for the child's second signal. A child whose pipe is gone gets the signal that means the same."""
    try:
        if slot.conn is None:
            raise OSError("no pipe")
        slot.conn.send((order, None))
    except (OSError, ValueError):
        if order == "stop":
            process.terminate()
        else:
            process.kill()


async def preflight(app: App, settings: Settings) -> None:
    """Fail fast, with one readable line, on what a fleet cannot fix by retrying: no server, wrong password."""
    streams = Streams(settings)
    try:
        await streams.ping()
        await check_permissions(streams, app, settings)  # RedisAuthError naming what the ACL denies
        pairs = [(handler.stream, handler.group) for handler in app.handlers]
        for stream, group in await streams.ensure_groups(pairs, settings.group_start_id):
            logger.info("created group %s on stream %s at id %s", group, stream, settings.group_start_id)
    finally:
        await streams.aclose()


def start_worker_process(app_ref: str, settings: Settings, index: int,
                         names: list[str]) -> tuple[SpawnProcess, Connection]:
    """Spawn worker process `index` for `names`: (the process, the supervisor's end of its pipe: reports come in,
    orders go out)."""
    ours, theirs = _SPAWN.Pipe(duplex=True)
    try:
        process = _SPAWN.Process(target=_child_main, name=f"fw-worker-{index}",
                                 args=(app_ref, settings, index, names, theirs, os.getpid()))
        # The child inherits these signals blocked (fork and exec keep the mask) until it has its handlers: a
        # Ctrl-C or a group's SIGTERM while it is still starting then waits for them instead of killing it. Here
        # they only wait for the spawn. The resource tracker is started first: starting it unblocks them.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STARTING_BLOCKED)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


def _child_main(app_ref: str, settings: Settings, index: int, names: list[str], conn: Connection,
                parent_pid: int) -> None:
    """The target of every worker process: die with the supervisor, leave Ctrl-C to it, log like it, run the
    worker on uvloop, then exit with the code it returned.

    Exits with os._exit: the interpreter's normal exit joins the handler thread pool, and a sync handler stuck past
    its timeout would keep the process alive after its drain (its entries are pending, nothing is lost). The
    SIGTERM handler stays until then: a repeat of the group's signal must never find the default action.
    """
    die_with_parent(signal.SIGTERM)  # drain, like a normal stop
    set_process_name(f"fw-worker-{index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signals = StopSignals(signals=(signal.SIGTERM,), doing="draining").install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTING_BLOCKED)  # what came while starting is handled now
    logs.configure(settings.log_level, settings.log_format)
    code: int = ExitCode.FAILURE
    try:
        if os.getppid() == parent_pid:  # else the supervisor died before the parent-death signal was set
            code = uvloop.run(worker_process(app_ref, settings, names, conn, parent_pid, signals))
        else:
            code = ExitCode.OK
    except BaseException:
        logger.exception("worker process %d failed", os.getpid())
    logging.shutdown()
    os._exit(code)


async def worker_process(app_ref: str, settings: Settings, names: list[str], conn: Connection,
                         parent_pid: int, signals: StopSignals | None = None) -> int:
    """The body of one worker process: run a Worker for `names`, take the supervisor's orders and report to it."""
    signals = signals or StopSignals(signals=(signal.SIGTERM,), doing="draining")
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), _take_order, conn, signals)
    try:
        app = load_app(app_ref)
    except FastworkerError as exc:
        _report_failure(conn, str(exc))
        return int(exc.exit_code)
    worker = Worker(app, settings, names)
    reporter = asyncio.create_task(_report_loop(worker, conn, parent_pid))
    try:
        return await serve(worker, wait_for_server=True, signals=signals)
    except StartupFailed as exc:
        _report_failure(conn, str(exc), exc.details)
        return ExitCode.FAILURE
    finally:
        reporter.cancel()
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(conn.fileno())
        with contextlib.suppress(OSError, ValueError):
            conn.send(("final", _report(worker)))


def _take_order(conn: Connection, signals: StopSignals) -> None:
    """An order of the supervisor: `stop` (drain) or `leave` (at once). Its end closing means it is gone: drain."""
    try:
        order, _ = conn.recv()
        why = "the supervisor stops the fleet"
    except (EOFError, OSError):
        asyncio.get_running_loop().remove_reader(conn.fileno())
        order, why = "stop", "the supervisor is gone"
    if order == "leave":
        logger.warning("the supervisor was signalled again: leaving at once")
        signals.request_leave()
    elif not signals.stop_requested:
        logger.info("%s: draining", why)
        signals.request_stop()


def _report_failure(conn: Connection, reason: str, details: str = "") -> None:
    """Why this process could not start, for the supervisor to log with the death (and the traceback once)."""
    try:
        conn.send(("failed", {"reason": reason, "traceback": details}))
    except (OSError, ValueError):
        logger.error("%s%s", reason, "\n" + details if details else "")


def _report(worker: Worker) -> dict[str, Any]:
    return {**worker.stats.snapshot(), "inspect": worker.inspect()}


async def _report_loop(worker: Worker, conn: Connection, parent_pid: int) -> None:
    await worker.ready.wait()
    kind = "ready"
    while True:
        if os.getppid() != parent_pid:  # PDEATHSIG's fallback: the supervisor is gone
            logger.warning("supervisor %d is gone; draining", parent_pid)
            worker.stop()
            return
        try:
            conn.send((kind, _report(worker)))
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
