"""The chaos harness, short: a real fleet through worker kills, a server kill and a pause, cuts and delay
(bench/chaos.py, `make chaos-short`). Its targets are the delivery contract: nothing lost, no result twice, nothing
pending, the fleet up throughout and exiting 0 on SIGTERM, re-runs bounded by one batch per fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SHORT = ("--jobs", "20000", "--worker-kills", "3", "--server-kills", "1", "--pauses", "1", "--pause-s", "3",
         "--cuts", "2", "--delays", "1", "--delay-s", "2", "--drain-timeout-s", "60", "--seed", "7")


def test_chaos_short_run_keeps_every_target(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.chaos", *SHORT, "--work-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    failed = [f"{measure.strip()}: {value.strip()} (target {target.strip()})"
              for measure, value, target, held in rows if held.strip() == "NO"]
    assert rows, done.stdout + done.stderr
    assert failed == [], "\n".join([*failed, "", done.stdout[-6000:], done.stderr[-3000:]])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "targets: all held" in done.stdout
