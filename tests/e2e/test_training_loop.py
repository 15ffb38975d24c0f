"""`bios.train` / `bios.train_async` against a real server: modes agree, resume, per-step errors."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np
import pytest

import bios
from bios import types
from bios.exceptions import APIConnectionError, RequestFailedError

TINY = "bios/tiny-llama"


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:]})


def make_batches(n: int, seed: int = 0) -> list[list[types.Datum]]:
    rng = random.Random(seed)
    return [[datum([rng.randrange(3, 20000) for _ in range(rng.randrange(6, 12))])
             for _ in range(2)] for _ in range(n)]


PROBE = [datum([5, 17, 923, 40, 71, 88, 1024, 3]), datum([9, 8, 7, 6, 5, 4, 3, 2, 1])]


def probe(client: bios.TrainingClient) -> np.ndarray:
    out = client.forward(PROBE, "cross_entropy").result(timeout=120)
    return np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


def test_simple_and_efficient_modes_give_the_same_weights(service_client) -> None:
    batches = make_batches(6)
    schedule = [2e-2, 2e-2, 1e-2, 1e-2, 5e-3, 5e-3]
    simple = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=3)
    efficient = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=3)
    before = probe(simple)

    seen: list[tuple[int, float, float]] = []
    r1 = bios.train(simple, batches, mode="simple", learning_rate=schedule, progress=False,
                    print_report=False,
                    callback=lambda step, loss, m: seen.append((step, loss, m["learning_rate"])))

    async def on_step(step: int, loss: float, metrics: dict[str, float]) -> None:
        await asyncio.sleep(0)  # async callbacks are awaited

    r2 = asyncio.run(bios.train_async(efficient, iter(batches), mode="efficient",
                                      pipeline_depth=4, learning_rate=lambda s: schedule[s],
                                      callback=on_step, progress=False, print_report=False))
    assert (r1.steps, r2.steps) == (6, 6) and not r1.skipped and not r2.skipped
    assert [s for s, _, _ in seen] == list(range(6))
    assert [lr for _, _, lr in seen] == schedule
    assert r2.pipeline_depth == 4 and r2.next_step == 6 and r2.steps_per_s > 0
    assert len(r2.step_latency_s) == 6
    # The same batches in the same order: the same losses, step by step, and the same weights.
    np.testing.assert_allclose([x for _, x in r2.losses], [x for _, x in r1.losses], atol=1e-2)
    after_simple, after_efficient = probe(simple), probe(efficient)
    assert np.abs(after_simple - before).max() > 0.05  # training did move the weights
    np.testing.assert_allclose(after_efficient, after_simple, atol=2e-2)
    assert "steps/s" in r2.summary()


def test_resume_from_checkpoint_continues_where_it_stopped(service_client) -> None:
    batches = make_batches(4, seed=1)
    adam = types.AdamParams(learning_rate=1e-2)
    full = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=5)
    report = bios.train(full, batches, adam_params=adam, checkpoint_every=2, progress=False,
                        print_report=False)
    assert report.checkpoints == [f"bios://{full.model_id}/weights/step_2",
                                  f"bios://{full.model_id}/weights/step_4"]
    # A different run (other seed) that loads step_2 and gets the remaining batches.
    resumed = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=6)
    seen: list[int] = []
    r = bios.train(resumed, batches, adam_params=adam, resume_from=report.checkpoints[0],
                   callback=lambda step, loss, m: seen.append(step), progress=False,
                   print_report=False)
    assert (r.start_step, r.steps, seen) == (2, 2, [2, 3])
    np.testing.assert_allclose(probe(resumed), probe(full), atol=2e-2)


class FlakyClient:
    """A TrainingClient whose forward_backward fails on chosen calls (transiently)."""

    def __init__(self, inner: bios.TrainingClient, fail_submit: set[int],
                 fail_result: set[int]) -> None:
        self.inner, self.fail_submit, self.fail_result = inner, fail_submit, fail_result
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def forward_backward_async(self, data, loss_fn, loss_fn_config=None):
        self.calls += 1
        if self.calls in self.fail_submit:
            raise APIConnectionError("injected: connection lost")
        fut = await self.inner.forward_backward_async(data, loss_fn, loss_fn_config)
        if self.calls in self.fail_result:
            return _failed(RequestFailedError("injected: worker died", request_id="x",
                                              category="server"))
        return fut


async def _failed(exc: Exception) -> None:
    raise exc


def test_transient_errors_retry_bad_batches_skip_fatal_errors_checkpoint(service_client) -> None:
    batches = make_batches(6, seed=2)
    batches[2] = [datum([5, 6, 10**6, 7])]  # a token outside the vocabulary: a 400
    client = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=1)
    flaky = FlakyClient(client, fail_submit={2}, fail_result={5})
    report = bios.train(flaky, batches, pipeline_depth=3, retry_delay=0.01, progress=False,
                        print_report=False)
    assert report.skipped == [2] and report.retries == 2 and report.steps == 5
    assert sorted(s for s, _ in report.losses) == [0, 1, 3, 4, 5]

    # An exception in the callback is fatal: the loop saves a checkpoint, then re-raises.
    def boom(step: int, loss: float, metrics: dict[str, float]) -> None:
        if step == 1:
            raise RuntimeError("callback failed")

    async def inside_async() -> None:  # the sync API also works from inside `async def`
        bios.train(client, make_batches(3), mode="simple", callback=boom, progress=False,
                   print_report=False)

    with pytest.raises(RuntimeError, match="callback failed") as info:
        asyncio.run(inside_async())
    path = f"bios://{client.model_id}/weights/error_step_2"
    assert any(path in note for note in info.value.__notes__)
    rest = service_client.create_rest_client()
    deadline = time.monotonic() + 60
    while "weights/error_step_2" not in {c.checkpoint_id for c in
                                         rest.list_checkpoints(client.model_id).checkpoints}:
        assert time.monotonic() < deadline, "the error checkpoint never appeared"
        time.sleep(0.2)
