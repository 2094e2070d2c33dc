"""The fleet as users run it: the real CLI in a subprocess, real signals, real crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from fastworker import EmbeddedServer, ExitCode
from tests.conftest import JOB

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


class Fleet:
    """One `fastworker run tests.fleet_app:app` subprocess and what it left behind."""

    def __init__(self, server: EmbeddedServer, uid: str, tmp_path: Path, **env: str) -> None:
        self.stream, self.group, self.results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
        self.prefix = uid
        self.calls_dir = tmp_path
        self.log = tmp_path / "fleet.log"
        self.client = redis.Redis.from_url(server.url)
        self.env = {**os.environ, "FLEET_STREAM": self.stream, "FLEET_GROUP": self.group,
                    "FLEET_RESULTS": self.results, "FLEET_CALLS_DIR": str(tmp_path), **env,
                    "REDIS_URL": server.url, "PYTHONPATH": str(REPO)}
        self.process: subprocess.Popen[str] | None = None

    def publish(self, n: int) -> list[str]:
        ids = []
        pipe = self.client.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd(self.stream, {"data": f'{{"job_id": "job-{i}", "shop_id": "{JOB["shop_id"]}"}}'})
            if len(pipe) == 1000:
                ids += [i.decode() for i in pipe.execute()]
        ids += [i.decode() for i in pipe.execute()]
        return ids

    def start(self, *flags: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "fastworker", "run", "tests.fleet_app:app", "--consumer-prefix", self.prefix,
                "--block-ms", "200", "--claim-interval-ms", "500", *flags]
        with self.log.open("w") as log:  # a file, not a pipe: nobody reads a pipe while the fleet runs
            self.process = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            text=True)
        return self.process

    def calls(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for path in self.calls_dir.glob("calls-*.txt"):
            counts.update(path.read_text().split())
        return counts

    def pending(self) -> int:
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def workers(self) -> list[int]:
        assert self.process is not None
        return children(self.process.pid)

    def wait(self, condition: Callable[[], bool], timeout_s: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"fleet exited with {self.process.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 40) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def output(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.client.close()


def children(pid: int, name: str = "fw-worker-") -> list[int]:
    """Live (non-zombie) worker processes whose parent is `pid`, from /proc, in worker index order."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
            fields = rest.split()
            if int(fields[1]) == pid and fields[0] != "Z" and comm.startswith(name):
                found.append((comm, int(entry.name)))
    return [pid for _, pid in sorted(found)]


def tree(pid: int) -> list[tuple[str, int, str]]:
    """(name, pid, command line) of every live child of `pid`, sorted by name."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
            fields = rest.split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append((comm, int(entry.name), cmdline))
    return sorted(found)


def helpers(pid: int) -> list[int]:
    """Children of `pid` that are not worker processes."""
    return [child for name, child, _ in tree(pid) if not name.startswith("fw-worker-")]


def working(fleet: Fleet, exclude: list[int]) -> int | None:
    """A worker process that has handled a job (so it was ready), other than `exclude`."""
    for pid in fleet.workers():
        path = fleet.calls_dir / f"calls-{pid}.txt"
        if pid not in exclude and path.exists() and path.stat().st_size > 0:
            return pid
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def fleet(server: EmbeddedServer, uid: str, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(server, uid, tmp_path)
    yield running
    running.close()


def test_fleet_two_processes_handle_every_entry(fleet: Fleet) -> None:
    n = 50_000
    fleet.publish(n)
    fleet.start("--processes", "2", "--batch-size", "500")
    fleet.wait(lambda: fleet.client.xlen(fleet.results) >= n, what="every result")
    assert fleet.stop() == ExitCode.OK
    calls = fleet.calls()
    assert len(calls) == n
    assert fleet.pending() == 0
    results = {fields[b"data"] for _, fields in fleet.client.xrange(fleet.results)}
    assert len(results) == n


def test_fleet_restarts_sigkilled_workers_under_the_same_names(fleet: Fleet) -> None:
    n, batch, kills = 30_000, 100, 3
    fleet.publish(n)
    fleet.env["FLEET_DELAY_S"] = "0.0002"  # slow enough that the kills land mid-run
    fleet.start("--processes", "2", "--batch-size", str(batch), "--concurrency", "1")
    fleet.wait(lambda: len(fleet.workers()) >= 2, what="two workers")
    for kill in range(kills):
        fleet.wait(lambda k=kill: sum(fleet.calls().values()) > (k + 1) * n // (kills + 2), what="progress")
        victim = fleet.workers()[kill % 2]
        os.kill(victim, signal.SIGKILL)
        fleet.wait(lambda v=victim: not alive(v) and len(fleet.workers()) >= 2, what="a replacement worker")
    fleet.wait(lambda: len(fleet.calls()) == n and fleet.pending() == 0, timeout_s=90, what="every job handled")
    assert fleet.stop() == ExitCode.OK
    calls = fleet.calls()
    lost = n - len(calls)
    duplicates = sum(calls.values()) - len(calls)
    assert lost == 0
    assert duplicates <= kills * batch
    consumers = {c["name"].decode() for c in fleet.client.xinfo_consumers(fleet.stream, fleet.group)}
    names = {f"{fleet.prefix}-0", f"{fleet.prefix}-1"}
    assert names <= consumers <= names | {f"{name}.claim" for name in names}  # no new name per restart


def test_fleet_sigterm_drains_and_acks_only_what_was_handled(fleet: Fleet) -> None:
    n = 20_000
    ids = fleet.publish(n)
    fleet.env["FLEET_DELAY_S"] = "0.0005"
    fleet.start("--processes", "2", "--batch-size", "200", "--shutdown-grace-s", "10")
    fleet.wait(lambda: sum(fleet.calls().values()) > 2_000, what="progress")
    started = time.monotonic()
    assert fleet.stop() == ExitCode.OK
    assert time.monotonic() - started < 10
    handled = set(fleet.calls())
    pending = {e["message_id"].decode() for e in fleet.client.xpending_range(fleet.stream, fleet.group, "-", "+", n)}
    delivered = {entry_id.decode() for entry_id, _ in fleet.client.xrange(fleet.stream)}
    assert delivered == set(ids)
    jobs = {entry_id.decode(): fields[b"data"] for entry_id, fields in fleet.client.xrange(fleet.stream)}
    read = int(fleet.client.xinfo_groups(fleet.stream)[0]["entries-read"])
    acked = [entry_id for entry_id in ids[:read] if entry_id not in pending]
    not_handled = [i for i in acked if jobs[i].split(b'"')[3].decode() not in handled]
    assert not_handled == []
    assert 0 < len(handled) < n


def test_fleet_workers_leave_when_the_supervisor_is_sigkilled(fleet: Fleet) -> None:
    fleet.start("--processes", "2")
    fleet.wait(lambda: len(fleet.workers()) >= 2, what="workers")
    assert fleet.process is not None
    left = fleet.workers() + helpers(fleet.process.pid)
    assert len(left) == 3  # two workers and the resource tracker
    fleet.process.kill()
    fleet.process.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in left if alive(pid)] == []


def test_fleet_sigkills_of_working_workers_are_not_a_crash_loop(fleet: Fleet) -> None:
    n, kills, batch = 8_000, 6, 50
    fleet.publish(n)
    fleet.env["FLEET_DELAY_S"] = "0.002"  # about 2 ms a job, one at a time: the kills land while they work
    fleet.start("--processes", "2", "--batch-size", str(batch), "--concurrency", "1",
                "--crash-loop-restarts", "5", "--crash-loop-window-s", "60")
    killed: list[int] = []
    first = 0.0
    for _ in range(kills):
        fleet.wait(lambda: working(fleet, killed) is not None, what="a worker that has handled a job")
        victim = working(fleet, killed)
        assert victim is not None
        assert len(fleet.calls()) < n  # still working
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        first = first or time.monotonic()
    assert time.monotonic() - first < 60  # all within the crash loop window: before, the 5th one gave exit 7
    fleet.wait(lambda: len(fleet.calls()) == n and fleet.pending() == 0, timeout_s=120, what="every job handled")
    assert fleet.stop() == ExitCode.OK
    results = {fields[b"data"] for _, fields in fleet.client.xrange(fleet.results)}
    assert n - len(results) == 0  # lost
    assert n - len(fleet.calls()) == 0
    output = fleet.output()
    assert output.count("killed by SIGKILL after it was ready") == kills
    assert "crash loop" not in output


def test_fleet_needs_no_helper_process_to_restart_workers(fleet: Fleet) -> None:
    n = 6_000
    fleet.publish(n)
    fleet.env["FLEET_DELAY_S"] = "0.002"
    fleet.start("--processes", "2", "--batch-size", "50", "--concurrency", "1")
    fleet.wait(lambda: len(fleet.workers()) >= 2, what="two workers")
    assert fleet.process is not None
    processes = tree(fleet.process.pid)
    assert [name for name, _, _ in processes if name.startswith("fw-")] == ["fw-worker-0", "fw-worker-1"]
    others = [cmdline for name, _, cmdline in processes if not name.startswith("fw-")]
    assert len(others) == 1  # no manager: the standard library's resource tracker, relaunched on demand
    assert "from multiprocessing.resource_tracker import main" in others[0]
    # Kill the one helper there is, then a working worker: the worker is replaced and the work goes on.
    (tracker,) = helpers(fleet.process.pid)
    os.kill(tracker, signal.SIGKILL)
    fleet.wait(lambda: not alive(tracker), what="the resource tracker gone")
    fleet.wait(lambda: working(fleet, []) is not None, what="a worker that has handled a job")
    victim, before = working(fleet, []), fleet.workers()
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    fleet.wait(lambda: working(fleet, before) is not None, what="a replacement worker handling jobs")
    fleet.wait(lambda: len(fleet.calls()) == n and fleet.pending() == 0, timeout_s=120, what="every job handled")
    assert fleet.stop() == ExitCode.OK
    assert "killed by SIGKILL after it was ready" in fleet.output()


def test_fleet_crash_loop_exits_with_its_code(fleet: Fleet) -> None:
    fleet.env["FLEET_CRASH_ON_START"] = "1"
    process = fleet.start("--processes", "1", "--crash-loop-restarts", "3", "--crash-loop-window-s", "60")
    assert process.wait(60) == ExitCode.CRASH_LOOP
    assert "worker processes died 3 times" in fleet.output()


def test_cli_unknown_app_is_one_line_and_exit_code(fleet: Fleet) -> None:
    done = subprocess.run([sys.executable, "-m", "fastworker", "run", "tests.no_such_module:app"],
                          check=False, capture_output=True, text=True, env=fleet.env, cwd=REPO, timeout=30)
    assert done.returncode == ExitCode.APP_IMPORT
    assert done.stderr == "fastworker: error: cannot import module 'tests.no_such_module': " \
                          "No module named 'tests.no_such_module'\n"


def test_cli_bad_flag_value_is_one_line_and_exit_code(fleet: Fleet) -> None:
    done = subprocess.run([sys.executable, "-m", "fastworker", "run", "tests.fleet_app:app", "--processes", "two"],
                          check=False, capture_output=True, text=True, env=fleet.env, cwd=REPO, timeout=30)
    assert done.returncode == ExitCode.USAGE  # a malformed command line, refused while parsing
    assert done.stderr == ("fastworker run: error: argument --processes: expected a whole number, got 'two' "
                           "(see --help)\n")


def _get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_fleet_metrics_count_what_was_sent(fleet: Fleet) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from fastworker.server import free_port

    n, every = 3_000, 10
    fleet.publish(n)
    fleet.env["FLEET_REJECT_EVERY"] = str(every)
    port = free_port()
    fleet.start("--processes", "2", "--http-port", str(port), "--http-host", "127.0.0.1",
                "--sample-interval-s", "0.2")
    fleet.wait(lambda: fleet.client.xlen(fleet.results) >= n - n // every, what="every result")
    fleet.wait(lambda: _get(port, "/readyz")[0] == 200, what="ready")

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = _get(port, "/metrics")[1]
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def outcome(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
        labels = (("group", fleet.group), ("outcome", name), ("stream", fleet.stream))
        return samples.get(("fastworker_messages_total", labels), -1)

    fleet.wait(lambda: outcome(scraped(), "acked") + outcome(scraped(), "dead") == n, timeout_s=20,
               what="reports to reach the supervisor")
    samples = scraped()
    assert fleet.stop() == ExitCode.OK
    assert outcome(samples, "received") == n
    assert outcome(samples, "acked") == n - n // every
    assert outcome(samples, "dead") == n // every
    assert samples[("fastworker_workers_alive", ())] == 2
    assert samples[("fastworker_handler_duration_seconds_count", (("group", fleet.group),
                                                                  ("stream", fleet.stream)))] == n
    assert samples[("fastworker_stream_length", (("stream", fleet.stream),))] == n


def test_fleet_health_endpoints_answer(fleet: Fleet) -> None:
    from fastworker.server import free_port

    port = free_port()
    fleet.start("--processes", "1", "--http-port", str(port), "--http-host", "127.0.0.1")
    fleet.wait(lambda: _get(port, "/healthz")[0] == 200, what="healthy")
    fleet.wait(lambda: _get(port, "/readyz")[0] == 200, what="ready")
    assert _get(port, "/nope")[0] == 404
    assert fleet.stop() == ExitCode.OK


def test_fleet_results_are_exactly_once_through_kills_and_cut_connections(fleet: Fleet) -> None:
    n, rounds = 10_000, 8
    fleet.publish(n)
    fleet.env["FLEET_DELAY_S"] = "0.001"  # about 1 ms a job, one at a time: the chaos lands mid-batch
    # A short claim idle makes the reclaimer race slow batches too: entries get handled twice, results must not.
    fleet.start("--processes", "2", "--batch-size", "50", "--claim-idle-ms", "600", "--handler-timeout-s", "0.3",
                "--claim-interval-ms", "200", "--crash-loop-restarts", "100", "--concurrency", "1")
    fleet.wait(lambda: len(fleet.workers()) >= 2, what="two workers")
    for chaos in range(rounds):
        fleet.wait(lambda c=chaos: sum(fleet.calls().values()) > (c + 1) * n // (rounds + 2), what="progress")
        if chaos % 2:
            fleet.client.client_kill_filter(_type="normal", skipme=True)  # every worker connection, mid-batch
        else:
            victim = fleet.workers()[chaos % 4 // 2]
            os.kill(victim, signal.SIGKILL)
            fleet.wait(lambda v=victim: not alive(v) and len(fleet.workers()) >= 2, what="a replacement worker")
    fleet.wait(lambda: len(fleet.calls()) == n and fleet.pending() == 0, timeout_s=120, what="every job handled")
    assert fleet.stop() == ExitCode.OK
    results = Counter(fields[b"data"] for _, fields in fleet.client.xrange(fleet.results))
    duplicates = sum(results.values()) - len(results)
    lost = n - len(results)
    assert (lost, duplicates) == (0, 0)
    assert sum(fleet.calls().values()) > n  # the chaos did make handlers run twice; the results did not double


def test_fleet_health_turns_red_while_the_server_refuses_to_settle(fleet: Fleet) -> None:
    # The dead-letter key holds a string: no batch with a dead letter can settle until an operator fixes it.
    from fastworker.server import free_port

    fleet.client.set(f"{fleet.stream}:dead", "not a stream")
    fleet.env["FLEET_REJECT_EVERY"] = "1"
    fleet.publish(5)
    port = free_port()
    fleet.start("--processes", "1", "--http-port", str(port), "--http-host", "127.0.0.1",
                "--sample-interval-s", "0.2")
    fleet.wait(lambda: _get(port, "/healthz")[0] == 503 and "WRONGTYPE" in _get(port, "/healthz")[1],
               what="health red with the reason")
    status, body = _get(port, "/readyz")
    assert status == 503 and "WRONGTYPE" in body
    assert fleet.pending() == 5  # nothing acked
    fleet.client.delete(f"{fleet.stream}:dead")
    fleet.wait(lambda: fleet.client.exists(f"{fleet.stream}:dead") and fleet.pending() == 0, timeout_s=60,
               what="the dead letters once the key is fixed")
    fleet.wait(lambda: _get(port, "/healthz")[0] == 200 and _get(port, "/readyz")[0] == 200, what="green again")
    assert fleet.stop() == ExitCode.OK
    assert fleet.client.xlen(f"{fleet.stream}:dead") == 5
    assert sum(fleet.calls().values()) == 5  # not handled again while refused


def test_fleet_workers_killed_while_the_server_is_paused_are_not_a_crash_loop(uid: str, tmp_path: Path) -> None:
    # A replacement cannot become ready while the server is stopped; killing it from outside (an operator, the OOM
    # killer) is not the worker failing to start, so it must not end the fleet as a crash loop.
    with EmbeddedServer(data_dir=tmp_path / "data") as own:
        running = Fleet(own, uid, tmp_path)
        try:
            running.publish(100)
            running.start("--processes", "1", "--crash-loop-restarts", "3", "--crash-loop-window-s", "60")
            running.wait(lambda: len(running.calls()) == 100, what="the first jobs")
            assert own.process is not None
            own.process.send_signal(signal.SIGSTOP)
            try:
                for _ in range(5):
                    running.wait(lambda: len(running.workers()) == 1, what="a worker")
                    victim = running.workers()[0]
                    os.kill(victim, signal.SIGKILL)
                    running.wait(lambda v=victim: not alive(v), what="the kill")
            finally:
                own.process.send_signal(signal.SIGCONT)
            running.publish(100)
            running.wait(lambda: running.pending() == 0 and running.client.xlen(running.results) == 200,
                         timeout_s=60, what="jobs after the pause")
            assert running.stop() == ExitCode.OK
            assert "crash loop" not in running.output()
        finally:
            running.close()
