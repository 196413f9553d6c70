"""Finished adapters on disk, the base-model fingerprint, and safe writing.

A finished adapter is a directory holding two files and nothing that can execute code:

* ``jpeft_adapter.json``: the format version, the jpeft version, the method config
  (``config.to_dict()``), the fingerprint of the base model the adapter was trained on, and an
  index of the arrays (``shape``, ``dtype``, ``sha256`` of the bytes);
* ``jpeft_adapter.safetensors``: the adapter arrays, keyed ``"<module path>/<field>"``
  (``"model/layers_0/self_attn/q_proj/lora_A"``).

Loading never unpickles: the JSON is parsed with :mod:`json`, the arrays with
:mod:`safetensors` after the header has been checked, and a pickle, zip (``torch.save``) or
``.npy`` file offered as an adapter is refused with :class:`~jpeft.errors.UnsafeFileError`.
Nodes are not stored: :func:`load_adapter` rebuilds them by calling :func:`jpeft.init` with
the stored config (under :func:`jax.eval_shape`, so nothing is computed) and fills the
arrays in, so each method's node type stays the one source of truth for its structure.

Writing goes to a temporary sibling directory that is renamed into place only once every
file is written and flushed: a save that fails part-way (disk full, permission denied)
raises :class:`~jpeft.errors.SaveError` and leaves the previous files untouched. Paths can be
confined to a root directory (``root=``); ``..``, absolute names and symlinks that would
lead outside it raise :class:`~jpeft.errors.PathEscapeError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

from jpeft._version import __version__
from jpeft import quant
from jpeft.config import AdapterConfig
from jpeft.core import init
from jpeft.errors import (
    BaseMismatchError,
    CheckpointError,
    ConfigError,
    JpeftError,
    LayoutError,
    LoadError,
    OverwriteError,
    PathEscapeError,
    SaveError,
    ShapeMismatchError,
    UnsafeFileError,
)
from jpeft.methods._common import head_copies, with_head_copies
from jpeft.methods.base import FOREIGN_SITE_FIX, foreign_site, recorded_kernel_fns, with_kernel_fns
from jpeft.tree import host_array, path_str, unwrap_params

ADAPTER_JSON = "jpeft_adapter.json"
ADAPTER_WEIGHTS = "jpeft_adapter.safetensors"
FORMAT = "jpeft-adapter"
FORMAT_VERSION = 1
MAX_JSON_BYTES = 64 << 20  # a metadata file larger than this is refused unread
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header

# safetensors dtype names <-> numpy dtype names (ml_dtypes provides bfloat16 & co.)
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

# config keys that describe the software, not the model; ignored by the fingerprint
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
     "torch_dtype", "dtype", "name_or_path", "architectures"}
)


# --------------------------------------------------------------------------------------------
# naming: adapter (and any pytree) <-> {"path/field": array}
# --------------------------------------------------------------------------------------------
def leaf_names(tree) -> list[tuple[str, Any]]:
    """``[(name, leaf)]`` in tree order, where ``name`` is the key path as
    :func:`jpeft.tree.path_str` writes it (``/``-joined, empty components dropped: the root
    module's path is ``""``).

    For an adapter the names are ``"<module path>/<field>"``:

    >>> import jax.numpy as jnp
    >>> [n for n, _ in leaf_names({"a/q": {"lora_A": jnp.zeros(1)}, "": {"w": jnp.zeros(1)}})]
    ['w', 'a/q/lora_A']

    Raises:
      ConfigError: when two leaves would get the same name.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out, seen = [], set()
    for kp, leaf in flat:
        name = path_str(kp)
        if name in seen:
            raise ConfigError(f"two leaves of the tree are both named {name!r}; rename a module or a field.")
        seen.add(name)
        out.append((name, leaf))
    return out


def sha256_hex(arr: np.ndarray) -> str:
    """The SHA-256 of a host array's bytes (C order), as saved adapters and checkpoints record it."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# base fingerprint
# --------------------------------------------------------------------------------------------
def _config_dict(base_config) -> Optional[dict]:
    if base_config is None:
        return None
    if isinstance(base_config, Mapping):
        d = dict(base_config)
    elif hasattr(base_config, "to_dict"):
        d = base_config.to_dict()
    elif dataclasses.is_dataclass(base_config) and not isinstance(base_config, type):
        d = dataclasses.asdict(base_config)
    else:
        raise ConfigError(
            f"base_config must be a dict, a dataclass or an object with to_dict() (a transformers config), "
            f"found {type(base_config).__name__}."
        )
    d = {k: v for k, v in d.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def content_hash(params) -> str:
    """SHA-256 over every parameter's path, shape, dtype and bytes (in path order)."""
    inner, _ = unwrap_params(params)
    h = hashlib.sha256()
    for name, leaf in sorted(leaf_names(inner), key=lambda t: t[0]):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ConfigError(
                "content_hash needs the base weights themselves, found an abstract jax.ShapeDtypeStruct "
                f"at {name!r}. Pass concrete params, or content_hash=False."
            )
        a = host_array(leaf)
        h.update(f"{name}|{a.shape}|{a.dtype}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()


def base_fingerprint(params, base_config=None, *, with_content_hash: bool = False) -> dict:
    """A JSON-able fingerprint of a base model: its config (when given) and every parameter's
    path, shape and dtype, plus optionally a hash of the weights' bytes.

    Works on ``jax.ShapeDtypeStruct`` trees (no weights needed) unless ``with_content_hash``.

    >>> import jax.numpy as jnp
    >>> fp = base_fingerprint({"params": {"q": {"kernel": jnp.zeros((2, 3))}}}, {"hidden_size": 3})
    >>> fp["params"], fp["config"]
    ([['q/kernel', [2, 3], 'float32']], {'hidden_size': 3})
    """
    inner, _ = unwrap_params(params)
    inner = quant.abstract(inner)  # a quantized base has the fingerprint of the model it stands for
    rows = []
    for name, leaf in leaf_names(inner):
        if not hasattr(leaf, "shape"):
            continue
        rows.append([name, [int(d) for d in leaf.shape], str(np.dtype(leaf.dtype))])
    return {
        "config": _config_dict(base_config),
        "params": rows,
        "num_params": int(sum(math.prod(r[1]) for r in rows)),
        "content_hash": content_hash(params) if with_content_hash else None,
    }


def fingerprint_difference(saved: Mapping, current: Mapping) -> Optional[str]:
    """What differs between two :func:`base_fingerprint` s, in words, or ``None`` when they
    describe the same base (the config's first differing key, else the first parameter whose
    name, shape or dtype differs)."""
    sc, cc = saved.get("config"), current.get("config")
    if sc is not None and cc is not None and sc != cc:
        for k in sorted(set(sc) | set(cc)):
            if sc.get(k, "<absent>") != cc.get(k, "<absent>"):
                return f"base config field {k!r}: saved {sc.get(k, '<absent>')!r}, this base {cc.get(k, '<absent>')!r}"
    sp = {r[0]: (tuple(r[1]), r[2]) for r in saved.get("params", [])}
    cp = {r[0]: (tuple(r[1]), r[2]) for r in current.get("params", [])}
    for name, (shape, dtype) in sp.items():
        if name not in cp:
            return f"parameter {name!r} ({shape}, {dtype}) is missing from this base"
        cs, cd = cp[name]
        if cs != shape:
            return f"parameter {name!r} has shape {cs} in this base, the saved base had {shape}"
        if cd != dtype:
            return f"parameter {name!r} has dtype {cd} in this base, the saved base had {dtype}"
    extra = [n for n in cp if n not in sp]
    if extra:
        return f"this base has parameter {extra[0]!r} that the saved base did not have ({len(extra)} extra in all)"
    return None


def check_base(saved: Optional[Mapping], params, base_config=None, *, allow_base_mismatch: bool = False,
               what: str = "adapter") -> None:
    """Compares a stored fingerprint with ``params`` (and ``base_config`` when given).

    Raises:
      BaseMismatchError: naming the first config field, or the first parameter whose
        presence, shape or dtype differs, or a differing content hash. With
        ``allow_base_mismatch=True`` a :class:`UserWarning` is issued instead.
    """
    if saved is None or params is None:
        return
    current = base_fingerprint(params, base_config)
    diff = fingerprint_difference(saved, current)
    if diff is None and saved.get("content_hash"):
        leaves = jax.tree.leaves(params)
        if leaves and not any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            got = content_hash(params)
            if got != saved["content_hash"]:
                diff = "the base weights' content hash differs (same shapes, different values)"
    if diff is None:
        return
    if allow_base_mismatch:
        warnings.warn(base_mismatch_message(what, diff, ", or allow_base_mismatch=True was given"), stacklevel=3)
        return
    err = BaseMismatchError(base_mismatch_message(what, diff))
    err.what, err.difference = what, diff  # for callers that word the fix their own way (the CLI)
    raise err


def base_mismatch_message(what: str, diff: str, fix: str = ", or pass allow_base_mismatch=True to load it anyway") -> str:
    """:func:`check_base`'s message: what differs, and ``fix``."""
    return f"this {what} was saved for a different base model: {diff}. Load it onto the base it was trained on{fix}."


# --------------------------------------------------------------------------------------------
# path safety and atomic writes
# --------------------------------------------------------------------------------------------
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


def _write_file(path: Path, data: bytes) -> None:
    """Writes all of ``data`` with ``os.write`` and fsyncs; raises ``OSError`` on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, f"short write to {path}")
            view = view[n:]
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


def with_checksum(doc: dict) -> dict:
    """``doc`` plus ``"checksum"``: the SHA-256 of its canonical JSON, so a metadata file changed
    after saving (bit rot, a partial write, an edit) is detected on load."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    out = dict(body)
    out["checksum"] = "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return out


def verify_checksum(doc: dict, where: str) -> None:
    """Raises :class:`CheckpointError` when ``doc["checksum"]`` does not match its content."""
    if "checksum" not in doc:
        raise CheckpointError(f"{where} has no 'checksum'; it was not written by jpeft or was damaged.")
    try:
        want = with_checksum(doc)["checksum"]
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where} is corrupted: {e}") from None
    if doc["checksum"] != want:
        raise CheckpointError(
            f"{where} is corrupted: its content does not match its checksum (it was changed after saving). "
            "Use an intact copy, or save it again."
        )


# --------------------------------------------------------------------------------------------
# reading files defensively
# --------------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def open_regular(path, *, what: str = "file") -> int:
    """A read-only file descriptor of ``path``, refusing anything but a regular file.

    A FIFO, a device such as ``/dev/zero`` (directly or through a symlink) or a socket has no
    meaningful size and can block or stream forever; the file is opened non-blocking, so even a
    FIFO without a writer returns at once, and refused after ``fstat``. The caller closes the
    descriptor.

    Raises:
      LoadError: ``path`` is missing, unreadable or not a regular file.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise LoadError(f"{what} {p} does not exist.") from None
    except OSError as e:
        raise LoadError(f"cannot read {what} {p}: {e}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise LoadError(f"cannot read {what} {p}: {e}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LoadError(
            f"{what} {p} is a {_kind(mode)}, not a regular file; jpeft reads only regular files, since a pipe or a "
            "device can block or stream without end. Replace it with the real file."
        )
    return fd


def read_bounded(fd: int, n: int, offset: int = 0) -> bytes:
    """At most ``n`` bytes from ``offset``, counted as they are read (never trusting ``st_size``)."""
    chunks, got = [], 0
    while got < n:
        b = os.pread(fd, min(n - got, 1 << 24), offset + got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def sniff_unsafe(path) -> Optional[str]:
    """A description of the format when ``path`` is a file whose loading could execute code
    (a pickle, a ``torch.save`` zip archive, a ``.npy``/``.npz`` file), else ``None``."""
    p = Path(path)
    try:
        fd = open_regular(p)
    except LoadError:
        return None
    try:
        head = read_bounded(fd, 9)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _describe_unsafe(head, p.suffix)


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_JSON_BYTES


def _describe_unsafe(head: bytes, suffix: str = "") -> Optional[str]:
    p = Path("x" + suffix)
    if _looks_like_safetensors(head) and p.suffix.lower() in ("", ".safetensors"):
        # A safetensors header length such as 896 = 0x380 starts with the bytes 0x80 0x03,
        # which is also the pickle protocol-3 opcode: recognise safetensors first.
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]})"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "a zip archive (torch.save / .npz format, which holds pickles)"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy file (which may hold pickled objects)"
    if p.suffix.lower() in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz"):
        return f"a {p.suffix} file (a pickle-based format)"
    return None


def refuse_unsafe(path, head: Optional[bytes] = None) -> None:
    """Raises :class:`UnsafeFileError` when :func:`sniff_unsafe` recognises ``path`` (or, when
    ``head`` is given, when those first bytes are a pickle / zip / npy signature)."""
    kind = sniff_unsafe(path) if head is None else _describe_unsafe(head)
    if kind is not None:
        raise UnsafeFileError(
            f"refusing to load {path}: it is {kind}, and loading it could execute arbitrary code. jpeft reads "
            "adapters only from safetensors + JSON. Convert it once, in an environment you trust, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')."
        )


def read_json(path, *, what: str = "metadata", max_bytes: int = MAX_JSON_BYTES) -> dict:
    """Reads a JSON object from ``path`` with a size limit; every failure is a named error."""
    p = Path(path)
    fd = open_regular(p, what=f"{what} file")
    try:
        raw = read_bounded(fd, max_bytes + 1)
    except OSError as e:
        raise LoadError(f"cannot read {what} file {p}: {e}") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise CheckpointError(f"{what} file {p} is more than the {max_bytes:,} bytes allowed; it is not a jpeft file.")
    return _json_object(raw, f"{what} file {p}")


def _json_object(raw: bytes, where: str) -> dict:
    """The JSON object the UTF-8 bytes ``raw`` hold (a metadata file, a safetensors header);
    ``where`` names them in the errors.

    Raises:
      CheckpointError: not UTF-8, not JSON (or nested too deep to parse), or not an object.
    """
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise CheckpointError(f"{where} is corrupted or truncated: not valid JSON ({type(e).__name__}: {e}).") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{where} must hold a JSON object, found {type(d).__name__}.")
    return d


def check_index(index, where: str) -> dict:
    """The ``arrays`` index of a saved adapter's or checkpoint's metadata, checked entry by entry.

    Raises:
      CheckpointError: an entry is not ``{shape, dtype, sha256}`` or names an unknown dtype.
    """
    if not isinstance(index, dict):
        raise CheckpointError(f"{where}: 'arrays' must be an object mapping names to {{shape, dtype, sha256}}.")
    out = {}
    for name, e in index.items():
        if not (isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("dtype"), str)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
                and (e.get("sha256") is None or isinstance(e.get("sha256"), str))):
            raise CheckpointError(f"{where}: the index entry for {name!r} is malformed: {str(e)[:200]}.")
        try:
            np.dtype(np_dtype(e["dtype"]))
        except TypeError:
            raise CheckpointError(f"{where}: the index entry for {name!r} has an unknown dtype {e['dtype']!r}.") from None
        out[name] = e
    return out


def np_dtype(name: str):
    """The numpy dtype a saved dtype name stands for (``bfloat16`` and the float8s through ml_dtypes).

    Raises:
      TypeError: ``name`` is not a dtype name.
    """
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return getattr(ml_dtypes, name)
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise TypeError(name)
    return np.dtype(name)


def safetensors_index(path, *, max_header: int = MAX_HEADER_BYTES) -> tuple[dict[str, tuple], dict]:
    """Reads and validates a safetensors file's header only (length, JSON, dtypes, shapes and
    offsets against the file's size); returns ``({name: (dtype, shape, file_offset, nbytes)},
    header_metadata)`` with little-endian numpy dtypes. Never unpickles, reads no tensor data,
    and reads only a regular file (never a FIFO or a device such as ``/dev/zero``).

    Raises:
      UnsafeFileError: the file is a pickle / zip / npy file.
      LoadError: the file is missing, unreadable or not a regular file.
      CheckpointError: the file is truncated, its header malformed or inconsistent.
    """
    p = Path(path)
    with _weights_fd(p) as fd:
        return _index_fd(p, fd, max_header)


@contextlib.contextmanager
def _weights_fd(p: Path) -> Iterator[int]:
    """A descriptor of the weights file ``p``, opened only when it is a regular file (a file
    not named ``.safetensors`` is first refused when it is a pickle / zip / npy file), closed
    afterwards; an ``OSError`` while it is read becomes a :class:`LoadError` naming the file."""
    refuse_unsafe(p) if p.suffix != ".safetensors" else None
    fd = open_regular(p, what="weights file")
    try:
        yield fd
    except JpeftError:
        raise
    except OSError as e:
        raise LoadError(f"cannot read {p}: {e}") from None
    finally:
        os.close(fd)


def _check_shape(p: Path, name: str, e: dict, itemsize: int) -> None:
    shape = e["shape"]
    # numpy refuses more than 64 dimensions, and a size whose byte count overflows even when a
    # zero dimension makes it empty; refuse both here with a named error.
    if len(shape) > 64 or math.prod(d or 1 for d in shape) * itemsize >= 1 << 62:
        raise CheckpointError(
            f"{p} is corrupted: tensor {name!r} has an impossible shape ({len(shape)} dimensions, "
            f"{str(shape)[:120]})."
        )


def _index_fd(p: Path, fd: int, max_header: int) -> tuple[dict[str, tuple], dict]:
    head = read_bounded(fd, 9)
    refuse_unsafe(p, head=head)
    size = os.fstat(fd).st_size
    if len(head) < 8:
        raise CheckpointError(f"{p} is truncated: {len(head)} bytes, a safetensors file has at least 8.")
    (n,) = struct.unpack("<Q", head[:8])
    if n > max_header or n > size - 8:
        raise CheckpointError(
            f"{p} is corrupted or truncated: its header claims {n:,} bytes but the file has {size - 8:,} after "
            f"the length field (limit {max_header:,})."
        )
    raw = read_bounded(fd, n, 8)
    if len(raw) != n:
        raise CheckpointError(f"{p} is truncated: its header claims {n:,} bytes, {len(raw):,} could be read.")
    header = _json_object(raw, f"the safetensors header of {p}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p} is corrupted: __metadata__ is not an object.")
    body = size - 8 - n
    index = {}
    for name, e in header.items():
        if not (isinstance(e, dict) and e.get("dtype") in _ST_DTYPES and isinstance(e.get("shape"), list)
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
                and all(isinstance(o, int) and not isinstance(o, bool) for o in e["data_offsets"])):
            raise CheckpointError(f"{p} is corrupted: the header entry for {name!r} is malformed: {str(e)[:200]}.")
        b, en = e["data_offsets"]
        dt = np.dtype(np_dtype(_ST_DTYPES[e["dtype"]])).newbyteorder("<")
        _check_shape(p, name, e, dt.itemsize)
        if not (0 <= b <= en <= body) or en - b != math.prod(e["shape"]) * dt.itemsize:
            raise CheckpointError(
                f"{p} is corrupted or truncated: tensor {name!r} ({e['dtype']}{e['shape']}) claims bytes [{b}, {en}) "
                f"of a {body:,}-byte data section."
            )
        index[name] = (dt, tuple(e["shape"]), 8 + n + b, en - b)
    spans = sorted((off, off + nb) for _, _, off, nb in index.values())
    for (b0, e0), (b1, e1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{p} is corrupted: two tensors overlap in the data section.")
    return index, meta


def _read_tensor_fd(p: Path, fd: int, name: str, dt, shape: tuple, offset: int, nbytes: int) -> np.ndarray:
    """One tensor read straight into its own buffer: memory is the tensor's size, bounded by the
    bytes actually read."""
    buf = np.empty(shape, dt)
    view = memoryview(buf.reshape(-1).view(np.uint8))
    got = 0
    while got < nbytes:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            break
        got += k
    if got != nbytes:
        raise CheckpointError(
            f"{p} is truncated: tensor {name!r} needs {nbytes:,} bytes at offset {offset:,}, {got:,} could be read."
        )
    return buf


def check_expected(index: Mapping[str, tuple], expect: Mapping[str, tuple], where: str) -> None:
    """Compares a safetensors index with the expected ``{name: (shape, dtype name)}`` before any
    data is read, so a header that declares a huge or unexpected tensor costs nothing.

    Raises:
      CheckpointError: a name is missing or extra, or a shape or dtype differs.
    """
    if set(index) != set(expect):
        diff = sorted(set(index) ^ set(expect))
        side = "the file" if diff[0] in index else "the expected arrays"
        raise CheckpointError(f"{where} does not match what was expected: array {diff[0]!r} is only in {side}.")
    for name, (shape, dtype) in expect.items():
        dt, fshape = index[name][0], index[name][1]
        if tuple(fshape) != tuple(shape) or (dtype is not None and str(dt.newbyteorder("=")) != str(np.dtype(np_dtype(dtype)))):
            raise CheckpointError(
                f"{where} is corrupted: {name!r} is {dt.newbyteorder('=')}{list(fshape)} in the file, "
                f"expected {dtype}{list(shape)}."
            )


def read_safetensors(path, *, max_header: int = MAX_HEADER_BYTES,
                     expect: Optional[Mapping[str, tuple]] = None) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a safetensors file after validating its header (:func:`safetensors_index`);
    returns ``(arrays, header_metadata)``. Never unpickles, reads only a regular file, and
    reads each tensor into its own buffer (peak memory is the arrays themselves).

    Args:
      expect: ``{name: (shape, dtype name or None)}``; when given, the header must declare
        exactly these before any tensor data is read.

    Raises:
      UnsafeFileError: the file is a pickle / zip / npy file.
      LoadError: the file is missing, unreadable or not a regular file.
      CheckpointError: the file is truncated, its header malformed or its data inconsistent.
    """
    p = Path(path)
    with _weights_fd(p) as fd:
        index, meta = _index_fd(p, fd, max_header)
        if expect is not None:
            check_expected(index, expect, str(p))
        arrays = {name: _read_tensor_fd(p, fd, name, *spec) for name, spec in index.items()}
    return arrays, meta


# --------------------------------------------------------------------------------------------
# finished adapters
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What :func:`read_adapter_info` returns: everything about a saved adapter but its arrays.

    Attributes:
      path: the adapter directory.
      config: the method config (an :class:`~jpeft.AdapterConfig` subclass).
      base: the base-model fingerprint (``{"config", "params", "num_params", "content_hash"}``)
        or ``None`` when the adapter was saved without ``params``.
      arrays: ``{name: (shape, dtype)}``.
      num_params: number of adapter parameters.
      nbytes: bytes of the adapter arrays.
      jpeft_version: the jpeft version that wrote it.
      metadata: the user's own ``metadata`` dict given to :func:`save_adapter`.
      module_copies: paths of the module copies the adapter holds beside its method's sites
        (SEQ_CLS's classifier copy of a method without ``modules_to_save``, read from a PEFT file).
      kernel_fns: ``{path: function}`` of the sites on modules that compute with their own
        function of the kernel (:attr:`jpeft.methods.base.Layout.kernel_fn`), which
        :func:`jpeft.merge` refuses.
    """

    path: Path
    config: AdapterConfig
    base: Optional[dict]
    arrays: dict
    num_params: int
    nbytes: int
    jpeft_version: str
    metadata: dict
    module_copies: tuple = ()
    kernel_fns: dict = dataclasses.field(default_factory=dict)


def _resolve_adapter_dir(path) -> Path:
    p = Path(path)
    try:
        recover(p)  # a save killed between its two renames (systems without an atomic exchange)
    except OSError as e:
        raise LoadError(f"cannot finish an interrupted save of {p}: {e}") from None
    if p.is_file():
        if p.name in (ADAPTER_JSON, ADAPTER_WEIGHTS):
            return p.parent
        refuse_unsafe(p)
        raise LoadError(
            f"{p} is a file; jpeft.load_adapter expects the adapter directory written by jpeft.save_adapter "
            f"(holding {ADAPTER_JSON} and {ADAPTER_WEIGHTS})."
        )
    if not p.exists():
        raise LoadError(f"adapter directory {p} does not exist.")
    if not (p / ADAPTER_JSON).exists():
        for f in sorted(p.iterdir()) if p.is_dir() else []:
            if f.is_file() and sniff_unsafe(f) is not None:
                refuse_unsafe(f)
        if (p / "adapter_config.json").exists():
            raise LoadError(
                f"{p} holds a Hugging Face PEFT adapter (adapter_config.json), not a jpeft adapter; "
                "load it with jpeft.hf.load_peft."
            )
        raise LoadError(f"{p} is not a jpeft adapter directory: {ADAPTER_JSON} is missing.")
    return p


def _parse_info(p: Path) -> tuple[AdapterInfo, dict]:
    d = read_json(p / ADAPTER_JSON, what="adapter metadata")
    where = str(p / ADAPTER_JSON)
    verify_checksum(d, where)
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not jpeft adapter metadata: 'format' is {str(d.get('format'))[:80]!r}, expected {FORMAT!r}.")
    v = d.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CheckpointError(f"{where}: 'format_version' must be a positive integer, found {str(v)[:80]!r}.")
    if v > FORMAT_VERSION:
        raise LoadError(f"{where} has format_version {v}; this jpeft reads up to {FORMAT_VERSION}. Upgrade jpeft.")
    cfg = d.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: 'config' must be an object, found {type(cfg).__name__}.")
    try:
        config = AdapterConfig.from_dict(cfg)
    except JpeftError:
        raise
    except Exception as e:  # a config class rejecting a malformed value
        raise CheckpointError(f"{where}: the stored config is invalid ({type(e).__name__}: {e}).") from None
    base = d.get("base")
    if base is not None:
        if not (isinstance(base, dict) and isinstance(base.get("params"), list)
                and all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], list)
                        and isinstance(r[2], str) for r in base["params"])
                and (base.get("config") is None or isinstance(base.get("config"), dict))):
            raise CheckpointError(f"{where}: the base fingerprint is malformed.")
    index = check_index(d.get("arrays"), where)
    meta = d.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: 'metadata' must be an object.")
    arrays = {k: (tuple(e["shape"]), e["dtype"]) for k, e in index.items()}
    num = sum(math.prod(s) for s, _ in arrays.values())
    nbytes = sum(math.prod(s) * np.dtype(np_dtype(dt)).itemsize for s, dt in arrays.values())
    copies = module_copies(d, where)
    info = AdapterInfo(p, config, base, arrays, int(num), int(nbytes), str(d.get("jpeft_version", "?")), meta, copies,
                       kernel_fns(d, where))
    return info, index


def module_copies(meta: Mapping[str, Any], where: str) -> tuple:
    """The ``module_copies`` a writer recorded in ``meta`` (:func:`jpeft.methods._common.head_copies`), checked."""
    copies = meta.get("module_copies", [])
    if not isinstance(copies, list) or not all(isinstance(c, str) for c in copies):
        raise CheckpointError(f"{where}: 'module_copies' must be a list of module paths, found {str(copies)[:80]!r}.")
    return tuple(copies)


def kernel_fns(meta: Mapping[str, Any], where: str) -> dict:
    """The ``kernel_fns`` a writer recorded in ``meta`` (:func:`jpeft.methods.base.recorded_kernel_fns`), checked."""
    fns = meta.get("kernel_fns", {})
    if not isinstance(fns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fns.items()):
        raise CheckpointError(f"{where}: 'kernel_fns' must map module paths to function names, found {str(fns)[:80]!r}.")
    return dict(fns)


def read_adapter_info(path) -> AdapterInfo:
    """Reads a saved adapter's metadata (config, base fingerprint, array shapes) without
    loading its arrays.

    Raises:
      LoadError: the directory or its metadata is missing; CheckpointError: it is malformed;
      UnsafeFileError: a pickle-based file was offered.
    """
    try:
        return _parse_info(_resolve_adapter_dir(path))[0]
    except JpeftError:
        raise
    except Exception as e:  # a damaged file must end in a named error, whatever tripped on it
        raise CheckpointError(f"adapter at {path} is damaged: {type(e).__name__}: {str(e)[:300]}") from None


def save_adapter(
    path,
    config: AdapterConfig,
    adapter: Mapping[str, Any],
    *,
    params=None,
    base_config=None,
    with_content_hash: bool = False,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    root=None,
) -> Path:
    """Saves a finished adapter as ``path/jpeft_adapter.json`` + ``path/jpeft_adapter.safetensors``.

    Only the adapter's arrays are written, never a base weight. The write is atomic: the files
    go to a temporary sibling directory that replaces ``path`` in one rename.

    Args:
      path: the adapter directory to create (relative to ``root`` when ``root`` is given).
      config: the method config the adapter was made with.
      adapter: the adapter dict from :func:`jpeft.init` (after training).
      params: the base model's params (arrays or ``jax.ShapeDtypeStruct``); strongly
        recommended: their fingerprint lets :func:`load_adapter` refuse a wrong base.
      base_config: the base model's config (dict, dataclass or transformers config), added
        to the fingerprint.
      with_content_hash: also hash the base weights' bytes (needs concrete params).
      metadata: a JSON-able dict of your own (task name, metrics, ...).
      overwrite: replace an existing ``path`` that holds an earlier adapter (or is an empty
        folder); a file or a folder of anything else is refused (:class:`OverwriteError`).
      root: confine ``path`` to this directory (``..``, absolute paths and symlinks refused).

    Returns:
      The directory written.

    Raises:
      ConfigError: ``adapter`` holds nodes the config's method does not make (e.g. a merged
        LoRA adapter of VeRA inputs with their ``VeraConfig``), which :func:`load_adapter`
        could not rebuild.
      OverwriteError: ``path`` exists and ``overwrite`` is false, or it is not an adapter.
      PathEscapeError: ``path`` would leave ``root``, or is a symlink.
      SaveError: the write failed; nothing at ``path`` changed.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft, tempfile, os
    >>> model = nn.Dense(4); params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> cfg = jpeft.LoraConfig(r=2, target_modules=".*")
    >>> adapter = jpeft.init(cfg, params, jax.random.key(1))
    >>> d = jpeft.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), cfg, adapter, params=params)
    >>> cfg2, adapter2 = jpeft.load_adapter(d, params)
    >>> cfg2 == cfg, bool(jnp.array_equal(adapter2[""].lora_A, adapter[""].lora_A))
    (True, True)
    >>> jpeft.read_adapter_info(d).arrays
    {'lora_A': ((3, 2), 'float32'), 'lora_B': ((2, 4), 'float32')}
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"save_adapter expects a method config such as jpeft.LoraConfig, found {type(config).__name__}.")
    if not isinstance(adapter, Mapping) or not adapter:
        raise ConfigError(f"save_adapter expects the adapter dict {{module_path: node}} from jpeft.init, found {type(adapter).__name__}.")
    # SEQ_CLS's classifier copy beside a method without modules_to_save (from jpeft.hf.load_peft): recorded by path
    copies = head_copies(config, adapter)
    foreign = foreign_site(config, {p: n for p, n in adapter.items() if p not in copies})  # load_adapter: jpeft.init(config)
    if foreign is not None:
        raise ConfigError(f"save_adapter: {foreign}, which load_adapter could not rebuild. {FOREIGN_SITE_FIX}")
    # the config load_adapter rebuilds these sites from (LoRA: init set to the sites' residual base)
    config = config.saved_config(adapter)
    target = resolve_target(path, root)
    named = leaf_names(dict(adapter))
    arrays, index = {}, {}
    for name, leaf in named:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ConfigError(f"adapter leaf {name!r} is abstract (jax.ShapeDtypeStruct); save a concrete adapter.")
        a = host_array(leaf)
        arrays[name] = a
        index[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": sha256_hex(a)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jpeft_version": __version__,
        "config": config.to_dict(),
        "base": base_fingerprint(params, base_config, with_content_hash=with_content_hash) if params is not None else None,
        "arrays": index,
        "metadata": dict(metadata or {}),
    }
    if copies:
        meta["module_copies"] = sorted(copies)
    fns = recorded_kernel_fns(adapter)  # sites jpeft.merge refuses: a load without the model cannot see them
    if fns:
        meta["kernel_fns"] = fns
    try:
        # not sort_keys: rank_pattern / alpha_pattern take the first matching key, so their order is meaning
        # (the checksum is computed over the canonical, sorted form)
        meta_bytes = json.dumps(with_checksum(meta), indent=1).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metadata must be JSON-able: {e}") from None

    weights = safetensors.numpy.save(arrays, metadata={"format": "jpeft"})
    if overwrite:
        _check_replaceable(target)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        _write_file(tmp / ADAPTER_WEIGHTS, weights)
        _write_file(tmp / ADAPTER_JSON, meta_bytes)
    return target


def _check_replaceable(target: Path) -> None:
    """``overwrite=True`` replaces an earlier adapter (or an empty folder), never a file or a
    folder holding something else: a path given by mistake (a data file, a project folder)
    would be lost with everything in it."""
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise OverwriteError(f"{target} is a file, not an adapter folder; overwrite=True replaces an earlier adapter "
                             "only. Choose another path, or remove the file yourself.")
    # hidden entries count too (a project's .git, a .env): only the Finder's .DS_Store is nobody's work
    names = sorted(n for n in os.listdir(target) if n != ".DS_Store")
    if names and ADAPTER_JSON not in names:
        raise OverwriteError(f"{target} holds files that are not a jpeft adapter ({names[0]!r}, {len(names)} in all); "
                             "overwrite=True replaces an earlier adapter only. Choose another path, or empty it yourself.")


def template_adapter(config: AdapterConfig, params, model=None, *model_args, **model_kwargs):
    """The adapter :func:`jpeft.init` would create for ``params``, as ``jax.ShapeDtypeStruct``
    leaves (nothing is computed): the structure loaders fill with saved arrays."""
    def make(p):
        return init(config, p, jax.random.key(0), model, *model_args, **model_kwargs)

    return jax.eval_shape(make, params)


def fill_template(template, arrays: Mapping[str, Any], *, where: str, exact_dtype: bool = False):
    """Puts ``arrays`` (named as :func:`leaf_names` names them) into ``template``'s structure.

    Raises:
      ShapeMismatchError: a name is missing or extra, or a shape differs.
    """
    named = leaf_names(template)
    want = {n for n, _ in named}
    missing = [n for n, _ in named if n not in arrays]
    extra = [n for n in arrays if n not in want]
    if missing or extra:
        raise ShapeMismatchError(
            f"{where} does not fit this base: "
            + (f"it lacks {missing[0]!r} ({len(missing)} missing)" if missing else "")
            + ("; " if missing and extra else "")
            + (f"it has {extra[0]!r} that the config does not create here ({len(extra)} extra)" if extra else "")
            + ". Was it saved for another model, or with a different model tracing (model, *example_args)?"
        )
    leaves = []
    for name, t in named:
        a = arrays[name]
        if tuple(a.shape) != tuple(t.shape):
            raise ShapeMismatchError(
                f"{where}: array {name!r} has shape {tuple(a.shape)}, but the config creates {tuple(t.shape)} on this base. "
                "Load it onto the base it was trained on."
            )
        tdt, adt = np.dtype(t.dtype), np.dtype(a.dtype)
        if tdt != adt and (exact_dtype or not (jax.dtypes.issubdtype(tdt, np.inexact) and jax.dtypes.issubdtype(adt, np.inexact))):
            raise ShapeMismatchError(f"{where}: array {name!r} has dtype {adt}, expected {tdt}.")
        leaves.append(a)
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, leaves)


def load_adapter(path, params, model=None, *model_args, base_config=None, allow_base_mismatch: bool = False,
                 **model_kwargs) -> tuple[AdapterConfig, dict]:
    """Loads an adapter saved by :func:`save_adapter`: ``config, adapter = load_adapter(path, params)``.

    The nodes are rebuilt by :func:`jpeft.init` with the stored config on ``params`` (under
    :func:`jax.eval_shape`), and the saved arrays, checked against their stored SHA-256, are
    filled in. Give ``model, *example_args`` when the adapter was created with them.

    Args:
      path: the adapter directory (or one of its two files).
      params: the base model's params (arrays or ``jax.ShapeDtypeStruct``).
      model, *model_args, **model_kwargs: as for :func:`jpeft.init`.
      base_config: the base model's config, compared with the stored fingerprint's.
      allow_base_mismatch: load onto a base whose fingerprint differs (a warning instead of
        :class:`~jpeft.errors.BaseMismatchError`); shapes must still fit.

    Raises:
      UnsafeFileError: a pickle-based file was offered.
      BaseMismatchError: the adapter was saved for another base (says what differs).
      CheckpointError: a file is corrupted or truncated.
      ShapeMismatchError: the arrays do not fit the nodes the config creates on ``params``.
      LoadError: files are missing.
    """
    try:
        return _load_adapter(path, params, model, model_args, base_config, allow_base_mismatch, model_kwargs)
    except JpeftError:
        raise
    except Exception as e:  # a damaged file must end in a named error, whatever tripped on it
        raise CheckpointError(f"adapter at {path} is damaged: {type(e).__name__}: {str(e)[:300]}") from None


def _load_adapter(path, params, model, model_args, base_config, allow_base_mismatch, model_kwargs):
    p = _resolve_adapter_dir(path)
    info, index = _parse_info(p)
    check_base(info.base, params, base_config, allow_base_mismatch=allow_base_mismatch)
    try:
        template = template_adapter(info.config, params, model, *model_args, **model_kwargs)
    except LayoutError as e:
        if model is not None:
            raise
        # its fix names jpeft.init, which a user loading a saved adapter does not call
        raise LayoutError(f"{e} To load a saved adapter, give them to load_adapter the same way: "
                          "jpeft.load_adapter(path, params, model, x).") from None
    if info.module_copies:
        template = with_head_copies(template, unwrap_params(params)[0], info.module_copies, str(p))
    if model is None:  # layouts from the params alone: what the saved adapter's trace recorded (with the model: its own)
        template = with_kernel_fns(template, info.kernel_fns)
    # Names and shapes are checked against the config's template and the metadata index before
    # any tensor data is read: a header declaring a 1 GiB tensor in a sparse file costs nothing.
    fill_template(template, {k: jax.ShapeDtypeStruct(tuple(e["shape"]), np_dtype(e["dtype"])) for k, e in index.items()},
                  where=str(p))
    where = str(p / ADAPTER_WEIGHTS)
    arrays, _ = read_safetensors(p / ADAPTER_WEIGHTS, expect={k: (e["shape"], e["dtype"]) for k, e in index.items()})
    for name, e in index.items():
        if e.get("sha256") and sha256_hex(arrays[name]) != e["sha256"]:
            raise CheckpointError(f"{where} is corrupted: the bytes of {name!r} do not match their SHA-256 in {ADAPTER_JSON}.")
    adapter = fill_template(template, arrays, where=str(p))
    adapter = jax.tree.map(jax.numpy.asarray, adapter)
    _warn_load_notes(p, adapter)
    return info.config, adapter


def _warn_load_notes(p, adapter) -> None:
    """Warns what the loaded nodes say a user must know (each node's ``load_note``: LoRA factors
    relative to a residual base, which nothing on disk ties to the params given), once per note."""
    notes = sorted({n for node in adapter.values() if (n := node.load_note()) is not None})
    for note in notes:
        warnings.warn(f"the adapter in {str(p)!r}: {note}", UserWarning, stacklevel=4)


__all__ = [
    "AdapterInfo",
    "save_adapter",
    "load_adapter",
    "read_adapter_info",
    "base_fingerprint",
    "check_base",
    "content_hash",
    "safe_join",
    "atomic_directory",
    "recover",
    "sniff_unsafe",
    "refuse_unsafe",
    "read_json",
    "with_checksum",
    "verify_checksum",
    "read_safetensors",
    "safetensors_index",
    "check_expected",
    "open_regular",
    "read_bounded",
    "leaf_names",
    "template_adapter",
    "fill_template",
]
