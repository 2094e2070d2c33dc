"""The dashboard's ASGI app (Starlette): pages and fragments rendered by Jinja2, a small JSON API, the guard.

Pages are rendered on the server with autoescaping on; the page's script only swaps in fragments this app
rendered, polling every interval, and sends write requests (JSON, with the token in a header). Reading and writing
go through `fastworker.ops`: `snapshot` (via the sampler), `list_dead_letters`, `get_dead_letter`,
`requeue_dead_letters`, `purge_dead_letters`, `plan_replay` and `replay`.

Invariants: every request passes the guard's read check; every request that changes data passes its write check
first; purge and requeue touch dead-letter streams only (a purge is XDEL by id: on any other stream it would
delete jobs); the server URL is only ever shown redacted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastworker.commands.status import format_age, format_bytes
from fastworker.config import Settings
from fastworker.dashboard import views
from fastworker.dashboard.sampler import Sampler
from fastworker.dashboard.security import SECURITY_HEADERS, Guard
from fastworker.edge.streams import Streams
from fastworker.errors import FastworkerError, RedisAuthError, RedisUnavailable
from fastworker.ops.deadletters import (
    DeadLetter,
    dead_letter_pair,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    requeue_dead_letters,
)
from fastworker.ops.inspect import DEFAULT_DEAD_AFTER_MS, Snapshot, is_dead_letter_stream, parse_id, snapshot
from fastworker.ops.replay import plan_replay, replay

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
LIST_LIMIT = 200  # dead letters in one list
MAX_SELECTION = 1000  # dead letters in one requeue or purge
MAX_BODY_BYTES = 256 * 1024
MAX_NAME_CHARS = 1024


class FleetView(Protocol):
    """What the dashboard shows of a fleet that serves it."""

    def workers(self) -> list[dict[str, Any]]: ...
    def handlers(self) -> list[dict[str, str]]: ...


class Dashboard:
    """The dashboard's state: the server connection, the sampler, the guard, and the fleet that serves it."""

    def __init__(self, settings: Settings, *, stream_names: Sequence[str] | None = None, token: str | None = None,
                 fleet: FleetView | None = None, interval_s: float = 2.0,
                 dead_after_ms: int = DEFAULT_DEAD_AFTER_MS, loopback_hosts_only: bool = True,
                 loopback_clients_only: bool = False) -> None:
        self.settings = settings
        self.stream_names = list(stream_names) if stream_names is not None else None  # None: every stream
        self.fleet = fleet
        self.dead_after_ms = dead_after_ms
        self.guard = Guard(token or None, loopback_hosts_only, loopback_clients_only)
        self.sampler = Sampler(self._take, interval_s)
        self._streams: Streams | None = None

    @property
    def streams(self) -> Streams:
        if self._streams is None:  # made in the serving event loop: its connections belong to that loop
            self._streams = Streams(self.settings)
        return self._streams

    async def _take(self) -> Snapshot:
        return await snapshot(self.streams, self.stream_names, dead_letter_suffix=self.settings.dead_letter_suffix,
                              dead_after_ms=self.dead_after_ms)

    async def aclose(self) -> None:
        await self.sampler.aclose()
        if self._streams is not None:
            await self._streams.aclose()
            self._streams = None

    def dead_letter_streams(self, snap: Snapshot | None) -> list[str]:
        """Every dead-letter stream the snapshot knows of that has letters (or exists on its own)."""
        if snap is None:
            return []
        names = {s.name for s in snap.streams if s.is_dead_letter and s.exists}
        names |= {s.dead_letter_stream for s in snap.streams if s.dead_letter_stream and s.dead_letters}
        return sorted(names)


# --- the app ------------------------------------------------------------------------------------------------------

def create_app(dashboard: Dashboard) -> Starlette:
    """The ASGI app of `dashboard`; its lifespan starts the sampler's timer and closes the connection."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(age=format_age, size=format_bytes, rate=views.format_rate, clip=views.clip,
                       one_line=views.one_line, utc=views.utc)
    env.globals.update(role=views.consumer_role, preview=views.fields_preview)
    pages = Pages(dashboard, env)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dashboard.sampler.start()
        try:
            yield
        finally:
            await dashboard.aclose()

    routes = [
        Route("/", pages.index),
        Route("/fragments/live", pages.live),
        Route("/fragments/dead-letters", pages.dead_letters),
        Route("/fragments/dead-letter", pages.dead_letter),
        Route("/api/snapshot", pages.snapshot_json),
        Route("/api/replay-plan", pages.replay_plan),
        Route("/api/check-token", pages.check_token, methods=["POST"]),
        Route("/api/dead-letters/requeue", pages.requeue, methods=["POST"]),
        Route("/api/dead-letters/purge", pages.purge, methods=["POST"]),
        Route("/api/replay", pages.replay, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers = {FastworkerError: _error_response, HTTPException: _error_response}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(GuardMiddleware, guard=dashboard.guard)
    return app


async def _error_response(request: Request, exc: Exception) -> Response:
    """An error as one line (JSON under /api/): an HTTPException's own status; for a FastworkerError 503 when the
    server cannot be read, else 400 (a malformed id, a missing stream)."""
    if isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
    else:
        status, message = (503 if isinstance(exc, RedisUnavailable | RedisAuthError) else 400), str(exc)
    if request.url.path.removeprefix(request.scope.get("root_path", "")).startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return PlainTextResponse(message, status_code=status)


class GuardMiddleware:
    """Refuses requests the guard says may not read, and adds the security headers to every response."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        client = request.client.host if request.client else None
        refused = self.guard.refuse_read(request.headers, client)
        if refused is not None:
            logger.debug("dashboard refused a request client=%s reason=%s", client, refused)
            await PlainTextResponse(refused + "\n", status_code=403, headers=SECURITY_HEADERS)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Pages:
    """The request handlers."""

    def __init__(self, dashboard: Dashboard, env: Environment) -> None:
        self.dashboard = dashboard
        self.env = env

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        dashboard = self.dashboard
        context.setdefault("url", dashboard.settings.redacted_url())
        context.setdefault("writable", dashboard.guard.writable)
        context.setdefault("fleet", dashboard.fleet is not None)
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status)

    async def _live_context(self) -> dict[str, Any]:
        dashboard = self.dashboard
        dashboard.sampler.start()
        snap = await dashboard.sampler.current()
        charts = {}
        if snap is not None:
            charts = {s.name: views.stream_chart(dashboard.sampler.history, snap.taken_at_ms, s.name,
                                                 [g.name for g in s.groups])
                      for s in snap.streams if not s.is_dead_letter}
        return {"snap": snap, "error": dashboard.sampler.error, "history": dashboard.sampler.history,
                "charts": charts, "workers": dashboard.fleet.workers() if dashboard.fleet else None,
                "handlers": dashboard.fleet.handlers() if dashboard.fleet else None,
                "dead_streams": dashboard.dead_letter_streams(snap),
                "suffix": dashboard.settings.dead_letter_suffix}

    async def index(self, request: Request) -> Response:
        context = await self._live_context()
        letters = await self._letters(request, context["dead_streams"])
        return self.render("index.html", interval_ms=int(self.dashboard.sampler.interval_s * 1000),
                           **context, **letters)

    async def live(self, request: Request) -> Response:
        return self.render("_live.html", **await self._live_context())

    # -- dead letters -------------------------------------------------------------------------------------------

    async def _letters(self, request: Request, known: list[str]) -> dict[str, Any]:
        """The dead letters the request's filters select: stream, error class, dead since / until (ms)."""
        params = request.query_params
        stream = params.get("stream", "")
        error_class = params.get("error_class", "").strip() or None
        start, end = _time_bound(params.get("since_ms"), "-"), _time_bound(params.get("until_ms"), "+")
        dead_streams = [dead_letter_pair(stream, self.dashboard.settings.dead_letter_suffix)[1]] if stream else known
        letters: list[tuple[str, DeadLetter]] = []
        for dead_stream in dead_streams:
            found = await list_dead_letters(self.dashboard.streams, dead_stream, start=start, end=end,
                                            count=LIST_LIMIT, error_class=error_class)
            letters += [(dead_stream, letter) for letter in found]
        letters.sort(key=lambda pair: parse_id(pair[1].id))
        return {"letters": letters[:LIST_LIMIT], "more": len(letters) > LIST_LIMIT, "limit": LIST_LIMIT,
                "filters": {"stream": stream, "error_class": error_class or "",
                            "since_ms": params.get("since_ms", ""), "until_ms": params.get("until_ms", "")},
                "error_classes": sorted({letter.error_class for _, letter in letters if letter.error_class})}

    async def dead_letters(self, request: Request) -> Response:
        snap = await self.dashboard.sampler.current()
        letters = await self._letters(request, self.dashboard.dead_letter_streams(snap))
        return self.render("_dead_letters.html", **letters)

    async def dead_letter(self, request: Request) -> Response:
        dead_stream = _dead_stream(request.query_params.get("stream", ""), self.dashboard.settings)
        entry_id = _entry_id(request.query_params.get("id", ""))
        letter = await get_dead_letter(self.dashboard.streams, dead_stream, entry_id)
        if letter is None:
            return self.render("_letter.html", status=404, letter=None, stream=dead_stream, id=entry_id)
        return self.render("_letter.html", letter=letter, stream=dead_stream, id=entry_id,
                           fields=views.letter_fields(letter), facts=views.letter_facts(letter),
                           traceback=views.clip(letter.meta.get("traceback", ""), views.DETAIL_CHARS))

    # -- JSON ---------------------------------------------------------------------------------------------------

    async def snapshot_json(self, request: Request) -> Response:
        snap = await self.dashboard.sampler.current()
        if snap is None:
            return JSONResponse({"url": self.dashboard.settings.redacted_url(), "error": self.dashboard.sampler.error},
                                status_code=503)
        history = self.dashboard.sampler.history
        rates = {s.name: {"added_per_s": history.added_rate(s.name),
                          "acked_per_s": {g.name: history.acked_rate(s.name, g.name) for g in s.groups}}
                 for s in snap.streams}
        workers = self.dashboard.fleet.workers() if self.dashboard.fleet else None
        return JSONResponse({"url": self.dashboard.settings.redacted_url(), **snap.to_dict(), "rates": rates,
                             "workers": workers, "writable": self.dashboard.guard.writable})

    async def replay_plan(self, request: Request) -> Response:
        params = request.query_params
        plan = await plan_replay(self.dashboard.streams, _name(params.get("stream", "")), params.get("from", "-"),
                                 params.get("to", "+"), params.get("to_stream") or None)
        return JSONResponse({"stream": plan.stream, "to_stream": plan.to_stream, "count": plan.count,
                             "first_id": plan.first_id, "last_id": plan.last_id})

    # -- writes -------------------------------------------------------------------------------------------------

    async def _write_body(self, request: Request) -> dict[str, Any]:
        """The JSON body of a write request that passed the guard's write check; raises 403 or 400."""
        refused = self.dashboard.guard.refuse_write(request.headers)
        if refused is not None:
            logger.warning("dashboard refused a write path=%s reason=%s", request.url.path, refused)
            raise HTTPException(403, refused)
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise HTTPException(413, f"a write request needs a Content-Length of at most {MAX_BODY_BYTES} bytes")
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return body

    async def check_token(self, request: Request) -> Response:
        await self._write_body(request)
        return Response(status_code=204)

    def _selection(self, body: dict[str, Any]) -> dict[str, list[str]]:
        """dead-letter stream -> ids, from `{"letters": [{"stream": ..., "id": ...}, ...]}`."""
        letters = body.get("letters")
        if not isinstance(letters, list) or not letters or len(letters) > MAX_SELECTION:
            raise HTTPException(400, f"letters must be a list of 1 to {MAX_SELECTION} {{stream, id}} objects")
        selection: dict[str, list[str]] = {}
        for item in letters:
            if not isinstance(item, dict):
                raise HTTPException(400, "each letter must be a {stream, id} object")
            dead_stream = _dead_stream(item.get("stream"), self.dashboard.settings)
            selection.setdefault(dead_stream, []).append(_entry_id(item.get("id")))
        return selection

    async def requeue(self, request: Request) -> Response:
        selection = self._selection(await self._write_body(request))
        requeued, skipped = [], []
        for dead_stream, ids in selection.items():
            source = dead_letter_pair(dead_stream, self.dashboard.settings.dead_letter_suffix)[0]
            result = await requeue_dead_letters(self.dashboard.streams, dead_stream, ids, source)
            requeued += [{"stream": dead_stream, "id": d, "to": s, "new_id": n} for d, s, n in result.requeued]
            skipped += [{"stream": dead_stream, "id": d, "reason": r} for d, r in result.skipped]
        logger.info("dashboard requeued dead letters count=%d skipped=%d", len(requeued), len(skipped))
        await self._refresh()
        return JSONResponse({"requeued": requeued, "skipped": skipped})

    async def purge(self, request: Request) -> Response:
        selection = self._selection(await self._write_body(request))
        purged = 0
        for dead_stream, ids in selection.items():
            purged += await purge_dead_letters(self.dashboard.streams, dead_stream, ids)
        logger.info("dashboard purged dead letters count=%d", purged)
        await self._refresh()
        return JSONResponse({"purged": purged})

    async def replay(self, request: Request) -> Response:
        body = await self._write_body(request)
        stream, to_stream = _name(body.get("stream")), body.get("to_stream") or None
        plan = await plan_replay(self.dashboard.streams, stream, str(body.get("from", "")),
                                 str(body.get("to", "")), None if to_stream is None else _name(to_stream))
        new_ids = await replay(self.dashboard.streams, plan)
        logger.info("dashboard replayed stream=%s first=%s last=%s to=%s count=%d", plan.stream, plan.first_id,
                    plan.last_id, plan.to_stream, len(new_ids))
        await self._refresh()
        return JSONResponse({"stream": plan.stream, "to_stream": plan.to_stream, "replayed": len(new_ids),
                             "first_id": plan.first_id, "last_id": plan.last_id})

    async def _refresh(self) -> None:
        """Sample now, so that the next poll shows the change at once."""
        with contextlib.suppress(FastworkerError):
            await self.dashboard.sampler.sample()


# --- request values -----------------------------------------------------------------------------------------------

def _name(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise HTTPException(400, "a stream name is required (at most 1024 characters)")
    return value


def _dead_stream(value: Any, settings: Settings) -> str:
    """`value` when it names a dead-letter stream; purge and requeue act on nothing else."""
    name = _name(value)
    if not is_dead_letter_stream(name, settings.dead_letter_suffix):
        raise HTTPException(400, f"not a dead-letter stream (its name must end with {settings.dead_letter_suffix})")
    return name


def _entry_id(value: Any) -> str:
    if not isinstance(value, str):
        raise HTTPException(400, "an entry id is required")
    try:
        parse_id(value)
    except FastworkerError as exc:
        raise HTTPException(400, str(exc)) from None
    return value


def _time_bound(value: str | None, default: str) -> str:
    """An XRANGE bound from a time in milliseconds (an id's time part), or `default`."""
    if not value:
        return default
    if not value.isdigit():
        raise HTTPException(400, "since_ms and until_ms must be milliseconds since the epoch")
    return value

