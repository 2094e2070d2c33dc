"""`fastworker trim STREAM`: remove the entries every group is done with, keeping a retention window.

`--max-len` / `--max-age-s` apply an output stream's retention policy by hand, the one the fleet applies with
`--output-max-len` / `--output-max-age-s`. The decision is `fastworker.ops.trim.safe_trim`'s; this module parses
the window and the policy and says what was freed. Without a window or a policy, a trim removes every entry
that all groups acknowledged at once: it then asks first on a terminal (or takes --yes), and refuses without a
terminal (exit 2); --dry-run shows what would go.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fastworker.cli import at_least, number, settings_from_args
from fastworker.commands.output import confirm, format_bytes, plural, print_json, render_table
from fastworker.commands.status import add_common_flags, run_with_streams
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode
from fastworker.ops.trim import TrimResult, safe_trim


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "trim", help="remove entries every group has acknowledged (MINID), keeping a retention window",
        description="Trim STREAM with XTRIM MINID (exact) up to the oldest entry some group still needs (pending "
                    "or not yet delivered), keeping the newest --retain entries or those newer than --retain-s. "
                    "An output stream's policy: --max-len and --max-age-s keep at most that many, or that recent, "
                    "entries (an entry breaking either goes). Never removes an entry a group has not acknowledged; "
                    "a stream without groups is trimmed only with --force, by the window and policy alone.")
    parser.add_argument("stream", metavar="STREAM")
    parser.add_argument("--retain", type=at_least(0), default=0, metavar="N",
                        help="keep at least the newest N entries (default 0: no such window)")
    parser.add_argument("--retain-s", type=number(), default=0.0, metavar="S",
                        help="keep at least the entries added in the last S seconds (default 0: none)")
    parser.add_argument("--max-len", type=at_least(0), default=0, metavar="N",
                        help="keep at most the newest N entries, and any older one a group still needs "
                             "(default 0: no limit)")
    parser.add_argument("--max-age-s", type=number(), default=0.0, metavar="S",
                        help="keep nothing older than S seconds but what a group still needs (default 0: no limit)")
    parser.add_argument("--force", action="store_true",
                        help="trim a stream without groups (by the window and the policy alone)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    parser.add_argument("--yes", action="store_true",
                        help="without a window or policy: trim without asking (needed without a terminal)")
    add_common_flags(parser)
    parser.set_defaults(handler=trim)


def trim(args: argparse.Namespace) -> int:
    settings, _ = settings_from_args(args)
    result = run_with_streams(settings, lambda streams: _trim(streams, args))
    if args.json:
        print_json(result.to_dict())
    else:
        print(render_trim(result))
    return ExitCode.OK


async def _trim(streams: Streams, args: argparse.Namespace) -> TrimResult:
    async def attempt(dry_run: bool) -> TrimResult:
        return await safe_trim(streams, args.stream, args.retain, int(args.retain_s * 1000), max_len=args.max_len,
                               max_age_ms=int(args.max_age_s * 1000), force=args.force, dry_run=dry_run)

    bounded = args.retain or args.retain_s or args.max_len or args.max_age_s
    if args.dry_run or bounded or args.yes:
        return await attempt(args.dry_run)
    plan = await attempt(dry_run=True)  # no window: everything acknowledged goes, so say how much and ask
    if plan.minid is None:
        return dataclasses.replace(plan, dry_run=False)
    confirm(f"remove {plural(plan.removed, 'entry', 'entries')} of {plan.stream} below {plan.minid} (every entry all "
            "groups acknowledged; --retain N or --retain-s S keep a window)?", args.yes, "nothing trimmed")
    return await attempt(dry_run=False)


def render_trim(result: TrimResult) -> str:
    if result.minid is None:
        lines = [f"nothing to trim in {result.stream}: its oldest entry is still needed ({result.limited_by})"]
    elif result.dry_run:
        lines = [f"would remove {result.removed} entries of {result.stream} below {result.minid} "
                 f"(limited by: {result.limited_by}); length {result.length_before} -> {result.length_after}",
                 "dry run: nothing changed"]
    else:
        freed = None
        if result.memory_before is not None and result.memory_after is not None:
            freed = result.memory_before - result.memory_after
        lines = [f"removed {result.removed} entries of {result.stream} below {result.minid} "
                 f"(limited by: {result.limited_by})",
                 f"length {result.length_before} -> {result.length_after}, memory "
                 f"{format_bytes(result.memory_before)} -> {format_bytes(result.memory_after)} "
                 f"(freed {format_bytes(freed)})" + (", server checked acks (ACKED)" if result.acked_option else "")]
    rows = [(bound.reason, bound.keep_from) for bound in result.bounds]
    return "\n".join(lines) + "\n\n" + render_table(("KEPT FOR", "FROM ID"), rows)
