"""The ``sts`` command's tree: every group and command, as the README's table lists them.

``sts/cli/`` holds one module per command group and ``sts.cli.main`` (the console script of
``pyproject.toml``) assembles them: a group left out of the assembly, or a command registered
on the wrong group, would vanish from ``sts`` without any other test noticing at once.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
from click.testing import CliRunner

from sts.cli import main

REPO = Path(__file__).resolve().parents[2]

COMMANDS = {
    "audit": {"checkpoint", "export", "prune", "query", "summarize", "tail", "verify"},
    "baseline": {"accept", "reset", "show"},
    "clients": {"secret"},
    "config": {"check"},
    "db": {"current", "history", "restored", "upgrade"},
    "dev": {"issuer", "token"},
    "keys": {"jwks", "list", "prune", "rotate"},
    "policy": {"check", "explain", "schema"},
    "revoke": {"subject"},
    "serve": set(),
}


def test_every_group_and_command_is_assembled() -> None:
    tree = {
        name: set(command.commands) if isinstance(command, click.Group) else set()
        for name, command in main.commands.items()
    }
    assert tree == COMMANDS


def test_the_console_script_is_the_assembled_group() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sts": "sts.cli:main"}


def test_each_group_answers_help_and_an_unknown_command_is_a_usage_error() -> None:
    runner = CliRunner()
    for group, commands in COMMANDS.items():
        shown = runner.invoke(main, [group, "--help"], prog_name="sts")
        assert shown.exit_code == 0, shown.output
        assert f"Usage: sts {group} " in shown.output
        for command in commands:
            assert f"  {command} " in shown.output
    unknown = runner.invoke(main, ["no-such-command"], prog_name="sts")
    assert unknown.exit_code == 2
    assert "No such command 'no-such-command'" in unknown.output
