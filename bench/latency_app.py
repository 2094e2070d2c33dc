"""The latency benchmark's app: records, per entry, the time from its XADD to the start of its handler call.

Each worker process keeps its samples in memory (no per-message I/O) and writes them out when it stops.
"""

from __future__ import annotations

import os
import time
from array import array

from fastworker import App, Message

STREAM = os.environ.get("BENCH_STREAM", "bench:latency")
GROUP = os.environ.get("BENCH_GROUP", "bench")
OUT_DIR = os.environ.get("BENCH_LATENCY_DIR", ".")

app = App("latency")
samples = array("d")


@app.handler(STREAM, group=GROUP)
async def handle(msg: Message) -> None:
    samples.append(time.time() - msg.payload["t"])


@app.on_shutdown
def write_samples() -> None:
    with open(os.path.join(OUT_DIR, f"latency-{os.getpid()}.bin"), "wb") as out:
        samples.tofile(out)
