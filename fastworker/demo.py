"""The demo app: BetterBundle's streams and groups, with typed handlers that do a token amount of work.

Run it against any server with `fastworker run fastworker.demo:app`, or end to end on the embedded server with
`fastworker demo`. Payloads are declared as msgspec Structs: a job that does not fit (a Node producer writing
`"days": "ninety"`) is dead-lettered at its first delivery as PayloadInvalid, naming the field. A data job yields one
entry on `betterbundle:analysis-results` carrying its `job_id` and `shop_id`; a training job one on
`betterbundle:features-computed`. Simulated trouble: `"simulate": "error"` fails every time (retried with backoff,
then dead-lettered after max deliveries); `"simulate": "poison"` is rejected at once; `"simulate": "rate_limited"`
gets an HTTP 429 on its first delivery and is retried after the Retry-After the API sent.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

import msgspec

from fastworker.app import App
from fastworker.errors import Reject, Retry
from fastworker.message import Message
from fastworker.policy import Backoff

DATA_JOBS = "betterbundle:data-jobs"
ML_TRAINING = "betterbundle:ml-training"
NOTIFICATIONS = "betterbundle:user-notifications"
ANALYSIS_RESULTS = "betterbundle:analysis-results"
FEATURES_COMPUTED = "betterbundle:features-computed"
GROUPS = {DATA_JOBS: "data-processors", ML_TRAINING: "ml-processors", NOTIFICATIONS: "notification-processors"}

RATE_LIMIT_RETRY_AFTER_S = 0.25  # what the simulated 429 asks for
RETRY = Backoff(first_s=0.2, factor=2, max_s=30, jitter=0.1)  # a flaky upstream: quick first retries

app = App("betterbundle")


class Params(msgspec.Struct, frozen=True):
    days: int = 30
    min_support: float = 0.01


class AnalysisJob(msgspec.Struct):
    job_id: str
    shop_id: str
    params: Params = Params()
    simulate: str | None = None


class Dataset(msgspec.Struct, frozen=True):
    orders: int = 0


class TrainingJob(msgspec.Struct):
    job_id: str
    shop_id: str
    model: str | None = None
    dataset: Dataset = Dataset()
    simulate: str | None = None


class Notification(msgspec.Struct):
    shop_id: str
    kind: str
    channel: str = "email"
    message: str = ""
    simulate: str | None = None


class Bundle(msgspec.Struct):
    products: list[str]
    support: float


class AnalysisResult(msgspec.Struct):
    job_id: str
    shop_id: str
    status: str
    bundles: list[Bundle]
    duration_ms: float


class FeaturesComputed(msgspec.Struct):
    job_id: str
    shop_id: str
    model: str | None
    features: int
    status: str


def _simulate(simulate: str | None, deliveries: int) -> None:
    if simulate == "error":
        raise RuntimeError("simulated failure: upstream Shopify API returned 502")
    if simulate == "poison":
        raise Reject("simulated poison message: shop no longer exists")
    if simulate == "rate_limited" and deliveries == 1:
        raise Retry("simulated HTTP 429 from the Shopify API", delay_s=RATE_LIMIT_RETRY_AFTER_S)


@functools.lru_cache(maxsize=1024)  # a shop's bundles change slowly: real analysers cache them too
def _bundles(shop_id: str, days: int) -> list[Bundle]:
    digest = hashlib.blake2b(f"{shop_id}:{days}".encode(), digest_size=8).digest()
    return [Bundle([f"prod_{digest[i]}", f"prod_{digest[i + 1]}"], round(digest[i] / 2550, 4)) for i in range(0, 6, 2)]


@app.handler(DATA_JOBS, group=GROUPS[DATA_JOBS], retry=RETRY)
async def analyse(msg: Message[AnalysisJob]) -> None:
    started = time.perf_counter()
    job = msg.payload
    _simulate(job.simulate, msg.deliveries)
    bundles = _bundles(job.shop_id, job.params.days)
    msg.emit(ANALYSIS_RESULTS, AnalysisResult(job.job_id, job.shop_id, "completed", bundles,
                                              round((time.perf_counter() - started) * 1000, 3)))


@app.handler(ML_TRAINING, group=GROUPS[ML_TRAINING], retry=RETRY)
async def train(msg: Message[TrainingJob]) -> None:
    job = msg.payload
    _simulate(job.simulate, msg.deliveries)
    msg.emit(FEATURES_COMPUTED, FeaturesComputed(job.job_id, job.shop_id, job.model,
                                                 min(job.dataset.orders // 100, 512), "computed"))


@app.handler(NOTIFICATIONS, group=GROUPS[NOTIFICATIONS], retry=RETRY)
async def notify(msg: Message[Notification]) -> None:
    _simulate(msg.payload.simulate, msg.deliveries)  # a real handler would call the mail or push service here


def malformed_payload(stream: str, index: int) -> dict[str, Any]:
    """A sample payload as a careless producer writes it: a field of the wrong type (not worth retrying)."""
    payload = sample_payload(stream, index)
    if stream == DATA_JOBS:
        payload["params"] = {"days": "ninety", "min_support": 0.01}
    elif stream == ML_TRAINING:
        payload["dataset"] = {"orders": "lots"}
    else:
        del payload["kind"]
    return payload


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
