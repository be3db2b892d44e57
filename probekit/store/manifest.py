"""``manifest.json``: reading, atomic writing, the cross-process update lock, header comparison.

The manifest is only ever replaced whole (temp file, fsync, ``os.replace``, fsync of the
directory: :func:`probekit.store.outdir.write_json`), and every read-modify-write happens under a blocking ``flock`` on
``DIR/.manifest.lock``, so several ranks can record their shards into one manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from probekit.errors import ProbekitError
from probekit.store.layout import FORMAT, MANIFEST, MANIFEST_LOCK
from probekit.store.outdir import remove_temporaries, write_json

#: Manifest fields that must agree before a writer may add shards to an existing cache.
IDENTITY_FIELDS = (
    "model",
    "dataset",
    "prompt",
    "layers",
    "sites",
    "hidden_size",
    "max_choices",
    "measures",
    "dtype",
    "choice_surface",
    "n_items",
    "shard_size",
    "world_size",
)
#: What an identity field means in a manifest written before the field existed.
IDENTITY_DEFAULTS = {"choice_surface": False}


def manifest_bytes(cache_dir: Path) -> bytes | None:
    """The raw bytes of ``DIR/manifest.json``, or None when there is none."""
    try:
        return (cache_dir / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None


def parse_json(raw: bytes, where: Path, fmt: str) -> dict[str, Any]:
    """Decode the bytes of a probekit JSON file (``where``) and check its ``format`` tag is ``fmt``."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbekitError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ProbekitError(f"{where} has format {found!r}, expected {fmt!r}")
    return obj


def parse_manifest(raw: bytes, cache_dir: Path) -> dict[str, Any]:
    """Decode manifest bytes and check the format tag."""
    return parse_json(raw, cache_dir / MANIFEST, FORMAT)


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``cache_dir`` as a dict, or None when the directory has none."""
    raw = manifest_bytes(cache_dir)
    return None if raw is None else parse_manifest(raw, cache_dir)


def sha256_bytes(raw: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(raw).hexdigest()


def write_manifest(cache_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Replace ``DIR/manifest.json`` atomically: temp file, fsync, rename, fsync the directory."""
    write_json(cache_dir / MANIFEST, manifest)


@contextmanager
def manifest_lock(cache_dir: Path, lock_file: str = MANIFEST_LOCK) -> Iterator[None]:
    """Hold the blocking manifest lock (``DIR/.manifest.lock``, or ``lock_file``) for the ``with`` block."""
    try:
        fd = os.open(cache_dir / lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ProbekitError(f"cannot write to {cache_dir} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def update_manifest(
    cache_dir: Path, change: Callable[[dict[str, Any] | None], dict[str, Any]]
) -> dict[str, Any]:
    """Read-modify-write the manifest under the lock; ``change`` gets the current one (or None).

    The manifest is written only when ``change`` returns something different."""
    with manifest_lock(cache_dir):
        remove_temporaries(cache_dir, [MANIFEST])  # of a writer killed mid-write (all writes hold this lock)
        old = read_manifest(cache_dir)
        new = change(old)
        if new != old:  # an unchanged manifest is not rewritten (a finished cache may be read-only)
            write_manifest(cache_dir, new)
        return new


def first_difference(old: Any, new: Any, name: str) -> tuple[str, Any, Any] | None:
    """The first (dotted field, old, new) where two JSON values differ, descending into dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            diff = first_difference(old.get(key), new.get(key), f"{name}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else (name, old, new)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_cache(cache_dir: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse to add to a cache written for another model, dataset, prompt or layout."""
    for field in IDENTITY_FIELDS:
        default = IDENTITY_DEFAULTS.get(field)
        diff = first_difference(old.get(field, default), new.get(field, default), field)
        if diff:
            name, was, now = diff
            raise ProbekitError(
                f"cache {cache_dir} was written with {name}={_short(was)}, not {_short(now)}; "
                "choose another --out or delete that cache"
            )
