"""The README's Python examples run as written, against an embedded server of their own.

Every ```python block of README.md is one of two kinds:
- an app module (it makes `app = App(...)`): saved under the name its first line gives (`# myapp.py`) and run with
  `fastworker run NAME:app`; one sample job goes to each of its handlers' streams, and each must end acknowledged,
  with nothing dead-lettered or left pending (an undefined name or a missing import would leave it failing);
- a script: run with `python`, with the README's `redis://localhost:6379/0` pointed at the test's server.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from fastworker import EmbeddedServer, ExitCode
from fastworker.demo import sample_payload

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
README_URL = "redis://localhost:6379/0"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def module_name(block: str, index: int) -> str:
    first = block.splitlines()[0]
    named = re.fullmatch(r"# (\w+)\.py", first.strip())
    return named.group(1) if named else f"readme_example_{index}"


def is_app(block: str) -> bool:
    return re.search(r"^app = App\(", block, re.MULTILINE) is not None


@pytest.fixture(scope="module")
def own_server() -> Iterator[EmbeddedServer]:
    """The examples use the README's stream names: a server of their own keeps them apart from other tests."""
    with EmbeddedServer() as server:
        yield server


def test_readme_has_python_examples_of_both_kinds() -> None:
    blocks = python_blocks()
    assert any(is_app(block) for block in blocks)
    assert any(not is_app(block) for block in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_example_runs_as_written(index: int, own_server: EmbeddedServer, tmp_path: Path) -> None:
    block = python_blocks()[index]
    name = module_name(block, index)
    (tmp_path / f"{name}.py").write_text(block.replace(README_URL, own_server.url))
    env = {"PATH": str(Path(sys.executable).parent), "REDIS_URL": own_server.url, "HOME": str(tmp_path)}
    if is_app(block):
        _run_app(name, tmp_path, env, own_server)
    else:
        done = subprocess.run([sys.executable, f"{name}.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr


def _run_app(name: str, where: Path, env: dict[str, str], server: EmbeddedServer) -> None:
    client = redis.Redis.from_url(server.url)
    log = where / "fleet.log"
    with log.open("w") as out:
        fleet = subprocess.Popen([sys.executable, "-m", "fastworker", "run", f"{name}:app", "--processes", "1",
                                  "--consumer-prefix", name], cwd=where, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        pairs = _handlers(client, name, where, env)
        for stream, _ in pairs:
            client.xadd(stream, {"data": orjson.dumps(sample_payload(stream, 0))})
        deadline = time.monotonic() + 60
        while not all(_settled(client, stream, group) for stream, group in pairs):
            assert fleet.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        fleet.send_signal(signal.SIGTERM)
        assert fleet.wait(30) == ExitCode.OK, log.read_text()
    finally:
        if fleet.poll() is None:
            fleet.kill()
        client.close()
    assert [stream for stream, _ in pairs if client.xlen(f"{stream}:dead")] == []
    assert "failed" not in log.read_text(), log.read_text()


def _handlers(client: redis.Redis, name: str, where: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    code = f"from {name} import app; print([[h.stream, h.group] for h in app.handlers])"
    done = subprocess.run([sys.executable, "-c", code], cwd=where, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    return [(stream, group) for stream, group in orjson.loads(done.stdout.replace("'", '"'))]


def _settled(client: redis.Redis, stream: str, group: str) -> bool:
    """The group has read everything and has nothing pending: the sample job was handled and acknowledged."""
    try:
        info = next(g for g in client.xinfo_groups(stream) if g["name"].decode() == group)
    except (redis.ResponseError, StopIteration):
        return False
    return bool(info["lag"] == 0 and info["pending"] == 0)
