"""`APIFuture`: the handle every Bios operation returns.

An `APIFuture` wraps two thread-safe futures filled by the SDK loop: *submitted* (the server has
durably accepted and ordered the request) and *result* (the operation finished). Waiting never
cancels the operation: a timeout only stops that wait, like `concurrent.futures.Future`.

This module knows nothing about HTTP or Bios types.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from bios._loop import get_loop, in_sdk_loop_thread

T = TypeVar("T")
U = TypeVar("U")

__all__ = ["APIFuture"]

_ON_LOOP_THREAD = (
    "APIFuture.result() was called on the Bios SDK's own event-loop thread, where blocking "
    "would deadlock; use `await future` (or `await future.result_async()`) there instead"
)


def _timeout_error(timeout: float | None) -> TimeoutError:
    return TimeoutError(
        f"the operation did not finish within {timeout} s; it is still running "
        "(wait again with result()/await to get its result)"
    )


async def _wait_done(fut: concurrent.futures.Future[Any], timeout: float | None) -> None:
    """Wait in the running event loop until `fut` is done, without ever cancelling `fut`.

    A private asyncio future is woken from the SDK thread; a timeout or a cancellation of the
    awaiting task only abandons that private future.
    """
    if fut.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def _wake_waiter() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def _on_done(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the awaiting loop was closed meanwhile
            loop.call_soon_threadsafe(_wake_waiter)

    fut.add_done_callback(_on_done)
    try:
        async with asyncio.timeout(timeout):
            await waiter
    except TimeoutError:
        raise _timeout_error(timeout) from None


class APIFuture(Generic[T]):
    """The pending result of a Bios operation.

    Use `future.result()` (blocking, any thread) or `await future` (any event loop). Both may be
    called any number of times, from any number of threads or loops.
    """

    def __init__(self, result: concurrent.futures.Future[T],
                 submitted: concurrent.futures.Future[Any] | None = None) -> None:
        self._result = result
        self._submitted_cf = submitted if submitted is not None else result

    @classmethod
    def _run(cls, coro: Coroutine[Any, Any, T],
             submitted: concurrent.futures.Future[Any] | None = None) -> APIFuture[T]:
        """Schedule `coro` on the SDK loop and return its future at once."""
        return cls(get_loop().run(coro), submitted)

    def result(self, timeout: float | None = None) -> T:
        """Block until the operation finishes and return its result.

        Args:
            timeout: seconds to wait; None waits as long as it takes.

        Returns:
            The operation's result.

        Raises:
            TimeoutError: not finished within `timeout`; the operation keeps running.
            BiosAPIError: the operation failed (see `bios.exceptions`).
            RuntimeError: called on the SDK's own event-loop thread.
        """
        if in_sdk_loop_thread():
            raise RuntimeError(_ON_LOOP_THREAD)
        try:
            return self._result.result(timeout)
        except concurrent.futures.TimeoutError:
            if self._result.done():  # the operation itself raised a TimeoutError
                raise
            raise _timeout_error(timeout) from None

    async def result_async(self, timeout: float | None = None) -> T:
        """Wait (without blocking the event loop) until the operation finishes.

        Args:
            timeout: seconds to wait; None waits as long as it takes.

        Returns:
            The operation's result.

        Raises:
            TimeoutError (= asyncio.TimeoutError): not finished within `timeout`; the operation
                keeps running and can be awaited again.
            BiosAPIError: the operation failed.
        """
        await _wait_done(self._result, timeout)
        return self._result.result()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def done(self) -> bool:
        """True once the operation has finished (successfully or not)."""
        return self._result.done()

    def _is_submitted(self) -> bool:
        return self._submitted_cf.done()

    async def _submitted(self) -> APIFuture[T]:
        """Wait until the server has accepted and ordered the request; return this future.

        Raises the submission's error if the server rejected the request.
        """
        await _wait_done(self._submitted_cf, None)
        self._submitted_cf.result()
        return self

    def _then(self, fn: Callable[[T], U]) -> APIFuture[U]:
        """A future of `fn(result)`, sharing this future's submission."""
        out: concurrent.futures.Future[U] = concurrent.futures.Future()

        def _chain(src: concurrent.futures.Future[T]) -> None:
            if src.cancelled():
                out.cancel()
                return
            exc = src.exception()
            if exc is not None:
                out.set_exception(exc)
                return
            try:
                out.set_result(fn(src.result()))
            except BaseException as e:
                out.set_exception(e)

        self._result.add_done_callback(_chain)
        return APIFuture(out, self._submitted_cf)

    def __repr__(self) -> str:
        if not self._result.done():
            state = "submitted" if self._submitted_cf.done() else "submitting"
        elif self._result.cancelled() or self._result.exception() is not None:
            state = "failed"
        else:
            state = "done"
        return f"<APIFuture {state}>"
