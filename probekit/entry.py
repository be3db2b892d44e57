"""Packages that are also their entry point: ``probekit.extract(...)``, ``probekit.finetune(...)`` and
``probekit.report(...)`` call the package's main function, so the name means the same thing whether or
not ``import probekit.extract.run`` (which binds the package to that name) ran before."""

from __future__ import annotations

import importlib
import sys
import types


class EntryPackage(types.ModuleType):
    """A package module that, called, calls ``__entry__ = (module, function)``."""

    __entry__: tuple[str, str]

    def __call__(self, *args, **kwargs):
        module, name = self.__entry__
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


def entry_package(package: str, module: str, function: str) -> None:
    """Make the (already imported) package ``package`` callable as ``module.function``."""
    mod = sys.modules[package]
    mod.__class__ = EntryPackage
    mod.__entry__ = (module, function)
