"""Output directories: one writer at a time, temporaries under unique names, durable renames.

Every probekit output (a cache, a sweep's results, a report, ICL scores, hardness scores) is
written the same way:

- **Lock.** A writer holds a non-blocking ``flock`` on a lock file inside the directory
  (:func:`take_dir_lock`; the lock file holds the writer's pid). A second writer of the same
  output gets one line: "<what> DIR is being written by another process (pid N); wait for it or
  choose another --out". The lock is released when the process ends, however it ends.
- **Temporaries.** A file is written under :func:`temp_path` (``.NAME.<pid>-<random>.tmp``) beside
  its final name, fsynced and renamed over it with :func:`replace_file` (the directory is fsynced
  after the rename). Leftovers of a killed run are removed by the next writer, which holds the
  lock, with :func:`remove_temporaries`.
- :class:`OutputDir` bundles the three for a whole directory, and removes a directory it created
  itself when the ``with`` block fails before anything was committed into it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable

from probekit.errors import ProbekitError
from probekit.store.layout import fsync_path

#: Lock file of an output directory with a single writer (a cache uses one per rank).
LOCK = ".lock"


def take_dir_lock(directory: Path, lock_file: str = LOCK, what: str = "directory") -> int:
    """Take the non-blocking lock ``DIR/<lock_file>``, note our pid in it; return its descriptor.

    Raises one line naming ``what`` and the directory when another process holds it.
    """
    path = Path(directory) / lock_file
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ProbekitError(f"cannot write to {directory} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = path.read_text().strip() or "unknown"
        raise ProbekitError(
            f"{what} {directory} is being written by another process (pid {pid}); "
            "wait for it or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def temp_path(directory: Path, name: str) -> Path:
    """A fresh temporary name for ``DIR/name``: ``DIR/.name.<pid>-<random>.tmp``."""
    return Path(directory) / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def is_temporary(entry: str, name: str) -> bool:
    """Whether ``entry`` is a temporary of ``name`` (this scheme's or the older ``.name.tmp*``)."""
    return entry.startswith(f".{name}.") and (entry.endswith(".tmp") or ".tmp" in entry[len(name) + 1:])


def remove_temporaries(directory: Path, names: Iterable[str]) -> list[str]:
    """Delete leftover temporaries (files or folders) of ``names`` in ``DIR``; returns what went.

    Call it only while holding the directory's lock, so no live writer's temporaries are hit.
    """
    directory = Path(directory)
    names = list(names)
    gone = []
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return gone
    for entry in entries:
        if any(is_temporary(entry, name) for name in names):
            path = directory / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            gone.append(entry)
    return gone


def replace_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable and rename it to ``final``; fsync the directory after."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_json(path: Path, obj: Any, indent: int = 2, **dump: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically: temp file, fsync, rename, fsync the directory.

    ``dump`` goes to :func:`json.dump` (default ``allow_nan=False``).
    """
    path = Path(path)
    tmp = temp_path(path.parent, path.name)
    dump.setdefault("allow_nan", False)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, **dump)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


class OutputDir:
    """A directory written by one process at a time: ``with OutputDir(path, names, what) as d:``.

    Entering creates the directory when needed, takes its lock (:func:`take_dir_lock`) and
    removes leftover temporaries of ``names`` (the files this output consists of). Inside, write
    each file to ``d.temp(name)`` and commit it with ``d.commit(tmp, name)``. Leaving releases the
    lock and deletes this writer's uncommitted temporaries; if the block failed and the directory
    did not exist before and nothing was committed, the directory is removed again.
    """

    def __init__(self, path: str | os.PathLike, names: Iterable[str], what: str = "output directory",
                 lock_file: str = LOCK) -> None:
        self.path = Path(path)
        self.names = tuple(names)
        self.what = what
        self.lock_file = lock_file
        self.created = False
        self.committed = False
        self._fd: int | None = None
        self._temps: list[Path] = []

    def __enter__(self) -> "OutputDir":
        if self.path.exists() and not self.path.is_dir():
            raise ProbekitError(f"{self.what} {self.path} exists and is not a directory")
        try:
            self.path.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ProbekitError(f"cannot create {self.what} {self.path} ({exc.strerror})") from None
        try:
            self._fd = take_dir_lock(self.path, self.lock_file, self.what)
        except BaseException:
            self._remove_if_created()
            raise
        remove_temporaries(self.path, self.names)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for tmp in self._temps:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self._temps = []
        if exc_type is not None and not self.committed:
            self._remove_if_created()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _remove_if_created(self) -> None:
        """Remove the directory we created, if it holds nothing but our lock file."""
        if not self.created:
            return
        (self.path / self.lock_file).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass

    def temp(self, name: str) -> Path:
        """A fresh temporary path for ``name`` in this directory, deleted on exit unless committed."""
        if self._fd is None:
            raise ProbekitError(f"{self.what} {self.path}: write inside `with OutputDir(...)`")
        tmp = temp_path(self.path, name)
        self._temps.append(tmp)
        return tmp

    def commit(self, tmp: Path, name: str) -> Path:
        """Rename the finished temporary ``tmp`` to ``DIR/name`` durably; returns the final path."""
        final = self.path / name
        replace_file(tmp, final)
        self.committed = True
        if tmp in self._temps:
            self._temps.remove(tmp)
        return final

    def write_json(self, name: str, obj: Any, indent: int = 2, **dump: Any) -> Path:
        """Commit ``obj`` as ``DIR/name`` (atomic, fsynced; ``dump`` as for :func:`write_json`)."""
        if self._fd is None:
            raise ProbekitError(f"{self.what} {self.path}: write inside `with OutputDir(...)`")
        write_json(self.path / name, obj, indent, **dump)
        self.committed = True
        return self.path / name
