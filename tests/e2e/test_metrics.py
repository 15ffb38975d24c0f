"""Per-run metrics and engine utilization through a real server: two runs training at once."""

from __future__ import annotations

import threading

import pytest

import bios
from bios import types
from bios.exceptions import NotFoundError

TINY = "bios/tiny-llama"
STEPS = 4


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:]})


def test_two_runs_metrics_add_up(service_client: bios.ServiceClient) -> None:
    adam = types.AdamParams(learning_rate=1e-3)
    batches = {0: [datum(list(range(3, 3 + 17)))],  # 16 input tokens per step
               1: [datum(list(range(40, 40 + 9))), datum(list(range(60, 60 + 5)))]}  # 8 + 4
    clients = [service_client.create_lora_training_client(base_model=TINY, rank=4, seed=i)
               for i in range(2)]

    def train(i: int) -> None:
        for _ in range(STEPS):
            clients[i].forward_backward(batches[i], "cross_entropy")
            clients[i].optim_step(adam).result(timeout=60)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    rest = service_client.create_rest_client()
    for i, client in enumerate(clients):
        m = rest.get_run_metrics(client.model_id)
        assert m.training_run_id == client.model_id
        sent = sum(len(d.model_input.chunks[0].tokens) for d in batches[i])
        assert m.tokens == STEPS * sent
        assert m.steps == STEPS
        assert m.requests == 1 + 2 * STEPS  # create + fb/optim per step
        assert STEPS < m.cycles_with_work <= m.requests  # at most one cycle per request
        assert m.cycles_with_work >= m.steps
        assert m.missed_cycles >= 0 and m.queue_wait_s >= 0
        assert 0 < m.compute_s <= m.engine_busy_s + 1e-6
        assert m.engine_busy_s <= m.active_s + 1e-6
        assert m.engine_idle_s == pytest.approx(m.active_s - m.engine_busy_s, abs=1e-6)
    util = rest.get_engine_utilization(base_model=TINY, last=5)
    assert 1 <= len(util.cycles) <= 5
    assert all(0 <= c.busy_fraction <= 1 for c in util.cycles)
    assert [c.cycle_id for c in util.cycles] == sorted(c.cycle_id for c in util.cycles)
    assert 0 < util.busy_fraction <= 1


async def test_metrics_async_and_unknown_run(service_client: bios.ServiceClient) -> None:
    client = await service_client.create_lora_training_client_async(base_model=TINY, rank=4)
    rest = service_client.create_rest_client()
    m = await rest.get_run_metrics_async(client.model_id)
    assert m.requests == 1 and m.tokens == 0 and m.steps == 0
    util = await rest.get_engine_utilization_async(last=2)  # the server serves one engine
    assert len(util.cycles) <= 2
    with pytest.raises(NotFoundError):
        await rest.get_run_metrics_async("s-nope:train:0")
