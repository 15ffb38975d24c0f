"""APIFuture: waiting, timeouts that never cancel the work, the double await, loop-thread guard."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
from fake_server import FakeBios, make_datum

import bios
from bios._loop import get_loop
from bios.futures import APIFuture


def test_sync_op_returns_before_the_server_has_accepted_it(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    fake.submit_gate.clear()  # the server stalls every submission
    start = time.monotonic()
    fut = training_client.forward_backward([make_datum()], "cross_entropy")
    assert time.monotonic() - start < 0.5
    assert not fut._is_submitted() and not fut.done()
    fake.submit_gate.set()
    assert fut.result(timeout=5).loss == 0.5


async def test_first_await_returns_once_submitted_second_once_done(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    fake.submit_gate.clear()
    fake.hold_results = True
    submit = asyncio.ensure_future(training_client.forward_backward_async([make_datum()],
                                                                          "cross_entropy"))
    await asyncio.sleep(0.1)
    assert not submit.done()  # not accepted yet
    fake.submit_gate.set()
    fut = await submit
    assert [p for p, _ in fake.submits][-1] == "/forward_backward"  # the server has it
    assert isinstance(fut, APIFuture) and not fut.done()
    fake.release_all()
    result = await fut
    assert result.loss == 0.5


def test_result_timeout_leaves_the_operation_running(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    fake.hold_results = True
    fut = training_client.optim_step()
    with pytest.raises(TimeoutError, match="still running"):
        fut.result(timeout=0.1)
    assert not fut.done()
    fake.release_all()
    assert fut.result(timeout=5).metrics == {"lr": 1e-4}
    assert len([p for p, _ in fake.submits if p == "/optim_step"]) == 1


async def test_result_async_timeout_and_wait_for_leave_the_operation_running(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    fake.hold_results = True
    fut = await training_client.optim_step_async()
    with pytest.raises(asyncio.TimeoutError):
        await fut.result_async(timeout=0.05)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(fut, 0.05)  # cancels the waiting task, not the operation
    assert not fut.done()
    fake.release_all()
    assert (await fut).metrics == {"lr": 1e-4}


def test_result_on_the_sdk_loop_thread_raises_runtime_error(
        fake: FakeBios, service: bios.ServiceClient,
        training_client: bios.TrainingClient) -> None:
    fut = training_client.optim_step()

    async def block_on_loop_thread():
        with pytest.raises(RuntimeError, match="event-loop thread"):
            fut.result()
        with pytest.raises(RuntimeError, match="event-loop thread"):
            service.get_server_capabilities()
        return await fut  # awaiting is the right way there

    assert get_loop().run(block_on_loop_thread()).result(timeout=5).metrics == {"lr": 1e-4}


def test_a_future_can_be_awaited_from_several_threads_and_loops(
        training_client: bios.TrainingClient) -> None:
    fut = training_client.forward_backward([make_datum()], "cross_entropy")
    results: list[float] = []

    def in_own_loop() -> None:
        results.append(asyncio.run(fut.result_async()).loss)

    threads = [threading.Thread(target=in_own_loop) for _ in range(3)]
    for t in threads:
        t.start()
    results.append(fut.result().loss)
    for t in threads:
        t.join(5)
    assert results == [0.5] * 4


def test_then_maps_results_and_passes_errors_through() -> None:
    ok: concurrent.futures.Future[int] = concurrent.futures.Future()
    bad: concurrent.futures.Future[int] = concurrent.futures.Future()
    mapped = APIFuture(ok)._then(lambda x: x * 2)
    failed = APIFuture(bad)._then(lambda x: x * 2)
    assert not mapped.done()
    ok.set_result(21)
    bad.set_exception(bios.BiosAPIError("boom"))
    assert mapped.result() == 42
    with pytest.raises(bios.BiosAPIError, match="boom"):
        failed.result()
    assert repr(mapped) == "<APIFuture done>" and repr(failed) == "<APIFuture failed>"


async def test_submission_error_raises_on_the_first_await(fake: FakeBios,
                                                          training_client) -> None:
    from fake_server import Fault

    fake.add_fault("/optim_step", Fault(409, {"detail": "seq_id 1 is taken", "field": "seq_id"}))
    with pytest.raises(bios.exceptions.ConflictError, match="seq_id 1 is taken"):
        await training_client.optim_step_async()
