"""Layer specs: which hidden-state layers a command reads. One grammar and one rule for every command.

``probekit extract --layers`` (which layers to cache), ``probekit sweep --layers`` and
``probekit hardness --layers`` (which feature sets to fit heads on) all read a spec through this
module. Layers are indices into the model's ``hidden_states`` tuple: 0 is the embedding output,
``L`` (the model's number of layers) the last layer, after the final norm.

A spec is a comma-separated list of items (or a list of them); each item is one of:

* ``all``: every available layer, one feature set each: ``0..L`` for ``extract``, the cache's
  layers for ``sweep``;
* ``last``: layer ``L``;
* ``middle``: layer ``ceil((L + 1) / 2)`` (docs/protocol.md §3: 16 of SmolLM2-135M's 30, 17 of
  Llama-2-7B's 32);
* ``middle_and_last``: the middle and last layers concatenated into one feature set, middle first;
* an integer ``i``: layer ``i``; a negative integer counts from the end as in Python, against the
  model's last layer ``L`` (``-1`` is ``L``, ``-2`` is ``L - 1``) in every command;
* ``a+b``: layers ``a`` and ``b`` concatenated into one feature set.

Refused, with one :class:`~probekit.errors.ProbekitError` line naming the spec:

* an empty item (``3,,4``, a comma at either end, ``3+``) or an empty spec;
* an unknown word, or an index that is not an integer;
* a feature set named twice, however it is named (``8,8``; ``all,last``; ``-1,30`` when ``L`` is
  30), or a layer repeated inside one concatenation (``8+8``);
* a layer outside ``0..L``, or, for ``sweep``, a layer the cache does not hold.

``extract`` caches the layers its feature sets name, each once, in order of first appearance
(``middle_and_last`` caches ``[16, 30]`` of a 30-layer model); ``sweep`` fits one head per feature
set (``all,middle_and_last`` is every layer alone plus the middle and last layers concatenated).

Example:
    >>> feature_sets("middle_and_last,-1,4+8", 30)
    [(16, 30), (30,), (4, 8)]
    >>> resolve_layers("middle_and_last", 30)
    [16, 30]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probekit.errors import ProbekitError

NAMES = ("all", "last", "middle", "middle_and_last")
_EXPECTED = ("expected all, last, middle, middle_and_last, layer indices (negative ones count from the end) "
             "or a+b concatenations, separated by commas")

Item = str | tuple[int, ...]


def middle_layer(n_layers: int) -> int:
    """The protocol's middle layer of a model with ``n_layers`` layers: ``ceil((L + 1) / 2)``."""
    return math.ceil((int(n_layers) + 1) / 2)


@dataclass(frozen=True)
class LayerSpec:
    """A parsed spec: its items as written (names, or tuples of indices), checked for syntax only."""

    text: str  # the spec as the user wrote it, for messages
    items: tuple[Item, ...]

    def fail(self, why: str) -> ProbekitError:
        return ProbekitError(f"layers={self.text!r}: {why}")


def parse(spec: str | int | Sequence[int | str] | LayerSpec) -> LayerSpec:
    """Check a spec's syntax without knowing the model (so a bad spec fails before anything loads)."""
    if isinstance(spec, LayerSpec):
        return spec
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        text, parts = str(int(spec)), [str(int(spec))]
    elif isinstance(spec, str):
        text, parts = spec.strip(), [p.strip() for p in spec.split(",")]
    else:
        values = list(spec)
        text, parts = ",".join(str(v) for v in values), [str(v).strip() for v in values]
    out = LayerSpec(text, ())
    if not text:
        raise out.fail("names no layer")
    items: list[Item] = []
    for part in parts:
        if not part:
            raise out.fail("has an empty item (a doubled comma, or a comma at an end)")
        if part in NAMES:
            item: Item = part
        else:
            pieces = [p.strip() for p in part.split("+")]
            if not all(pieces):
                raise out.fail(f"{part!r} has an empty term (a doubled '+', or a '+' at an end)")
            try:
                item = tuple(int(p) for p in pieces)
            except ValueError:
                raise out.fail(_EXPECTED) from None
            if len(set(item)) != len(item):
                raise out.fail(f"{part!r} repeats a layer")
        if item in items:
            raise out.fail(f"names {part!r} twice")
        items.append(item)
    return LayerSpec(text, tuple(items))


def feature_sets(
    spec: str | int | Sequence[int | str] | LayerSpec,
    n_layers: int | None,
    available: Sequence[int] | None = None,
) -> list[tuple[int, ...]]:
    """The feature sets a spec names, in order: one tuple of layer indices per head.

    ``n_layers``: the model's ``L`` (None: the largest of ``available``). ``available``: the layers
    a cache holds (``sweep``); None means every layer ``0..L`` (``extract``).
    """
    parsed = parse(spec)
    have = [int(x) for x in available] if available is not None else None
    if n_layers is None:
        if not have:
            raise ValueError("feature_sets needs n_layers or the available layers")
        L = max(have)
    else:
        L = int(n_layers)
    middle = middle_layer(L)
    sets: list[tuple[int, ...]] = []
    for item in parsed.items:
        if item == "all":
            found = [(x,) for x in (have if have is not None else range(L + 1))]
        elif item == "last":
            found = [(L,)]
        elif item == "middle":
            found = [(middle,)]
        elif item == "middle_and_last":
            found = [(middle, L)]
        else:
            found = [tuple(_index(parsed, v, L, have) for v in item)]
        for fs in found:
            if len(set(fs)) != len(fs):
                raise parsed.fail(f"{_label(item)!r} repeats layer {_repeated(fs)}")
            if fs in sets:
                raise parsed.fail(f"names layer set {'+'.join(map(str, fs))} twice")
            if isinstance(item, str):
                for x in fs:
                    _check(parsed, x, x, L, have)
            sets.append(fs)
    return sets


def resolve_layers(spec: str | int | Sequence[int | str] | LayerSpec, n_layers: int) -> list[int]:
    """The layers ``extract`` caches: those the spec's feature sets name, each once, first appearance first."""
    out: list[int] = []
    for fs in feature_sets(spec, n_layers):
        out.extend(x for x in fs if x not in out)
    return out


def _index(parsed: LayerSpec, v: int, L: int, have: list[int] | None) -> int:
    idx = v + L + 1 if v < 0 else v
    _check(parsed, v, idx, L, have)
    return idx


def _check(parsed: LayerSpec, written: int, idx: int, L: int, have: list[int] | None) -> None:
    shown = f"{written} (= {idx})" if written != idx and 0 <= idx <= L else f"{written}"
    if have is not None:
        if idx not in have:
            raise parsed.fail(f"layer {shown} is not in the cache (it holds layers {have})")
    elif not 0 <= idx <= L:
        raise parsed.fail(f"layer {shown} is out of range: this model has hidden_states indices 0..{L}")


def _label(item: Item) -> str:
    return item if isinstance(item, str) else "+".join(map(str, item))


def _repeated(fs: tuple[int, ...]) -> int:
    return next(x for i, x in enumerate(fs) if x in fs[:i])
