"""Helpers shared by the command modules: one-line errors, consoles."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from probekit.errors import OptionError, ProbekitError

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def option_flag(name: str, options: Mapping[str, str] | None = None) -> str:
    """The command-line form of a library setting: ``options[name]`` (a template with ``{value}``,
    e.g. ``"--recipe lr={value}"``), else ``--name-with-dashes {value}``."""
    return (options or {}).get(name) or f"--{name.replace('_', '-')} {{value}}"


@contextmanager
def clean_errors(options: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn a ProbekitError from the library, or a failed file operation (full disk, no
    permission), into one error line and exit code 2. An :class:`OptionError` is named by its
    option (``options``: library setting -> its option on this command, see :func:`option_flag`):
    "--final-lr-fraction 2.0: must be in [0, 1]"."""
    try:
        yield
    except OptionError as exc:
        value = exc.value
        shown = repr(value) if isinstance(value, str) and (not value or value != value.strip()) else value
        fail(f"{option_flag(exc.name, options).format(value=shown)}: must be {exc.rule}")
    except ProbekitError as exc:
        fail(str(exc))
    except OSError as exc:
        from probekit.store.outdir import is_disk_full, no_space

        where = Path(exc.filename) if exc.filename else None
        if is_disk_full(exc):
            fail(str(no_space(where or Path.cwd())))
        reason = exc.strerror or str(exc).splitlines()[0]
        fail(f"{reason}: {where}" if where else reason)
