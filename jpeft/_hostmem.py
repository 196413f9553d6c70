"""Returning freed host memory to the operating system.

glibc's allocator keeps freed blocks of up to tens of MiB in its heap for reuse (its mmap
threshold grows with the blocks it has seen), so after loading a model tensor by tensor the
process can stay hundreds of MiB above what it holds, and a following large allocation (a
stacked layer array, the training step's buffers) comes on top. ``release()`` asks glibc to
give the free pages back (``malloc_trim(0)``); elsewhere it does nothing. The loaders call it
after releasing per-tensor host copies. ``in_use()`` and ``settle()`` let ``jpeft.fit`` wait,
after a step, until XLA has freed that step's temporaries (docs/ARCHITECTURE.md, "Host memory
pages on the CPU").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from typing import Optional


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _trim():
    return getattr(_libc(), "malloc_trim", None)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    fn = getattr(_libc(), "mallinfo2", None)  # glibc >= 2.33
    if fn is not None:
        fn.restype = _MallInfo2
        fn.argtypes = []
    return fn


def release() -> bool:
    """Gives freed heap memory back to the OS where the C library supports it (glibc);
    returns whether anything could be asked."""
    fn = _trim()
    if fn is None:
        return False
    fn(0)
    return True


def in_use() -> Optional[int]:
    """Bytes the C heap has handed out and not yet had back (glibc's ``mallinfo2``: heap
    chunks in use plus mmapped ones), or None where the C library does not say."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return int(info.uordblks) + int(info.hblkhd)


SETTLE_SLACK = 64 << 20  # what a step may leave allocated beyond what was in use before it
SETTLE_TIMEOUT = 0.25  # seconds


def settle(before: Optional[int], *, slack: int = SETTLE_SLACK, timeout: float = SETTLE_TIMEOUT) -> bool:
    """Waits (polling every millisecond, at most ``timeout`` seconds) until the C heap holds
    no more than ``before + slack`` bytes: ``before`` is :func:`in_use` just before a
    training step, called once the step's outputs are ready. XLA's CPU runtime frees a step's
    temporary buffer on its own thread a moment *after* the outputs become ready; a next step
    dispatched in that moment allocates its temporaries while the last ones are still held, so
    they land elsewhere and the peak grows by one step's temporaries (issue 24: one cause of
    the issue Llama's LoRA step peaking at ~2,340 instead of ~1,490 MiB in some runs, at a
    random step that also took 7 s instead of 1.8; not the only one). Returns whether the heap
    settled (False on a timeout or without ``mallinfo2``)."""
    if before is None:
        return False
    deadline = time.perf_counter() + timeout
    while True:
        now = in_use()
        if now is None:
            return False
        if now <= before + slack:
            return True
        if time.perf_counter() >= deadline:
            return False
        time.sleep(0.001)
