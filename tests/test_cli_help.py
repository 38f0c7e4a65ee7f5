"""Every command explains itself: --help works and documents every option."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from p2plb.cli import cli

COMMANDS = sorted(cli.commands)


def test_every_command_of_design_md_is_there() -> None:
    assert set(COMMANDS) >= {
        "balancer", "indexer", "add", "remove", "get", "list", "status",
        "strategy", "demo",
    }  # fmt: skip


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_describes_every_option(name: str) -> None:
    args = [name, "--help"] if name else ["--help"]
    result = CliRunner().invoke(cli, args, prog_name="p2plb")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: p2plb")

    command = cli.commands[name] if name else cli
    assert command.help, f"{name or 'p2plb'} has no description"
    undocumented = [
        param.name
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert undocumented == [], f"p2plb {name}: options without help"
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag:
            # A metavar says what to give, not just "VALUE" or "TEXT".
            metavar = param.make_metavar(click.Context(command))
            assert metavar not in ("VALUE", "TEXT"), (param.name, metavar)


def test_only_commands_that_change_something_take_the_admin_token() -> None:
    def options(name: str) -> set[str]:
        command = cli.commands[name]
        return {opt for param in command.params for opt in param.opts}

    assert "--admin-token" in options("strategy")  # PUT /v1/strategy
    assert "--admin-token" not in options("status")  # GET /v1/status is public
    result = CliRunner().invoke(cli, ["status", "--admin-token", "x"])
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        2,
        "Error: No such option '--admin-token'.",
    )
