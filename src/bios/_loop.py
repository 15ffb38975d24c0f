"""The SDK's one background event loop, on a daemon thread, shared by every client in a process.

Every network call of the SDK is a coroutine scheduled here, so sync callers (any thread) and
async callers (any event loop) share one implementation, and the caller's own event loop never
does the SDK's I/O. Started lazily on first use; restarted in a forked child.

This module knows nothing about HTTP or Bios types.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("bios")

# How long interpreter exit waits for submissions still on their way to the server, so a request
# the user fired without waiting (e.g. `save_state` just before `raise`) still reaches it.
EXIT_DRAIN_SECONDS = 30.0


class SDKLoop:
    """An asyncio loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._submissions: set[concurrent.futures.Future[Any]] = set()
        self._submissions_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bios-sdk-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop_thread(self) -> bool:
        """True when called from this loop's own thread (where blocking would deadlock)."""
        return threading.get_ident() == self._thread.ident

    def run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; returns at once with a thread-safe future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def track_submission(self, submitted: concurrent.futures.Future[Any]) -> None:
        """Remember a submission until it completes, so interpreter exit can wait for it."""
        with self._submissions_lock:
            self._submissions.add(submitted)
        submitted.add_done_callback(self._forget)

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._submissions_lock:
            self._submissions.discard(fut)

    def drain_submissions(self, timeout: float) -> None:
        """Wait (bounded) until every tracked submission has been accepted or has failed."""
        if self.in_loop_thread():
            return
        with self._submissions_lock:
            pending = list(self._submissions)
        if not pending:
            return
        _, not_done = concurrent.futures.wait(pending, timeout=timeout)
        if not_done:
            log.warning("bios: %d request(s) were still being submitted at exit", len(not_done))


_lock = threading.Lock()
_instance: SDKLoop | None = None


def get_loop() -> SDKLoop:
    """The process's SDK loop, started on first call."""
    global _instance
    inst = _instance
    if inst is not None:
        return inst
    with _lock:
        if _instance is None:
            _instance = SDKLoop()
        return _instance


def in_sdk_loop_thread() -> bool:
    """True when the caller runs on the SDK loop's thread."""
    inst = _instance
    return inst is not None and inst.in_loop_thread()


def _drain_at_exit() -> None:
    inst = _instance
    if inst is not None:
        inst.drain_submissions(EXIT_DRAIN_SECONDS)


def _reset_after_fork() -> None:
    # The loop thread does not exist in a forked child; the next call starts a fresh one.
    global _instance, _lock
    _instance = None
    _lock = threading.Lock()


atexit.register(_drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
