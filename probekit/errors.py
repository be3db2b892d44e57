"""The one exception type the library raises for bad input.

Its message is a single line that names what is wrong and where; the CLI prints it as is and
exits non-zero. :class:`OptionError` is the same for one bad setting: it also carries the
setting's name and value, so that a command line can name its own option for it.
"""

from __future__ import annotations

from typing import Any


class ProbekitError(Exception):
    """Bad input or an unusable cache: the message names what is wrong and where."""


class OptionError(ProbekitError):
    """A setting outside what it may be: ``name`` (the library's parameter), ``value`` and ``rule``
    (what it must be, e.g. "in [0, 1]"). The message reads "NAME must be RULE, got VALUE"."""

    def __init__(self, name: str, value: Any, rule: str) -> None:
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f"{name} must be {rule}, got {value!r}")
