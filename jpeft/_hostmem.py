"""Returning freed host memory to the operating system.

glibc's allocator keeps freed blocks of up to tens of MiB in its heap for reuse (its mmap
threshold grows with the blocks it has seen), so after loading a model tensor by tensor the
process can stay hundreds of MiB above what it holds, and a following large allocation (a
stacked layer array, the training step's buffers) comes on top. ``release()`` asks glibc to
give the free pages back (``malloc_trim(0)``); elsewhere it does nothing. The loaders call it
after releasing per-tensor host copies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release() -> bool:
    """Gives freed heap memory back to the OS where the C library supports it (glibc);
    returns whether anything could be asked."""
    fn = _trim()
    if fn is None:
        return False
    fn(0)
    return True
