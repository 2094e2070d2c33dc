# PYTHON_ARGCOMPLETE_OK
"""The `fastworker` command: argument parsing, logging set-up, and the one place errors become exit codes.

Each subcommand lives in its own module with `register(subparsers)`, which adds its parser and sets
`handler=<function(args) -> int>`. Every Settings field gets exactly one flag, derived from its name, so flags and
settings cannot drift apart. The rules every command follows live here, once:
- every numeric option is checked at parse time, range and unit, by one of the value types below (a settings flag
  by the setting's own range); a bad command line is one line and exit 2, and so is a UsageError;
- no abbreviations: `--batch` is an unknown flag, not `--batch-size`;
- a FASTWORKER_* variable that names no setting is warned about, with the closest name;
- any FastworkerError becomes one line on stderr and its exit code; a connection error says which setting gave
  the URL; a reader that goes away (`| head`) ends the command quietly with exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastworker import config, logs
from fastworker.commands.output import UsageError, error_line, warning_line
from fastworker.config import Settings
from fastworker.errors import (
    ConfigError,
    ExitCode,
    FastworkerError,
    RedisAuthError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnavailable,
)

__all__ = ["ArgumentParser", "UsageError", "at_least", "main", "number", "port"]

logger = logging.getLogger(__name__)

# Subcommand modules, in the order `fastworker --help` lists them.
COMMAND_MODULES = (
    "fastworker.commands.demo",
    "fastworker.commands.run",
    "fastworker.commands.status",
    "fastworker.commands.health",
    "fastworker.commands.dlq",
    "fastworker.commands.replay",
    "fastworker.commands.trim",
    "fastworker.commands.publish",
    "fastworker.commands.tail",
    "fastworker.commands.inspect",
    "fastworker.commands.check",
    "fastworker.commands.dashboard",
)

CONNECTION_FIELDS = ("redis_url", "socket_timeout_s")
DB_OUT_OF_RANGE = "DB index is out of range"  # the server's reply to SELECT of a database it does not have


# --- value types: every numeric option takes one of these ----------------------------------------------------------

def at_least(low: int, unit: str = "") -> Callable[[str], int]:
    """A whole number >= `low` (e.g. `type=at_least(1)` for a count)."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number{_of(unit)}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{_in(unit)}, got {value}" if low else
                                             f"must not be negative, got {value}")
        return value

    return whole


def number(low: float = 0.0, *, above: bool = False, high: float = math.inf,
           unit: str = "seconds") -> Callable[[str], float]:
    """A finite number >= `low` (> `low` when `above`) and <= `high`, in `unit` (e.g. `type=number(above=True)`
    for a positive number of seconds, `number(high=1, unit="")` for a share)."""
    def checked(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a number{_of(unit)}, got {text!r}")
        if above and not value > low:
            raise argparse.ArgumentTypeError(f"must be more than {low:g}{_in(unit)}, got {text}" if low else
                                             f"must be more than 0{_in(unit)}, got {text}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}{_in(unit)}, got {text}" if low else
                                             f"must not be negative, got {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}{_in(unit)}, got {text}")
        return value

    return checked


def port(text: str) -> int:
    """A TCP port number, 1 to 65535."""
    value = at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1 to 65535), got {value}")
    return value


def _of(unit: str) -> str:
    return f" of {unit}" if unit else ""


def _in(unit: str) -> str:
    return f" {unit}" if unit else ""


def _setting_type(field: Any) -> Callable[[str], str]:
    """Checks a settings flag's value at parse time by the setting's own type and range; the text is kept (the
    flag's value is resolved with the environment's by `config.load_settings`)."""
    def checked(text: str) -> str:
        try:
            value = config.parse_text(field, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        problem = config.value_problem(field.name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text

    checked.__name__ = field.name  # what argparse calls the type in its own messages
    return checked


# --- the parser ---------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, and keeps a description or epilog laid out as written when it
    has line breaks of its own (one-line texts are wrapped to the terminal)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default in (argparse.SUPPRESS, [])):
            return text
        return f"{text} (default: {shown(action.default).replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return "\n".join(indent + line for line in self._split_lines(text, width - len(indent)))

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never break inside a flag (`--http-` / `port`): wrap at spaces only.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations and with defaults in --help; a bad flag is one line and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # `--batch 100` must be an error, not a guess at --batch-size
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None,
                       defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per Settings field (all, or those named), defaulting to None so that unset flags fall through
    to the environment and then the field default. `defaults`: a command's own defaults, shown in its help."""
    group = parser.add_argument_group("settings (flag > FASTWORKER_<NAME> environment > default)")
    for field in config.fields():
        if names is not None and field.name not in names:
            continue
        metavar = field.name.rsplit("_", 1)[-1].upper() if field.name.endswith(("_ms", "_s")) else field.name.upper()
        group.add_argument(config.flag_name(field.name), dest=f"setting_{field.name}", default=None,
                           type=_setting_type(field), metavar=metavar,
                           help=_setting_help(field, (defaults or {}).get(field.name, field.default)))


def _setting_help(field: Any, default: Any = dataclasses.MISSING) -> str:
    """The field's help in flags (`block_ms` -> `--block-ms`), with its default and unit, and its variable."""
    text = str(field.metadata["help"])
    for other in config.fields():
        if other.name != field.name:
            text = text.replace(other.name, config.flag_name(other.name))
    default = field.default if default is dataclasses.MISSING else default
    if "default" not in text and default is not dataclasses.MISSING:
        unit = " ms" if field.name.endswith("_ms") else " s" if field.name.endswith("_s") else ""
        text += f" (default: {shown(default)}{unit})"
    return f"{text} [{config.env_name(field.name)}]".replace("%", "%%")


def shown(default: Any) -> str:
    """A default as help shows it: 3600 rather than 3600.0, a list as a comma list (none when empty)."""
    if isinstance(default, tuple | list):
        return ",".join(map(str, default)) or "none"
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(parser, CONNECTION_FIELDS)


def flag_values(args: argparse.Namespace) -> dict[str, str]:
    return {key.removeprefix("setting_"): value for key, value in vars(args).items()
            if key.startswith("setting_") and value is not None}


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """The resolved settings (flag > environment > default) and where each value came from."""
    return config.load_settings(flag_values(args))


def configure_logging(args: argparse.Namespace) -> None:
    """Log as the resolved settings say (flag > environment > default), validated like every setting."""
    level = getattr(args, "setting_log_level", None) or config.environ_value("log_level") or "INFO"
    fmt = getattr(args, "setting_log_format", None) or config.environ_value("log_format") or "text"
    sources = {name: "flag" if getattr(args, f"setting_{name}", None) else f"env:{config.env_name(name)}"
               for name in ("log_level", "log_format")}
    with config.named(sources):
        problems = config.logging_problems(level, fmt)
    if problems:
        raise ConfigError(problems[0])
    logs.configure(level, fmt)


def build_parser() -> ArgumentParser:
    from fastworker import __version__

    parser = ArgumentParser(prog="fastworker", description="A Redis Streams worker fleet.")
    parser.add_argument("--version", action="version", version=f"fastworker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


# --- running a command --------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`| head`): it has what it wanted, so that is the end of the command, not an error
        # (exit 0, nothing on stderr). Python's exit flush would complain about the closed pipe: stdout goes to
        # /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # shell completion asks (see README); exits once it has answered
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return ExitCode.USAGE
    for warning in config.unknown_environment():
        warning_line(warning)
    try:
        configure_logging(args)
        code = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, inside main, rather than at the interpreter's exit
        return code
    except FastworkerError as exc:
        message, code = in_user_words(exc, args)
        error_line(message)
        return code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def in_user_words(exc: FastworkerError, args: argparse.Namespace) -> tuple[str, int]:
    """The error's line and exit code; a connection error also says which setting gave the URL."""
    message = str(exc)
    # TLS and ACL refusals carry their own advice: the URL it came from is not the problem
    about_connection = isinstance(exc, RedisUnavailable | RedisAuthError) and not isinstance(
        exc, RedisTLSError | RedisPermissionError)
    if not about_connection and DB_OUT_OF_RANGE not in message:
        return message, int(exc.exit_code)
    try:
        settings, sources = settings_from_args(args)
    except FastworkerError:
        return message, int(exc.exit_code)
    origin = url_origin(sources.get("redis_url", "default"))
    if DB_OUT_OF_RANGE in message:
        db = settings.redis_url.rsplit("/", 1)[-1].partition("?")[0] or "0"
        return (f"the server has no database {db} ({settings.redacted_url()}: {DB_OUT_OF_RANGE}; databases are "
                f"numbered from 0, 16 of them unless the server is configured otherwise): {origin}",
                ExitCode.CONFIG)
    return f"{message.rstrip('.')}; {origin}", int(exc.exit_code)


def url_origin(source: str) -> str:
    """Which setting to change for the server URL, from its source as `config.load_settings` reports it."""
    if source.startswith("flag"):
        return "check --redis-url"
    if source.startswith("env:"):
        names = config.user_name("redis_url", source).replace("/", ", ")
        return f"check {names} in the environment (or pass --redis-url)"
    return ("no server URL was set, so the default (redis://localhost:6379/0) was tried: pass --redis-url, or set "
            "FASTWORKER_REDIS_URL or REDIS_URL")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
