"""A strict safetensors reader: the header is read and checked (length, JSON, dtypes, shapes and
offsets against the file's size) before any tensor data, every tensor is read into its own
buffer, and nothing is ever unpickled. :mod:`jpeft.io` re-exports the public names. Also the
layout of a file written one tensor at a time (:func:`safetensors_layout`), byte for byte the
file ``safetensors.numpy.save`` makes of the same arrays."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping, Optional

import ml_dtypes
import numpy as np
import safetensors.numpy

from jpeft._safe_read import json_object, open_regular, read_bounded, refuse_unsafe
from jpeft.errors import CheckpointError, JpeftError, LoadError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header

# safetensors dtype names <-> numpy dtype names (ml_dtypes provides bfloat16 & co.)
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

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

def safetensors_layout(specs: Mapping[str, tuple], metadata: Optional[Mapping[str, str]] = None
                       ) -> tuple[bytes, list[str]]:
    """The start of a safetensors file (its 8-byte length and JSON header) for arrays of the
    given ``{name: (shape, dtype)}``, and the names in the order their bytes follow it, each
    C-ordered and little-endian: the same bytes ``safetensors.numpy.save`` writes for those
    arrays, without holding them, so that a large file can be written one tensor at a time.

    The order and dtype names are safetensors' own (by dtype, then name), read from a file it makes
    of one element per name; only the shapes and offsets are filled in here.

    Raises:
      whatever ``safetensors.numpy.save`` raises for these dtypes (one it cannot store).
    """
    probe = safetensors.numpy.save({n: np.zeros((1,), dt) for n, (_, dt) in specs.items()},
                                   metadata=None if metadata is None else dict(metadata))
    size = struct.unpack("<Q", probe[:8])[0]
    entries = json.loads(probe[8:8 + size])
    header, offset = {}, 0
    if "__metadata__" in entries:
        header["__metadata__"] = entries.pop("__metadata__")
    for name, e in entries.items():
        shape, dt = specs[name]
        nbytes = math.prod(shape) * np.dtype(dt).itemsize
        header[name] = {"dtype": e["dtype"], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text, list(entries)


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
    header = json_object(raw, f"the safetensors header of {p}")
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


__all__ = ["MAX_HEADER_BYTES", "np_dtype", "safetensors_index", "check_expected", "read_safetensors"]
