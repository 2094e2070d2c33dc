"""Subcommands of the `fastworker` command, one module each."""
