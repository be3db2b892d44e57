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
  itself when the ``with`` block fails before anything was committed into it. Given ``own``, it
  refuses an existing directory that holds files which are not part of this kind of output.
- **Holding early.** While an :class:`OutputDir` entered with ``share=True`` is held, the same
  process may take the same lock again (:func:`take_dir_lock` returns a duplicate descriptor of the held lock), so a command
  can lock its output before slow set-up (loading a model) and write it later through a writer
  that takes the lock itself.
- **Whole directories.** A directory written as a whole (a report) is built under a temporary name
  beside its final name and swapped in with :func:`replace_dir`: one atomic exchange of the two
  names, so a reader (or a kill) sees the old directory or the new one, never a mix.
- **Errors.** A failed write (full disk, no permission) becomes one line naming the path, and for
  a full disk the space needed where it is known (:func:`write_error`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from probekit.errors import OptionError, ProbekitError
from probekit.store.layout import fsync_path

#: Lock file of an output directory with a single writer (a cache uses one per rank).
LOCK = ".lock"

#: Locks held by an entered :class:`OutputDir` of this process: (directory, lock file) -> descriptor.
_HELD: dict[tuple[str, str], int] = {}


def _lock_key(directory: Path, lock_file: str) -> tuple[str, str]:
    return os.path.realpath(directory), lock_file


def mib(n: float) -> str:
    """A byte count in MiB for messages: ``12.3 MiB``."""
    return f"{n / 2**20:.1f} MiB"


def free_bytes(directory: Path) -> int | None:
    """Bytes free to this user on the file system holding ``directory`` (or its nearest parent)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception (OSError, or h5py's/pyarrow's wrappers of one) reports a full disk."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)


def no_space(path: Path, needed: int | None = None) -> ProbekitError:
    """The one-line error for a full disk while writing ``path``."""
    free = free_bytes(Path(path).parent)
    need = f"it needs about {mib(needed)}" if needed else "it needs more space"
    have = f", {mib(free)} free" if free is not None else ""
    return ProbekitError(f"no space left on the device writing {path}: {need}{have}; free some space and rerun")


def write_error(exc: BaseException, path: Path, needed: int | None = None) -> ProbekitError:
    """One line for an exception raised while writing ``path``: full disk, permission, other."""
    if is_disk_full(exc):
        return no_space(path, needed)
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return ProbekitError(f"cannot write {path} ({reason})")


def take_dir_lock(directory: Path, lock_file: str = LOCK, what: str = "directory", reuse: bool = True) -> int:
    """Take the non-blocking lock ``DIR/<lock_file>``, note our pid in it; return its descriptor.

    Raises one line naming ``what`` and the directory when another process holds it. When an
    entered :class:`OutputDir` of this process holds the lock with ``share=True`` (and ``reuse``),
    returns a duplicate of its descriptor (closing it keeps the lock held); with ``reuse=False`` it
    is refused like any other holder's.
    """
    held = _HELD.get(_lock_key(Path(directory), lock_file)) if reuse else None
    if held is not None:
        return os.dup(held)
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
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        os.close(fd)
        raise write_error(exc, path) from None
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
    text = json.dumps(obj, indent=indent, **dump) + "\n"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        raise write_error(exc, path, len(text.encode())) from None
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is no such file; one error line when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProbekitError(f"cannot read {path}: {exc}") from None


class OutputDir:
    """A directory written by one process at a time: ``with OutputDir(path, names, what) as d:``.

    Entering creates the directory when needed, takes its lock (:func:`take_dir_lock`) and
    removes leftover temporaries of ``names`` (the files this output consists of). Inside, write
    each file to ``d.temp(name)`` and commit it with ``d.commit(tmp, name)``. Leaving releases the
    lock and deletes this writer's uncommitted temporaries; if the block failed and the directory
    did not exist before and nothing was committed, the directory is removed again.

    ``own(entry)`` says whether a directory entry can belong to this kind of output; when given,
    an existing directory holding anything else is refused before it is touched. ``share=True``
    lets writers of this process inside the block take the same lock (see :func:`take_dir_lock`).
    ``disposable(entry)``: entries that do not count as written output (a cache's manifest before
    its first shard, say); a directory this block created and that holds nothing else when the
    block fails is removed with them, unless another writer holds one of its locks.
    ``exclusive=True`` (a command holding its output from its start): refused even when this
    process already holds the lock, so a second command run inside the first is refused too.
    """

    def __init__(self, path: str | os.PathLike, names: Iterable[str], what: str = "output directory",
                 lock_file: str = LOCK, own: Callable[[str], bool] | None = None, share: bool = False,
                 disposable: Callable[[str], bool] | None = None, exclusive: bool = False) -> None:
        self.path = Path(path)
        self.own = own
        self.disposable = disposable
        self.exclusive = exclusive
        self.share = share
        self.names = tuple(names)
        self.what = what
        self.lock_file = lock_file
        self.created = False
        self.committed = False
        self._fd: int | None = None
        self._temps: list[Path] = []

    def __enter__(self) -> OutputDir:
        if self.path.exists() and not self.path.is_dir():
            raise ProbekitError(f"{self.what} {self.path} exists and is not a directory")
        if self.own is not None:
            refuse_foreign(self.path, self.own, self.what)
        try:
            self.path.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ProbekitError(f"cannot create {self.what} {self.path} ({exc.strerror})") from None
        try:
            self._fd = take_dir_lock(self.path, self.lock_file, self.what, reuse=not self.exclusive)
        except BaseException:
            self._remove_if_created()
            raise
        if self.share:
            _HELD.setdefault(_lock_key(self.path, self.lock_file), self._fd)  # an outer holder stays the holder
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
            key = _lock_key(self.path, self.lock_file)
            if _HELD.get(key) == self._fd:
                del _HELD[key]
            os.close(self._fd)
            self._fd = None

    def _remove_if_created(self) -> None:
        """Remove the directory we created, if it holds nothing but lock files (and disposable
        entries) and no other process holds one of its locks."""
        if not self.created:
            return
        try:
            entries = os.listdir(self.path)
        except OSError:
            return

        def is_lock(e: str) -> bool:
            return e == self.lock_file or e.endswith(".lock") or e.startswith(".lock")

        if not all(is_lock(e) or (self.disposable is not None and self.disposable(e)) for e in entries):
            return
        if any(is_lock(e) and e != self.lock_file and _held_elsewhere(self.path / e) for e in entries):
            return  # another writer (another rank) is at work in it
        for entry in entries:  # lock files (ours, and those of writers sharing our lock) and leftovers
            (self.path / entry).unlink(missing_ok=True)
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
        try:
            replace_file(tmp, final)
        except OSError as exc:
            raise write_error(exc, final) from None
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


def _held_elsewhere(lock: Path) -> bool:
    """Whether a lock file is held by another open descriptor (another process) right now."""
    key = (os.path.realpath(lock.parent), lock.name)
    if key in _HELD:
        return False  # held by this process
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def refuse_foreign(directory: Path, own: Callable[[str], bool], what: str) -> None:
    """Refuse an existing, non-empty ``directory`` holding entries ``own`` does not claim."""
    try:
        entries = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    foreign = [e for e in entries if not own(e)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ProbekitError(
            f"{what} {directory} already holds files that are not part of one ({shown}); "
            "choose an empty or new --out"
        )


def check_dir_target(path: str | os.PathLike, name: str) -> None:
    """Refuse, before any work, a folder setting ``name`` that cannot become a folder: an existing
    file, a path under a file, or a place this user cannot write (an :class:`OptionError`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(name, str(path), "a folder (it is a file)")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(name, str(path), f"a folder ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(name, str(path), f"a folder this user can write ({parent} is not writable)")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished directory ``new`` (a sibling of ``final``) in place of ``final`` as a whole;
    afterwards ``new`` holds the old directory (or is gone), for the caller to delete.

    Where the system can, the two names are exchanged in one atomic step, so ``final`` is always
    either the old or the new directory; elsewhere the old one is renamed aside first and ``final``
    is missing for the moment between the two renames. Both are fsynced."""
    new, final = Path(new), Path(final)
    for path in new.iterdir():
        if path.is_file():
            fsync_path(path)
    fsync_path(new)
    if final.exists() and not _exchange(new, final):
        aside = temp_path(final.parent, final.name)
        os.rename(final, aside)
        os.rename(new, final)
        os.rename(aside, new)
    elif not final.exists():
        os.rename(new, final)
    fsync_path(final.parent)
