"""Writing files safely: paths confined to a root, and atomic writes of a file or a directory.

A save goes to a temporary sibling that is renamed into place only once every byte is written
and flushed, so an interrupted write leaves the previous version (:func:`atomic_write` for one
file, :func:`atomic_directory` for a folder such as a finished adapter or a checkpoint step).
Paths can be confined to a root directory (:func:`safe_join`); ``..``, absolute names and
symlinks that would lead outside it raise :class:`~jpeft.errors.PathEscapeError`.
:mod:`jpeft.io` re-exports the public names; it knows nothing of adapters.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from jpeft.errors import OverwriteError, PathEscapeError, SaveError


def safe_join(root, name) -> Path:
    """``root / name``, refusing names that would lead outside ``root``.

    Raises:
      PathEscapeError: for an absolute ``name``, a ``..`` component, an empty name, or an
        existing symlink anywhere between ``root`` and the target.

    >>> safe_join("/tmp/adapters", "task_a").as_posix()
    '/tmp/adapters/task_a'
    >>> safe_join("/tmp/adapters", "../etc")
    Traceback (most recent call last):
    ...
    jpeft.errors.PathEscapeError: name '../etc' would leave the directory /tmp/adapters: '..' components are not allowed. Use a plain name such as 'task_a'.
    """
    root = Path(root)
    s = os.fspath(name)
    if not s or s.strip() in ("", "."):
        raise PathEscapeError(f"empty name for a path under {root}; give a plain name such as 'task_a'.")
    if "\x00" in s:
        raise PathEscapeError(f"name {s!r} contains a NUL byte.")
    p = Path(s)
    if p.is_absolute() or s.startswith(("/", "\\")) or (len(s) > 1 and s[1] == ":"):
        raise PathEscapeError(f"name {s!r} is absolute; under {root} only relative names are allowed.")
    if any(part == ".." for part in p.parts) or any(part == ".." for part in s.replace("\\", "/").split("/")):
        raise PathEscapeError(
            f"name {s!r} would leave the directory {root}: '..' components are not allowed. "
            "Use a plain name such as 'task_a'."
        )
    target = root / p
    _check_no_symlink(root, target)
    return target


def _check_no_symlink(root: Path, target: Path) -> None:
    cur = root
    for part in target.relative_to(root).parts:
        cur = cur / part
        if cur.is_symlink():
            raise PathEscapeError(
                f"{cur} is a symlink (to {os.readlink(cur)}); jpeft does not write through symlinks under {root}, "
                "since they can lead outside it. Remove the link or choose another name."
            )
    if root.exists():
        rr = root.resolve()
        tr = target.resolve()
        if tr != rr and rr not in tr.parents:
            raise PathEscapeError(f"{target} resolves to {tr}, outside {rr}.")


def resolve_target(path, root=None) -> Path:
    """The directory a save writes to: ``safe_join(root, path)`` when ``root`` is given, else
    ``path`` itself, which must not be a symlink."""
    if root is not None:
        return safe_join(root, path)
    p = Path(path)
    if not os.fspath(path):
        raise PathEscapeError("empty output path; give a directory such as 'out/adapter'.")
    if p.is_symlink():
        raise PathEscapeError(
            f"{p} is a symlink (to {os.readlink(p)}); jpeft does not save through symlinks. "
            "Give the real directory instead."
        )
    return p


def write_file(path: Path, data) -> None:
    """Writes all of ``data`` (bytes, or an iterable of bytes-like chunks written in turn, so a
    large file need not be held whole) with ``os.write`` and fsyncs; raises ``OSError`` on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
            view = memoryview(chunk).cast("B")
            del chunk  # nothing here holds a chunk once written (the next may be read only then)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write to {path}")
                view = view[n:]
            del view
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not Linux, or a libc without renameat2 (glibc < 2.28)
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``): there is no
    moment at which neither exists. False where the system or the file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(p: Path) -> None:
    """Removes a file or a directory tree (a save may replace either)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _sibling(target: Path, tag: str, kind: str) -> Path:
    # A fixed-length name keyed by a hash of the target's name: a 250-character target name
    # still gives a temporary name under the 255-byte limit, and recover() finds the siblings.
    key = hashlib.sha256(os.fsencode(target.name)).hexdigest()[:16]
    return target.parent / f".jpeft-{key}-{tag}.{kind}"


def recover(target) -> Optional[Path]:
    """Finishes a replacement that a killed process left between its two renames (only where
    :func:`atomic_directory` could not swap in one step): when ``target`` is missing and a
    ``.old`` sibling is there, the complete new version (its ``.tmp`` sibling) is moved into
    place, or else the old one is put back. Returns the path restored, if any."""
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    olds = sorted(target.parent.glob(_sibling(target, "*", "old").name))
    if not olds:
        return None
    old = olds[-1]
    new = old.with_suffix(".tmp")
    os.rename(new if new.exists() else old, target)
    for o in olds:
        _remove(o)
    _fsync_dir(target.parent)
    return target


_WRITE_TMP = ".jpeft-tmp"
# a temporary file of atomic_write this old and unlocked is a killed writer's; long, because on a shared
# file system whose flock is local to each host a live writer on another host looks unlocked
_STALE_WRITE_TMP_S = 900.0


def _lock_nb(fd: int) -> bool:
    """Takes an exclusive ``flock`` on ``fd`` without waiting; False when another process holds
    it, or the file system has no ``flock``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _remove_stale_write_temps(path: str) -> None:
    """Removes the temporary files that :func:`atomic_write` calls to ``path`` killed before
    their rename left beside it (``.<name>.<12 hex digits>.jpeft-tmp``): only regular files
    unchanged for :data:`_STALE_WRITE_TMP_S` seconds whose ``flock`` is free (a writer holds its
    own from creation to rename; the kernel releases it when the writer dies)."""
    folder, base = os.path.split(path)
    own = re.compile(re.escape(f".{base}.") + r"[0-9a-f]{12}" + re.escape(_WRITE_TMP))
    try:
        names = [n for n in os.listdir(folder or ".") if own.fullmatch(n)]
    except OSError:
        return
    for name in names:
        tmp = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            st = os.lstat(tmp)
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < _STALE_WRITE_TMP_S:
                continue
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                if _lock_nb(fd) and os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                    os.remove(tmp)
            finally:
                os.close(fd)


def check_folder(path, what: str) -> None:
    """Refuses an output folder ``path`` that exists as a file, or under a file, before anything
    is made or written in it (``os.makedirs`` would end with a bare ``FileExistsError`` or
    ``NotADirectoryError``); ``what`` names it for the user (``"--out"``, ``"output_dir"``).

    Raises:
      OverwriteError: ``path`` or a folder above it is a file.
    """
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise OverwriteError(f"{what} {os.fspath(path)!r} cannot be made a folder: {p!r} exists and is a file. Give a "
                             "folder path (a missing folder is made), or move the file away.")


def atomic_write(path, data) -> None:
    """Writes ``data`` (``str`` or ``bytes``) to ``path`` through a temporary file of a fresh
    name next to it, flushed and renamed over it, so an interrupted write leaves the previous
    version, never half a file (and a file of the user's named ``<path>.tmp`` is never touched).
    A writer killed before its rename leaves its hidden ``.<name>.<12 hex>.jpeft-tmp`` behind; a
    later successful write of the same ``path`` removes those that are 15 minutes old and not
    held by a live writer (each holds an ``flock`` on its own until the rename)."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}{_WRITE_TMP}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as with open()
        _lock_nb(fd)  # a fresh name: only a cleanup of a stale one could look at it, and it waits 15 minutes
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w",
                       **({} if isinstance(data, bytes) else {"newline": ""})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still open, so still locked
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _remove_stale_write_temps(path)


@contextlib.contextmanager
def atomic_directory(target, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to ``target``; when the block ends without an
    error it replaces ``target`` in one atomic step (an exchange of the two names on Linux, so
    no moment exists without ``target``; elsewhere two renames, which :func:`recover` completes
    if the process is killed between them). On any error the temporary directory is removed
    and ``target`` is left as it was.

    Raises:
      OverwriteError: ``target`` exists and ``overwrite`` is false.
      SaveError: writing, flushing or renaming failed (disk full, permission denied, ...).
    """
    target = Path(target)
    try:
        recover(target)
    except OSError as e:
        raise SaveError(f"cannot finish an interrupted earlier save of {target}: {e}. Nothing was written.") from e
    if target.exists() and not overwrite:
        raise OverwriteError(
            f"{target} already exists; jpeft does not replace an existing adapter or checkpoint unless asked. "
            "Pass overwrite=True, or choose another path."
        )
    parent = target.parent
    tag = uuid.uuid4().hex[:10]
    tmp = _sibling(target, tag, "tmp")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:
        raise SaveError(f"cannot create a directory next to {target}: {e}. Nothing was written.") from e
    try:
        yield tmp
        _fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            if _exchange(tmp, target):
                _remove(tmp)  # it now holds the previous version
            else:
                old = _sibling(target, tag, "old")
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except OSError:
                    os.rename(old, target)
                    raise
                _remove(old)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except OSError as e:
        _remove(tmp)
        raise SaveError(
            f"saving to {target} failed: {e}. The previous contents of {target} (if any) are intact; "
            "free space or fix permissions and save again."
        ) from e
    except BaseException:
        _remove(tmp)
        raise


__all__ = ["safe_join", "resolve_target", "check_folder", "atomic_write", "atomic_directory", "recover", "write_file"]
