"""A fault-injecting TCP proxy on loopback, for chaos runs and benchmarks: cut every connection, add delay.

Clients connect to the proxy's port instead of the server's; each connection gets its own connection upstream and
two pumps (client to server, server to client). The pumps hold at most `queue_chunks` reads of up to `chunk_bytes`
each, and a full queue stops reading (TCP backpressure), so a slow side never grows memory without bound.

Faults:
- `cut()` aborts every open connection at once, both sides, with a reset: what a failover, a NAT timeout or a
  restarted load balancer does to a client. New connections are accepted as before.
- `set_delay(to_server_s, to_client_s)` delays each direction on its own (a one-way delay); bytes keep their order.
  It applies to what is read from then on.

Two ways to run it: `FaultProxy` inside your own event loop, or `ProxyProcess`, the same proxy in a process of its
own (`python -m bench.faultproxy`, on uvloop) so that forwarding does not compete with the caller for the GIL. The
process stops by itself when its owner goes away (its stdin closes, or the kernel's parent-death signal), or after
`lifetime_s`. By hand: `python -m bench.faultproxy --upstream-port 6379 --port 7000`, then type `cut`,
`delay 0 0.05` (seconds to the server, to the client), `stats` or `stop`.

    with ProxyProcess(server_port) as proxy:     # listens on 127.0.0.1:proxy.port
        ...                                      # point the clients at proxy.port
        proxy.cut()                              # -> connections cut
        proxy.set_delay(to_client_s=0.05)        # 50 ms on every reply from now on
        proxy.stats()                            # {"accepted": .., "open": .., "cut": .., "to_server_bytes": ..}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
TIMER_TICK_S = 0.002  # the event loop's timer granularity, with a margin
PR_SET_TIMERSLACK = 29  # prctl(2)
QUEUE_CHUNKS = 16  # per direction: at most 1 MiB read ahead of what the other side has taken


@dataclass
class ProxyStats:
    accepted: int = 0
    open: int = 0
    cut: int = 0  # connections aborted by cut()
    refused: int = 0  # clients closed because the upstream did not accept (server down)
    to_server_bytes: int = 0
    to_client_bytes: int = 0


class _Pump:
    """One direction of one connection: read, hold until due, write; bounded by its queue."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: list[float],
                 counter: str, stats: ProxyStats, queue_chunks: int, chunk_bytes: int) -> None:
        self.reader, self.writer = reader, writer
        self.delay = delay  # a shared one-element list, so set_delay() reaches running pumps
        self.counter, self.stats = counter, stats
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(queue_chunks)
        self.chunk_bytes = chunk_bytes

    async def read(self) -> None:
        while data := await self.reader.read(self.chunk_bytes):
            await self.queue.put((time.monotonic() + self.delay[0], data))
        await self.queue.put((0.0, b""))  # end of stream: pass the half-close on once the queue is written

    async def write(self) -> None:
        while True:
            due, data = await self.queue.get()
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            await _until(due)
            self.writer.write(data)
            setattr(self.stats, self.counter, getattr(self.stats, self.counter) + len(data))
            await self.writer.drain()


async def _until(due: float) -> None:
    """Wait until time.monotonic() reaches `due`, to tens of microseconds, without spinning.

    The event loop's timers tick in whole milliseconds (uvloop rounds a 0.1 ms sleep to none at all, epoll rounds
    it up to 1 ms), so a sub-millisecond delay would be lost or inflated: sleep whole ticks on the loop, then the
    rest in a thread (time.sleep is a nanosleep; the process's timer slack is cut to 1 us at start). A yield-spin
    instead would hold a core whenever data is in flight: on a 2-core machine it took one from the fleet and the
    server under test, and a consumer that keeps reads in flight all the time looked no faster than one that does not.
    """
    wait = due - time.monotonic()
    if wait > TIMER_TICK_S:
        await asyncio.sleep(wait - TIMER_TICK_S)
        wait = due - time.monotonic()
    if wait > 0:
        await asyncio.get_running_loop().run_in_executor(_SLEEPERS, time.sleep, wait)


# One thread per chunk waiting out the end of its delay: bounded by the connections' queues, idle otherwise.
_SLEEPERS = ThreadPoolExecutor(max_workers=256, thread_name_prefix="fw-proxy-delay")


def _fine_timer_slack() -> None:
    """Cut this process's timer slack (50 us by default) to 1 us, so that short sleeps end when asked (Linux only;
    elsewhere the default stays)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class FaultProxy:
    """Forwards 127.0.0.1:`port` (0: any free port) to `upstream_host`:`upstream_port`, with faults on demand."""

    def __init__(self, upstream_port: int, *, port: int = 0, upstream_host: str = LOOPBACK,
                 chunk_bytes: int = CHUNK_BYTES, queue_chunks: int = QUEUE_CHUNKS) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.chunk_bytes = chunk_bytes
        self.queue_chunks = queue_chunks
        self.stats = ProxyStats()
        self._to_server_delay = [0.0]
        self._to_client_delay = [0.0]
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], tuple[asyncio.StreamWriter, ...]] = {}

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        tasks = list(self._connections)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def cut(self) -> int:
        """Abort every open connection (a reset on both sides); returns how many were cut."""
        count = 0
        for task, writers in list(self._connections.items()):
            for writer in writers:
                writer.transport.abort()
            task.cancel()
            count += 1
        self.stats.cut += count
        return count

    def set_delay(self, to_server_s: float = 0.0, to_client_s: float = 0.0) -> None:
        """Hold every chunk read from now on this long before passing it on, per direction (0: none)."""
        if to_server_s < 0 or to_client_s < 0:
            raise ValueError("a delay cannot be negative")
        self._to_server_delay[0] = to_server_s
        self._to_client_delay[0] = to_client_s

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.stats.accepted += 1
        self._connections[task] = (client_writer,)
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.stats.refused += 1
                return
            self._connections[task] = (client_writer, server_writer)
            self.stats.open += 1
            try:
                await self._pump(client_reader, client_writer, server_reader, server_writer)
            finally:
                self.stats.open -= 1
                server_writer.transport.abort()
        except asyncio.CancelledError:
            pass  # cut(): the transports are already aborted
        finally:
            client_writer.transport.abort()
            self._connections.pop(task, None)

    async def _pump(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                    server_reader: asyncio.StreamReader, server_writer: asyncio.StreamWriter) -> None:
        up = _Pump(client_reader, server_writer, self._to_server_delay, "to_server_bytes", self.stats,
                   self.queue_chunks, self.chunk_bytes)
        down = _Pump(server_reader, client_writer, self._to_client_delay, "to_client_bytes", self.stats,
                     self.queue_chunks, self.chunk_bytes)
        tasks = [asyncio.create_task(coro) for coro in (up.read(), up.write(), down.read(), down.write())]
        try:
            # Every pump done means both sides closed cleanly; an error (a reset) on either ends the connection.
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                if any(not t.cancelled() and t.exception() for t in done):
                    return
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class ProxyProcess:
    """A FaultProxy in a process of its own (`python -m bench.faultproxy`), driven over its stdin and stdout.

    Use as a context manager, or start() / close(). The process ends when told to, when its stdin closes (the owner
    went away), when the owner dies (parent-death signal), or after lifetime_s.
    """

    def __init__(self, upstream_port: int, *, port: int = 0, lifetime_s: float = 3600.0,
                 chunk_bytes: int = CHUNK_BYTES, queue_chunks: int = QUEUE_CHUNKS) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.argv = [sys.executable, "-m", "bench.faultproxy", "--upstream-port", str(upstream_port),
                     "--port", str(port), "--lifetime-s", str(lifetime_s), "--chunk-bytes", str(chunk_bytes),
                     "--queue-chunks", str(queue_chunks)]
        self._process: subprocess.Popen[str] | None = None

    def start(self, timeout_s: float = 30.0) -> ProxyProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        self._process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         bufsize=1, env=env, cwd=ROOT, preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.port = int(self._reply(timeout_s))
        return self

    def _reply(self, timeout_s: float) -> Any:
        process = self._process
        if process is None or process.stdout is None:
            raise RuntimeError("the fault proxy is not running")
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the fault proxy did not answer within {timeout_s:g} s")
        kind, value = json.loads(line)
        if kind == "error":
            raise RuntimeError(f"fault proxy: {value}")
        return value

    def _call(self, *request: Any) -> Any:
        if self._process is None or self._process.stdin is None:
            raise RuntimeError("the fault proxy is not running")
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return self._reply(30)

    def cut(self) -> int:
        """Abort every open connection; returns how many were cut."""
        return int(self._call("cut"))

    def set_delay(self, to_server_s: float = 0.0, to_client_s: float = 0.0) -> None:
        self._call("delay", to_server_s, to_client_s)

    def stats(self) -> dict[str, int]:
        return dict(self._call("stats"))

    def close(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if process.stdin is not None:
                process.stdin.close()  # end of input: the proxy stops
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _die_with_parent() -> None:
    with contextlib.suppress(ImportError):
        from fastworker.proc import die_with_parent

        die_with_parent(signal.SIGKILL)


async def _control(args: argparse.Namespace) -> None:
    """Serve until told to stop, until stdin closes, or until lifetime_s has passed; one JSON line per request."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with FaultProxy(args.upstream_port, port=args.port, upstream_host=args.upstream_host,
                          chunk_bytes=args.chunk_bytes, queue_chunks=args.queue_chunks) as proxy:
        _say("ok", proxy.port)
        deadline = loop.time() + args.lifetime_s
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return
            if not line or line.strip() in (b"stop", b'["stop"]'):
                return
            if line.strip():
                _say(*_answer(proxy, line.decode()))


def _say(kind: str, value: Any) -> None:
    sys.stdout.write(json.dumps([kind, value]) + "\n")
    sys.stdout.flush()


def _answer(proxy: FaultProxy, line: str) -> tuple[str, Any]:
    """A request is a JSON array (`["delay", 0, 0.05]`) or the same words on a line (`delay 0 0.05`)."""
    try:
        request = json.loads(line) if line.lstrip().startswith("[") else line.split()
        verb, params = request[0], [float(value) for value in request[1:]]
        if verb == "cut":
            return "ok", proxy.cut()
        if verb == "delay":
            proxy.set_delay(*params)
            return "ok", None
        if verb == "stats":
            return "ok", asdict(proxy.stats)
    except (ValueError, TypeError, IndexError) as exc:
        return "error", f"bad request {line.strip()!r}: {exc}"
    return "error", f"unknown request {verb!r}: cut, delay TO_SERVER_S TO_CLIENT_S, stats, stop"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faultproxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream-host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (0: any free one)")
    parser.add_argument("--lifetime-s", type=float, default=3600, help="stop by itself after this long")
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    parser.add_argument("--queue-chunks", type=int, default=QUEUE_CHUNKS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides when it stops
    _fine_timer_slack()
    with contextlib.suppress(ImportError):
        from fastworker.proc import set_process_name

        set_process_name("fw-faultproxy")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_control(args))
    else:
        uvloop.run(_control(args))


if __name__ == "__main__":
    main()
