"""`fastworker demo` as a new user runs it: its live line, its summary, and what Ctrl-C does to both.

Each test runs the real command in a subprocess (on a pseudo-terminal where the terminal matters), with the demo's
own embedded server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastworker import ExitCode
from tests.test_stopping import Terminal

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"published\s+([\d,]+)\s+acked\s+([\d,]+)\s+dead\s+([\d,]+)\s+([\d,]+) msgs/s")
CLEAR_LINE = "\x1b[2K"


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _demo(*flags: str) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FASTWORKER_", "REDIS_"))}
    return subprocess.Popen([sys.executable, "-m", "fastworker", "demo", *flags], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: carriage returns go back to the line's start, CLEAR_LINE blanks it."""
    shown = []
    for physical in raw.replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        column = 0
        for part in re.split(r"(\r|\x1b\[2K)", physical):
            if part == "\r":
                column = 0
            elif part == CLEAR_LINE:
                cells = [" "] * len(cells)
            else:  # written over what is there, from the cursor on
                cells[column:column + len(part)] = part
                column += len(part)
        shown.append("".join(cells).rstrip())
    return shown


def test_demo_interrupted_prints_an_honest_partial_summary_and_exits_130() -> None:
    demo = _demo("--jobs", "1000000", "--rate", "20000")
    assert demo.stdout is not None
    lines = []
    try:
        for line in demo.stdout:  # one progress line a second: wait for some work done
            lines.append(line)
            found = PROGRESS.search(line)
            if found and _number(found.group(2)) > 0:
                break
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    output = "".join(lines) + rest
    assert demo.returncode == ExitCode.INTERRUPTED, output
    summary = re.search(r"interrupted after ([\d.]+) s: ([\d,]+) of 1,000,000 jobs published, ([\d,]+) acked "
                        r"\(([\d,]+) msgs/s over ([\d.]+) s\), ([\d,]+) dead-lettered", output)
    assert summary is not None, output
    published, acked, rate = _number(summary.group(2)), _number(summary.group(3)), _number(summary.group(4))
    assert 0 < acked <= published < 1_000_000
    assert rate <= 40_000  # acked over the time it took, not over a fraction of a second
    assert "jobs handled in" not in output and "all settled" not in output  # no claim of a finished run
    left = re.search(r"([\d,]+) published jobs? not settled", output)
    pending = sum(int(row.split()[2]) for row in output.splitlines() if row.startswith("betterbundle:") and
                  row.split()[2].isdigit())
    assert (_number(left.group(1)) if left else 0) >= pending


def test_demo_progress_never_shows_published_behind_acked_and_ends_on_the_summary_rate() -> None:
    demo = _demo("--jobs", "30000")
    output, _ = demo.communicate(timeout=120)
    assert demo.returncode == ExitCode.OK, output
    progress = [tuple(map(_number, found.groups())) for found in map(PROGRESS.search, output.splitlines()) if found]
    assert progress
    assert all(published >= acked + dead for published, acked, dead, _ in progress), progress
    summary = re.search(r"([\d,]+) jobs handled in [\d.]+ s: ([\d,]+) msgs/s", output)
    assert summary is not None, output
    assert progress[-1][1] == _number(summary.group(1))
    assert progress[-1][3] == _number(summary.group(2))  # the same rate, counted the same way


def test_demo_warning_lines_do_not_break_the_progress_line() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FASTWORKER_", "REDIS_"))}
    terminal = Terminal(["-m", "fastworker", "demo", "--jobs", "30000", "--fail-rate", "0.02"], env)
    try:
        assert terminal.wait(120) == ExitCode.OK, terminal.output()
    finally:
        terminal.close()
    shown = screen(terminal.output())
    warnings = [line for line in shown if " WARNING " in line]
    assert warnings  # the failing jobs were logged while the progress line was up
    assert [line for line in shown if "WARNING" in line and "published" in line] == []
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in warnings)  # each log line whole, from its start


@pytest.mark.slow
def test_demo_into_head_ends_quietly() -> None:
    # `| head` goes away after two lines: the demo stops its fleet and ends with 0, no traceback, no hang.
    command = f"{sys.executable} -m fastworker demo --jobs 300 --processes 1 --fail-rate 0 | head -2; " \
              "exit ${PIPESTATUS[0]}"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr
