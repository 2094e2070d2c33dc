"""What the fleet says, and how: one clear error for a start-up that cannot work, a line a minute while it works,
logs like the CLI's from `fastworker.run()`, plurals, JSON fields, one outage line per process.

The real CLI in a subprocess against the session's embedded server, except where a unit is the subject.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from fastworker import EmbeddedServer, ExitCode
from fastworker.errors import NoGroupError, RedisUnavailable
from fastworker.logs import JsonFormatter, fields_of, plural
from fastworker.outages import Outages
from tests.test_fleet import Fleet

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fleet(server: EmbeddedServer, uid: str, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(server, uid, tmp_path)
    yield running
    running.close()


@pytest.mark.slow
def test_fleet_failing_startup_hook_is_one_error_with_its_traceback_once_and_exit_7(fleet: Fleet) -> None:
    fleet.env["FLEET_CRASH_ON_START"] = "1"
    process = fleet.start("--processes", "2", "--crash-loop-restarts", "4", "--crash-loop-window-s", "60")
    assert process.wait(60) == ExitCode.CRASH_LOOP
    output = fleet.output()
    cause = "on_startup hook crash_if_asked raised RuntimeError: this worker cannot start"
    assert output.count("Traceback (most recent call last)") == 1, output
    assert 'raise RuntimeError("this worker cannot start")' in output  # the hook's own frame
    assert "fastworker/worker.py" not in output  # and not ours
    assert output.rstrip().splitlines()[-1] == (
        f"fastworker: error: worker processes died 4 times within 60 s before they were ready: {cause}")
    deaths = [line for line in output.splitlines() if "before it was ready" in line]
    assert len(deaths) == 4 and all(cause in line for line in deaths)
    assert len(output.splitlines()) < 40, output


@pytest.mark.slow
def test_fleet_run_logs_a_progress_line_every_interval(fleet: Fleet) -> None:
    # The interval is a minute; the command is run with it shortened, the rest as `fastworker run` does.
    n = 300
    fleet.publish(n)
    fleet.env["FLEET_REJECT_EVERY"] = "10"
    argv = ["run", "tests.fleet_app:app", "--consumer-prefix", fleet.prefix, "--processes", "2", "--block-ms", "200"]
    code = (f"import sys, fastworker.monitor as monitor; monitor.PROGRESS_EVERY_S = 0.5; "
            f"from fastworker.cli import main; sys.exit(main({argv!r}))")
    with fleet.log.open("w") as log:
        fleet.process = subprocess.Popen([sys.executable, "-c", code], env=fleet.env, cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT, text=True)
    line = re.compile(r"last \d+ s: rate_per_s=[\d.]+ acked=(\d+) retried=(\d+) dead=(\d+) lag=(\d+) pending=(\d+)")

    def progress() -> list[tuple[int, ...]]:
        return [tuple(map(int, found.groups())) for found in map(line.search, fleet.output().splitlines()) if found]

    fleet.wait(lambda: any(lag == 0 and pending == 0 for *_, lag, pending in progress()) and
               sum(acked + dead for acked, _, dead, _, _ in progress()) == n, what="progress lines adding up")
    assert fleet.stop() == ExitCode.OK
    lines = progress()
    assert sum(acked for acked, *_ in lines) == n - n // 10
    assert sum(dead for _, _, dead, _, _ in lines) == n // 10
    assert all(" INFO " in text for text in fleet.output().splitlines() if line.search(text))


@pytest.mark.slow
def test_run_from_code_logs_like_the_cli(fleet: Fleet) -> None:
    code = ("import sys, fastworker; from tests.fleet_app import app; "
            f"sys.exit(fastworker.run(app, fastworker.Settings(redis_url={fleet.env['REDIS_URL']!r}, "
            f"consumer_prefix={fleet.prefix!r}, block_ms=200)))")
    with fleet.log.open("w") as log:
        fleet.process = subprocess.Popen([sys.executable, "-c", code], env=fleet.env, cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT, text=True)
    fleet.wait(lambda: "worker ready" in fleet.output(), what="the worker's ready line")
    assert fleet.stop() == ExitCode.OK
    assert re.search(r"^\S+ \S+ INFO MainProcess fastworker.worker: worker ready ", fleet.output(), re.MULTILINE)


@pytest.mark.slow
def test_fleet_logs_say_one_worker_process_in_the_singular(fleet: Fleet) -> None:
    fleet.start("--processes", "1")
    fleet.wait(lambda: "ready" in fleet.output() and "1 worker process" in fleet.output(), what="ready")
    assert fleet.stop() == ExitCode.OK
    output = fleet.output()
    assert "1 worker process ready" in output
    assert "draining 1 worker process (grace 30 s)" in output
    assert "1 worker processes" not in output


@pytest.mark.slow
def test_fleet_json_logs_carry_context_as_fields(fleet: Fleet) -> None:
    fleet.start("--processes", "1", "--log-format", "json")
    fleet.wait(lambda: "ready" in fleet.output(), what="ready")
    assert fleet.stop() == ExitCode.OK
    entries = [orjson.loads(line) for line in fleet.output().splitlines() if line.startswith("{")]
    started = next(entry for entry in entries if entry["message"] == "started worker process")
    assert started["index"] == 0
    assert isinstance(started["pid"], int)
    assert started["consumers"] == f"{fleet.prefix}-0"


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("fastworker.test", logging.INFO, __file__, 1, msg, args, None)


@pytest.mark.parametrize(("msg", "args", "message", "fields"), [
    ("started worker process index=%d pid=%s", (0, 42), "started worker process", {"index": 0, "pid": 42}),
    ("consumer %s group=%s: %s", ("c-0", "g", "gone"), "consumer c-0: gone", {"group": "g"}),
    ("100%% done rate_per_s=%.1f", (2.5,), "100% done", {"rate_per_s": 2.5}),
    ("no context: %s", ("x",), "no context: x", {}),
    ("a bad %d", ("x",), "a bad %d", {}),  # logging would fail on it too: kept as it comes
])
def test_json_log_fields_come_from_key_value_pairs(msg: str, args: tuple[object, ...], message: str,
                                                    fields: dict[str, object]) -> None:
    assert fields_of(_record(msg, *args)) == (message, fields)
    entry = orjson.loads(JsonFormatter().format(_record(msg, *args)))
    assert entry["message"] == message
    assert {key: entry[key] for key in fields} == fields


def test_plural_fits_the_count() -> None:
    assert plural(1, "worker process", "worker processes") == "1 worker process"
    assert plural(2, "worker process", "worker processes") == "2 worker processes"
    assert plural(0, "retry", "retries") == "0 retries"
    assert plural(1200, "entry", "entries") == "1,200 entries"


def test_outages_one_line_per_process_for_an_unreachable_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastworker.outage")
    outages = Outages()
    down = RedisUnavailable("cannot reach the server (redis://localhost:6379/0): Connection refused")
    loops = [f"consumer host-{i} group=g{j}" for i in range(3) for j in range(2)] + ["reclaimer", "worker start-up"]
    for _ in range(3):  # every loop retries, several times
        for loop in loops:
            outages.failed(loop, down)
    for loop in loops[:-1]:
        outages.recovered(loop)
    assert [r.getMessage() for r in caplog.records] == [f"{down}; retrying with backoff"]
    outages.recovered(loops[-1])
    assert len(caplog.records) == 2
    assert caplog.records[1].levelno == logging.INFO
    assert re.fullmatch(r"the server is reachable again after \d+\.\d s", caplog.records[1].getMessage())


def test_outages_an_answered_error_stays_its_loops_own(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastworker.outage")
    outages = Outages()
    outages.failed("consumer a group=g", NoGroupError("NOGROUP no such group"))
    outages.failed("consumer b group=g", NoGroupError("NOGROUP no such group"))
    outages.recovered("consumer a group=g")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["consumer a group=g: NOGROUP no such group; retrying with backoff",
                            "consumer b group=g: NOGROUP no such group; retrying with backoff"]
    assert messages[2].startswith("consumer a group=g: recovered after ")
    assert outages.failing() == {"consumer b group=g": 1}


@pytest.mark.slow
def test_fleet_server_restart_is_one_outage_line_per_worker_process(uid: str, tmp_path: Path) -> None:
    # Four consumer loops, a reclaimer and the supervisor's timers all lose the server at once; each worker process
    # says so once, and once that it is back. (Needs consumer.py's Outage to report to fastworker.outages.)
    with EmbeddedServer(data_dir=tmp_path / "data") as own:
        fleet = Fleet(own, uid, tmp_path)
        try:
            fleet.publish(10)
            fleet.start("--processes", "2", "--consumers", "4")
            fleet.wait(lambda: fleet.client.xlen(fleet.results) == 10 and "2 worker processes ready" in fleet.output(),
                       what="the first jobs")
            own.kill()
            fleet.wait(lambda: "cannot reach the server" in fleet.output(), what="the outage to be noticed")
            own.restart()
            fleet.publish(10)
            fleet.wait(lambda: fleet.client.xlen(fleet.results) >= 10 and fleet.pending() == 0 and
                       fleet.output().count("reachable again") >= 2, what="the fleet to work again")
            assert fleet.stop() == ExitCode.OK
        finally:
            fleet.close()
    lost = [line for line in fleet.output().splitlines() if "cannot reach the server" in line and "fw-worker" in line]
    back = [line for line in fleet.output().splitlines() if "the server is reachable again" in line]
    assert len(lost) == 2, "\n".join(lost)  # one per worker process
    assert len(back) == 2 and all(" INFO " in line for line in back)


def test_outages_a_late_failure_right_after_the_end_is_the_tail_not_news(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastworker.outage")
    now = [100.0]
    outages = Outages(clock=lambda: now[0])
    down = RedisUnavailable("cannot reach the server: Connection closed by server.")
    outages.failed("consumer a", down)
    now[0] += 3
    outages.recovered("consumer a")  # the server is back
    now[0] += 1
    outages.failed("consumer b", down)  # b's connection broke in the outage; it finds out only now
    outages.recovered("consumer b")
    assert len(caplog.records) == 2  # the outage and its end: b's late failure was its tail
    now[0] += 60
    outages.failed("consumer a", down)  # a new outage, well after
    now[0] += 1
    outages.failed("consumer b", down)
    assert len(caplog.records) == 3
    outages.recovered("consumer a")
    outages.recovered("consumer b")
    now[0] += 1
    outages.failed("consumer c", down)  # a tail again, but it lasts: logged once it has
    now[0] += 12
    outages.failed("consumer c", down)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO, logging.WARNING, logging.INFO,
                                                   logging.WARNING]
