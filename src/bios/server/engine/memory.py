"""Host memory of the engine process: what it holds, and giving freed memory back to the OS.

A training pass allocates and frees hundreds of MiB of activations and logits. glibc's malloc
keeps freed chunks for reuse, and tensors of many sizes fragment its heap, so without help the
process's resident size creeps up to a high-water mark far above what it actually uses (seen as
slow RSS growth under load). After a cycle the engine asks malloc how much of the heap is free
and, past a threshold, calls `malloc_trim(0)`, which returns free pages to the OS. On platforms
without glibc the stats read as unknown and trimming does nothing.

Both calls walk every free chunk of every arena, so their cost grows with the heap and its
fragmentation: about 70 ms for `mallinfo2` on a fragmented 6.7 GiB heap (measured), and a few
ms in a server holding a hundred runs, where a small step's whole cycle takes 5-50 ms.
`HeapWatch` therefore reads (and trims) at most once per interval, not after every cycle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass

_MIB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    # struct mallinfo2 (glibc >= 2.33); every field is a size_t.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None
    return libc


_LIBC = _load_libc()


@dataclass(frozen=True)
class HostMemory:
    """Resident size of the process and, with glibc, malloc's heap in use and free (MiB).

    heap_* cover the main and thread arenas; blocks that malloc mapped directly (large ones)
    are not in them: those go back to the OS as soon as they are freed.
    """

    rss_mib: float | None
    heap_in_use_mib: float | None
    heap_free_mib: float | None


def resident_mib() -> float | None:
    """This process's resident set size in MiB (Linux), or None where /proc is missing."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / _MIB


def host_memory() -> HostMemory:
    """Read the process's memory now: one /proc read and one mallinfo2 call (which walks the
    heap; see the module docstring)."""
    rss = resident_mib()
    if _LIBC is None:
        return HostMemory(rss, None, None)
    info = _LIBC.mallinfo2()
    return HostMemory(rss, info.uordblks / _MIB, info.fordblks / _MIB)


def release_free_memory(min_free_mib: float, heap_free_mib: float | None) -> bool:
    """Return malloc's free heap pages to the OS when a reading just taken
    (`host_memory().heap_free_mib`) shows more than `min_free_mib` MiB free.

    Returns whether a trim ran; a trim walks the heap and costs a few milliseconds per GiB,
    so the threshold keeps it off small cycles.
    """
    if _LIBC is None or heap_free_mib is None:
        return False
    if heap_free_mib < min_free_mib:
        return False
    _LIBC.malloc_trim(0)
    return True


class HeapWatch:
    """The engine's memory reading after each piece of work, with malloc's figures (and any
    trim) refreshed at most every `interval_s` seconds.

    Args:
        trim_free_mib: trim when a fresh reading shows more free heap than this (MiB); None
            never trims.
        interval_s: the least time between two `mallinfo2` walks of the heap.
    """

    def __init__(self, trim_free_mib: float | None, interval_s: float = 1.0) -> None:
        self.trim_free_mib = trim_free_mib
        self.interval_s = interval_s
        self._last = HostMemory(None, None, None)
        self._read_at = float("-inf")

    def after_work(self) -> HostMemory:
        """RSS now; heap in use and free as of the latest walk, taken now when due (before
        trimming, so a cycle's own high-water mark shows)."""
        now = time.monotonic()
        if now - self._read_at < self.interval_s:
            return HostMemory(resident_mib(), self._last.heap_in_use_mib,
                              self._last.heap_free_mib)
        self._read_at = now
        self._last = host_memory()
        if self.trim_free_mib is not None:
            release_free_memory(self.trim_free_mib, self._last.heap_free_mib)
        return self._last
