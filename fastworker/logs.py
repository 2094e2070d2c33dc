"""Logging set-up: text for people, JSON lines for log shippers. Configured once per process.

Messages carry their context as `key=value` pairs (`started worker process index=%d pid=%s`). In JSON, each such
pair becomes a field of its own, with its value's type (`"pid": 4242`), and leaves the message, so that a log
shipper can filter on `pid` and group by the message; other arguments stay in the message.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
CLEAR_LINE = "\x1b[2K"  # erase the terminal's current line (the cursor stays where it is)
# A %-conversion of a log message (or a literal %%), optionally right after `key=`.
_CONVERSION = re.compile(r"(\s?(\w+)=)?%(?:[#0 +-]*(?:\d+|\*)?(?:\.\d+)?)([diouxXeEfFgGcrsa%])")
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_RESERVED = frozenset({"time", "level", "logger", "process", "message", "exception"})


def fields_of(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """(the message without its `key=value` pairs, those pairs as fields), plus any `extra=` fields."""
    fields = {key: _plain(value) for key, value in vars(record).items()
              if key not in _RECORD_ATTRS and not key.startswith("_")}
    args = record.args
    if not isinstance(record.msg, str) or not isinstance(args, tuple) or not args:
        return record.getMessage(), fields
    kept_args: list[Any] = []
    position = 0

    def take(match: re.Match[str]) -> str:
        nonlocal position
        if match.group(3) == "%":
            return match.group(0)
        value = args[position] if position < len(args) else None
        position += 1
        name = match.group(2)
        if name is None or name in _RESERVED or name in fields:
            kept_args.append(value)
            return match.group(0)
        fields[name] = _plain(value)
        return ""

    try:
        template = _CONVERSION.sub(take, record.msg)
        message = template % tuple(kept_args) if kept_args or "%" in template else template
    except (TypeError, ValueError):  # a message that does not match its arguments: shown as it was written
        return str(record.msg), {}
    return message.strip(), fields


def _plain(value: Any) -> Any:
    """A value JSON can carry as itself: numbers, text, booleans and None stay, anything else becomes its text."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message, fields = fields_of(record)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": message,
            **fields,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TerminalFormatter(logging.Formatter):
    """Text for a terminal: each record starts by clearing the line, so that a progress line drawn in place (the
    demo's, publish's), possibly by another process on the same terminal, is replaced whole, never mixed into."""

    def format(self, record: logging.LogRecord) -> str:
        return CLEAR_LINE + super().format(record)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    text = TerminalFormatter(TEXT_FORMAT) if _is_terminal(sys.stderr) else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(JsonFormatter() if fmt == "json" else text)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure_unless_configured(level: str = "INFO", fmt: str = "text") -> None:
    """`configure`, unless the program has set up logging itself (the root logger has a handler)."""
    if not logging.getLogger().handlers:
        configure(level, fmt)


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """`1 worker process`, `2 worker processes`: the count with the word that fits it."""
    return f"{count:,} {singular if count == 1 else plural_form or singular + 's'}"
