"""The handler registry: which function handles which stream for which consumer group.

An `App` is built at import time of the user's module and loaded in every worker process from its
`module:attr` reference, so it holds only functions and plain data. One handler per (stream, group); a stream
may have handlers in several groups (each group gets every entry).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

from fastworker.errors import AppImportError, PayloadInvalid
from fastworker.message import DEFAULT_PAYLOAD_FIELD, PAYLOAD_MODES, Message, PayloadMode
from fastworker.payloads import PayloadType, payload_type_of
from fastworker.policy import Backoff

MessageHandler = Callable[[Message], Any]
BatchHandler = Callable[[list[Message]], Any]
Hook = Callable[[], Awaitable[None] | None]


@dataclasses.dataclass(frozen=True)
class Dedup:
    """Opt-in idempotency for handlers with side effects outside Redis (a payment, an e-mail, an API call).

    After a handler call succeeds, a key naming the unit of work is recorded with a TTL, at once (not with the
    batch's settlement), together with the results the call emitted. A later delivery of the same unit, after a
    crash between the side effect and the acknowledgement, or a producer's retried XADD when `field` is set,
    skips the handler, republishes the recorded results and is acknowledged. The window that remains is between
    the side effect and the record: one call, instead of a whole batch.
    """

    field: str | None = None  # a payload field naming the unit of work (e.g. "job_id"); None: stream + entry id
    ttl_s: float = 86_400.0

    def key(self, group: str, message: Message) -> str:
        value = message.payload.get(self.field) if self.field and isinstance(message.payload, dict) else None
        if value is None:
            return f"fw:done:{group}:{message.stream}:{message.id}"
        return f"fw:done:{group}:{self.field}:{value}"


@dataclasses.dataclass(frozen=True)
class Handler:
    """One registered handler and how its entries are decoded and dispatched."""

    stream: str
    group: str
    func: Callable[..., Any]
    batch: bool = False
    payload: PayloadMode = "auto"
    payload_field: str = DEFAULT_PAYLOAD_FIELD
    dedup: Dedup | None = None
    retry: Backoff | None = None  # None: the fleet's default backoff (settings)
    max_deliveries: int | None = None  # None: the fleet's default (settings)
    dead_on: tuple[type[BaseException], ...] = ()  # failures that dead-letter at once, besides validation errors
    typed: PayloadType | None = None  # the declared payload type, None for an untyped handler
    delete_acked: bool = False  # ack with XACKDEL ... ACKED where the server has it (Redis 8.2+)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    @property
    def name(self) -> str:
        return getattr(self.func, "__qualname__", repr(self.func))


class App:
    """A set of handlers. Register with the `handler` decorator:

        app = App()

        @app.handler("betterbundle:data-jobs", group="data-processors")
        async def analyse(msg: Message) -> None:
            msg.emit("betterbundle:analysis-results", {"job_id": msg.payload["job_id"], "status": "completed"})
    """

    def __init__(self, name: str = "fastworker") -> None:
        self.name = name
        self.handlers: list[Handler] = []
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []

    def handler(self, stream: str, *, group: str, batch: bool = False, payload: PayloadMode = "auto",
                payload_field: str = DEFAULT_PAYLOAD_FIELD, dedup: Dedup | bool | None = None,
                retry: Backoff | None = None, max_deliveries: int | None = None,
                dead_on: Iterable[type[BaseException]] = (), payload_type: Any = None,
                delete_acked: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a function for the entries of `stream` read through consumer `group`.

        The function takes one `Message` (or, with `batch=True`, the list of a batch's messages for this stream),
        may be sync (run in a thread, off the event loop) or async. Returning means success; raising `Reject`
        dead-letters now; any other exception leaves the entry pending for a retry. `payload` picks the decoding:
        `auto` (JSON of the `data` field if present, else the flat fields as str), `json` (the field is
        required), `fields` (flat fields as str) or `raw` (no decoding; read `msg.fields`). `dedup=True` (or a
        `Dedup`) skips entries whose work was already done; see `Dedup`.

        Typed payloads: annotate the message `msg: Message[AnalysisJob]` (or pass `payload_type=AnalysisJob`) with a
        msgspec Struct, a dataclass, a TypedDict or a pydantic model, and `msg.payload` is built as that type; an
        entry that does not fit is dead-lettered at its first delivery as PayloadInvalid, naming the field path.
        Failures: `retry` (a `Backoff`) spaces the retries (default: the fleet's `--retry-*` settings), a `Retry`
        raised with `delay_s` picks the next delay; `max_deliveries` overrides the fleet's; exceptions of the
        classes in `dead_on` (and validation errors: msgspec's, pydantic's, PayloadInvalid) dead-letter at once.

        `delete_acked=True`: an entry is deleted from `stream` once every consumer group of the stream has
        acknowledged it (XACKDEL ... ACKED, Redis 8.2+), so the stream's memory stays flat without trimming. Entries
        another group has not read or acknowledged yet stay until it has, and a group that acknowledges with plain
        XACK (no `delete_acked`, or another program) leaves behind the entries it acknowledges last: give every
        group of the stream the option. A reader without a group (plain XREAD) is not waited for. Dead letters and
        results are kept. On a server without XACKDEL the worker says so once at start and acknowledges with XACK:
        the entries stay, for the trim (`--trim-interval-s`).
        """
        if not stream or not group:
            raise ValueError("a handler needs a stream and a group")
        if payload not in PAYLOAD_MODES:
            raise ValueError(f"payload must be one of {', '.join(PAYLOAD_MODES)}, got {payload!r}")
        if any(h.stream == stream and h.group == group for h in self.handlers):
            raise ValueError(f"stream {stream!r} already has a handler in group {group!r}")
        if dedup and batch:
            raise ValueError("dedup works per message: it cannot be combined with batch=True")
        if max_deliveries is not None and max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, got {max_deliveries}")
        deadly = tuple(dead_on)
        if not all(isinstance(kind, type) and issubclass(kind, BaseException) for kind in deadly):
            raise ValueError(f"dead_on takes exception classes, got {deadly!r}")
        if any(h.stream == stream and h.delete_acked != delete_acked for h in self.handlers):
            raise ValueError(f"stream {stream!r} has a handler with delete_acked={not delete_acked}: give every group "
                             "of a stream the same delete_acked (XACKDEL ... ACKED deletes an entry only when every "
                             "group acknowledged it with XACKDEL)")
        rule = Dedup() if dedup is True else (dedup or None)

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            typed = payload_type_of(func, payload_type)
            if typed is not None and payload == "raw":
                raise ValueError("a typed payload needs decoding: payload='raw' cannot be combined with it")
            self.handlers.append(Handler(stream, group, func, batch, payload, payload_field, rule, retry,
                                         max_deliveries, validation_errors() + deadly, typed, delete_acked))
            return func

        return register

    def on_startup(self, func: Hook) -> Hook:
        """Run `func` once in every worker process before it reads (open pools, load models)."""
        self.startup_hooks.append(func)
        return func

    def on_shutdown(self, func: Hook) -> Hook:
        """Run `func` once in every worker process after its last batch is settled."""
        self.shutdown_hooks.append(func)
        return func

    def groups(self) -> dict[str, dict[str, Handler]]:
        """Handlers by group, then by stream: one consumer loop per group reads all of its streams at once."""
        by_group: dict[str, dict[str, Handler]] = {}
        for handler in self.handlers:
            by_group.setdefault(handler.group, {})[handler.stream] = handler
        return by_group

    def streams(self) -> list[str]:
        return sorted({handler.stream for handler in self.handlers})


def validation_errors() -> tuple[type[BaseException], ...]:
    """The payload validation errors every handler dead-letters at once: no retry makes a payload fit."""
    kinds: tuple[type[BaseException], ...] = (PayloadInvalid, msgspec.ValidationError)
    pydantic = sys.modules.get("pydantic")  # only when the app uses it: importing it costs a second
    if pydantic is not None:
        kinds += (pydantic.ValidationError,)
    return kinds


def load_app(reference: str) -> App:
    """Import `module:attr` and return the App it names, or raise AppImportError saying what went wrong."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise AppImportError(f"app reference {reference!r} must look like module:attribute")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: apps in the working directory are importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppImportError(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise AppImportError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else type(app).__name__
        raise AppImportError(f"{reference!r} must name a fastworker App, found {found}")
    if not app.handlers:
        raise AppImportError(f"app {reference!r} has no handlers")
    return app
