"""Sampling through a real server on the tiny model: determinism, greedy, stops, snapshots,
logprob agreement with training, mixed adapters, PEFT export, and 4xx errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import bios
from bios import types
from bios.exceptions import BadRequestError, BiosAPIError
from peft_check import LOGPROB_ATOL, PEFT_ATOL, peft_logprobs

TINY = "bios/tiny-llama"
PROMPT = types.ModelInput.from_ints([1, 504, 2119, 314, 260, 1345, 282])


def greedy(max_tokens: int = 12, **kw) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def trained(server) -> tuple[bios.ServiceClient, bios.TrainingClient]:
    """A run trained a few steps so its adapter differs from the base model."""
    service = bios.ServiceClient(base_url=server.base_url)
    client = service.create_lora_training_client(base_model=TINY, rank=8, seed=5)
    tokens = [1, 504, 2119, 314, 260, 1345, 282, 900, 901, 902, 903, 904]
    d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:]})
    for _ in range(4):
        client.forward_backward([d], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=2e-2))
    return service, client


def test_seeded_sampling_is_deterministic_and_samples_differ(trained) -> None:
    _, client = trained
    sampler = client.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    a = sampler.sample(PROMPT, num_samples=4, sampling_params=params).result()
    b = sampler.sample(PROMPT, num_samples=4, sampling_params=params).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) == 4  # num_samples rows differ
    assert all(len(s.tokens) == 16 and s.stop_reason == "length" for s in a.sequences)
    c = sampler.sample(PROMPT, num_samples=1,
                       sampling_params=types.SamplingParams(max_tokens=16, seed=99)).result()
    assert c.sequences[0].tokens != a.sequences[0].tokens


def test_greedy_is_argmax(trained) -> None:
    _, client = trained
    sampler = client.save_weights_and_get_sampling_client()
    out = sampler.sample(PROMPT, num_samples=1, sampling_params=greedy(10)).result()
    tokens = out.sequences[0].tokens
    full = types.ModelInput.from_ints(PROMPT.to_ints() + tokens)
    check = sampler.sample(full, num_samples=1, sampling_params=greedy(1),
                           topk_prompt_logprobs=1).result()
    n = PROMPT.length
    top1 = [check.topk_prompt_logprobs[n + i][0][0] for i in range(len(tokens))]
    assert top1 == tokens


def test_stop_tokens_and_strings(trained) -> None:
    _, client = trained
    sampler = client.save_weights_and_get_sampling_client()
    tokenizer = sampler.get_tokenizer()
    free = sampler.sample(PROMPT, num_samples=1, sampling_params=greedy(12)).result()
    toks = free.sequences[0].tokens
    stop_tok = toks[3]
    cut = toks.index(stop_tok)
    out = sampler.sample(PROMPT, 1, greedy(12, stop=[stop_tok])).result().sequences[0]
    assert out.tokens == toks[:cut + 1] and out.stop_reason == "stop"

    text = tokenizer.decode(toks)
    stop_str = tokenizer.decode(toks[4:6]).strip() or tokenizer.decode(toks[4:6])
    out = sampler.sample(PROMPT, 1, greedy(12, stop=[stop_str])).result().sequences[0]
    assert out.stop_reason == "stop" and len(out.tokens) <= 6
    assert stop_str in tokenizer.decode(out.tokens) and stop_str in text


def test_snapshot_is_immutable(trained) -> None:
    _, client = trained
    snapshot = client.save_weights_and_get_sampling_client()
    before = snapshot.sample(PROMPT, 1, greedy(12)).result().sequences[0]
    d = types.Datum(model_input=types.ModelInput.from_ints([7, 8, 9, 10]),
                    loss_fn_inputs={"target_tokens": [11, 12, 13, 14]})
    for _ in range(3):
        client.forward_backward([d], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=5e-2))
    after_same = snapshot.sample(PROMPT, 1, greedy(12)).result().sequences[0]
    assert after_same.tokens == before.tokens
    np.testing.assert_allclose(after_same.logprobs, before.logprobs, atol=1e-5)
    fresh = client.save_weights_and_get_sampling_client().sample(PROMPT, 1, greedy(12)).result()
    assert fresh.sequences[0].logprobs != before.logprobs


def test_sampled_logprobs_agree_with_forward(trained) -> None:
    _, client = trained
    sampler = client.save_weights_and_get_sampling_client()
    seq = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=12, seed=7)).result()
    tokens = seq.sequences[0].tokens
    full = PROMPT.to_ints() + tokens
    d = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                    loss_fn_inputs={"target_tokens": full[1:]})
    fwd = client.forward([d], "cross_entropy").result()
    lp = fwd.loss_fn_outputs[0]["logprobs"].to_numpy()[PROMPT.length - 1:]
    np.testing.assert_allclose(seq.sequences[0].logprobs, lp, atol=LOGPROB_ATOL)
    # compute_logprobs gives the prompt's logprobs the same way.
    prompt_lp = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert prompt_lp[0] is None
    np.testing.assert_allclose(prompt_lp[PROMPT.length:], lp, atol=LOGPROB_ATOL)


def test_mixed_adapters_in_one_batch_equal_each_alone(trained, server) -> None:
    service, client = trained
    other = service.create_lora_training_client(base_model=TINY, rank=4, seed=9)
    d = types.Datum(model_input=types.ModelInput.from_ints([3, 4, 5, 6, 7]),
                    loss_fn_inputs={"target_tokens": [4, 5, 6, 7, 8]})
    other.forward_backward([d], "cross_entropy")
    other.optim_step(types.AdamParams(learning_rate=5e-2))
    samplers = [client.save_weights_and_get_sampling_client(),
                other.save_weights_and_get_sampling_client(),
                service.create_sampling_client(base_model=TINY)]
    prompts = [PROMPT, types.ModelInput.from_ints([1, 9, 99, 999]), PROMPT]
    alone = [s.sample(p, 1, greedy(10)).result().sequences[0].tokens
             for s, p in zip(samplers, prompts, strict=True)]

    async def together():
        futures = await asyncio.gather(*[s.sample_async(prompt=p, sampling_params=greedy(10))
                                         for s, p in zip(samplers, prompts, strict=True)])
        return await asyncio.gather(*futures)

    mixed = [r.sequences[0].tokens for r in asyncio.run(together())]
    assert mixed == alone
    assert alone[0] != alone[2]  # the trained adapter changed the model's answer


def test_exported_adapter_loads_in_peft(trained, server) -> None:
    pytest.importorskip("peft")
    _, client = trained
    path = client.save_weights_for_sampler(name="export").result().path
    assert path == f"bios://{client.model_id}/sampler_weights/export"
    run_dir = client.model_id.replace(":", "__")
    adapter_dir = Path(server.data_dir) / "checkpoints" / run_dir / "sampler_weights" / "export"
    config = (adapter_dir / "adapter_config.json").read_text()
    assert '"base_model_name_or_path": "bios/tiny-llama"' in config
    tokens = PROMPT.to_ints()
    peft_lp = peft_logprobs(adapter_dir, tokens)
    d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:]})
    ours = client.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    np.testing.assert_allclose(ours.to_numpy(), peft_lp, atol=PEFT_ATOL)
    # the bound is meaningful: the adapter moves these logprobs by far more
    base_lp = peft_logprobs(adapter_dir, tokens, adapter=False)
    assert np.abs(peft_lp - base_lp).max() > 5 * PEFT_ATOL


def test_sampling_errors_are_clear_4xx(trained) -> None:
    service, client = trained
    sampler = client.save_weights_and_get_sampling_client()
    with pytest.raises(BadRequestError, match="context window"):
        sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=4000)).result(timeout=30)
    with pytest.raises(BadRequestError, match="temperature"):
        sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=4, temperature=-1)
                       ).result(timeout=30)
    with pytest.raises(BiosAPIError, match="not found"):
        service.create_sampling_client(
            model_path=f"bios://{client.model_id}/sampler_weights/nope")
