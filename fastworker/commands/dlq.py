"""`fastworker dlq list|show|requeue|purge STREAM`: look at dead letters, send them back, or delete them.

STREAM is the source stream (its dead letters are in STREAM + the dead-letter suffix) or the dead-letter stream
itself. The work is done by `fastworker.ops.deadletters`; this module selects letters and renders. Purge is the
only destructive action and asks for confirmation on a terminal unless `--yes`; without a terminal it refuses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fastworker.cli import settings_from_args
from fastworker.commands.status import (
    UsageError,
    add_common_flags,
    format_age,
    print_json,
    render_table,
    run_with_streams,
)
from fastworker.errors import ExitCode, FastworkerError
from fastworker.ops.deadletters import (
    DeadLetter,
    dead_letter_pair,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    requeue_dead_letters,
)
from fastworker.ops.inspect import server_time_ms
from fastworker.streams import Streams

ERROR_WIDTH = 60


class ConfirmationRequired(UsageError):
    """A destructive command was not confirmed."""


class DeadLetterNotFound(FastworkerError):
    """The dead letter named by its id does not exist."""


def register(sub: Any) -> None:
    parser = sub.add_parser("dlq", help="list, show, requeue or purge dead letters",
                            description="Dead letters of STREAM (the source stream, or its dead-letter stream).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    listing = actions.add_parser("list", help="list dead letters (oldest first)")
    _add_selection(listing, default_count=100)
    show = actions.add_parser("show", help="one dead letter in full")
    show.add_argument("stream", metavar="STREAM")
    show.add_argument("id", metavar="ID", help="the dead letter's id in the dead-letter stream")
    add_common_flags(show)
    requeue = actions.add_parser("requeue", help="move dead letters back to their source stream")
    _add_selection(requeue, ids=True)
    purge = actions.add_parser("purge", help="delete dead letters (asks first, unless --yes)")
    _add_selection(purge, ids=True)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.set_defaults(handler=dlq)


def _add_selection(parser: argparse.ArgumentParser, default_count: int | None = None, ids: bool = False) -> None:
    parser.add_argument("stream", metavar="STREAM")
    if ids:
        parser.add_argument("ids", nargs="*", metavar="ID", help="dead letter ids (default: every one selected)")
    parser.add_argument("--from", dest="start", default="-", metavar="ID", help="first dead letter id (default -)")
    parser.add_argument("--to", dest="end", default="+", metavar="ID", help="last dead letter id (default +)")
    parser.add_argument("--count", type=int, default=default_count, metavar="N",
                        help=f"at most N letters (default {default_count or 'all'})")
    parser.add_argument("--error-class", default=None, metavar="NAME", help="only letters of this error class")
    add_common_flags(parser)


def dlq(args: argparse.Namespace) -> int:
    settings, _ = settings_from_args(args)
    source, dead_stream = dead_letter_pair(args.stream, settings.dead_letter_suffix)
    handlers = {"list": _list, "show": _show, "requeue": _requeue, "purge": _purge}

    async def work(streams: Streams) -> int:
        return await handlers[args.action](streams, args, source, dead_stream)

    return run_with_streams(settings, work)


async def _select(streams: Streams, args: argparse.Namespace, dead_stream: str) -> list[DeadLetter]:
    """The letters named by id (if any), else those in the --from/--to range; filtered by --error-class."""
    wanted = getattr(args, "ids", None)
    if not wanted:
        return await list_dead_letters(streams, dead_stream, start=args.start, end=args.end, count=args.count,
                                       error_class=args.error_class)
    letters = [letter for entry_id in dict.fromkeys(wanted)
               if (letter := await get_dead_letter(streams, dead_stream, entry_id)) is not None]
    return [letter for letter in letters if args.error_class in (None, letter.error_class)]


async def _list(streams: Streams, args: argparse.Namespace, source: str, dead_stream: str) -> int:
    letters = await _select(streams, args, dead_stream)
    if args.json:
        print_json({"stream": source, "dead_letter_stream": dead_stream,
                    "letters": [letter.to_dict() for letter in letters]})
        return ExitCode.OK
    if not letters:
        print(f"no dead letters in {dead_stream}")
        return ExitCode.OK
    now_ms = await server_time_ms(streams)
    rows = [(letter.id, format_age(_since(letter, now_ms)), letter.source_id or "-", letter.group or "-",
             letter.deliveries if letter.deliveries is not None else "-", letter.requeues, letter.error_class,
             _one_line(letter.error)) for letter in letters]
    print(render_table(("ID", "DEAD FOR", "SOURCE ID", "GROUP", "DELIVERIES", "REQUEUES", "ERROR CLASS", "ERROR"),
                       rows))
    if args.count is not None and len(letters) == args.count:
        print(f"(first {args.count}; use --count or --from for more)")
    return ExitCode.OK


def _since(letter: DeadLetter, now_ms: int) -> int | None:
    return None if letter.dead_at_ms is None else max(0, now_ms - letter.dead_at_ms)


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= ERROR_WIDTH else flat[:ERROR_WIDTH - 3] + "..."


async def _show(streams: Streams, args: argparse.Namespace, source: str, dead_stream: str) -> int:
    letter = await get_dead_letter(streams, dead_stream, args.id)
    if letter is None:
        raise DeadLetterNotFound(f"no dead letter {args.id} in {dead_stream}")
    if args.json:
        print_json({"dead_letter_stream": dead_stream, **letter.to_dict()})
        return ExitCode.OK
    dead_at = "-"
    if letter.dead_at_ms is not None:
        dead_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(letter.dead_at_ms / 1000))
    facts = [("source", f"{letter.source_stream or source} {letter.source_id or '?'} (group {letter.group or '?'})"),
             ("error class", letter.error_class or "-"), ("deliveries", letter.deliveries),
             ("requeues", letter.requeues), ("dead at", dead_at), ("error", letter.error or "-")]
    print(f"dead letter {letter.id} in {dead_stream}")
    for name, value in facts:
        print(f"  {name:<12} {value}")
    print("fields" if letter.original else "fields: none (the entry was deleted before it was handled)")
    for key, value in letter.to_dict()["fields"].items():
        print(f"  {key}: {_pretty(value)}")
    return ExitCode.OK


def _pretty(value: str) -> str:
    try:
        document = json.loads(value)
    except ValueError:
        return value
    if not isinstance(document, dict | list):
        return value
    return json.dumps(document, indent=2).replace("\n", "\n  ")


async def _requeue(streams: Streams, args: argparse.Namespace, source: str, dead_stream: str) -> int:
    letters = await _select(streams, args, dead_stream)
    missing = [i for i in args.ids if i not in {letter.id for letter in letters}]
    result = await requeue_dead_letters(streams, dead_stream, [letter.id for letter in letters], source)
    result.skipped += [(i, "not found in the selection") for i in missing]
    if args.json:
        print_json(result.to_dict())
    else:
        for dead_id, stream, new_id in result.requeued:
            print(f"requeued {dead_id} -> {stream} {new_id}")
        for dead_id, reason in result.skipped:
            print(f"skipped {dead_id}: {reason}")
        print(f"{len(result.requeued)} requeued, {len(result.skipped)} skipped")
    return ExitCode.FAILURE if result.skipped else ExitCode.OK


async def _purge(streams: Streams, args: argparse.Namespace, source: str, dead_stream: str) -> int:
    letters = await _select(streams, args, dead_stream)
    if not letters:
        print(f"nothing to purge in {dead_stream}")
        return ExitCode.OK
    if not args.yes:
        _confirm(f"purge {len(letters)} dead letter(s) from {dead_stream}?")
    purged = await purge_dead_letters(streams, dead_stream, [letter.id for letter in letters])
    if args.json:
        print_json({"dead_letter_stream": dead_stream, "purged": purged})
    else:
        print(f"purged {purged} dead letter(s) from {dead_stream}")
    return ExitCode.OK


def _confirm(question: str) -> None:
    """Ask on the terminal; refuse when there is none (a script must say --yes)."""
    if not sys.stdin.isatty():
        raise ConfirmationRequired(f"{question} refusing without confirmation: stdin is not a terminal "
                                   "(pass --yes)")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise ConfirmationRequired("not confirmed: nothing purged")
