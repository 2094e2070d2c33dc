"""`fastworker trim STREAM`: remove the entries every group is done with, keeping a retention window.

`--max-len` / `--max-age-s` apply an output stream's retention policy by hand, the one the fleet applies with
`--output-max-len` / `--output-max-age-s`. The decision is `fastworker.ops.trim.safe_trim`'s; this module parses
the window and the policy and says what was freed.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastworker.cli import settings_from_args
from fastworker.commands.status import (
    UsageError,
    add_common_flags,
    format_bytes,
    print_json,
    render_table,
    run_with_streams,
)
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
    parser.add_argument("--retain", type=int, default=0, metavar="N", help="keep at least the newest N entries")
    parser.add_argument("--retain-s", type=float, default=0.0, metavar="S",
                        help="keep at least the entries added in the last S seconds")
    parser.add_argument("--max-len", type=int, default=0, metavar="N",
                        help="keep at most the newest N entries (and any older one a group still needs)")
    parser.add_argument("--max-age-s", type=float, default=0.0, metavar="S",
                        help="keep nothing older than S seconds (but any entry a group still needs)")
    parser.add_argument("--force", action="store_true",
                        help="trim a stream without groups (by the window and the policy alone)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    add_common_flags(parser)
    parser.set_defaults(handler=trim)


def trim(args: argparse.Namespace) -> int:
    if min(args.retain, args.retain_s, args.max_len, args.max_age_s) < 0:
        raise UsageError("--retain, --retain-s, --max-len and --max-age-s must not be negative")
    settings, _ = settings_from_args(args)
    result = run_with_streams(settings, lambda streams: safe_trim(
        streams, args.stream, args.retain, int(args.retain_s * 1000), max_len=args.max_len,
        max_age_ms=int(args.max_age_s * 1000), force=args.force, dry_run=args.dry_run))
    if args.json:
        print_json(result.to_dict())
    else:
        print(render_trim(result))
    return ExitCode.OK


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
