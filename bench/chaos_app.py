"""The chaos harness's app: the demo's data-job and training handlers, each call recorded before it runs.

Every call appends the job id to a per-process file with one unbuffered write (like tests/fleet_app.py), so the
harness can count handler re-runs even for a process that was SIGKILLed. The notifications stream is left out: its
handler emits nothing, so its jobs could not be counted as results.
"""

from __future__ import annotations

import os

from fastworker import App, Message, demo

CALLS_DIR = os.environ.get("CHAOS_CALLS_DIR", ".")
STREAMS = (demo.DATA_JOBS, demo.ML_TRAINING)
RESULTS = (demo.ANALYSIS_RESULTS, demo.FEATURES_COMPUTED)

app = App("chaos")
_calls: list[int] = []


def _record(job_id: str) -> None:
    if not _calls:
        path = os.path.join(CALLS_DIR, f"calls-{os.getpid()}.txt")
        _calls.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.write(_calls[0], job_id.encode() + b"\n")


@app.handler(demo.DATA_JOBS, group=demo.GROUPS[demo.DATA_JOBS], retry=demo.RETRY)
async def analyse(msg: Message[demo.AnalysisJob]) -> None:
    _record(msg.payload.job_id)
    await demo.analyse(msg)


@app.handler(demo.ML_TRAINING, group=demo.GROUPS[demo.ML_TRAINING], retry=demo.RETRY)
async def train(msg: Message[demo.TrainingJob]) -> None:
    _record(msg.payload.job_id)
    await demo.train(msg)
