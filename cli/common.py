"""Helpers shared by the command modules: one-line errors, consoles, the model options."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from probekit.errors import OptionError, ProbekitError
from probekit.llm.spec import DTYPES, QUANTIZE, ModelSpec

console = Console()
err_console = Console(stderr=True)

#: Help of the model options every command that runs a model has (what "auto" means: :mod:`probekit.llm.spec`).
DTYPE_HELP = f"{' | '.join(DTYPES)} | auto (float16 on a GPU or with --device-map, float32 on the CPU)."
QUANTIZE_HELP = (f"bitsandbytes weights: {' | '.join(QUANTIZE)} (auto: 8bit when the model is fine-tuned on a GPU, "
                 "else none).")
DEVICE_HELP = "cpu | cuda | cuda:N | auto (cuda when a GPU is visible)."


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def option_flag(name: str, options: Mapping[str, str] | None = None) -> str:
    """The command-line form of a library setting: ``options[name]`` (a template with ``{value}``,
    e.g. ``"--recipe lr={value}"``), else ``--name-with-dashes {value}``."""
    return (options or {}).get(name) or f"--{name.replace('_', '-')} {{value}}"


def model_spec(model: str | None, *, dtype: str, quantize: str, device: str, device_map: str | None,
               threads: int | None = None, bnb_4bit_type: str = "nf4") -> ModelSpec:
    """The :class:`ModelSpec` of a command's model options, checked before anything is read ("auto"
    is settled when the model loads)."""
    if threads is not None and threads < 1:
        raise ProbekitError(f"--threads {threads}: must be a positive integer")
    spec = ModelSpec(model=model, dtype=dtype, quantize=quantize, bnb_4bit_type=bnb_4bit_type, device=device,
                     device_map=device_map, threads=threads)
    spec.validate()
    return spec


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
