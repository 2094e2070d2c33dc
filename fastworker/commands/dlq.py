"""`fastworker dlq list|show|requeue|purge STREAM`: look at dead letters, send them back, or delete them.

STREAM is the source stream (its dead letters are in STREAM + the dead-letter suffix) or the dead-letter stream
itself. The work is done by `fastworker.ops.deadletters`; this module selects letters and renders. The actions
that change many letters at once ask first: purge always, requeue when no ids are named (it would requeue every
letter selected). They ask on a terminal unless `--yes`, refuse without a terminal (exit 2), and both have
`--dry-run`. A source stream that does not exist, with no dead letters either, is an error (exit 1); a filter that
matches nothing says which error classes there are.
"""

from __future__ import annotations

import argparse
import difflib
import json
import time
from collections import Counter
from typing import Any

from fastworker.cli import at_least, settings_from_args
from fastworker.commands.output import confirm, format_age, plural, print_json, render_table
from fastworker.commands.status import add_common_flags, run_with_streams
from fastworker.edge.streams import Streams
from fastworker.errors import ExitCode, FastworkerError
from fastworker.ops.deadletters import (
    DeadLetter,
    dead_letter_pair,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    requeue_dead_letters,
)
from fastworker.ops.inspect import require_stream, server_time_ms, stream_exists

ERROR_WIDTH = 60


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
    requeue = actions.add_parser("requeue", help="move dead letters back to their source stream (without IDs: "
                                 "every letter selected, after asking)")
    _add_selection(requeue, ids=True)
    _add_confirmation(requeue, "requeue every letter selected without asking (needed without a terminal)")
    purge = actions.add_parser("purge", help="delete dead letters (asks first, unless --yes)")
    _add_selection(purge, ids=True)
    _add_confirmation(purge, "delete without asking (needed without a terminal)")
    parser.set_defaults(handler=dlq)


def _add_selection(parser: argparse.ArgumentParser, default_count: int | None = None, ids: bool = False) -> None:
    parser.add_argument("stream", metavar="STREAM")
    if ids:
        parser.add_argument("ids", nargs="*", metavar="ID", help="dead letter ids (default: every one selected)")
    parser.add_argument("--from", dest="start", default="-", metavar="ID", help="first dead letter id (default -)")
    parser.add_argument("--to", dest="end", default="+", metavar="ID", help="last dead letter id (default +)")
    parser.add_argument("--count", type=at_least(1), default=default_count, metavar="N",
                        help=f"at most N letters (default {default_count or 'all'})")
    parser.add_argument("--error-class", default=None, metavar="NAME", help="only letters of this error class")
    add_common_flags(parser)


def _add_confirmation(parser: argparse.ArgumentParser, yes_help: str) -> None:
    parser.add_argument("--yes", action="store_true", help=yes_help)
    parser.add_argument("--dry-run", action="store_true", help="list the letters it would act on, change nothing")


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


async def _none_selected(streams: Streams, args: argparse.Namespace, source: str, dead_stream: str) -> str:
    """Why nothing was selected, in one line. A name that does not exist says so: neither the stream nor its
    dead-letter stream is an error (StreamNotFound, exit 1); an error class without letters lists those present."""
    if not await stream_exists(streams, dead_stream):
        await require_stream(streams, source, f" and has no dead-letter stream {dead_stream} either")
        return f"no dead letters in {dead_stream}"
    if args.error_class is None:
        return f"no dead letters in {dead_stream}" + (" with those ids" if getattr(args, "ids", None) else "")
    classes = Counter(letter.error_class for letter in
                      await list_dead_letters(streams, dead_stream, start=args.start, end=args.end))
    if not classes:
        return f"no dead letters in {dead_stream}"
    close = difflib.get_close_matches(args.error_class, list(classes), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    present = ", ".join(f"{name or '(none)'} ({count})" for name, count in classes.most_common())
    return f"no dead letters of class {args.error_class} in {dead_stream}{hint}; classes present: {present}"


async def _list(streams: Streams, args: argparse.Namespace, source: str, dead_stream: str) -> int:
    letters = await _select(streams, args, dead_stream)
    note = await _none_selected(streams, args, source, dead_stream) if not letters else None
    if args.json:
        print_json({"stream": source, "dead_letter_stream": dead_stream,
                    "letters": [letter.to_dict() for letter in letters]})
        return ExitCode.OK
    if note is not None:
        print(note)
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
    if letter.traceback:
        print("traceback of the last failure")
        print("\n".join(f"  {line}" for line in letter.traceback.rstrip().splitlines()))
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
    if not letters:
        print(f"nothing to requeue: {await _none_selected(streams, args, source, dead_stream)}")
        return ExitCode.FAILURE if args.ids else ExitCode.OK
    if args.dry_run:
        return _dry_run("requeue", letters, dead_stream, args.json)
    if not args.ids:  # every letter selected: ask, as purge does
        confirm(f"requeue {plural(len(letters), 'dead letter')} from {dead_stream} to their source streams?",
                args.yes, "nothing requeued")
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
        print(f"nothing to purge: {await _none_selected(streams, args, source, dead_stream)}")
        return ExitCode.OK
    if args.dry_run:
        return _dry_run("purge", letters, dead_stream, args.json)
    confirm(f"purge {plural(len(letters), 'dead letter')} from {dead_stream}?", args.yes, "nothing purged")
    purged = await purge_dead_letters(streams, dead_stream, [letter.id for letter in letters])
    if args.json:
        print_json({"dead_letter_stream": dead_stream, "purged": purged})
    else:
        print(f"purged {plural(purged, 'dead letter')} from {dead_stream}")
    return ExitCode.OK


def _dry_run(action: str, letters: list[DeadLetter], dead_stream: str, as_json: bool) -> int:
    if as_json:
        print_json({"action": action, "dry_run": True, "dead_letter_stream": dead_stream,
                    "ids": [letter.id for letter in letters]})
        return ExitCode.OK
    for letter in letters:
        print(f"would {action} {letter.id} ({letter.error_class or 'no error class'})")
    print(f"dry run: would {action} {plural(len(letters), 'dead letter')} from {dead_stream}; nothing changed")
    return ExitCode.OK
