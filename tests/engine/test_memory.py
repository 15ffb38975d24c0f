"""HeapWatch: malloc's heap is walked at most once per interval after work, RSS is read every
time, big blocks come from the heap, and free heap goes back to the OS only when idle."""

from __future__ import annotations

import pytest

from bios.server.engine.memory import MMAP_THRESHOLD_MIB, HeapWatch, host_memory

pytestmark = pytest.mark.skipif(host_memory().heap_in_use_mib is None,
                                reason="no glibc mallinfo2 here")


def _grow_heap() -> list[bytearray]:
    # Many 64 KiB blocks: below glibc's mmap threshold, so they live in the heap.
    return [bytearray(64 * 1024) for _ in range(1024)]  # 64 MiB


def test_heap_figures_are_reused_within_the_interval() -> None:
    watch = HeapWatch(trim_free_mib=None, interval_s=3600)
    first = watch.after_work()
    held = _grow_heap()
    big = bytearray(256 * 1024 * 1024)  # one block above any mmap threshold: fresh pages
    # calloc'd pages count in RSS only once written: touch one byte in every 4 KiB page.
    big[::4096] = b"\1" * len(range(0, len(big), 4096))
    again = watch.after_work()
    assert again.heap_in_use_mib == first.heap_in_use_mib  # not walked again
    assert again.rss_mib is not None and first.rss_mib is not None
    assert again.rss_mib > first.rss_mib + 200  # RSS is read every time
    del held, big


def test_heap_is_read_again_once_the_interval_has_passed() -> None:
    watch = HeapWatch(trim_free_mib=None, interval_s=0.0)
    first = watch.after_work()
    held = _grow_heap()
    again = watch.after_work()
    assert first.heap_in_use_mib is not None and again.heap_in_use_mib is not None
    assert again.heap_in_use_mib > first.heap_in_use_mib + 32
    del held


def _fragment_heap() -> tuple[list[bytearray], float]:
    held = _grow_heap()
    del held[::2]  # 32 MiB of free chunks between live ones: free() cannot return them
    rss = host_memory().rss_mib
    assert rss is not None
    return held, rss


def test_work_does_not_trim_within_the_busy_interval_but_idle_does() -> None:
    watch = HeapWatch(trim_free_mib=16, interval_s=0.0, busy_trim_s=3600)
    held, before = _fragment_heap()
    reading = watch.after_work()  # read, and over the threshold: still no trim while busy
    assert reading.heap_free_mib is not None and reading.heap_free_mib > 24
    assert reading.rss_mib is not None and reading.rss_mib > before - 8
    assert watch.when_idle()
    after = host_memory().rss_mib
    assert after is not None and after < before - 16  # malloc_trim gave their pages back
    del held


def test_sustained_work_trims_once_the_busy_interval_has_passed() -> None:
    watch = HeapWatch(trim_free_mib=16, interval_s=0.0, busy_trim_s=0.0)
    held, before = _fragment_heap()
    reading = watch.after_work()  # the reading is taken before the trim
    assert reading.heap_free_mib is not None and reading.heap_free_mib > 24
    after = host_memory().rss_mib
    assert after is not None and after < before - 16
    del held


def test_idle_without_a_threshold_keeps_the_heap() -> None:
    held, before = _fragment_heap()
    assert not HeapWatch(trim_free_mib=None).when_idle()
    after = host_memory().rss_mib
    assert after is not None and after > before - 8
    del held


def test_blocks_below_the_threshold_come_from_the_heap() -> None:
    """Pass-sized tensors are reused from malloc's heap, not mapped fresh each time."""
    HeapWatch(trim_free_mib=None)
    before = host_memory().heap_in_use_mib
    block = bytearray((MMAP_THRESHOLD_MIB - 8) * 1024 * 1024)
    after = host_memory().heap_in_use_mib
    assert before is not None and after is not None
    assert after > before + MMAP_THRESHOLD_MIB - 9  # counted in the heap: not an mmap
    del block
