"""A new user's first hour with the `fastworker` command (issue 11): options checked at parse time, errors in the
user's words, no silent guessing, names that do not exist said so, help with defaults, confirmations for sweeping
changes, status's state and rates, quiet exits into closed pipes, terminal output and completion.

The real CLI runs in-process (`main(argv)`) against the session's embedded server, or as a subprocess where a real
pipe or terminal matters (a pseudo-terminal from `pty`).
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fastworker import EmbeddedServer, ExitCode, config
from fastworker.cli import ArgumentParser, build_parser, main
from fastworker.commands.status import measure
from fastworker.ops.inspect import GroupInfo, Snapshot, StreamInfo
from fastworker.server import free_port
from fastworker.settlement import RETRY_CONSUMER
from tests.conftest import cli

FW = [sys.executable, "-m", "fastworker"]


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment must not leak settings into the commands they run."""
    for name in list(os.environ):
        if name.startswith(("FASTWORKER_", "REDIS_")) and name != "FASTWORKER_SERVER_BIN":
            monkeypatch.delenv(name)


def parsers(parser: argparse.ArgumentParser | None = None) -> Iterator[argparse.ArgumentParser]:
    """The `fastworker` parser and every subcommand's parser, depth first."""
    parser = parser or build_parser()
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from parsers(sub)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings]


def run(*argv: str, stdin: int | None = subprocess.DEVNULL, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FW, *argv], stdin=stdin, capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **env})


def groups_read_acked(r: redis.Redis, stream: str, group: str, read: int, acked: int) -> None:
    r.xgroup_create(stream, group, id="0", mkstream=True)
    if not read:
        return
    entries = r.xreadgroup(group, "c1", {stream: ">"}, count=read)
    ids = [entry_id for _, batch in entries for entry_id, _ in batch]
    if acked:
        r.xack(stream, group, *ids[:acked])


def add(r: redis.Redis, stream: str, n: int) -> list[str]:
    return [r.xadd(stream, {"data": f'{{"n": {i}}}'}).decode() for i in range(n)]


class Terminal:
    """A command in a pseudo-terminal: what it writes, and what we type."""

    def __init__(self, *argv: str, **env: str) -> None:
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen([*FW, *argv], stdin=child, stdout=child, stderr=child, close_fds=True,
                                     env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", **env})
        os.close(child)
        self.seen = b""

    def expect(self, text: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while text.encode() not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} within {timeout_s} s; seen {self.seen[-500:]!r}")
            try:
                self.seen += os.read(self.fd, 65536)
            except OSError:  # the command ended and closed the terminal
                raise AssertionError(f"ended before {text!r}; seen {self.seen[-500:]!r}") from None
        return self.seen.decode(errors="replace")

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def wait(self, timeout_s: float = 30.0) -> int:
        """The exit code, once the command ended and everything it wrote was read."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the command ended and its side of the terminal is closed
                    break
                if not chunk:
                    break
                self.seen += chunk
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for term in opened:
        term.close()


# 1. numeric options are checked at parse time, range and unit, by one rule


@pytest.mark.parametrize("value", ["0", "-1", "0.1", "soon"])
def test_status_watch_rejects_what_is_not_a_sane_interval(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["status", "--watch", value])
    err = capsys.readouterr().err
    assert caught.value.code == ExitCode.USAGE
    assert err.startswith("fastworker status: error: argument --watch: ") and err.count("\n") == 1


def test_every_numeric_option_has_a_checked_type() -> None:
    bare = [f"{parser.prog} {action.option_strings[0]}" for parser in parsers() for action in options(parser)
            if action.type in (int, float)]
    assert bare == []


@pytest.mark.parametrize(("argv", "message"), [
    (["trim", "s", "--retain", "-1"], "argument --retain: must not be negative, got -1"),
    (["trim", "s", "--retain-s", "1m"], "argument --retain-s: expected a number of seconds, got '1m'"),
    (["dlq", "list", "s", "--count", "0"], "argument --count: must be at least 1, got 0"),
    (["health", "--max-latency-ms", "0"], "argument --max-latency-ms: must be more than 0 milliseconds, got 0"),
    (["status", "--dead-after-s", "nan"], "argument --dead-after-s: expected a number of seconds, got 'nan'"),
    (["run", "x:app", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["run", "x:app", "--block-ms", "2s"], "argument --block-ms: expected a whole number of milliseconds, got '2s'"),
    (["run", "x:app", "--http-port", "70000"], "argument --http-port: must be at most 65535, got 70000"),
    (["run", "x:app", "--log-level", "loud"], "argument --log-level: must be DEBUG, INFO, WARNING or ERROR"),
    (["demo", "--fail-rate", "1.5"], "argument --fail-rate: must be at most 1, got 1.5"),
])
def test_option_out_of_range_is_a_usage_error_naming_the_flag(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                              message: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == ExitCode.USAGE
    assert message in capsys.readouterr().err


def test_setting_from_environment_out_of_range_names_the_variable(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTWORKER_BATCH_SIZE", "0")
    code, _, err = cli(capsys, "run", "x:app", "--print-config")
    assert code == ExitCode.CONFIG
    assert err == "fastworker: error: FASTWORKER_BATCH_SIZE must be at least 1, got 0\n"


def test_hazard_names_each_setting_as_it_was_set(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTWORKER_CLAIM_IDLE_MS", "1000")
    code, _, err = cli(capsys, "run", "x:app", "--print-config", "--handler-timeout-s", "5")
    assert code == ExitCode.CONFIG
    assert err.startswith("fastworker: error: --handler-timeout-s (5) must be shorter than FASTWORKER_CLAIM_IDLE_MS")


# 2. a reader that goes away ends the command quietly


@pytest.fixture
def jobs(r: redis.Redis, uid: str) -> str:
    stream = f"{uid}:jobs"
    add(r, stream, 5)
    groups_read_acked(r, stream, "g", 5, 5)
    return stream


@pytest.mark.parametrize("argv", [
    ["run", "x:app", "--print-config"],
    ["status", "--stream", "{stream}"],
    ["status", "--json", "--stream", "{stream}"],
    ["health", "--json"],
    ["trim", "{stream}", "--dry-run"],
    ["replay", "{stream}", "--from", "-", "--to", "+"],
])
def test_output_into_a_closed_pipe_exits_0_without_a_traceback(server: EmbeddedServer, jobs: str,
                                                               argv: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as `| head` is after its line
    try:
        done = subprocess.run([*FW, *(arg.format(stream=jobs) for arg in argv), "--redis-url", server.url],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (ExitCode.OK, "")


def test_status_watch_into_head_exits_0_without_a_traceback(server: EmbeddedServer, jobs: str,
                                                            tmp_path: Path) -> None:
    script = (f"{' '.join(FW)} status --watch 0.5 --json --stream {jobs} --redis-url {server.url} 2>{tmp_path}/err "
              f"| head -1; echo \"exit ${{PIPESTATUS[0]}}\"; cat {tmp_path}/err")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False)
    first, status, *rest = done.stdout.splitlines()
    assert json.loads(first)["streams"][0]["name"] == jobs
    assert (status, rest) == ("exit 0", [])


# 3. errors in the user's words; usage errors exit 2


def test_bad_redis_port_names_redis_port(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "localhost")
    monkeypatch.setenv("REDIS_PORT", "63a79")
    code, _, err = cli(capsys, "status")
    assert code == ExitCode.CONFIG
    assert err == "fastworker: error: REDIS_PORT must be a port number (1 to 65535), got '63a79'\n"


@pytest.mark.parametrize(("how", "hint"), [
    ("flag", "check --redis-url"),
    ("FASTWORKER_REDIS_URL", "check FASTWORKER_REDIS_URL in the environment"),
    ("REDIS_URL", "check REDIS_URL in the environment"),
    ("REDIS_PORT", "check REDIS_PORT in the environment"),
])
def test_unreachable_server_says_which_setting_gave_the_url(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, how: str,
                                                            hint: str) -> None:
    port = free_port()
    argv = ["status"]
    if how == "flag":
        argv += ["--redis-url", f"redis://127.0.0.1:{port}/0"]
    else:
        monkeypatch.setenv(how, str(port) if how == "REDIS_PORT" else f"redis://127.0.0.1:{port}/0")
    code, _, err = cli(capsys, *argv)
    assert code == ExitCode.REDIS_UNREACHABLE
    assert err.startswith("fastworker: error: cannot reach the server") and err.count("\n") == 1
    assert hint in err


def test_database_out_of_range_is_one_line_naming_the_setting(capsys: pytest.CaptureFixture[str],
                                                              server: EmbeddedServer) -> None:
    code, _, err = cli(capsys, "status", "--redis-url", server.url.rsplit("/", 1)[0] + "/99")
    assert code == ExitCode.CONFIG
    assert err.startswith("fastworker: error: the server has no database 99 (") and err.count("\n") == 1
    assert err.rstrip().endswith("check --redis-url")


def test_batch_size_not_a_number_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "x:app", "--batch-size", "abc"])
    assert caught.value.code == ExitCode.USAGE
    assert "argument --batch-size: expected a whole number, got 'abc'" in capsys.readouterr().err


def test_publish_with_nothing_to_publish_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                          server: EmbeddedServer, uid: str) -> None:
    code, _, err = cli(capsys, "publish", uid, "--redis-url", server.url)
    assert code == ExitCode.USAGE
    assert err.startswith("fastworker: error: nothing to publish")


# 4. no silent guessing


def test_abbreviated_flag_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "x:app", "--batch", "100", "--print-config"])
    assert caught.value.code == ExitCode.USAGE
    assert "unrecognized arguments: --batch 100" in capsys.readouterr().err


def test_every_parser_refuses_abbreviations() -> None:
    assert [parser.prog for parser in parsers() if parser.allow_abbrev or not isinstance(parser, ArgumentParser)] == []


def test_unknown_fastworker_variable_is_warned_about_with_the_closest_name(capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTWORKER_BATCHSIZE", "100")
    code, out, err = cli(capsys, "run", "x:app", "--print-config")
    assert code == ExitCode.OK
    assert err == ("fastworker: warning: FASTWORKER_BATCHSIZE is not a fastworker setting and is ignored (did you "
                   "mean FASTWORKER_BATCH_SIZE?)\n")
    assert re.search(r"^batch_size +500 +default$", out, re.MULTILINE)


# 5. names that do not exist say so


def test_tail_of_a_missing_stream_says_so_and_exits_1(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                      uid: str) -> None:
    code, out, err = cli(capsys, "tail", f"{uid}:nosuch", "--redis-url", server.url)
    assert (code, out) == (ExitCode.FAILURE, "")
    assert err == f"fastworker: error: stream '{uid}:nosuch' does not exist\n"


def test_dlq_list_of_a_missing_stream_says_so_and_exits_1(capsys: pytest.CaptureFixture[str],
                                                          server: EmbeddedServer, uid: str) -> None:
    code, _, err = cli(capsys, "dlq", "list", f"{uid}:nosuch", "--redis-url", server.url)
    assert code == ExitCode.FAILURE
    assert err.startswith(f"fastworker: error: stream '{uid}:nosuch' does not exist")


def test_replay_of_a_missing_stream_says_so_and_exits_1(capsys: pytest.CaptureFixture[str],
                                                        server: EmbeddedServer, uid: str) -> None:
    code, _, err = cli(capsys, "replay", f"{uid}:nosuch", "--from", "-", "--to", "+", "--redis-url", server.url)
    assert code == ExitCode.FAILURE
    assert err == f"fastworker: error: stream '{uid}:nosuch' does not exist\n"


def test_dlq_list_of_an_absent_error_class_lists_the_classes_present(capsys: pytest.CaptureFixture[str],
                                                                     server: EmbeddedServer, r: redis.Redis,
                                                                     uid: str) -> None:
    stream = f"{uid}:jobs"
    for n in range(6):
        r.xadd(stream + ":dead", {"data": "{}", "fw:error_class": "ValueError" if n % 3 else "HandlerTimeout"})
    code, out, _ = cli(capsys, "dlq", "list", stream, "--error-class", "ValueEror", "--redis-url", server.url)
    assert code == ExitCode.OK
    assert out == (f"no dead letters of class ValueEror in {stream}:dead (did you mean ValueError?); classes "
                   "present: ValueError (4), HandlerTimeout (2)\n")


# 6. --help shows defaults and units, and only mentions flags the command has


def test_help_shows_defaults_and_units() -> None:
    text = {parser.prog: parser.format_help() for parser in parsers()}
    run_help = " ".join(text["fastworker run"].split())
    assert "--batch-size BATCH_SIZE entries per XREADGROUP (COUNT) and per settle pipeline (default: 500)" in run_help
    assert "--block-ms MS how long one XREADGROUP waits for new entries (BLOCK) (default: 2000 ms)" in run_help
    assert "(default: 30 s) [FASTWORKER_HANDLER_TIMEOUT_S]" in run_help
    assert "--dead-after-s S a consumer with zero pending idle longer than this many seconds is dead (default: " \
           "3600)" in " ".join(text["fastworker status"].split())


def test_every_option_with_a_default_shows_it() -> None:
    missing = []
    for parser in parsers():
        formatter = parser._get_formatter()
        for action in options(parser):
            if (action.default is not None and action.default is not False and action.default not in (
                    argparse.SUPPRESS, []) and action.help != argparse.SUPPRESS):
                shown = formatter._expand_help(action) if action.help else ""
                if "default" not in shown:
                    missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert missing == []


def _mentions(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The flags `text` names that `parser` does not have, and the settings it names by field name."""
    own = {flag for action in options(parser) for flag in action.option_strings}
    settings = [field.name for field in config.fields() if "_" in field.name]  # not `processes`: also a word
    return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) - own) + [
        name for name in settings if re.search(rf"\b{name}\b", text)]


def test_help_mentions_only_flags_the_command_has() -> None:
    wrong = []
    for parser in parsers():
        subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if subcommands:  # a list of commands: each line is about its own command
            for choice in subcommands[0]._choices_actions:
                sub = subcommands[0].choices[choice.dest]
                wrong += [f"{parser.prog} ({choice.dest}): {name}" for name in _mentions(sub, choice.help or "")]
            text = "\n".join(filter(None, [parser.description, parser.epilog]))
        else:
            text = parser.format_help()
        wrong += [f"{parser.prog}: {name}" for name in _mentions(parser, text)]
    assert wrong == []


# 7. sweeping changes ask first, refuse without a terminal, and have --dry-run


def test_trim_without_a_window_refuses_without_a_terminal(server: EmbeddedServer, r: redis.Redis, jobs: str) -> None:
    done = run("trim", jobs, "--redis-url", server.url)
    assert done.returncode == ExitCode.USAGE
    assert "refusing without confirmation" in done.stderr and "--yes" in done.stderr
    assert r.xlen(jobs) == 5


def test_trim_without_a_window_asks_on_a_terminal(server: EmbeddedServer, r: redis.Redis, jobs: str,
                                                  terminal: list[Terminal]) -> None:
    term = Terminal("trim", jobs, "--redis-url", server.url)
    terminal.append(term)
    term.expect(f"remove 5 entries of {jobs} below")
    term.expect("[y/N] ")
    term.type("y")
    assert term.wait() == ExitCode.OK
    assert "removed 5 entries" in term.seen.decode()
    assert r.xlen(jobs) == 0


def test_dlq_requeue_everything_refuses_without_a_terminal(server: EmbeddedServer, r: redis.Redis,
                                                           uid: str) -> None:
    stream = f"{uid}:jobs"
    r.xadd(stream + ":dead", {"data": "{}", "fw:error_class": "ValueError", "fw:stream": stream})
    done = run("dlq", "requeue", stream, "--redis-url", server.url)
    assert done.returncode == ExitCode.USAGE
    assert "refusing without confirmation" in done.stderr
    assert (r.xlen(stream + ":dead"), r.exists(stream)) == (1, 0)


def test_dlq_requeue_everything_not_confirmed_on_a_terminal_changes_nothing(server: EmbeddedServer, r: redis.Redis,
                                                                            uid: str,
                                                                            terminal: list[Terminal]) -> None:
    stream = f"{uid}:jobs"
    for _ in range(2):
        r.xadd(stream + ":dead", {"data": "{}", "fw:error_class": "ValueError", "fw:stream": stream})
    term = Terminal("dlq", "requeue", stream, "--redis-url", server.url)
    terminal.append(term)
    term.expect(f"requeue 2 dead letters from {stream}:dead to their source streams? [y/N] ")
    term.type("n")
    assert term.wait() == ExitCode.USAGE
    assert "not confirmed: nothing requeued" in term.seen.decode()
    assert r.xlen(stream + ":dead") == 2


def test_dlq_requeue_dry_run_lists_and_changes_nothing(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                       r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    letter = r.xadd(stream + ":dead", {"data": "{}", "fw:error_class": "ValueError", "fw:stream": stream}).decode()
    code, out, _ = cli(capsys, "dlq", "requeue", stream, "--dry-run", "--redis-url", server.url)
    assert code == ExitCode.OK
    assert out == (f"would requeue {letter} (ValueError)\n"
                   f"dry run: would requeue 1 dead letter from {stream}:dead; nothing changed\n")
    assert r.xlen(stream + ":dead") == 1


# 8. status: state, rates, and the app's streams


def test_status_state_names_what_each_consumer_is(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                  r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    add(r, stream, 3)
    groups_read_acked(r, stream, "g", 2, 0)
    r.xclaim(stream, "g", RETRY_CONSUMER, 0, [r.xpending_range(stream, "g", "-", "+", 1)[0]["message_id"]])
    r.xgroup_createconsumer(stream, "g", "host-0.claim")
    code, out, _ = cli(capsys, "status", "--stream", stream, "--redis-url", server.url)
    states = {line.split()[2]: " ".join(line.split()[5:]) for line in out.splitlines()
              if line.startswith(f"{stream}  ") and len(line.split()) > 5 and line.split()[1] == "g"
              and not line.split()[2].isdigit()}
    assert code == ExitCode.OK
    assert states == {"c1": "active", RETRY_CONSUMER: "retries waiting (1)", "host-0.claim": "reclaimer"}


def _stream(name: str, added: int | None, group: GroupInfo | None = None) -> StreamInfo:
    return StreamInfo(name, True, False, 0, None, None, None, None, None, [group] if group else [], None, 0, added)


def _group(read: int | None, pending: int) -> GroupInfo:
    return GroupInfo("g", [], pending, 0, "5-0", read, None, None, None, None, None)


def test_status_rates_are_per_second_of_server_time() -> None:
    before = Snapshot(10_000, "valkey", "9", 0, [_stream("s", 100, _group(50, 10))])
    after = Snapshot(12_000, "valkey", "9", 0, [_stream("s", 300, _group(150, 30))])
    rates = measure(before, after)
    assert rates[("s", None)] == {"added": 100.0}
    assert rates[("s", "g")] == {"read": 50.0, "acked": 40.0}  # 100 read, pending grew by 20: 80 left it


def test_status_rates_are_unknown_without_a_counter_or_when_it_went_back() -> None:
    before = Snapshot(10_000, "redis", "6.2", 0, [_stream("s", None, _group(None, 0)), _stream("t", 500)])
    after = Snapshot(11_000, "redis", "6.2", 0, [_stream("s", None, _group(None, 0)), _stream("t", 10)])
    assert measure(before, after) == {("s", None): {"added": None}, ("s", "g"): {"read": None, "acked": None},
                                      ("t", None): {"added": None}}
    assert measure(None, after)[("t", None)] == {"added": None}  # the first refresh has nothing to compare


def test_status_watch_shows_rates_between_refreshes(server: EmbeddedServer, r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    groups_read_acked(r, stream, "g", 0, 0)
    with subprocess.Popen([*FW, "status", "--watch", "0.5", "--json", "--stream", stream, "--redis-url",
                           server.url], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline())
            add(r, stream, 20)
            groups = r.xreadgroup("g", "c1", {stream: ">"}, count=20)
            r.xack(stream, "g", *[entry_id for _, batch in groups for entry_id, _ in batch][:15])
            second = json.loads(proc.stdout.readline())
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)
    assert first["streams"][0]["rates"] == {"added_per_s": None}
    rates, group_rates = second["streams"][0]["rates"], second["streams"][0]["groups"][0]["rates"]
    assert rates["added_per_s"] > 0 and group_rates["read_per_s"] > 0
    assert group_rates["acked_per_s"] == pytest.approx(group_rates["read_per_s"] * 15 / 20)


def test_status_app_includes_dead_letter_and_result_streams(capsys: pytest.CaptureFixture[str],
                                                            server: EmbeddedServer, r: redis.Redis, uid: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stream, results = f"{uid}:jobs", f"{uid}:results"
    module = f"app_{uid.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from fastworker import App
        app = App()
        app.handler({stream!r}, group="g")(lambda msg: None)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    add(r, stream + ":dead", 2)
    add(r, results, 3)
    code, out, _ = cli(capsys, "status", "--app", f"{module}:app", "--output-streams", results, "--redis-url",
                       server.url)
    kinds = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.startswith(uid)
             and line.split()[1] in ("stream", "dead-letter", "missing")}
    assert code == ExitCode.OK
    assert kinds == {stream: ["missing", "0"], f"{stream}:dead": ["dead-letter", "2"], results: ["stream", "3"]}


# 9. terminal output from rich, NO_COLOR, plain text elsewhere; completion


def test_status_on_a_terminal_is_coloured_unless_no_color(server: EmbeddedServer, r: redis.Redis, uid: str,
                                                          terminal: list[Terminal]) -> None:
    stream = f"{uid}:jobs"
    add(r, stream, 1)
    groups_read_acked(r, stream, "g", 1, 0)
    colour = re.compile(rb"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;[25];[0-9;]+)m")
    coloured = Terminal("status", "--stream", stream, "--redis-url", server.url)
    plain = Terminal("status", "--stream", stream, "--redis-url", server.url, NO_COLOR="1")
    terminal += [coloured, plain]
    assert (coloured.wait(), plain.wait()) == (ExitCode.OK, ExitCode.OK)
    assert colour.search(coloured.seen) and "active" in coloured.seen.decode()
    assert not colour.search(plain.seen) and "active" in plain.seen.decode()


def test_completion_offers_commands_and_flags(tmp_path: Path) -> None:
    answer = tmp_path / "completions"
    for line, expected in (("fastworker st", {"status"}), ("fastworker status --wa", {"--watch"})):
        done = subprocess.run([*FW], capture_output=True, text=True, timeout=60, check=False, env={
            **os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
            "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(answer)})
        assert done.returncode == 0, done.stderr
        assert set(answer.read_text().split()) == expected
