"""OpenTelemetry tracing through the streams, when the `otel` extra is installed and tracing is on.

A span per handler call (kind CONSUMER, named `<stream> process`), continued from the producer's trace when the
entry carries a W3C `traceparent` field (and `tracestate`); the results the call emits and its dead letter carry
the handler span's `traceparent`, so the app that reads them continues the same trace. The publisher adds the
current span's `traceparent` to what it publishes.

Off, or without opentelemetry installed, nothing here is on the hot path: handlers are wrapped only when tracing is
on, and the publisher asks for a span once per publish call, not per entry.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastworker.errors import ConfigError
from fastworker.message import Message

TRACING_MODES = ("auto", "on", "off")
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"

try:  # the `otel` extra
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where the extra is absent
    AVAILABLE = False


def current_trace_fields() -> list[bytes]:
    """`traceparent` (and `tracestate`) of the active span as flat stream fields; empty without one."""
    if not AVAILABLE or not trace.get_current_span().get_span_context().is_valid:
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [value for key in ("traceparent", "tracestate") if key in carrier
            for value in (key.encode(), carrier[key].encode())]


def tracer_for(mode: str) -> HandlerTracer | None:
    """The tracer the worker's dispatcher wraps handlers with, or None (no tracing, nothing wrapped).

    `auto` traces when opentelemetry is installed and the app configured a tracer provider (in its module or an
    `on_startup` hook); `on` requires both; `off` never traces. Raises ConfigError for `on` without them.
    """
    if mode == "off":
        return None
    if not AVAILABLE:
        if mode == "on":
            raise ConfigError("tracing is on but opentelemetry is not installed: pip install 'fastworker[otel]'")
        return None
    if type(trace.get_tracer_provider()).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        if mode == "on":
            raise ConfigError("tracing is on but the app set up no OpenTelemetry tracer provider (in its module or an "
                              "on_startup hook): spans would go nowhere; set one up, or use --tracing auto or off")
        return None
    return HandlerTracer()


class HandlerTracer:
    """Wraps handler calls in spans and remembers the span of each failed call for its dead letter."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("fastworker")
        self._failed: dict[int, list[bytes]] = {}  # id(message) -> traceparent fields of its failed call

    def wrap(self, func: Callable[..., Any], stream: str, group: str, is_async: bool, batch: bool
             ) -> Callable[..., Any]:
        if is_async:
            async def call_async(arg: Any) -> Any:
                with self._span(arg, stream, group, batch) as span:
                    return await self._called(span, arg, batch, func(arg))

            return functools.update_wrapper(call_async, func)

        def call_sync(arg: Any) -> Any:
            with self._span(arg, stream, group, batch) as span:
                try:
                    result = func(arg)
                except BaseException as exc:
                    self._failure(span, arg, batch, exc)
                    raise
                self._success(span, arg, batch)
                return result

        return functools.update_wrapper(call_sync, func)

    def failed_call_fields(self, message: Message) -> list[bytes]:
        """The traceparent of `message`'s failed call (for its dead letter), asked once for each failure."""
        return self._failed.pop(id(message), [])

    def _span(self, arg: Any, stream: str, group: str, batch: bool) -> Any:
        first: Message = arg[0] if batch else arg
        parent = propagate.extract(_carrier(first)) if not batch else None
        attributes: dict[str, Any] = {"messaging.system": "redis", "messaging.operation.type": "process",
                                      "messaging.destination.name": stream, "messaging.consumer.group.name": group}
        if batch:
            attributes["messaging.batch.message_count"] = len(arg)
        else:
            attributes["messaging.message.id"] = first.id
            attributes["fastworker.deliveries"] = first.deliveries
        return self.tracer.start_as_current_span(f"{stream} process", context=parent, kind=SpanKind.CONSUMER,
                                                 attributes=attributes, record_exception=False,
                                                 set_status_on_exception=False)

    async def _called(self, span: Any, arg: Any, batch: bool, call: Awaitable[Any]) -> Any:
        try:
            result = await call
        except BaseException as exc:
            self._failure(span, arg, batch, exc)
            raise
        self._success(span, arg, batch)
        return result

    def _success(self, span: Any, arg: Any, batch: bool) -> None:
        span.set_attribute("fastworker.outcome", "ok")
        fields: list[bytes] | None = None
        for message in arg if batch else (arg,):
            for _, values in message.outputs or ():
                fields = current_trace_fields() if fields is None else fields
                values.extend(fields)

    def _failure(self, span: Any, arg: Any, batch: bool, exc: BaseException) -> None:
        span.set_attribute("fastworker.outcome", "timeout" if isinstance(exc, asyncio.CancelledError) else "error")
        span.set_attribute("error.type", type(exc).__name__)
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        fields = current_trace_fields()
        for message in arg if batch else (arg,):
            self._failed[id(message)] = fields


def _carrier(message: Message) -> dict[str, str]:
    raw = message.raw_fields
    carrier = {}
    for index in range(0, len(raw) - 1, 2):
        if raw[index] in (TRACEPARENT, TRACESTATE):
            value = raw[index + 1]
            carrier[raw[index].decode()] = value.decode() if isinstance(value, bytes) else str(value)
    return carrier
