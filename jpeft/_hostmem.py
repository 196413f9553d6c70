"""Returning freed host memory to the operating system.

glibc's allocator keeps freed blocks of up to tens of MiB in its heap for reuse (its mmap
threshold grows with the blocks it has seen), so after loading a model tensor by tensor the
process can stay hundreds of MiB above what it holds, and a following large allocation (a
stacked layer array, the training step's buffers) comes on top. ``release()`` asks glibc to
give the free pages back (``malloc_trim(0)``); elsewhere it does nothing. The loaders call it
after releasing per-tensor host copies. ``in_use()`` and ``settle()`` let ``jpeft.fit`` wait,
after a step, until XLA has freed that step's temporaries, and ``heap()`` lets it see when the
freed temporaries were cut off from the top of the heap (``StepHeap``, docs/ARCHITECTURE.md,
"Host memory pages on the CPU").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time
from typing import NamedTuple, Optional

import numpy as np


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
RELEASE_WAIT = 0.05  # seconds StepHeap.release watches for temporaries freed just after it


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


class Heap(NamedTuple):
    size: int  # bytes the heap has from the system (``mallinfo2().arena``)
    top: int  # bytes free at its top, contiguous with what it may still grow (``keepcost``)


@functools.lru_cache(maxsize=1)
def _sbrk_mincore():
    """libc's ``sbrk`` and ``mincore`` with their C signatures set once, or None where the C
    library lacks them."""
    libc = _libc()
    if libc is None or not hasattr(libc, "sbrk") or not hasattr(libc, "mincore"):
        return None
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    libc.mincore.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc.sbrk, libc.mincore


def heap() -> Optional[Heap]:
    """The main heap's size and its free top chunk (glibc's ``mallinfo2``), or None where the C
    library does not say."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return Heap(int(info.arena), int(info.keepcost))


def top_residency() -> Optional[tuple[int, int]]:
    """Of the main heap's free top chunk: bytes not resident *below* its highest resident page,
    and bytes resident (``mincore`` over the chunk's pages), or None where the C library or
    system does not say. glibc carves a request from the low end of the top, so a top with
    released pages under resident ones makes the next large request fault fresh pages in while
    resident ones stay idle (the never-touched end of the top above the last resident page is
    not counted: a request reaches it only when it needs more than the top's resident pages)."""
    fns, info = _sbrk_mincore(), heap()
    if fns is None or info is None:
        return None
    sbrk, mincore = fns
    page = os.sysconf("SC_PAGE_SIZE")
    end = sbrk(0) or 0
    start = -(-(end - info.top) // page) * page  # the first whole page of the top
    if end - start < page:
        return 0, 0
    n = (end - start) // page
    vec = (ctypes.c_ubyte * n)()
    if mincore(start, n * page, vec) != 0:
        return None
    resident = np.frombuffer(vec, np.uint8) & 1
    if not resident.any():
        return 0, 0
    kept = int(resident.sum())
    last = n - int(resident[::-1].argmax())  # one past the highest resident page
    return (last - kept) * page, kept * page


class StepHeap:
    """What ``jpeft.fit`` does around each training step for the `jpeft` command's kept heap
    (issue 24; docs/ARCHITECTURE.md, "Host memory pages on the CPU").

    * ``before(watch)`` reads :func:`in_use` just before a step (``watch``: the step is long
      enough for a look at the heap to cost nothing that matters; the first step compiles).
    * ``after()``, once the step's outputs are ready, waits with :func:`settle` for XLA to free
      the step's temporaries (given up after ``max_misses`` heaps that do not settle: something
      else keeps allocating). Then it hands freed pages back (:func:`release`, at most
      ``max_releases`` times a run) in two cases where the next step would otherwise take
      fresh pages while as many stay resident and idle:

      - **The freed temporaries are cut off from the top of the heap**: the same heap size as
        after the last watched step, but a free top smaller by more than the slack, because
        something the step allocated lies between them and the top. XLA's CPU buffers are
        allocated aligned (64 bytes), and glibc serves an aligned request from a chunk larger
        than the request by the alignment and a header, so the next step's temporaries never
        fit the hole the last ones left (as measured: the hole exactly the size of the chunk
        they had taken) and go on top: the heap grows by a whole step's temporaries (the issue
        Llama's LoRA step: ~1,490 -> ~2,340 MiB at a random step, in 4 of 8 runs).
        Releasing the hole's pages first keeps the resident peak at one step's temporaries.
      - **The free top has released pages under resident ones** (:func:`top_residency`):
        once whatever lay between is freed, the released hole and the resident pages above it
        form one top, and glibc carves the next request from its low, released end. Trimming
        the top makes the next step fault its temporaries in once, with nothing idle.
    """

    def __init__(self, *, slack: int = SETTLE_SLACK, max_misses: int = 2, max_releases: int = 4):
        self.slack, self.max_misses, self.max_releases = slack, max_misses, max_releases
        self.misses = self.releases = 0
        self._before: Optional[int] = None
        self._last: Optional[Heap] = None

    def release(self, wait: float = RELEASE_WAIT) -> bool:
        """:func:`release` now (``fit`` after its first step and after other work, once their
        outputs are ready), and the next watched step is not compared with the heap before it
        (trimmed, not cut off). XLA frees the work's temporaries a moment after its outputs are
        ready, as after a step (:func:`settle`); trimmed before that, they stay resident and
        the next step's aligned temporaries cannot reuse them (full fine-tuning of the issue
        Llama peaked at ~2,600 instead of ~1,740 MiB in 4 of 12 runs, the heap still holding
        the first step's ~1.1 GB of temporaries when ``fit`` trimmed it). So for up to ``wait``
        seconds it watches for the heap to drop by more than the slack and trims again when it
        does."""
        self._last = None
        held = in_use() if wait > 0 else None
        done = release()
        if held is None:
            return done
        deadline = time.perf_counter() + wait
        while time.perf_counter() < deadline:
            now = in_use()
            if now is None:
                break
            if now + self.slack < held:
                return release()
            time.sleep(0.001)
        return done

    def before(self, watch: bool) -> None:
        self._before = in_use() if watch and self.misses < self.max_misses else None
        if self._before is None:
            self._last = None  # a step not watched may change the heap: start again

    def after(self) -> None:
        if self._before is None:
            return
        if not settle(self._before, slack=self.slack):
            self.misses += 1
            self._last = None
            return
        now, last = heap(), self._last
        if now is not None and self.releases < self.max_releases:
            cut_off = last is not None and now.size <= last.size + self.slack and now.top + self.slack < last.top
            if not cut_off:
                pages = top_residency()
                cut_off = pages is not None and min(pages) > self.slack
            if cut_off:
                release()
                self.releases += 1
                now = heap()
        self._last = now
