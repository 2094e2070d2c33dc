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
from collections.abc import Awaitable, Callable
from typing import Any

from fastworker.errors import AppImportError
from fastworker.message import DEFAULT_PAYLOAD_FIELD, PAYLOAD_MODES, Message, PayloadMode

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
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a function for the entries of `stream` read through consumer `group`.

        The function takes one `Message` (or, with `batch=True`, the list of a batch's messages for this stream),
        may be sync (run in a thread, off the event loop) or async. Returning means success; raising `Reject`
        dead-letters now; any other exception leaves the entry pending for a retry. `payload` picks the decoding:
        `auto` (JSON of the `data` field if present, else the flat fields as str), `json` (the field is
        required), `fields` (flat fields as str) or `raw` (no decoding; read `msg.fields`). `dedup=True` (or a
        `Dedup`) skips entries whose work was already done; see `Dedup`.
        """
        if not stream or not group:
            raise ValueError("a handler needs a stream and a group")
        if payload not in PAYLOAD_MODES:
            raise ValueError(f"payload must be one of {', '.join(PAYLOAD_MODES)}, got {payload!r}")
        if any(h.stream == stream and h.group == group for h in self.handlers):
            raise ValueError(f"stream {stream!r} already has a handler in group {group!r}")
        if dedup and batch:
            raise ValueError("dedup works per message: it cannot be combined with batch=True")
        rule = Dedup() if dedup is True else (dedup or None)

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self.handlers.append(Handler(stream, group, func, batch, payload, payload_field, rule))
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
