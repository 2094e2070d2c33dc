"""`fastworker check MODULE:ATTR`: a dry run for deploy pipelines. Would `fastworker run` start with these
settings, here?

In order, each step stopping at the first failure with its one-line reason and its exit code (the same as `run`
would give): the app imports (4), the settings resolve without a hazard (3, printed with where each value that is
not a default came from), the server answers (5; 9 for a certificate that does not verify), and its ACL lets this
user run every command the fleet needs, housekeeping included as the settings switch it on (6). Then each handler
with its stream and group, and whether the group exists (a missing one is created when the fleet starts). Nothing
is written: no group, consumer or key is created.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastworker import config
from fastworker.app import App, load_app
from fastworker.cli import add_settings_flags, settings_from_args
from fastworker.commands.status import run_with_streams
from fastworker.config import Settings
from fastworker.edge.admin import Admin
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode
from fastworker.logs import plural
from fastworker.ops.inspect import check_health, groups_info
from fastworker.permissions import check_permissions

EPILOG = f"""\
exit codes: {int(ExitCode.OK)} the fleet can start; {int(ExitCode.APP_IMPORT)} the app does not import; \
{int(ExitCode.CONFIG)} a setting is malformed or hazardous; {int(ExitCode.REDIS_UNREACHABLE)} the server cannot be \
reached; {int(ExitCode.REDIS_AUTH)} credentials or a permission refused; {int(ExitCode.TLS)} the server's \
certificate does not verify.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "check", help="a dry run for deploys: import the app, resolve the settings, connect, check permissions",
        description="Check that `fastworker run MODULE:ATTR` would start with these settings: the app imports, the "
                    "settings are sound, the server answers and lets this user run what the fleet needs. Prints "
                    "each handler with its stream and group. Writes nothing.",
        epilog=EPILOG)
    parser.add_argument("app", metavar="MODULE:ATTR", help="the App to check, e.g. fastworker.demo:app")
    add_settings_flags(parser)
    parser.set_defaults(handler=check)


def check(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    print(f"app          {args.app}: {plural(len(app.handlers), 'handler')} in "
          f"{plural(len(app.groups()), 'group')}")
    settings, sources = settings_from_args(args)
    print(f"settings     {describe_sources(settings, sources)}")
    run_with_streams(settings, lambda streams: _server(streams, app, settings))
    print(f"ok: `fastworker run {args.app}` can start with these settings")
    return ExitCode.OK


def describe_sources(settings: Settings, sources: dict[str, str]) -> str:
    """The settings not at their default, each with where it came from; the server URL always."""
    shown = []
    for field in config.fields():
        source = sources.get(field.name, "default")
        if source == "default" and field.name != "redis_url":
            continue
        value = settings.redacted_url() if field.name == "redis_url" else getattr(settings, field.name)
        if isinstance(value, tuple):
            value = ",".join(value) or "none"
        shown.append(f"{field.name}={value} ({source})")
    return ", ".join(shown) + "; the rest default"


async def _server(streams: Streams, app: App, settings: Settings) -> None:
    """Each step's line as soon as it passed: a failure's one line (from the CLI) then follows the last good one."""
    health = await check_health(streams)
    print(f"server       {health.server} {health.version} at {settings.redacted_url()}, PING "
          f"{health.latency_ms:.2f} ms", flush=True)
    await check_permissions(streams, app, settings)
    print(f"permissions  user {Admin(streams).user!r} may run every command the fleet needs with these settings")
    print("handlers")
    for handler in app.handlers:
        kind = "batch" if handler.batch else ("async" if handler.is_async else "sync")
        group = await _group_state(streams, handler.stream, handler.group, settings.group_start_id)
        print(f"  {handler.name} ({kind}): stream {handler.stream}, group {handler.group}: {group}")


async def _group_state(streams: Streams, stream: str, group: str, start_id: str) -> str:
    groups = await groups_info(streams, stream)
    found = next((g for g in groups or [] if g.name == group), None)
    if found is None:
        where = "the stream does not exist yet" if groups is None else "missing"
        return f"{where}: the group is created at {start_id} when the fleet starts"
    return f"exists, {found.pending} pending, lag {'unknown' if found.lag is None else found.lag}"
