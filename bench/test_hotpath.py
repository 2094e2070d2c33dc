"""Micro-benchmarks of the hot path, for the regression gate (`make bench-check`), not for the default test run.

Each one times one step of a 1000-entry batch of the ~250-byte sample job: parsing the server's reply, decoding
the entries, dispatching them to a no-op handler, and building the settle commands. They use no server, so they
are steady enough to compare against a stored baseline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import msgspec
import pytest

from bench.common import payload
from fastworker.app import App
from fastworker.dispatch import Dispatcher
from fastworker.edge.wire import pack
from fastworker.message import Message, decode_entries
from fastworker.payloads import PayloadType
from fastworker.settlement import Settlement

BATCH = 1000
STREAM, GROUP = "betterbundle:data-jobs", "data-processors"


def _reply_bytes() -> bytes:
    """A RESP2 XREADGROUP reply of BATCH entries, byte for byte as a server sends it."""
    entries = [[f"1732530000000-{i}".encode(), [b"data", payload(i)]] for i in range(BATCH)]

    def resp(value: Any) -> bytes:
        if isinstance(value, list):
            return b"*%d\r\n" % len(value) + b"".join(resp(item) for item in value)
        return b"$%d\r\n%b\r\n" % (len(value), value)

    return resp([[STREAM.encode(), entries]])


REPLY = _reply_bytes()


def _entries() -> list[Any]:
    reader = hiredis.Reader()
    reader.feed(REPLY)
    return reader.gets()[0][1]  # type: ignore[no-any-return]


def test_parse_reply(benchmark: Any) -> None:
    def parse() -> Any:
        reader = hiredis.Reader()
        reader.feed(REPLY)
        return reader.gets()

    reply = benchmark(parse)
    assert len(reply[0][1]) == BATCH


def test_decode_batch(benchmark: Any) -> None:
    entries = _entries()
    messages = benchmark(decode_entries, STREAM, entries, 1)
    assert len(messages) == BATCH and messages[-1].payload["job_id"] == f"job_{BATCH - 1:010d}"


class Params(msgspec.Struct, frozen=True):
    days: int
    min_support: float


class AnalysisJob(msgspec.Struct):
    """The sample job as a typed handler declares it (fastworker.payloads)."""

    job_id: str
    shop_id: str
    shop_domain: str
    type: str
    trigger: str
    requested_at: str
    params: Params


def test_decode_batch_typed(benchmark: Any) -> None:
    entries = _entries()
    typed = PayloadType(AnalysisJob)
    messages = benchmark(decode_entries, STREAM, entries, 1, "auto", "data", typed)
    assert len(messages) == BATCH and messages[-1].payload.job_id == f"job_{BATCH - 1:010d}"
    assert messages[0].payload.params == Params(90, 0.01)


@pytest.fixture
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _noop_handlers(batch: bool = False) -> Any:
    app = App()

    async def one(msg: Message) -> None:
        return None

    async def many(msgs: list[Message]) -> None:
        return None

    app.handler(STREAM, group=GROUP, batch=batch)(many if batch else one)
    return app.groups()[GROUP]


def test_dispatch_batch_to_noop_handler(benchmark: Any, loop: Any) -> None:
    dispatcher = Dispatcher(64, 30.0, 5, ":dead")
    handlers = _noop_handlers()
    messages = decode_entries(STREAM, _entries(), 1)
    settlement = benchmark(lambda: loop.run_until_complete(dispatcher.dispatch(GROUP, handlers, {STREAM: messages})))
    assert len(settlement.acks[STREAM]) == BATCH


def test_dispatch_batch_to_noop_batch_handler(benchmark: Any, loop: Any) -> None:
    dispatcher = Dispatcher(64, 30.0, 5, ":dead")
    handlers = _noop_handlers(batch=True)
    messages = decode_entries(STREAM, _entries(), 1)
    settlement = benchmark(lambda: loop.run_until_complete(dispatcher.dispatch(GROUP, handlers, {STREAM: messages})))
    assert len(settlement.acks[STREAM]) == BATCH


def test_build_settle_commands(benchmark: Any) -> None:
    messages = decode_entries(STREAM, _entries(), 1)

    def settle() -> bytes:
        settlement = Settlement(GROUP)
        settlement.ack_all(STREAM, messages)
        return pack(settlement.commands())

    packed = benchmark(settle)
    assert packed.startswith(b"*%d\r\n$4\r\nXACK" % (BATCH + 3))


def test_build_settle_commands_with_results(benchmark: Any) -> None:
    messages = decode_entries(STREAM, _entries(), 1)
    for message in messages:
        message.emit("betterbundle:analysis-results", {"job_id": message.payload["job_id"], "status": "completed"})

    def settle() -> bytes:
        settlement = Settlement(GROUP)
        settlement.ack_all(STREAM, messages)
        return pack(settlement.commands())

    packed = benchmark(settle)
    assert packed.split(b"\r\n", 3)[2] == b"EVALSHA"  # one script call, by digest, settles them all


def test_build_settle_commands_with_results_delete_acked(benchmark: Any) -> None:
    """The same batch on a stream with delete-on-ack (XACKDEL, Redis 8.2+): the script that acks each run with one
    XACKDEL."""
    messages = decode_entries(STREAM, _entries(), 1)
    for message in messages:
        message.emit("betterbundle:analysis-results", {"job_id": message.payload["job_id"], "status": "completed"})

    def settle() -> bytes:
        settlement = Settlement(GROUP, deleting={STREAM})
        settlement.ack_all(STREAM, messages)
        return pack(settlement.commands())

    packed = benchmark(settle)
    assert packed.split(b"\r\n", 3)[2] == b"EVALSHA"


def test_dispatch_batch_to_noop_handler_traced(benchmark: Any, loop: Any) -> None:
    """The same dispatch with tracing on (the SDK's provider, spans recorded but not exported): the cost of a span
    per handler call. With tracing off, handlers are not wrapped at all (test_dispatch_batch_to_noop_handler)."""
    from opentelemetry.sdk.trace import TracerProvider

    from fastworker.tracing import HandlerTracer

    dispatcher = Dispatcher(64, 30.0, 5, ":dead")
    dispatcher.tracer = HandlerTracer()
    dispatcher.tracer.tracer = TracerProvider().get_tracer("bench")
    handlers = _noop_handlers()
    messages = decode_entries(STREAM, _entries(), 1)
    settlement = benchmark(lambda: loop.run_until_complete(dispatcher.dispatch(GROUP, handlers, {STREAM: messages})))
    assert len(settlement.acks[STREAM]) == BATCH
