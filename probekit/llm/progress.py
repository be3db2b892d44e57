"""A rich progress bar for extraction: items/s, tokens/s and ETA."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rates(ProgressColumn):
    """items/s (from the bar) and tokens/s (from the ``tokens`` field)."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        items = task.completed / elapsed if elapsed > 0 else 0.0
        tokens = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
        return Text(f"{items:,.1f} items/s  {tokens:,.0f} tok/s", style="progress.data.speed")


class Bar:
    """Advance by items and tokens; a no-op when disabled."""

    def __init__(self, progress: Progress | None, task) -> None:
        self._progress, self._task, self.tokens = progress, task, 0

    def advance(self, items: int, tokens: int) -> None:
        self.tokens += tokens
        if self._progress is not None:
            self._progress.update(self._task, advance=items, tokens=self.tokens)

    def describe(self, text: str) -> None:
        """Change the bar's description (e.g. the current phase of a unit)."""
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Bar]:
    if not enabled:
        yield Bar(None, None)
        return
    console = Console(stderr=True, file=sys.stderr)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rates(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, tokens=0)
        yield Bar(progress, task)
