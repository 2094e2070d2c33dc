"""The hand-written consumers the peers table compares against: a naive loop, a sync batch loop and the fastest
asyncio loop we know how to write by hand.

Run as `python -m bench.peers.loops PEER URL STREAM GROUP CONSUMER`: each prints `ready` once its imports are done,
waits for a line on stdin (so that every consumer of a run starts reading together), then consumes until it is
terminated. Every loop decodes each entry's `data` field and hands it to a no-op per-message handler, and acks
everything it read: the at-least-once contract, without a reclaimer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import orjson
import redis

BLOCK_MS = 100
BATCH = 1000


def handle(job: Any) -> None:
    """The no-op handler every loop calls once per message."""


def naive(url: str, stream: str, group: str, consumer: str) -> None:
    """The loop most tutorials show: one entry per XREADGROUP, json.loads, one XACK per entry."""
    client = redis.Redis.from_url(url)
    while True:
        reply = client.xreadgroup(group, consumer, {stream: ">"}, count=1, block=BLOCK_MS)
        for _, entries in _pairs(reply):
            for entry_id, fields in entries:
                handle(json.loads(fields[b"data"]))
                client.xack(stream, group, entry_id)


def sync_batch(url: str, stream: str, group: str, consumer: str) -> None:
    """redis-py's sync client, COUNT 1000, orjson, one XACK per batch: two round trips per batch."""
    client = redis.Redis.from_url(url)
    loads = orjson.loads
    while True:
        reply = client.xreadgroup(group, consumer, {stream: ">"}, count=BATCH, block=BLOCK_MS)
        for _, entries in _pairs(reply):
            for _entry_id, fields in entries:
                handle(loads(fields[b"data"]))
            client.xack(stream, group, *[entry_id for entry_id, _ in entries])


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """(stream, entries) pairs of an XREADGROUP reply, RESP2 (list) or RESP3 (map)."""
    if not reply:
        return []
    return list(reply.items()) if isinstance(reply, dict) else [(stream, entries) for stream, entries in reply]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _command(*args: str) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(arg.encode()) for arg in args)


async def handwritten(url: str, stream: str, group: str, consumer: str) -> None:
    """redis.asyncio's raw connection (hiredis replies, no per-entry conversion), orjson, uvloop; the XACK of a
    batch travels in the same write as the next XREADGROUP, so a batch costs one round trip."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    conn: Any = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    read = _command("XREADGROUP", "GROUP", group, consumer, "COUNT", str(BATCH), "BLOCK", str(BLOCK_MS),
                    "STREAMS", stream, ">")
    ack_prefix = _bulk(b"XACK") + _bulk(stream.encode()) + _bulk(group.encode())
    loads: Callable[[bytes], Any] = orjson.loads
    send, receive = conn.send_packed_command, conn.read_response
    ack = b""
    while True:
        await send(ack + read, check_health=False)
        if ack:
            acked = await receive()
            if isinstance(acked, Exception):
                raise acked
        reply = await receive()
        ack = b""
        if not reply:
            continue
        # One stream: the reply is {stream: entries} (RESP3) or [[stream, entries]] (RESP2).
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        for _entry_id, fields in entries:
            handle(loads(fields[1]))
        ack = (b"*%d\r\n" % (len(entries) + 3) + ack_prefix
               + b"".join([b"$%d\r\n%b\r\n" % (len(entry[0]), entry[0]) for entry in entries]))


def main(argv: list[str]) -> None:
    peer, url, stream, group, consumer = argv
    print("ready", flush=True)
    sys.stdin.readline()
    if peer == "naive":
        naive(url, stream, group, consumer)
    elif peer == "sync_batch":
        sync_batch(url, stream, group, consumer)
    elif peer == "handwritten":
        import uvloop

        uvloop.run(handwritten(url, stream, group, consumer))
    else:
        raise SystemExit(f"unknown peer {peer!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
