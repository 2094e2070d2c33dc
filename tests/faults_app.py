"""An app for the fault tests run through the real CLI, configured by environment (spawned workers rebuild it).

A job whose id is in FAULTS_KILLERS makes its handler SIGKILL its own worker process, standing in for an OOM kill
or a crash in a C extension. Every call appends its job id to a per-process file with one unbuffered write, so
calls are counted even in a process that was killed.
"""

from __future__ import annotations

import os
import signal

from fastworker import App, Message

STREAM = os.environ.get("FAULTS_STREAM", "faults:jobs")
GROUP = os.environ.get("FAULTS_GROUP", "faults")
RESULTS = os.environ.get("FAULTS_RESULTS", "faults:results")
CALLS_DIR = os.environ.get("FAULTS_CALLS_DIR", "")
KILLERS = set(filter(None, os.environ.get("FAULTS_KILLERS", "").split(",")))

app = App()
_fd: list[int] = []


def _record(job_id: str) -> None:
    if not _fd:
        _fd.append(os.open(os.path.join(CALLS_DIR, f"calls-{os.getpid()}.txt"),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.write(_fd[0], job_id.encode() + b"\n")


@app.handler(STREAM, group=GROUP)
async def handle(msg: Message) -> None:
    job_id = msg.payload["job_id"]
    _record(job_id)
    if job_id in KILLERS:
        os.kill(os.getpid(), signal.SIGKILL)
    msg.emit(RESULTS, {"job_id": job_id, "deliveries": msg.deliveries})
