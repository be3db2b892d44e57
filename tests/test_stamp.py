"""The verification stamp: repeated opens hash only changed shards, and still catch every damage."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

import probekit.store.layout as layout
from probekit.cli import app
from probekit.design import open_cache
from probekit.errors import ProbekitError
from probekit.store import Cache
from probekit.store.manifest import sha256_bytes
from probekit.store.stamp import VERIFIED, read_stamp

sys.path.insert(0, str(Path(__file__).parent))
from test_store import make_data, write_all  # noqa: E402

SHARD = "shard-00003.h5"


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    out = tmp_path / "cache"
    write_all(out, *make_data())
    return out


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    """The names of the files check_shard hashes from now on."""
    seen: list[str] = []
    real = layout.sha256_file

    def counting(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(layout, "sha256_file", counting)
    return seen


def flip_byte(path: Path) -> None:
    """Flip one byte inside layer 5's hidden states (size unchanged)."""
    with h5py.File(path, "r") as f:
        offset = f["hidden/answer_end"].id.get_chunk_info_by_coord((2, 0, 0, 0)).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 7] ^= 0xFF
    path.write_bytes(bytes(raw))


def bump_mtime(path: Path, st: os.stat_result) -> None:
    """Make sure the mtime differs from ``st``'s, as any write does (coarse clocks may tie)."""
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_writer_stamps_every_shard_and_open_cache_hashes_none(cache_dir, hashed):
    sha, shards = read_stamp(cache_dir)
    assert sha == sha256_bytes((cache_dir / "manifest.json").read_bytes())
    assert sorted(shards) == [f"shard-0000{k}.h5" for k in range(5)]
    open_cache(cache_dir)
    open_cache(cache_dir)
    assert hashed == []
    assert Cache(cache_dir).verify() == [] and len(hashed) == 5  # the full check hashes every shard


def test_changed_shard_is_rehashed_alone_and_restamped(cache_dir, hashed):
    path = cache_dir / SHARD
    bump_mtime(path, path.stat())  # same bytes, new mtime
    open_cache(cache_dir)
    assert hashed == [SHARD]
    open_cache(cache_dir)
    assert hashed == [SHARD]  # the stamp was refreshed


def test_changed_manifest_voids_the_stamp(cache_dir, hashed):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["note"] = "edited"
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    open_cache(cache_dir)
    assert len(hashed) == 5
    open_cache(cache_dir)
    assert len(hashed) == 5


def _flip(path: Path) -> None:
    st = path.stat()
    flip_byte(path)
    bump_mtime(path, st)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _replace(path: Path) -> None:
    """A new file (new inode) of the same size and mtime with one byte changed."""
    st = path.stat()
    other = path.with_name("other.h5")
    other.write_bytes(path.read_bytes())
    flip_byte(other)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    assert path.stat().st_ino != st.st_ino and path.stat().st_size == st.st_size


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage, why", [
    (_flip, "sha256 differs from the manifest"),
    (_truncate, "size is"),
    (_replace, "sha256 differs from the manifest"),
    (_delete, "file is missing"),
])
def test_damage_after_a_verified_open_is_refused(cache_dir, damage, why):
    open_cache(cache_dir)
    damage(cache_dir / SHARD)
    with pytest.raises(ProbekitError) as err:
        open_cache(cache_dir)
    line = str(err.value)
    assert "\n" not in line and f"fails verification: {SHARD}: {why}" in line
    with pytest.raises(ProbekitError):  # and still on the next open
        open_cache(cache_dir)


def test_byte_changed_with_size_and_mtime_restored_is_caught_by_info_verify(cache_dir):
    path = cache_dir / SHARD
    open_cache(cache_dir)
    st = path.stat()
    flip_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # `touch -d` by hand: the stamp cannot see it
    open_cache(cache_dir)  # the one case the stamp misses (documented)
    bad = CliRunner().invoke(app, ["info", str(cache_dir), "--verify"])
    assert bad.exit_code == 1 and f"bad: {SHARD}: sha256 differs" in bad.output
    with pytest.raises(ProbekitError, match=f"{SHARD}: sha256 differs"):  # the full check dropped its entry
        open_cache(cache_dir)


def test_unwritable_directory_gets_no_stamp(cache_dir, monkeypatch, hashed):
    import probekit.store.stamp as stamp

    (cache_dir / VERIFIED).unlink()

    def refuse(path, *args, **kwargs):
        raise ProbekitError(f"cannot write {path} (Read-only file system)")

    monkeypatch.setattr(stamp, "write_json", refuse)
    open_cache(cache_dir)
    open_cache(cache_dir)
    assert not (cache_dir / VERIFIED).exists() and len(hashed) == 10  # no stamp: a full hash each time


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_directory_gets_no_stamp(cache_dir):
    (cache_dir / VERIFIED).unlink()
    os.chmod(cache_dir, 0o555)
    try:
        assert open_cache(cache_dir).n_items == 23
        assert not (cache_dir / VERIFIED).exists()
    finally:
        os.chmod(cache_dir, 0o755)
