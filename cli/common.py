"""Helpers shared by the command modules: one-line errors, consoles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    """Turn a ProbekitError from the library, or a failed file operation (full disk, no
    permission), into one error line and exit code 2."""
    try:
        yield
    except ProbekitError as exc:
        fail(str(exc))
    except OSError as exc:
        from probekit.store.outdir import is_disk_full, no_space

        where = Path(exc.filename) if exc.filename else None
        if is_disk_full(exc):
            fail(str(no_space(where or Path.cwd())))
        reason = exc.strerror or str(exc).splitlines()[0]
        fail(f"{reason}: {where}" if where else reason)
