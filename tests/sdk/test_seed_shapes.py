"""The call shapes of async-and-futures.txt, against the fake API (the real-server versions
live in tests/e2e). Checks that each call works exactly as the seed writes it."""

from __future__ import annotations

import asyncio
from collections import deque

from fake_server import FakeBios, Fault, make_datum

import bios
from bios.exceptions import BiosAPIError


def batches(n: int) -> list[list[bios.Datum]]:
    return [[make_datum(3), make_datum(5)] for _ in range(n)]


def test_sync_training_loop(fake: FakeBios, service: bios.ServiceClient) -> None:
    training_client = service.create_lora_training_client(base_model="ultrasafe/usf-finance")
    for batch in batches(3):
        future = training_client.forward_backward(batch, "cross_entropy")
        result = future.result()
        training_client.optim_step()
        assert f"{result.loss:.4f}" == "0.5000"
    kinds = [p for p, _ in fake.submits]
    assert kinds[1:3] == ["/forward_backward", "/optim_step"]


def test_async_training_loop_and_overlap(fake: FakeBios, service: bios.ServiceClient) -> None:
    async def main() -> list[float]:
        training_client = await service.create_lora_training_client_async(
            base_model="ultrasafe/usf-finance")
        losses = []
        for batch in batches(2):
            future = await training_client.forward_backward_async(batch, "cross_entropy")
            result = await future
            await training_client.optim_step_async()
            losses.append(result.loss)
        batch1, batch2, batch3 = batches(3)
        future1 = await training_client.forward_backward_async(batch1, "cross_entropy")
        future2 = await training_client.forward_backward_async(batch2, "cross_entropy")
        future3 = await training_client.forward_backward_async(batch3, "cross_entropy")
        for fut in (future1, future2, future3):
            losses.append((await fut).loss)
        return losses

    assert asyncio.run(main()) == [0.5] * 5
    assert fake.submitted_seq_ids() == list(range(1, 8))


def test_pipelined_training(fake: FakeBios, service: bios.ServiceClient) -> None:
    client = service.create_lora_training_client(base_model="ultrasafe/usf-finance")

    async def pipelined_training(training_client, dataloader, pipeline_depth=4):
        futures = deque()
        for i, batch in enumerate(dataloader):
            if i >= pipeline_depth:
                break
            fwd_future = await training_client.forward_backward_async(batch, "cross_entropy")
            opt_future = await training_client.optim_step_async()
            futures.append((fwd_future, opt_future))
        for batch in dataloader[pipeline_depth:]:
            fwd_future, opt_future = futures.popleft()
            fwd_result = await fwd_future
            await opt_future
            print(f"Loss: {fwd_result.loss:.4f}")
            new_fwd = await training_client.forward_backward_async(batch, "cross_entropy")
            new_opt = await training_client.optim_step_async()
            futures.append((new_fwd, new_opt))
        while futures:
            fwd_future, opt_future = futures.popleft()
            await fwd_future
            await opt_future

    asyncio.run(pipelined_training(client, batches(10), pipeline_depth=4))
    assert fake.submitted_seq_ids() == list(range(1, 21))
    kinds = [p for p, _ in fake.submits[1:]]
    assert kinds == ["/forward_backward", "/optim_step"] * 10


def test_robust_training_catches_bios_api_error(fake: FakeBios,
                                                service: bios.ServiceClient) -> None:
    client = service.create_lora_training_client(base_model="ultrasafe/usf-finance")
    fake.add_fault("/forward_backward", Fault(400, {"detail": "datum 0: too many tokens",
                                                    "field": "forward_backward_input.data.0"}))
    log: list[str] = []

    async def robust_training(training_client, dataloader):
        for step, batch in enumerate(dataloader):
            try:
                fwd_future = await training_client.forward_backward_async(batch, "cross_entropy")
                opt_future = await training_client.optim_step_async()
                fwd_result = await fwd_future
                await opt_future
                log.append(f"Step {step}: Loss = {fwd_result.loss:.4f}")
            except BiosAPIError as e:
                log.append(f"Step {step}: API error - {e}")
                continue
            except asyncio.TimeoutError:  # noqa: UP041 - as the seed writes it
                log.append(f"Step {step}: Timeout - retrying...")
            except Exception:
                training_client.save_state(name=f"error_step_{step}")
                raise

    asyncio.run(robust_training(client, batches(3)))
    assert log[0].startswith("Step 0: API error - 400") and "too many tokens" in log[0]
    assert log[1:] == ["Step 1: Loss = 0.5000", "Step 2: Loss = 0.5000"]
