"""``manifest.json``: reading, atomic writing, the cross-process update lock, header comparison.

The manifest is only ever replaced whole (temp file, fsync, ``os.replace``, fsync of the
directory), and every read-modify-write happens under a blocking ``flock`` on
``DIR/.manifest.lock``, so several ranks can record their shards into one manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from probekit.errors import ProbekitError
from probekit.store.layout import FORMAT, MANIFEST, MANIFEST_LOCK, fsync_path

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
    "n_items",
    "shard_size",
    "world_size",
)


def manifest_bytes(cache_dir: Path) -> bytes | None:
    """The raw bytes of ``DIR/manifest.json``, or None when there is none."""
    try:
        return (cache_dir / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None


def parse_manifest(raw: bytes, cache_dir: Path) -> dict[str, Any]:
    """Decode manifest bytes and check the format tag."""
    where = cache_dir / MANIFEST
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbekitError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ProbekitError(f"{where} has format {found!r}, expected {FORMAT!r}")
    return manifest


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``cache_dir`` as a dict, or None when the directory has none."""
    raw = manifest_bytes(cache_dir)
    return None if raw is None else parse_manifest(raw, cache_dir)


def sha256_bytes(raw: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(raw).hexdigest()


def write_manifest(cache_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Replace ``DIR/manifest.json`` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = cache_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_dir / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(cache_dir)


@contextmanager
def manifest_lock(cache_dir: Path) -> Iterator[None]:
    """Hold the blocking manifest lock (``DIR/.manifest.lock``) for the ``with`` block."""
    fd = os.open(cache_dir / MANIFEST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def update_manifest(
    cache_dir: Path, change: Callable[[dict[str, Any] | None], dict[str, Any]]
) -> dict[str, Any]:
    """Read-modify-write the manifest under the lock; ``change`` gets the current one (or None)."""
    with manifest_lock(cache_dir):
        new = change(read_manifest(cache_dir))
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
        diff = first_difference(old.get(field), new.get(field), field)
        if diff:
            name, was, now = diff
            raise ProbekitError(
                f"cache {cache_dir} was written with {name}={_short(was)}, not {_short(now)}; "
                "choose another --out or delete that cache"
            )
