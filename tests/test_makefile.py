"""The quick start's first build: `make` checks the interpreter first and never reuses a .venv another Python made.

Runs the real Makefile in a scratch copy of the project's build files. An older Python is this interpreter with its
version changed by a sitecustomize (what `make` asks of it is its version; it never gets to build anything). No
package index is reached: pip is told there is none, so a build that gets as far as installing stops there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
OLD = "3.10.12"


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    return project


def _older_python(tmp_path: Path) -> Path:
    """An executable that runs this Python but says it is 3.10."""
    site = tmp_path / "old-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.version_info = ({OLD.replace('.', ', ')}, 'final', 0)\n")
    python = tmp_path / "python3.10"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    return python


def _make(project: Path, python: Path | str, *targets: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "MAKEFLAGS": ""}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={python}", *targets], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_refuses_an_older_python_in_one_line_before_building(tmp_path: Path) -> None:
    project = _project(tmp_path)
    python = _older_python(tmp_path)
    done = _make(project, python, "demo")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert lines == [f"fastworker needs Python 3.11 or newer; {python} is {OLD}: run make PYTHON=python3.11 "
                     "(or newer) demo"]
    assert not (project / ".venv").exists()  # nothing half-built for the next run to reuse


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_rebuilds_a_venv_another_python_made(tmp_path: Path) -> None:
    project = _project(tmp_path)
    broken = project / ".venv" / "bin"
    broken.mkdir(parents=True)
    shutil.copy(_older_python(tmp_path), broken / "python")  # what a failed build with Python 3.10 left behind
    done = _make(project, sys.executable, ".venv/.installed")
    this = ".".join(map(str, sys.version_info[:3]))
    assert f"rebuilding .venv: it was made by Python {OLD}, not {this}" in done.stdout, done.stdout + done.stderr
    rebuilt = subprocess.run([str(broken / "python"), "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True)
    assert rebuilt.stdout.strip() == this
