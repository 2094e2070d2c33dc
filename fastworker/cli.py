"""The `fastworker` command: argument parsing, logging set-up, and the one place errors become exit codes.

Each subcommand lives in its own module with `register(subparsers)`, which adds its parser and sets
`handler=<function(args) -> int>`. Every Settings field gets exactly one flag, derived from its name, so flags and
settings cannot drift apart. Any FastworkerError becomes one readable line on stderr and its exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fastworker import config, logs
from fastworker.config import Settings
from fastworker.errors import ConfigError, ExitCode, FastworkerError

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
)

CONNECTION_FIELDS = ("redis_url", "socket_timeout_s")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit code 2, without the usage dump."""

    def error(self, message: str) -> Any:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per Settings field (all, or those named), defaulting to None so that unset flags fall through
    to the environment and then the field default."""
    group = parser.add_argument_group("settings (flag > FASTWORKER_<NAME> environment > default)")
    for field in config.fields():
        if names is not None and field.name not in names:
            continue
        group.add_argument(config.flag_name(field.name), dest=f"setting_{field.name}", default=None,
                           metavar=field.name.rsplit("_", 1)[-1].upper() if field.name.endswith(("_ms", "_s"))
                           else field.name.upper(),
                           help=f"{field.metadata['help']} [{config.env_name(field.name)}]")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return ExitCode.USAGE
    try:
        configure_logging(args)
        return int(args.handler(args))
    except FastworkerError as exc:
        print(f"fastworker: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
