"""`fastworker replay STREAM`: re-publish a range of entries, or move a group's cursor.

`--from ID --to ID [--to-stream S]` appends copies of the range's entries; `--group G --reset-to ID` moves the
group's last delivered id (XGROUP SETID). Both print what they will do and change nothing without `--yes`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fastworker.cli import settings_from_args
from fastworker.commands.output import UsageError, print_json
from fastworker.commands.status import add_common_flags, run_with_streams
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode
from fastworker.ops.inspect import parse_id, require_stream
from fastworker.ops.replay import ReplayPlan, ResetPlan, plan_replay, plan_reset, replay, reset_group

DRY_RUN_NOTE = "dry run: nothing changed; pass --yes to do it"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "replay", help="re-publish a range of entries, or move a group's cursor (needs --yes to act)",
        description="Re-publish the entries of STREAM with ids in [--from, --to] (to STREAM or --to-stream), or "
                    "move --group's cursor to --reset-to (XGROUP SETID). Prints the plan; acts only with --yes.")
    parser.add_argument("stream", metavar="STREAM")
    parser.add_argument("--from", dest="start", metavar="ID", help="first entry id of the range (- for the first)")
    parser.add_argument("--to", dest="end", metavar="ID", help="last entry id of the range (+ for the last)")
    parser.add_argument("--to-stream", metavar="STREAM", help="publish the copies here (default: STREAM)")
    parser.add_argument("--group", metavar="GROUP", help="the group whose cursor --reset-to moves")
    parser.add_argument("--reset-to", metavar="ID", help="new last delivered id of --group (0, $ or an entry id)")
    parser.add_argument("--yes", action="store_true", help="act (without it: show the plan, change nothing)")
    add_common_flags(parser)
    parser.set_defaults(handler=replay_command)


def _mode(args: argparse.Namespace) -> str:
    ranged = args.start is not None or args.end is not None or args.to_stream is not None
    resetting = args.group is not None or args.reset_to is not None
    if ranged == resetting:
        raise UsageError("give either --from ID --to ID (replay a range) or --group G --reset-to ID")
    if ranged and (args.start is None or args.end is None):
        raise UsageError("a replay needs both --from and --to (use - and + for the whole stream)")
    if resetting and (args.group is None or args.reset_to is None):
        raise UsageError("moving a cursor needs both --group and --reset-to")
    return "range" if ranged else "reset"


def replay_command(args: argparse.Namespace) -> int:
    mode = _mode(args)
    settings, _ = settings_from_args(args)

    async def work(streams: Streams) -> None:
        if mode == "range":
            await _range(streams, args)
        else:
            await _reset(streams, args)

    run_with_streams(settings, work)
    return ExitCode.OK


async def _range(streams: Streams, args: argparse.Namespace) -> None:
    await require_stream(streams, args.stream)  # a misspelt name is an error, not "nothing to replay"
    plan = await plan_replay(streams, args.stream, args.start, args.end, args.to_stream)
    new_ids = await replay(streams, plan) if args.yes else []
    if args.json:
        print_json({"action": "replay", "dry_run": not args.yes, "plan": dataclasses.asdict(plan),
                    "replayed": len(new_ids), "new_ids": new_ids})
        return
    print(_describe_range(plan, done=args.yes))
    if args.yes and new_ids:
        print(f"new ids {new_ids[0]} .. {new_ids[-1]}")
    elif not args.yes:
        print(DRY_RUN_NOTE)


def _describe_range(plan: ReplayPlan, done: bool) -> str:
    verb = "replayed" if done else "would replay"
    if plan.count == 0:
        return f"no entries of {plan.stream} in [{plan.start}, {plan.end}]: nothing to replay"
    return (f"{verb} {plan.count} entr{'y' if plan.count == 1 else 'ies'} of {plan.stream} "
            f"[{plan.first_id} .. {plan.last_id}] to {plan.to_stream} (copies with new ids; originals stay)")


async def _reset(streams: Streams, args: argparse.Namespace) -> None:
    plan = await plan_reset(streams, args.stream, args.group, args.reset_to)
    if args.yes:
        await reset_group(streams, plan)
    if args.json:
        print_json({"action": "reset", "dry_run": not args.yes, "plan": plan.to_dict()})
        return
    verb = "moved" if args.yes else "would move"
    print(f"{verb} group {plan.group} on {plan.stream} from {plan.current_id} to {plan.new_id} "
          f"(pending {plan.pending}, lag {'unknown' if plan.lag is None else plan.lag})")
    print(_consequence(plan))
    if not args.yes:
        print(DRY_RUN_NOTE)


def _consequence(plan: ResetPlan) -> str:
    kept = "; pending entries stay pending"
    if plan.new_id == "$":
        return "every entry not yet delivered to the group is skipped: the group reads only new entries" + kept
    new, current = parse_id("0-0" if plan.new_id == "0" else plan.new_id), parse_id(plan.current_id)
    if new < current:
        return f"entries after {plan.new_id} will be delivered to the group again" + kept
    if new > current:
        return f"entries after {plan.current_id} up to {plan.new_id} will never be delivered to the group" + kept
    return "the cursor is already there: nothing changes"
