"""`fastworker publish STREAM`: publish one entry from flags, or many from a file or stdin of JSON lines.

Bulk input is read, validated and published one line at a time through `Publisher.publish_stream`, so memory stays
flat for any input size. Each line's JSON text is published as it was written (it is parsed only to validate it,
and to read the `--key` field). A malformed line, or one without the `--key` field, stops the publish: every line
before it is published, none after it, and the error names the line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import orjson
import uvloop

from fastworker.cli import UsageError, add_connection_flags, at_least, settings_from_args
from fastworker.commands.output import colours
from fastworker.errors import ExitCode, FastworkerError
from fastworker.partitions import MAX_PARTITIONS
from fastworker.publisher import Entry, KeyValue, Publisher

PROGRESS_INTERVAL_S = 0.2

EPILOG = """\
input:
  --json and --field publish one entry: the document in the `data` field, the fields beside it.
  --file PATH (or - for stdin) publishes one entry per line of JSON lines; blank lines are skipped and
  --field adds its fields to every entry. A malformed line stops the publish with an error naming the line:
  every line before it is published, none after it (use --check to validate a file without publishing).

partitions:
  A stream whose partition count is recorded on the server (STREAM:fw-partitions) is published to its
  partitions: --key FIELD names the JSON document's field (or a --field) whose value (a string or an integer,
  e.g. shop_id) picks each entry's partition, so one shop's entries stay in order in one partition; without
  --key the partitions take turns. --partitions N records N when no count is recorded, and stops with an
  error when another count is. On a cluster each partition's entries go to its master.

output:
  the entry ids, one per line, in input order (with --quiet only their count); a progress line on stderr
  when it is a terminal. The ids of a partitioned stream's entries are ids in their partition's stream.

exit codes:
  0 published; 1 a line is malformed or has no --key field (the lines before it are published), or the
  server refused an entry; 2 a bad command line; 3 --partitions differs from the count the server records;
  5 the server cannot be reached, or a reply was lost (the error says how many entries were confirmed;
  none is sent again); 6 credentials or a permission refused; 9 the server's certificate does not verify.
"""


class InputError(FastworkerError):
    """The input to publish is malformed (a line of a JSON lines file, for one)."""


def _json(text: str) -> str:
    """The document's text, validated: published as written (and `null` stays a document, not "none")."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    return text.strip()


def _partitions(text: str) -> int:
    count = at_least(1)(text)
    if count > MAX_PARTITIONS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_PARTITIONS}, got {count}")
    return count


def _key_value(document: Any, name: str, fields: dict[str, str]) -> KeyValue:
    """The value of the `--key` field: the document's top-level member `name`, else the `--field` of that name.
    ValueError naming what is wrong when there is none, or it is not a string or an integer."""
    if isinstance(document, dict) and name in document:
        value = document[name]
    elif name in fields:
        value = fields[name]
    else:
        raise ValueError(f"no field {name!r} to pick the partition by (--key {name})")
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"the --key field {name!r} is {orjson.dumps(value).decode()[:40]}: it must be a string or an "
                     "integer")


def _field(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "publish", help="publish entries to a stream: one from --json/--field, or JSON lines from --file",
        description="Publish entries to a stream, with the app's conventions (JSON in a `data` field).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stream", metavar="STREAM", help="the stream to publish to")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--json", type=_json, metavar="DOCUMENT", help="a JSON document, published in `data`")
    source.add_argument("--file", metavar="PATH", help="a file of JSON lines, one entry per line; - for stdin")
    parser.add_argument("--field", type=_field, action="append", default=[], metavar="NAME=VALUE",
                        help="a flat field (repeatable); with --file, added to every entry")
    parser.add_argument("--key", metavar="FIELD",
                        help="the field whose value picks each entry's partition, e.g. shop_id (see partitions)")
    parser.add_argument("--partitions", type=_partitions, metavar="N",
                        help=f"the stream's partition count (1..{MAX_PARTITIONS}): recorded when none is, checked "
                             "when one is")
    parser.add_argument("--check", action="store_true",
                        help="with --file: validate every line and print how many entries it holds; publish nothing")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the number of entries published")
    add_connection_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    fields = dict(args.field)
    if args.file is None and args.json is None and not fields:
        raise UsageError("nothing to publish: give --json, --field or --file (--file - reads stdin)")
    if args.check and args.file is None:
        raise UsageError("--check needs --file")
    if args.check:
        with _open(args.file) as lines:
            print(sum(1 for _ in _payloads(lines, args.file, checking=True, key=args.key, fields=fields)))
        return ExitCode.OK
    settings, _ = settings_from_args(args)
    return int(uvloop.run(_publish(args, settings, fields)))


async def _publish(args: argparse.Namespace, settings: Any, fields: dict[str, str]) -> int:
    async with Publisher(settings) as publisher:
        if args.file is None:
            document = None if args.json is None else orjson.Fragment(args.json)
            entry_id = await publisher.publish(args.stream, document, fields=fields, key=_single_key(args, fields),
                                               partitions=args.partitions)
            print(1 if args.quiet else entry_id)
            return ExitCode.OK
        progress = Progress(sys.stderr) if sys.stderr.isatty() else None
        with _open(args.file) as lines:
            try:
                count = await publisher.publish_stream(
                    args.stream, _payloads(lines, args.file, key=args.key, fields=fields), fields=fields,
                    partitions=args.partitions, on_ids=None if args.quiet else IdPrinter(), on_progress=progress)
            finally:
                if progress is not None:
                    progress.close()
    if args.quiet:
        print(count)
    return ExitCode.OK


def _single_key(args: argparse.Namespace, fields: dict[str, str]) -> KeyValue | None:
    if args.key is None:
        return None
    try:
        return _key_value(None if args.json is None else orjson.loads(args.json), args.key, fields)
    except ValueError as exc:
        raise InputError(f"cannot publish the entry: {exc}") from None


class IdPrinter:
    """Prints entry ids as they are confirmed. If stdout goes away (`| head`), publishing goes on without them."""

    def __init__(self) -> None:
        self._broken = False

    def __call__(self, ids: list[str]) -> None:
        if ids and not self._broken:
            try:
                sys.stdout.write("\n".join(ids) + "\n")
            except BrokenPipeError:
                self._broken = True
                # Nothing more can be written there, and Python's exit flush would complain about it.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _open(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _payloads(lines: IO[bytes], name: str, checking: bool = False, key: str | None = None,
              fields: dict[str, str] | None = None) -> Iterator[orjson.Fragment | Entry]:
    """Each non-blank line, validated, as a Fragment: its JSON text is published as written, not re-encoded. With
    `key`, an Entry of that Fragment carrying the value of its `key` field."""
    where = "stdin" if name == "-" else name
    published = 0
    outcome = "" if checking else "; the {} entries before it were published, none from this line on"
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"{where}, line {number}: not valid JSON ({exc}){outcome.format(published)}") from None
        if key is None:
            published += 1
            yield orjson.Fragment(text)
            continue
        try:
            value = _key_value(document, key, fields or {})
        except ValueError as exc:
            raise InputError(f"{where}, line {number}: {exc}{outcome.format(published)}") from None
        published += 1
        yield Entry(orjson.Fragment(text), key=value)


class Progress:
    """The count and rate of entries published so far, live on a terminal (rich redraws it a few times a second,
    off the publishing path); on anything else, one final line when closed."""

    def __init__(self, out: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import Progress as Live
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(file=out, no_color=not colours(out), highlight=False)
        self._live = Live(SpinnerColumn(), TextColumn("published {task.completed:,.0f} entries ({task.fields[rate]})"),
                          TimeElapsedColumn(), console=console, refresh_per_second=1 / PROGRESS_INTERVAL_S)
        self._task = self._live.add_task("publish", total=None, rate="-/s")
        self._started = time.monotonic()
        self._live.start()

    def __call__(self, count: int) -> None:
        rate = count / max(time.monotonic() - self._started, 1e-9)
        self._live.update(self._task, completed=count, rate=f"{rate:,.0f}/s")

    def close(self) -> None:
        self._live.stop()
