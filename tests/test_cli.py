"""The command line: every command is listed, and every command's help shows an example."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from probekit.cli import app

COMMANDS = [["datasets"], ["datasets", "show"], ["extract"], ["info"], ["export"], ["import"], ["sweep"], ["hardness"],
            ["finetune"], ["report"]]


def test_top_level_help_lists_every_command():
    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0
    for command in {c[0] for c in COMMANDS}:
        assert command in out.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_shows_an_example(command):
    out = CliRunner().invoke(app, [*command, "--help"], terminal_width=100)
    assert out.exit_code == 0, out.output
    assert "Example:" in out.output and f"probekit {command[0]}" in out.output.split("Example:")[1]
