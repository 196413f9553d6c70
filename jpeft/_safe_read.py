"""Reading untrusted files defensively: regular files only (never a FIFO or a device), sizes
counted as bytes are read, JSON with a size limit, and pickle-based files (a pickle, a
``torch.save`` zip archive, a ``.npy``/``.npz`` file) recognised by their first bytes and refused
with :class:`~jpeft.errors.UnsafeFileError`. :mod:`jpeft.io` re-exports the public names."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Optional

from jpeft.errors import CheckpointError, LoadError, UnsafeFileError

MAX_JSON_BYTES = 64 << 20  # a metadata file larger than this is refused unread


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
    return json_object(raw, f"{what} file {p}")


def json_object(raw: bytes, where: str) -> dict:
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


__all__ = ["MAX_JSON_BYTES", "open_regular", "read_bounded", "sniff_unsafe", "refuse_unsafe", "read_json", "json_object"]
