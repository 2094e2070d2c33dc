"""FastStream's Redis stream subscriber as the peers table runs it: a consumer group, a no-op handler, one message
per call (`single`) or a batch of up to 1000 per call (`batch`).

Configured as fast as FastStream's documentation allows: logging off (`logger=None`: otherwise it logs two lines
per message), uvloop (as `faststream run` picks when installed), COUNT 1000 per read, and its default ack policy
(acknowledge after the handler returns). Run as `python -m bench.peers.faststream_app MODE URL STREAM GROUP
CONSUMER`; the start handshake is the one of bench/peers/loops.py.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from faststream.redis import RedisBroker, StreamSub

BATCH = 1000


def broker(mode: str, url: str, stream: str, group: str, consumer: str) -> RedisBroker:
    """A broker with one stream subscriber whose handler does nothing with the jobs it is given."""
    app = RedisBroker(url, logger=None)  # type: ignore[arg-type]  # None is documented: no logging at all
    if mode == "batch":
        @app.subscriber(stream=StreamSub(stream, group=group, consumer=consumer, batch=True, max_records=BATCH))
        async def handle_batch(body: list[dict[str, Any]]) -> None:
            return None
    else:
        @app.subscriber(stream=StreamSub(stream, group=group, consumer=consumer, max_records=BATCH))
        async def handle(body: dict[str, Any]) -> None:
            return None
    return app


async def consume(app: RedisBroker) -> None:
    await app.start()
    await asyncio.Event().wait()  # until terminated


def main(argv: list[str]) -> None:
    mode, url, stream, group, consumer = argv
    app = broker(mode, url, stream, group, consumer)
    print("ready", flush=True)
    sys.stdin.readline()
    import uvloop

    uvloop.run(consume(app))


if __name__ == "__main__":
    main(sys.argv[1:])
