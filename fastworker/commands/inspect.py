"""`fastworker inspect`: what a running fleet's worker processes are doing, asked of the fleet itself.

The supervisor serves it at `/inspect` on its `--http-port`: per worker process, its consumer names, the handlers it
runs, the handler calls in flight (entry, handler, deliveries, how long it has been running) and its recent
failures, as the workers reported them within the last second. Nothing is guessed from Redis: an entry pending in a
group may be in flight, parked for a retry or orphaned by a crash, and only the workers know which.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.request
from typing import Any

import orjson

from fastworker.cli import add_settings_flags, number, settings_from_args
from fastworker.commands.output import UsageError, format_age, plural, print_json, render_table
from fastworker.errors import ExitCode, FastworkerError

EPILOG = """\
The fleet must run with --http-port (its /inspect endpoint); point this command at it with --http-url, or with
--http-port (FASTWORKER_HTTP_PORT) for a fleet on this machine. RUNNING counts from when the worker first reported
the call: it is exact to about a second.
"""


class FleetUnreachable(FastworkerError):
    """The fleet's HTTP endpoint did not answer (not running, or without --http-port)."""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect", help="what a running fleet's worker processes do: handlers, calls in flight, recent failures",
        description="Show, per worker process of a running fleet, its consumers, its handlers, the handler calls in "
                    "flight with their running time, and its recent failures (served by the fleet at /inspect).",
        epilog=EPILOG)
    parser.add_argument("--http-url", metavar="URL",
                        help="the fleet's HTTP address, e.g. http://10.0.0.5:9464 (default: this machine, at "
                             "--http-port)")
    parser.add_argument("--timeout-s", type=number(above=True, unit="seconds"), default=5.0, metavar="S",
                        help="give up on an answer after this many seconds")
    parser.add_argument("--json", action="store_true", help="print the fleet's answer as JSON")
    add_settings_flags(parser, ("http_port",))
    parser.set_defaults(handler=inspect)


def inspect(args: argparse.Namespace) -> int:
    url = fleet_url(args)
    answer = fetch(url, args.timeout_s)
    if args.json:
        print_json({"url": url, **answer})
    else:
        print(render(answer, url))
    return ExitCode.OK


def fleet_url(args: argparse.Namespace) -> str:
    if args.http_url:
        return str(args.http_url).rstrip("/")
    settings, _ = settings_from_args(args)
    if not settings.http_port:
        raise UsageError("say where the fleet serves HTTP: --http-url URL, or --http-port PORT (a fleet on this "
                         "machine, run with that --http-port)")
    return f"http://127.0.0.1:{settings.http_port}"


def fetch(url: str, timeout_s: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{url}/inspect", timeout=timeout_s) as response:
            answer: dict[str, Any] = orjson.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        raise FleetUnreachable(f"{url}/inspect answered {exc.code} {exc.reason}: is it a fastworker fleet (and one "
                               "recent enough to have /inspect)?") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FleetUnreachable(f"cannot reach the fleet at {url}/inspect: {reason} (is it running, with "
                               "--http-port?)") from exc
    except orjson.JSONDecodeError as exc:
        raise FleetUnreachable(f"{url}/inspect did not answer JSON: is it a fastworker fleet?") from exc


def render(answer: dict[str, Any], url: str) -> str:
    supervisor, workers = answer.get("supervisor", {}), answer.get("workers", [])
    up_ms = int((time.time() - supervisor.get("started_at", time.time())) * 1000)
    state = ", stopping" if supervisor.get("stopping") else ""
    head = (f"fleet at {url}: supervisor pid {supervisor.get('pid')}, "
            f"{plural(len(workers), 'worker process', 'worker processes')}, up {format_age(up_ms)}{state}")
    return "\n\n".join((head, _processes(workers), _in_flight(workers), _failures(workers)))


def _processes(workers: list[dict[str, Any]]) -> str:
    rows = [(w["index"], w.get("pid") or "-", w.get("state", "?"), ", ".join(w.get("consumers") or w["names"]),
             ", ".join(f"{h['handler']} ({h['stream']}, group {h['group']}, {h['kind']})"
                       for h in w.get("handlers", [])) or "-")
            for w in workers]
    return render_table(("PROCESS", "PID", "STATE", "CONSUMERS", "HANDLERS"), rows)


def _in_flight(workers: list[dict[str, Any]]) -> str:
    # running_s was measured when the worker reported; the report is report_age_s old by now
    rows = [(w["index"], call["stream"], call["id"], call["handler"], call["deliveries"],
             f"{call['running_s'] + (w.get('report_age_s') or 0):.1f} s")
            for w in workers for call in sorted(w.get("in_flight", []), key=lambda c: -c["running_s"])]
    if not rows:
        return "no handler calls in flight"
    return f"IN FLIGHT ({len(rows)})\n" + render_table(
        ("PROCESS", "STREAM", "ENTRY ID", "HANDLER", "DELIVERIES", "RUNNING"), rows)


def _failures(workers: list[dict[str, Any]]) -> str:
    now = time.time()
    failures = sorted(((w["index"], failure) for w in workers for failure in w.get("recent_failures", [])),
                      key=lambda item: -item[1]["at"])
    rows = [(index, f"{format_age(int((now - f['at']) * 1000))} ago", f["stream"], f["id"], f["handler"],
             f["deliveries"], f["action"], f"{f['error_class']}: {f['error']}") for index, f in failures]
    if not rows:
        return "no recent failures"
    return "RECENT FAILURES (newest first)\n" + render_table(
        ("PROCESS", "WHEN", "STREAM", "ENTRY ID", "HANDLER", "DELIVERIES", "THEN", "ERROR"), rows)
