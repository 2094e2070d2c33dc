"""The demo app: BetterBundle's streams and groups, with handlers that do a token amount of work.

Run it against any server with `fastworker run fastworker.demo:app`, or end to end on the embedded server with
`fastworker demo`. A data job yields one entry on `betterbundle:analysis-results` carrying its `job_id` and
`shop_id`; a training job one on `betterbundle:features-computed`. A payload with `"simulate": "error"` fails
every time (retried, then dead-lettered after max deliveries); `"simulate": "poison"` is rejected at once.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

from fastworker.app import App
from fastworker.errors import Reject
from fastworker.message import Message

DATA_JOBS = "betterbundle:data-jobs"
ML_TRAINING = "betterbundle:ml-training"
NOTIFICATIONS = "betterbundle:user-notifications"
ANALYSIS_RESULTS = "betterbundle:analysis-results"
FEATURES_COMPUTED = "betterbundle:features-computed"
GROUPS = {DATA_JOBS: "data-processors", ML_TRAINING: "ml-processors", NOTIFICATIONS: "notification-processors"}

app = App("betterbundle")


def _simulate(payload: Any) -> None:
    simulate = payload.get("simulate") if isinstance(payload, dict) else None
    if simulate == "error":
        raise RuntimeError("simulated failure: upstream Shopify API returned 502")
    if simulate == "poison":
        raise Reject("simulated poison message: shop no longer exists")


@functools.lru_cache(maxsize=1024)  # a shop's bundles change slowly: real analysers cache them too
def _bundles(shop_id: str, days: int) -> list[dict[str, Any]]:
    digest = hashlib.blake2b(f"{shop_id}:{days}".encode(), digest_size=8).digest()
    return [{"products": [f"prod_{digest[i]}", f"prod_{digest[i + 1]}"], "support": round(digest[i] / 2550, 4)}
            for i in range(0, 6, 2)]


@app.handler(DATA_JOBS, group=GROUPS[DATA_JOBS])
async def analyse(msg: Message) -> None:
    started = time.perf_counter()
    job = msg.payload
    _simulate(job)
    bundles = _bundles(job["shop_id"], int(job.get("params", {}).get("days", 30)))
    msg.emit(ANALYSIS_RESULTS, {"job_id": job["job_id"], "shop_id": job["shop_id"], "status": "completed",
                                "bundles": bundles, "duration_ms": round((time.perf_counter() - started) * 1000, 3)})


@app.handler(ML_TRAINING, group=GROUPS[ML_TRAINING])
async def train(msg: Message) -> None:
    job = msg.payload
    _simulate(job)
    orders = int(job.get("dataset", {}).get("orders", 0))
    msg.emit(FEATURES_COMPUTED, {"job_id": job["job_id"], "shop_id": job["shop_id"], "model": job.get("model"),
                                 "features": min(orders // 100, 512), "status": "computed"})


@app.handler(NOTIFICATIONS, group=GROUPS[NOTIFICATIONS])
async def notify(msg: Message) -> None:
    _simulate(msg.payload)  # a real handler would call the mail or push service here


def sample_payload(stream: str, index: int) -> dict[str, Any]:
    """The app's sample payloads (design notes, section 4), made unique per index."""
    shop = f"shop_{4821 + index % 97}"
    if stream == DATA_JOBS:
        return {"job_id": f"job_{index:08d}", "shop_id": shop, "shop_domain": f"{shop}.myshopify.com",
                "type": "analysis", "trigger": "scheduled", "requested_at": "2026-11-25T10:00:00Z",
                "params": {"days": 90, "min_support": 0.01}}
    if stream == ML_TRAINING:
        return {"job_id": f"job_{index:08d}", "shop_id": shop, "model": "bundle-recommender",
                "dataset": {"orders": 18234 + index % 1000}}
    return {"shop_id": shop, "kind": "analysis_complete", "channel": "email", "message": "Your bundles are ready",
            "notification_id": f"ntf_{index:08d}"}
