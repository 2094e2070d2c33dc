"""`fastworker run MODULE:ATTR`: run an app's handlers as a fleet of worker processes."""

from __future__ import annotations

import argparse
from typing import Any

from fastworker import config
from fastworker.app import load_app
from fastworker.cli import add_settings_flags, settings_from_args
from fastworker.commands.dashboard import serve_dashboard
from fastworker.errors import ExitCode
from fastworker.supervisor import Supervisor


def register(sub: Any) -> None:
    parser = sub.add_parser("run", help="run an app's handlers (MODULE:ATTR) as a fleet of worker processes",
                            description="Run an app's handlers as a fleet of worker processes.")
    parser.add_argument("app", metavar="MODULE:ATTR", help="the App to run, e.g. fastworker.demo:app")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings and where each came from, then exit")
    parser.add_argument("--dashboard", action="store_true",
                        help="serve the web dashboard under /dashboard/ on --http-port, to this machine's clients "
                             "(needs fastworker[dashboard]; writes need FASTWORKER_DASHBOARD_TOKEN)")
    add_settings_flags(parser)
    parser.set_defaults(handler=run)


def print_config(settings: config.Settings, sources: dict[str, str]) -> None:
    width = max(len(field.name) for field in config.fields())
    for field in config.fields():
        value = settings.redacted_url() if field.name == "redis_url" else getattr(settings, field.name)
        print(f"{field.name:<{width}}  {value!s:<28} {sources[field.name]}")


def run(args: argparse.Namespace) -> int:
    settings, sources = settings_from_args(args)
    if args.print_config:
        print_config(settings, sources)
        return ExitCode.OK
    app = load_app(args.app)
    supervisor = Supervisor(args.app, app, settings)
    if args.dashboard:
        serve_dashboard(supervisor)
    return supervisor.run()
