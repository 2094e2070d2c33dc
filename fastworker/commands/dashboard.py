"""`fastworker dashboard`: the live web dashboard against any server, served by uvicorn.

It listens on 127.0.0.1 unless told otherwise (`--host`) and is read-only unless started with a token (`--token`
or FASTWORKER_DASHBOARD_TOKEN); the page asks for the token before it requeues, purges or replays. The dashboard
itself is `fastworker.dashboard`; this module resolves the options, checks the server, binds the socket (so that a
port in use is one line and an exit code) and runs the server until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastworker import config
from fastworker.cli import CONNECTION_FIELDS, add_settings_flags, number, port, settings_from_args
from fastworker.commands.status import UsageError, app_pairs, run_with_streams
from fastworker.errors import ConfigError, ExitCode, FastworkerError

if TYPE_CHECKING:
    from fastworker.supervisor import Supervisor

DEFAULT_PORT = 8484
MIN_TOKEN_CHARS = 16
MIN_INTERVAL_S = 0.2
EXTRA_MODULES = ("starlette", "uvicorn", "jinja2")


class DashboardUnavailable(FastworkerError):
    """The optional dependencies of the dashboard are not installed."""

    exit_code = ExitCode.CONFIG


def require_extra() -> None:
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise DashboardUnavailable(f"the dashboard needs {', '.join(missing)}: pip install 'fastworker[dashboard]'")


def dashboard_token(flag: str | None) -> str | None:
    """The write token: the flag, else FASTWORKER_DASHBOARD_TOKEN, else None (read-only)."""
    token = flag if flag is not None else config.environ_value("dashboard_token")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the dashboard token must have at least {MIN_TOKEN_CHARS} characters (it lets whoever "
                          "holds it delete dead letters); e.g. `openssl rand -hex 16`")
    return token or None


def listen_port(text: str) -> int:
    """A TCP port number, or 0 for any free one."""
    return 0 if text.strip() == "0" else port(text)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "dashboard", help="a live web dashboard: streams, groups, consumers, dead letters",
        description="Serve a live web dashboard of a server: per stream its length, entries added and acknowledged "
                    "per second, groups with lag, pending and oldest pending entry, consumers, and dead letters "
                    "(filter, inspect, requeue, purge) and replay. Read-only unless started with a token.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=listen_port, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT}; 0: any free port, printed at start)")
    parser.add_argument("--token", default=None,
                        help="enable requeue, purge and replay for whoever presents this token (at least "
                             f"{MIN_TOKEN_CHARS} characters) [FASTWORKER_DASHBOARD_TOKEN]; without one: read-only")
    parser.add_argument("--app", metavar="MODULE:ATTR", help="show the streams of this app (default: every stream)")
    parser.add_argument("--stream", action="append", default=[], metavar="STREAM",
                        help="a stream to show (repeatable; default: every stream)")
    parser.add_argument("--interval-s", type=number(MIN_INTERVAL_S), default=2.0, metavar="S",
                        help="sample the server and refresh the page every S seconds (default 2)")
    parser.add_argument("--dead-after-s", type=number(above=True), default=3600.0, metavar="S",
                        help="a consumer with zero pending idle longer than this is dead (default 3600)")
    add_settings_flags(parser, (*CONNECTION_FIELDS, "dead_letter_suffix"))
    parser.set_defaults(handler=dashboard)


def dashboard(args: argparse.Namespace) -> int:
    require_extra()
    settings, _ = settings_from_args(args)
    token = dashboard_token(args.token)
    names: list[str] | None = sorted({stream for stream, _ in app_pairs(args.app)} | set(args.stream)) or None

    async def ping(streams: Any) -> float:
        return float(await streams.ping())

    run_with_streams(settings, ping)  # an unreachable server or refused credentials: one line and its exit code
    sock = bind(args.host, args.port)

    import uvicorn

    from fastworker.dashboard import Dashboard, create_app
    from fastworker.dashboard.security import is_loopback

    board = Dashboard(settings, stream_names=names, token=token, interval_s=args.interval_s,
                      dead_after_ms=int(args.dead_after_s * 1000), loopback_hosts_only=is_loopback(args.host))
    host = f"[{args.host}]" if ":" in args.host else args.host
    mode = "writes need the token" if token else "read-only: pass --token to requeue, purge and replay"
    print(f"fastworker dashboard on http://{host}:{sock.getsockname()[1]}/ for {settings.redacted_url()} ({mode}); "
          "Ctrl-C stops it", flush=True)
    config = uvicorn.Config(create_app(board), log_config=None, log_level="warning", access_log=False,
                            server_header=False, proxy_headers=False, lifespan="on")
    server(config).run(sockets=[sock])
    return ExitCode.OK


def server(config: Any) -> Any:
    """A uvicorn server that stops gracefully on Ctrl-C or SIGTERM and lets the command exit 0 (uvicorn itself
    raises the signal again once stopped, which would end the process with it)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def serve_dashboard(supervisor: Supervisor) -> None:
    """`fastworker run --dashboard`: the fleet serves the dashboard on its HTTP port, under /dashboard/."""
    require_extra()
    if not supervisor.settings.http_port:
        raise UsageError("--dashboard needs --http-port: the dashboard is served on the fleet's HTTP port")
    token = dashboard_token(None)
    from fastworker.dashboard.fleet import serve_on_fleet

    serve_on_fleet(supervisor, token)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (port in use, unknown address)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
