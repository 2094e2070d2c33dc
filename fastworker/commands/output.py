"""How the commands print: plain text for pipes and scripts, rich tables and colours on a terminal.

Invariant: output that is not a terminal (a pipe, a file, a test) is plain, stable text: columns separated by two
spaces, no escape codes, whatever the environment says. On a terminal, tables and colours come from rich, and
`NO_COLOR` (any value) or `TERM=dumb` turns the colours off. rich is imported only when it draws, so a command in a
pipe does not pay for it. Ages, sizes and JSON are formatted here, so every command shows them the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from fastworker.errors import ExitCode, FastworkerError


class UsageError(FastworkerError):
    """Options that do not fit together, or a destructive action without its confirmation."""

    exit_code = ExitCode.USAGE


class ConfirmationRequired(UsageError):
    """A destructive command was not confirmed."""


@dataclasses.dataclass(frozen=True)
class Styled:
    """A table cell with a rich style (`red`, `bold yellow`, ...): coloured on a terminal, plain text elsewhere."""

    text: str
    style: str

    def __str__(self) -> str:
        return self.text


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by something without a file, or closed
        return False


def colours(stream: IO[str] | None = None) -> bool:
    """Whether to colour `stream`: a terminal, and neither NO_COLOR (https://no-color.org) nor TERM=dumb."""
    return is_terminal(stream) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The rows as a table: rich on a terminal, else left-aligned columns separated by two spaces."""
    if is_terminal():
        return _rich_table(headers, rows)
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]
    lines = ["  ".join(text.ljust(widths[i]) for i, text in enumerate(row)).rstrip()
             for row in [list(headers), *cells]]
    return "\n".join(lines)


def _rich_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell.text, style=cell.style) if isinstance(cell, Styled) else Text(str(cell))
                        for cell in row))
    console = _console()
    with console.capture() as captured:
        console.print(table)
    return str(captured.get()).rstrip("\n")


def _console(stream: IO[str] | None = None) -> Any:
    from rich.console import Console

    stream = sys.stdout if stream is None else stream
    return Console(file=stream, no_color=not colours(stream), highlight=False, soft_wrap=False)


def error_line(message: str) -> None:
    """`fastworker: error: message` on stderr, the prefix in red where colours are on."""
    if colours(sys.stderr):
        from rich.markup import escape

        _console(sys.stderr).print(f"[bold red]fastworker: error:[/] {escape(message)}", soft_wrap=True)
    else:
        print(f"fastworker: error: {message}", file=sys.stderr)


def warning_line(message: str) -> None:
    if colours(sys.stderr):
        from rich.markup import escape

        _console(sys.stderr).print(f"[yellow]fastworker: warning:[/] {escape(message)}", soft_wrap=True)
    else:
        print(f"fastworker: warning: {message}", file=sys.stderr)


def confirm(question: str, yes: bool, refusal: str = "nothing changed") -> None:
    """Go on when `yes` (the --yes flag) or when the user answers y on the terminal; else raise
    ConfirmationRequired (exit 2). Without a terminal it refuses at once: a script must say --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfirmationRequired(f"{question} refusing without confirmation: stdin is not a terminal "
                                   "(pass --yes, or --dry-run to see what it would do)")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise ConfirmationRequired(f"not confirmed: {refusal}")


def format_age(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = ms // 1000
    if seconds < 1:
        return f"{ms}ms"
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def format_rate(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    return f"{per_s:,.0f}/s" if per_s >= 10 else f"{per_s:.1f}/s"


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else plural_form or noun + 's'}"


def print_json(data: Any, compact: bool = False) -> None:
    print(json.dumps(data, indent=None if compact else 2, default=str), flush=True)
