"""Helpers shared by the command modules: one-line errors, consoles."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console

from probekit.errors import ProbekitError

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def clean_errors() -> Iterator[None]:
    """Turn a ProbekitError from the library into one error line and exit code 2."""
    try:
        yield
    except ProbekitError as exc:
        fail(str(exc))
