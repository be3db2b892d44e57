"""The verification stamp ``DIR/.verified.json``: which shards were fully hashed, and as what file.

``{"format": "probekit-verified/1", "manifest_sha256": ..., "shards": {"shard-00000.h5":
{"bytes", "mtime_ns", "inode", "sha256"}, ...}}``. An entry is written only after the shard's
bytes were hashed and matched the manifest, with the file's size, mtime (ns) and inode taken
before the hash (and unchanged after it). A later check trusts a shard without re-hashing it
only when the stamp belongs to the same manifest bytes and the entry's size, mtime, inode and
sha256 all equal the file's and the manifest's now; anything else (a write, a truncation, a
replaced or deleted file, another manifest) means a full hash again.

The one change a stamp cannot see is a byte rewritten in place with the size and the mtime put
back by hand (``touch -d``): ``probekit info CACHE --verify`` always hashes every shard and
catches it. The stamp is an optimisation only: a missing, unreadable or foreign stamp is
ignored, and a directory that cannot be written (read-only) simply gets none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from probekit.errors import ProbekitError
from probekit.store.outdir import write_json

VERIFIED = ".verified.json"
STAMP_FORMAT = "probekit-verified/1"


def file_stat(path: Path) -> dict[str, int] | None:
    """The ``{bytes, mtime_ns, inode}`` a stamp records for ``path``, or None when it is not a file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def read_stamp(cache_dir: Path) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The stamp's manifest sha256 and its shard entries; ``(None, {})`` when absent or unreadable."""
    try:
        obj = json.loads((Path(cache_dir) / VERIFIED).read_bytes())
    except (OSError, ValueError):
        return None, {}
    if not isinstance(obj, dict) or obj.get("format") != STAMP_FORMAT or not isinstance(obj.get("shards"), dict):
        return None, {}
    return obj.get("manifest_sha256"), {k: v for k, v in obj["shards"].items() if isinstance(v, dict)}


def write_stamp(cache_dir: Path, manifest_sha256: str, shards: Mapping[str, Mapping[str, Any]]) -> bool:
    """Replace the stamp atomically; False (and nothing written) when the directory is not writable."""
    record = {"format": STAMP_FORMAT, "manifest_sha256": manifest_sha256,
              "shards": {name: dict(shards[name]) for name in sorted(shards)}}
    try:
        write_json(Path(cache_dir) / VERIFIED, record)
    except (ProbekitError, OSError):
        return False
    return True


def stamped(entry: Mapping[str, Any] | None, now: Mapping[str, int] | None, sha256: Any) -> bool:
    """Whether a stamp entry vouches for a file whose stat is ``now`` and whose manifest sha256 is ``sha256``."""
    return entry is not None and now is not None and sha256 is not None and dict(entry) == {**now, "sha256": sha256}
