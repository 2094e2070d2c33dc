"""`fastworker health`: an exit-code probe for Docker HEALTHCHECK and Kubernetes exec probes.

Exit 0 when the server answers and every required group exists; ExitCode.UNHEALTHY with the reason on one line
when it answers but something is missing (or PING is slower than allowed); RedisUnavailable and RedisAuthError keep
their own exit codes, so a probe's log tells "server down" from "wrong password" from "group missing".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from fastworker.cli import number, settings_from_args
from fastworker.commands.output import UsageError, print_json
from fastworker.commands.status import add_common_flags, app_pairs, run_with_streams
from fastworker.errors import ExitCode, FastworkerError
from fastworker.ops.inspect import Health, check_health


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "health", help="exit 0 when the server answers and the required groups exist (a probe)",
        description="PING the server (latency), show its name and version, and check that the required groups "
                    f"exist. Exit 0 when healthy, {int(ExitCode.UNHEALTHY)} with the reason otherwise, "
                    f"{int(ExitCode.REDIS_UNREACHABLE)} when unreachable, {int(ExitCode.REDIS_AUTH)} when the "
                    "credentials are refused.")
    parser.add_argument("--app", metavar="MODULE:ATTR", help="require the groups of this app's handlers")
    parser.add_argument("--stream", action="append", default=[], metavar="STREAM",
                        help="with --group: require GROUP on STREAM (repeatable)")
    parser.add_argument("--group", action="append", default=[], metavar="GROUP",
                        help="a group required on every --stream (repeatable)")
    parser.add_argument("--max-latency-ms", type=number(above=True, unit="milliseconds"), default=None, metavar="MS",
                        help="unhealthy when PING takes longer than this many milliseconds (default: no limit)")
    add_common_flags(parser, "print one JSON object (also on failure)")
    parser.set_defaults(handler=health)


def health(args: argparse.Namespace) -> int:
    if bool(args.stream) != bool(args.group):
        raise UsageError("--stream and --group go together: name the groups required on the streams")
    settings, _ = settings_from_args(args)
    required = app_pairs(args.app) + [(stream, group) for stream in args.stream for group in args.group]
    try:
        result = run_with_streams(settings, lambda streams: check_health(streams, required, args.max_latency_ms))
    except FastworkerError as exc:
        if not args.json:
            raise
        print_json({"healthy": False, "reason": str(exc), "exit_code": int(exc.exit_code)})
        return int(exc.exit_code)
    if args.json:
        print_json({**dataclasses.asdict(result), "url": settings.redacted_url()})
    else:
        _print(result)
    return ExitCode.OK if result.healthy else ExitCode.UNHEALTHY


def _print(result: Health) -> None:
    facts = f"{result.server} {result.version}, PING {result.latency_ms:.2f} ms"
    if result.healthy:
        print(f"healthy: {facts}")
    else:
        print(f"unhealthy: {result.reason} ({facts})", file=sys.stderr)
