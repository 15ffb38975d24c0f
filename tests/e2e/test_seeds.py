"""The seed documents' examples, as written, against a real `bios serve` process.

Each test body keeps the seeds' code (async-and-futures.txt) with only the data filled in: the
base model is the seeds' own "ultrasafe/usf-finance", served through an alias of the tiny model.
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

import bios
from bios import types
from bios.exceptions import BiosAPIError


@pytest.fixture
def tokenizer(service_client: bios.ServiceClient):
    client = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance")
    return client.get_tokenizer()


def make_batches(tokenizer, n: int) -> list[list[types.Datum]]:
    texts = ["The ledger balances at the end of every quarter.",
             "Interest accrues daily and compounds monthly.",
             "A bond's price falls when yields rise.",
             "Diversification lowers the variance of a portfolio."]
    batches = []
    for i in range(n):
        batch = []
        for text in (texts[i % 4], texts[(i + 1) % 4]):
            tokens = tokenizer.encode(text)
            batch.append(types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}))
        batches.append(batch)
    return batches


def test_sync_training_loop(service_client, tokenizer, capsys) -> None:
    dataloader = make_batches(tokenizer, 3)
    losses = []
    # --- seeds: "Sync vs Async: Side-by-Side Comparison", sync half
    # No event loop needed
    service_client = bios.ServiceClient()

    # Create training client (blocks)
    training_client = service_client.create_lora_training_client(
        base_model="ultrasafe/usf-finance"
    )

    # Training loop (each call blocks)
    for batch in dataloader:
        # Submit and wait
        future = training_client.forward_backward(
            batch, "cross_entropy"
        )
        result = future.result()
        losses.append(result.loss)

        # Submit and wait
        training_client.optim_step()

    print("Training complete")
    # ---
    assert "Training complete" in capsys.readouterr().out
    assert all(isinstance(x, float) and x > 0 for x in losses)
    print(f"Loss: {result.loss:.4f}")


def test_async_training_loop(service_client, tokenizer) -> None:
    dataloader = make_batches(tokenizer, 3)
    seen: list[float] = []

    # --- seeds: async half
    async def main():
        # Requires event loop
        service_client = bios.ServiceClient()

        # Create training client (async)
        training_client = await service_client.create_lora_training_client_async(
            base_model="ultrasafe/usf-finance"
        )

        # Training loop (concurrent ops)
        for batch in dataloader:
            # Submit (double await pattern)
            future = await training_client.forward_backward_async(
                batch, "cross_entropy"
            )
            result = await future
            seen.append(result.loss)

            # Submit optimizer step
            await training_client.optim_step_async()

        print("Training complete")

    asyncio.run(main())
    # ---
    assert len(seen) == 3


def test_overlapping_and_pipelined_patterns(service_client, tokenizer) -> None:
    batch1, batch2, batch3, *_ = make_batches(tokenizer, 8)
    loss_fn = "cross_entropy"
    client = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance")

    # --- seeds: "Optimal Pattern (Overlapping)"
    async def fast_training():
        # GOOD: Submit all requests first
        future1 = await client.forward_backward_async(batch1, loss_fn)
        future2 = await client.forward_backward_async(batch2, loss_fn)
        future3 = await client.forward_backward_async(batch3, loss_fn)

        # Now retrieve results (operations run in parallel on GPUs)
        result1 = await future1
        result2 = await future2
        result3 = await future3
        return result1, result2, result3

    results = asyncio.run(fast_training())
    assert [len(r.loss_fn_outputs) for r in results] == [2, 2, 2]

    # --- seeds: "Advanced Pattern: Pipelined Training"
    printed: list[str] = []

    async def pipelined_training(training_client, dataloader, pipeline_depth=4):
        futures = deque()

        # Prime the pipeline
        for i, batch in enumerate(dataloader):
            if i >= pipeline_depth:
                break

            # Submit forward_backward
            fwd_future = await training_client.forward_backward_async(
                batch, "cross_entropy"
            )

            # Submit optim_step
            opt_future = await training_client.optim_step_async()

            futures.append((fwd_future, opt_future))

        # Process remaining batches
        for batch in dataloader[pipeline_depth:]:
            # Retrieve oldest results
            fwd_future, opt_future = futures.popleft()
            fwd_result = await fwd_future
            await opt_future

            # Log metrics
            printed.append(f"Loss: {fwd_result.loss:.4f}")

            # Submit new requests
            new_fwd = await training_client.forward_backward_async(
                batch, "cross_entropy"
            )
            new_opt = await training_client.optim_step_async()
            futures.append((new_fwd, new_opt))

        # Drain pipeline
        while futures:
            fwd_future, opt_future = futures.popleft()
            await fwd_future
            await opt_future

        printed.append("Pipeline training complete!")

    batches = make_batches(tokenizer, 8)
    asyncio.run(pipelined_training(client, batches, pipeline_depth=4))
    assert printed[-1] == "Pipeline training complete!" and len(printed) == 5


def test_robust_training_error_handling(service_client, tokenizer) -> None:
    good = make_batches(tokenizer, 2)
    bad = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 10**9]),
                       loss_fn_inputs={"target_tokens": [2, 3, 4]})]
    client = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance")
    log: list[str] = []

    # --- seeds: "Error Handling with Async"
    async def robust_training(training_client, dataloader):
        for step, batch in enumerate(dataloader):
            try:
                # Submit operations
                fwd_future = await training_client.forward_backward_async(
                    batch, "cross_entropy"
                )
                opt_future = await training_client.optim_step_async()

                # Wait for results
                fwd_result = await fwd_future
                await opt_future

                log.append(f"Step {step}: Loss = {fwd_result.loss:.4f}")

            except BiosAPIError as e:
                log.append(f"Step {step}: API error - {e}")
                # Optionally retry or skip batch
                continue

            except TimeoutError:
                log.append(f"Step {step}: Timeout - retrying...")

            except Exception as e:
                log.append(f"Step {step}: Unexpected error - {e}")
                # Save checkpoint before failing
                training_client.save_state(name=f"error_step_{step}")
                raise

    asyncio.run(robust_training(client, [good[0], bad, good[1]]))
    # ---
    assert log[0].startswith("Step 0: Loss = ")
    assert log[1].startswith("Step 1: API error") and "vocabulary" in log[1]
    assert log[2].startswith("Step 2: Loss = "), log  # the run keeps working after the error


def test_unexpected_error_saves_checkpoint_from_inside_event_loop(service_client) -> None:
    """save_state called (sync, not awaited) inside an async except block must not deadlock."""
    client = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance")

    async def failing():
        try:
            raise RuntimeError("boom")
        except Exception:
            client.save_state(name="error_step_0")
            raise

    with pytest.raises(RuntimeError):
        asyncio.run(failing())
    rest = service_client.create_rest_client()
    names = [c.checkpoint_id for c in rest.list_checkpoints(client.model_id).checkpoints]
    # save_state's future was never awaited, yet it is ordered and completes.
    fut = client.save_state(name="after")
    fut.result(timeout=60)
    names = [c.checkpoint_id for c in rest.list_checkpoints(client.model_id).checkpoints]
    assert "weights/error_step_0" in names and "weights/after" in names


def test_parallel_evaluation(service_client, tokenizer) -> None:
    client = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance")

    # --- seeds: "Concurrent Operations with asyncio.gather"
    async def parallel_evaluation(training_client, test_prompts):
        """
        Evaluate model on multiple test cases concurrently
        """
        # Save weights for sampling
        sampling_client = training_client.save_weights_and_get_sampling_client(
            name="eval_checkpoint"
        )

        # Create sampling tasks for all prompts
        sampling_tasks = []
        for prompt in test_prompts:
            task = sampling_client.sample_async(
                prompt=prompt,
                sampling_params=types.SamplingParams(max_tokens=256)
            )
            sampling_tasks.append(task)

        # Wait for all futures to be submitted
        futures = await asyncio.gather(*sampling_tasks)

        # Wait for all results
        results = await asyncio.gather(*futures)

        return results

    # Run concurrent evaluation
    test_prompts = [
        types.ModelInput.from_ints(tokenizer.encode("Test 1")),
        types.ModelInput.from_ints(tokenizer.encode("Test 2")),
        types.ModelInput.from_ints(tokenizer.encode("Test 3")),
    ]

    results = asyncio.run(parallel_evaluation(client, test_prompts))
    outputs = []
    for i, result in enumerate(results):
        outputs.append(f"Result {i}: {tokenizer.decode(result.sequences[0].tokens)}")
    # ---
    assert len(outputs) == 3
    assert all(len(r.sequences[0].tokens) == 256 or r.sequences[0].stop_reason == "stop"
               for r in results)


def test_rest_client_lists_runs(service_client) -> None:
    client = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance")
    rest = service_client.create_rest_client()
    assert client.model_id in rest.list_training_run_ids()

    async def main():
        return await rest.list_training_run_ids_async()

    assert client.model_id in asyncio.run(main())
