"""An app for the permission tests: every kind of write the fleet makes (results, dead letters, idempotency
records), on streams under one prefix so that an ACL key pattern can cover them. Configured by environment, so that
spawned worker processes build the same app."""

from __future__ import annotations

import os

from fastworker import App, Message, Reject

PREFIX = os.environ.get("ACL_APP_PREFIX", "betterbundle")
JOBS = f"{PREFIX}:data-jobs"
NOTIFICATIONS = f"{PREFIX}:user-notifications"
RESULTS = f"{PREFIX}:analysis-results"

app = App()


@app.handler(JOBS, group="data-processors")
async def analyse(msg: Message) -> None:
    if msg.payload.get("reject"):
        raise Reject("rejected by the test")
    msg.emit(RESULTS, {"job_id": msg.payload["job_id"]})


@app.handler(NOTIFICATIONS, group="notification-processors", dedup=True)
async def notify(msg: Message) -> None:
    msg.emit(RESULTS, {"notification_id": msg.payload["job_id"]})
