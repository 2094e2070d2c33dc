"""OpenTelemetry through the streams, with the SDK's in-memory exporter: one trace from publish to result."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from fastworker import App, EmbeddedServer, Message, Publisher, Reject
from fastworker.tracing import tracer_for
from tests.conftest import RunningWorker, make_settings, pending_count, wait_for

otel_trace = pytest.importorskip("opentelemetry.trace", reason="the otel extra is not installed")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    otel_trace.set_tracer_provider(provider)  # once per process, as an app does at start
    yield provider


@pytest.fixture
def spans(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER


async def _true(value: bool) -> bool:
    return value


def _traceparent(fields: dict[bytes, bytes]) -> tuple[str, str]:
    _, trace_id, span_id, _ = fields[b"traceparent"].decode().split("-")
    return trace_id, span_id


async def test_one_trace_from_publish_to_result_and_dead_letter(server: EmbeddedServer, rc: aioredis.Redis, uid: str,
                                                                spans: InMemorySpanExporter) -> None:
    stream, group, results = f"{uid}:jobs", f"{uid}-g", f"{uid}:results"
    app = App()

    @app.handler(stream, group=group)
    async def analyse(msg: Message) -> None:
        if msg.payload["n"] == 1:
            raise Reject("no shop")
        msg.emit(results, {"n": msg.payload["n"]})

    tracer = otel_trace.get_tracer("the app")
    with tracer.start_as_current_span("request") as request:
        async with Publisher(server.url) as publisher:
            await publisher.publish(stream, {"n": 0})
            await publisher.publish_many(stream, [{"n": 1}])
    async with RunningWorker(app, make_settings(server, uid, tracing="on")):
        await wait_for(lambda: _settled(rc, stream, group, results), what="both settled")
    trace_id = f"{request.get_span_context().trace_id:032x}"
    handled = [s for s in spans.get_finished_spans() if s.name == f"{stream} process"]
    assert len(handled) == 2
    assert {f"{s.context.trace_id:032x}" for s in handled} == {trace_id}  # continued from the producer's trace
    assert {s.parent.span_id for s in handled if s.parent} == {request.get_span_context().span_id}
    ok = next(s for s in handled if s.attributes["fastworker.outcome"] == "ok")
    failed = next(s for s in handled if s.attributes["fastworker.outcome"] == "error")
    assert failed.attributes["error.type"] == "Reject" and ok.attributes["messaging.consumer.group.name"] == group
    [(_, result)] = await rc.xrange(results)
    assert _traceparent(result) == (trace_id, f"{ok.context.span_id:016x}")  # the app continues from the result
    [(_, dead)] = await rc.xrange(f"{stream}:dead")
    assert _traceparent(dead) == (trace_id, f"{failed.context.span_id:016x}")


async def _settled(rc: aioredis.Redis, stream: str, group: str, results: str) -> bool:
    written = int(await rc.xlen(results)) == 1 and int(await rc.xlen(f"{stream}:dead")) == 1
    return written and await pending_count(rc, stream, group) == 0


async def test_tracing_off_wraps_nothing(provider: TracerProvider) -> None:
    assert tracer_for("off") is None
    assert tracer_for("auto") is not None  # the app configured a provider


def test_tracing_on_without_a_tracer_provider_is_a_config_error() -> None:
    import subprocess
    import sys

    code = "from fastworker.tracing import tracer_for; tracer_for('on')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "no OpenTelemetry tracer provider" in done.stderr
