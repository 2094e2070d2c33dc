"""The server's own limit: the read and ack commands a batch consumer sends (XREADGROUP COUNT 1000, then XACK of
those 1000 ids), replayed as fast as a raw pipelined client can send them, so that what is left is the server's
cost per entry.

The ids to ack are known before the run (XRANGE, untimed), so every command is written out in advance and
streamed through `redis-cli --pipe` (C, discards the replies), timed from its start to its exit. Without
redis-cli, a Python client does the same over a raw socket: one thread writes, the other counts replies with
hiredis, which costs client CPU that redis-cli does not spend, so that figure is a little pessimistic.
`processes` is accepted for a uniform signature and ignored: the server runs commands on one thread, and one
pipelined client keeps it busy.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import cast
from urllib.parse import urlparse

import hiredis
import redis

from bench.peers.harness import PeerFailed, check_fresh, drain_timeout_s, verify

BATCH = 1000


def client_name() -> str:
    """Which client the replay runs through here."""
    return "redis-cli --pipe" if shutil.which("redis-cli") else "python raw socket"


def run_server_limit(url: str, stream: str, group: str, n: int, processes: int = 1) -> float:
    client = redis.Redis.from_url(url)
    try:
        check_fresh(client, stream, group, n)
        ids = entry_ids(client, stream, n)
        commands = replay(stream, group, ids)
        expected = 2 * ((n + BATCH - 1) // BATCH)
        cli = shutil.which("redis-cli")
        seconds = (pipe_redis_cli(cli, url, commands, expected, drain_timeout_s(n)) if cli
                   else pipe_socket(url, commands, expected, drain_timeout_s(n)))
        verify(client, stream, group, n)
        return seconds
    finally:
        client.close()


def entry_ids(client: redis.Redis, stream: str, n: int, chunk: int = 10_000) -> list[bytes]:
    ids: list[bytes] = []
    start = "-"
    while len(ids) < n:
        entries = cast("list[tuple[bytes, object]]", client.xrange(stream, start, "+", count=min(chunk, n - len(ids))))
        if not entries:
            break
        ids += [entry_id for entry_id, _ in entries]
        start = "(" + ids[-1].decode()
    return ids


def _pack(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args)


def replay(stream: str, group: str, ids: list[bytes]) -> bytes:
    """XREADGROUP COUNT 1000 + XACK of the ids that read returns, for every batch, in RESP."""
    s, g = stream.encode(), group.encode()
    read = _pack(b"XREADGROUP", b"GROUP", g, b"limit", b"COUNT", b"%d" % BATCH, b"STREAMS", s, b">")
    return b"".join(read + _pack(b"XACK", s, g, *ids[start:start + BATCH]) for start in range(0, len(ids), BATCH))


def pipe_redis_cli(cli: str, url: str, commands: bytes, expected: int, timeout_s: float) -> float:
    with tempfile.TemporaryFile() as source:
        source.write(commands)
        source.seek(0)
        started = time.perf_counter()
        done = subprocess.run([cli, "-u", url, "--pipe"], stdin=source, capture_output=True, timeout=timeout_s,
                              check=False)
        seconds = time.perf_counter() - started
    output = done.stdout.decode(errors="replace")
    counts = re.search(r"errors: (\d+), replies: (\d+)", output)
    if done.returncode or not counts or int(counts[1]) or int(counts[2]) != expected:
        raise PeerFailed(f"redis-cli --pipe exited {done.returncode} (expected {expected} replies, no errors): "
                         f"{output.strip()} {done.stderr.decode(errors='replace').strip()}")
    return seconds


def pipe_socket(url: str, commands: bytes, expected: int, timeout_s: float) -> float:
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=timeout_s) as conn:
        hello = _hello(parsed.password, parsed.path.strip("/"))
        if hello:
            conn.sendall(b"".join(hello))
            _count_replies(conn, len(hello))
        started = time.perf_counter()
        writer = threading.Thread(target=conn.sendall, args=(commands,), daemon=True)
        writer.start()
        _count_replies(conn, expected)
        seconds = time.perf_counter() - started
        writer.join()
    return seconds


def _hello(password: str | None, db: str) -> list[bytes]:
    auth = [_pack(b"AUTH", password.encode())] if password else []
    return auth + ([_pack(b"SELECT", db.encode())] if db and db != "0" else [])


def _count_replies(conn: socket.socket, expected: int) -> None:
    reader = hiredis.Reader()
    seen = 0
    while seen < expected:
        data = conn.recv(1 << 20)
        if not data:
            raise PeerFailed(f"the server closed the connection after {seen} of {expected} replies")
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise PeerFailed(f"the server answered an error: {reply}")
            seen += 1
