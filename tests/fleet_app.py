"""An app for the fleet tests, configured by environment so that spawned worker processes build the same one.

Every handler call appends the job id to a per-process file with one unbuffered write, so the test can count
calls (lost, duplicates) even for a process that was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os

from fastworker import App, Message, Reject

STREAM = os.environ.get("FLEET_STREAM", "fleet:jobs")
GROUP = os.environ.get("FLEET_GROUP", "fleet")
RESULTS = os.environ.get("FLEET_RESULTS", "fleet:results")
CALLS_DIR = os.environ.get("FLEET_CALLS_DIR", "")
DELAY_S = float(os.environ.get("FLEET_DELAY_S", "0"))
CRASH_ON_START = os.environ.get("FLEET_CRASH_ON_START") == "1"
REJECT_EVERY = int(os.environ.get("FLEET_REJECT_EVERY", "0"))  # dead-letter jobs whose number divides by this

app = App()
_calls: list[int] = []


def _calls_fd() -> int:
    if not _calls:
        path = os.path.join(CALLS_DIR, f"calls-{os.getpid()}.txt")
        _calls.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    return _calls[0]


@app.on_startup
def crash_if_asked() -> None:
    if CRASH_ON_START:
        raise RuntimeError("this worker cannot start")


@app.handler(STREAM, group=GROUP)
async def handle(msg: Message) -> None:
    if DELAY_S:
        await asyncio.sleep(DELAY_S)
    os.write(_calls_fd(), msg.payload["job_id"].encode() + b"\n")
    if REJECT_EVERY and int(msg.payload["job_id"].rsplit("-", 1)[1]) % REJECT_EVERY == 0:
        raise Reject("rejected by the test")
    msg.emit(RESULTS, {"job_id": msg.payload["job_id"]})
