"""The probekit command line: thin wrappers that parse, call one library function, and print.

Each command lives in its own module and registers itself on ``app``; the library never imports
this package.
"""

from __future__ import annotations

import typer

from probekit.errors import ProbekitError

app = typer.Typer(
    name="probekit",
    help="Hidden-state cache and linear probing for easy-to-hard generalization studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def main() -> None:  # console entry point
    from probekit.cli.common import fail

    try:
        app()
    except ProbekitError as exc:  # a command that did not wrap its call
        fail(str(exc))


# Command modules (each adds its commands to `app`), in the order of the workflow.
from probekit.cli import datasets_cmd  # noqa: E402,F401
from probekit.cli import extract_cmd  # noqa: E402,F401
from probekit.cli import info_cmd  # noqa: E402,F401
from probekit.cli import export_cmd  # noqa: E402,F401
from probekit.cli import sweep_cmd  # noqa: E402,F401
from probekit.cli import finetune_cmd  # noqa: E402,F401
from probekit.cli import generate_cmd  # noqa: E402,F401
from probekit.cli import report_cmd  # noqa: E402,F401

__all__ = ["app", "main"]
