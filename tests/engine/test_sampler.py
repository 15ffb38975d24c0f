"""The sampler against full forward passes (no cache) on the tiny model, plus sampling math.

Exactness: with an fp32 base, cached decoding and full passes differ only by float rounding,
so greedy tokens must be equal and logprobs agree within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from bios.server.engine import checkpoints
from bios.server.engine.lora import Adapter, LoRABatch
from bios.server.engine.model import ModelConfig, Transformer, load_transformer
from bios.server.engine.sampler import Sampler
from bios.server.engine.sampling_math import RowSampling, TokenChooser, inverse_cdf
from bios.server.plan import AdapterSpec, OpResult, SampleOp, SamplePlan

ATOL = 1e-4  # fp32 logprob agreement


# ----------------------------------------------------------------------------- helpers


def make_adapter(cfg: ModelConfig, seed: int, rank: int = 4, unembed: bool = True) -> Adapter:
    """A LoRA adapter with random (nonzero) A and B, strong enough to change greedy tokens."""
    adapter = Adapter.init(cfg, AdapterSpec(rank=rank, seed=seed, train_unembed=unembed), "cpu")
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, B in adapter.weights.values():
            B.copy_(torch.randn(B.shape, generator=gen) * 0.05)
    return adapter


def save_adapter(adapter: Adapter, directory: Path) -> str:
    state, config = adapter.to_peft_state_dict(), adapter.peft_config("bios/tiny-llama")
    checkpoints.write_sampler_weights(directory, adapter_state=state, adapter_config=config)
    return str(directory)


def lora_for(adapter: Adapter | None, seq_len: int) -> LoRABatch | None:
    return None if adapter is None else LoRABatch.build([adapter], [1], seq_len)


def full_logprobs(
    model: Transformer, adapter: Adapter | None, ids: list[int], last: int | None = None
) -> torch.Tensor:
    """log_softmax of one full causal pass (no cache): (len(ids), V), or of its `last`
    positions only."""
    x = torch.tensor([ids])
    with torch.no_grad():
        hidden = model(x, lora=lora_for(adapter, len(ids)))
        if last is not None:
            hidden = hidden[:, -last:]
        logits = model.unembed(hidden, lora_for(adapter, hidden.shape[1]))
    return torch.log_softmax(logits[0].float(), dim=-1)


def reference_greedy(
    model: Transformer, adapter: Adapter | None, prompt: list[int], n: int
) -> tuple[list[int], list[float]]:
    """Step-by-step argmax with a full forward per token."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(n):
        lp = full_logprobs(model, adapter, ids, last=1)[-1]
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(float(lp[token]))
        ids.append(token)
    return tokens, logprobs


def continuation_logprobs(
    model: Transformer, adapter: Adapter | None, prompt: list[int], tokens: list[int]
) -> torch.Tensor:
    """What a training forward computes for `tokens` after `prompt`."""
    lp = full_logprobs(model, adapter, prompt + tokens, last=len(tokens) + 1)[:-1]
    return lp[torch.arange(len(tokens)), torch.tensor(tokens)]


def random_prompt(n: int, seed: int, vocab: int = 49152) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def op(request_id: str, prompt: list[int], max_tokens: int, **kw) -> SampleOp:
    kw.setdefault("num_samples", 1)
    kw.setdefault("adapter_key", None)
    kw.setdefault("adapter_dir", None)
    return SampleOp(request_id=request_id, prompt=prompt, max_tokens=max_tokens, **kw)


def run_all(sampler: Sampler, ops: list[SampleOp], steps: int = 1000) -> dict[str, OpResult]:
    result = sampler.execute(SamplePlan(ops, steps))
    assert result.active == 0
    return {r.request_id: r for r in result.finished}


def sequences(result: OpResult) -> list[dict]:
    assert result.ok, result.error
    return result.result["sequences"]


def assert_same_sequences(got: OpResult, expected: OpResult) -> None:
    """Same tokens and stop reasons; logprobs within ATOL (the batches differ)."""
    for a, b in zip(sequences(got), sequences(expected), strict=True):
        assert (a["tokens"], a["stop_reason"]) == (b["tokens"], b["stop_reason"])
        torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tiny(tiny_fp32) -> tuple[Transformer, ModelConfig]:
    return tiny_fp32


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, tuple[Adapter, str]]:
    """key -> (adapter, PEFT directory): "a" trains everything, "b" everything but lm_head."""
    _, cfg = tiny
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for key, seed, unembed in (("a", 1, True), ("b", 2, False)):
        adapter = make_adapter(cfg, seed, unembed=unembed)
        out[key] = (adapter, save_adapter(adapter, root / key))
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture
def make_sampler(tiny, tokenizer):
    model, cfg = tiny

    def build(**kw) -> Sampler:
        return Sampler(model, cfg, device="cpu", tokenizer=tokenizer, **kw)

    return build


def adapter_kw(adapters, key: str | None) -> dict:
    if key is None:
        return {}
    return {"adapter_key": key, "adapter_dir": adapters[key][1]}


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("key", [None, "a"])
def test_greedy_matches_full_forwards(tiny, adapters, make_sampler, key):
    model, _ = tiny
    adapter = None if key is None else adapters[key][0]
    cases = [(random_prompt(3, 1), 6), (random_prompt(17, 2), 9), (random_prompt(9, 3), 4)]
    ops = [
        op(f"r{i}", p, n, temperature=0.0, **adapter_kw(adapters, key))
        for i, (p, n) in enumerate(cases)
    ]
    results = run_all(make_sampler(), ops)
    for i, (prompt, n) in enumerate(cases):
        (seq,) = sequences(results[f"r{i}"])
        tokens, logprobs = reference_greedy(model, adapter, prompt, n)
        assert seq["tokens"] == tokens
        assert seq["stop_reason"] == "length"
        torch.testing.assert_close(seq["logprobs"], logprobs, atol=ATOL, rtol=0)


def test_mixed_adapters_match_each_alone(tiny, adapters, make_sampler):
    """Rows of adapter a, adapter b and the base model share decode passes (and leave at
    different steps); greedy and seeded samples equal those of each request sampled alone."""
    model, _ = tiny
    keys = ["a", None, "b", "a"]
    ops = []
    for i, key in enumerate(keys):
        prompt = random_prompt(4 + 3 * i, 10 + i)
        ops.append(op(f"g{i}", prompt, 6 - i, temperature=0.0, **adapter_kw(adapters, key)))
        # top-k/top-p rows too: near-tied logits must not make the draw batch-dependent
        filters = [{}, {"top_p": 0.9}, {"top_k": 40}, {"top_k": 400, "top_p": 0.8}][i]
        kw = {**adapter_kw(adapters, key), **filters}
        ops.append(op(f"s{i}", prompt, 3 + i, seed=i, num_samples=2, **kw))
    together = run_all(make_sampler(), ops)
    for o in ops:
        assert_same_sequences(together[o.request_id], run_all(make_sampler(), [o])[o.request_id])
    greedy = {}
    for i, key in enumerate(keys[:3]):
        adapter = None if key is None else adapters[key][0]
        greedy[key] = reference_greedy(model, adapter, ops[0].prompt, 6)[0]
        (seq,) = sequences(together[f"g{i}"])
        assert seq["tokens"] == reference_greedy(model, adapter, ops[2 * i].prompt, 6 - i)[0]
    # the adapters matter: the same prompt decodes differently under a, b and the base
    assert len({tuple(t) for t in greedy.values()}) == 3


# ----------------------------------------------------------------------------- randomness


def test_seeds(make_sampler):
    prompt = random_prompt(8, 5)
    request = op("x", prompt, 6, seed=1234, num_samples=4)
    first = [s["tokens"] for s in sequences(run_all(make_sampler(), [request])["x"])]
    again = [s["tokens"] for s in sequences(run_all(make_sampler(), [request])["x"])]
    assert first == again  # same seed, prompt and snapshot: same tokens
    assert len({tuple(t) for t in first}) == 4  # the samples of one request differ
    other = op("y", prompt, 6, seed=99, num_samples=1)
    assert sequences(run_all(make_sampler(), [other])["y"])[0]["tokens"] != first[0]

    unseeded = op("z", prompt, 6, num_samples=2)
    runs = [sequences(run_all(make_sampler(), [unseeded])["z"]) for _ in range(2)]
    for seqs in runs:
        for seq in seqs:
            assert len(seq["tokens"]) == 6 and seq["stop_reason"] == "length"
            assert all(0 <= t < 49152 for t in seq["tokens"])
            assert all(lp <= 0.0 for lp in seq["logprobs"])
    assert runs[0][0]["tokens"] != runs[1][0]["tokens"]


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=50), dict(temperature=1.3, top_p=0.9)],
)
def test_logprobs_agree_with_training_forward(tiny, adapters, make_sampler, settings):
    """Reported logprobs are the untempered, unfiltered model logprobs of the sampled tokens."""
    model, _ = tiny
    prompt = random_prompt(12, 6)
    request = op("x", prompt, 8, seed=7, num_samples=3, **adapter_kw(adapters, "a"), **settings)
    for seq in sequences(run_all(make_sampler(), [request])["x"]):
        expected = continuation_logprobs(model, adapters["a"][0], prompt, seq["tokens"])
        torch.testing.assert_close(torch.tensor(seq["logprobs"]), expected, atol=ATOL, rtol=0)


def test_bf16_autocast_logprobs(tiny_model_dir):
    """bf16 base + bf16 autocast: cached decoding vs a full bf16 pass over the same tokens.

    Measured on the tiny model (12 sequences x 24 tokens): max |diff| 0.004 nats, from bf16
    rounding in a different order on the cached path; we assert < 0.05.
    """
    model, cfg = load_transformer(tiny_model_dir, base_dtype=torch.bfloat16)
    sampler = Sampler(model, cfg, device="cpu", autocast_dtype=torch.bfloat16)
    prompt = random_prompt(16, 8)
    (seq,) = sequences(run_all(sampler, [op("x", prompt, 12, seed=3)])["x"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = continuation_logprobs(model, None, prompt, seq["tokens"])
    diff = (torch.tensor(seq["logprobs"]) - expected).abs().max().item()
    assert diff < 0.05, diff


# ----------------------------------------------------------------------------- stops


def test_stop_tokens(tiny, make_sampler):
    model, _ = tiny
    prompt = random_prompt(10, 9)
    greedy, _ = reference_greedy(model, None, prompt, 8)
    stop = greedy[3]
    cut = greedy.index(stop) + 1  # the first time the stop token is generated
    requests = [
        op("stop", prompt, 8, temperature=0.0, stop_tokens=[stop, 49151]),
        op(
            "none", prompt, 8, temperature=0.0, stop_tokens=[t for t in range(5) if t not in greedy]
        ),
    ]
    results = run_all(make_sampler(), requests)
    (seq,) = sequences(results["stop"])
    assert seq["tokens"] == greedy[:cut] and seq["stop_reason"] == "stop"
    assert len(seq["logprobs"]) == cut
    (seq,) = sequences(results["none"])
    assert seq["tokens"] == greedy and seq["stop_reason"] == "length"


def test_stop_strings(tiny, tokenizer, make_sampler):
    """A stop string spanning two generated tokens ends the sequence at the token that
    completes it."""
    model, _ = tiny
    tok = tokenizer
    prompt = random_prompt(10, 11)
    greedy, _ = reference_greedy(model, None, prompt, 12)
    # the first k whose token adds text, making a 2-char string (last char before + first
    # char of the new token) that did not occur before
    for k in range(2, 12):
        before = tok.decode(greedy[: k - 1], skip_special_tokens=False)
        text = tok.decode(greedy[:k], skip_special_tokens=False)
        if text.startswith(before) and len(text) > len(before) and before:
            stop = text[len(before) - 1 : len(before) + 1]
            if stop not in before:
                break
    else:
        pytest.fail("no usable stop string in the greedy continuation")
    request = op("x", prompt, 12, temperature=0.0, stop_strings=["never-there", stop])
    (seq,) = sequences(run_all(make_sampler(), [request])["x"])
    assert seq["tokens"] == greedy[:k] and seq["stop_reason"] == "stop"


# ----------------------------------------------------------------------------- batching


def test_num_samples_share_one_prefill(tiny, make_sampler):
    model, _ = tiny
    prompt = random_prompt(20, 12)
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    try:
        sampler = make_sampler()
        results = run_all(sampler, [op("x", prompt, 5, temperature=0.0, num_samples=5)])
    finally:
        hook.remove()
    seqs = sequences(results["x"])
    assert len(seqs) == 5
    expected = reference_greedy(model, None, prompt, 5)[0]
    assert all(s["tokens"] == expected for s in seqs)
    assert shapes[0] == (1, 20)  # one prefill of the prompt for all five samples
    assert shapes[1:] == [(5, 1)] * 4  # then one pass per decode step over all five rows
    assert sampler.counters.prefill_tokens == 20 and sampler.counters.prefill_passes == 1


def test_continuous_batching(tiny, make_sampler):
    """A long request admitted first does not hold up short ones admitted later, and every
    request's result equals the request sampled alone."""
    model, _ = tiny
    long_op = op("long", random_prompt(6, 20), 30, temperature=0.0)
    short_ops = [
        op("short0", random_prompt(9, 21), 3, temperature=0.0),
        op("short1", random_prompt(4, 22), 4, seed=5, num_samples=2),
    ]
    sampler = make_sampler()
    first = sampler.execute(SamplePlan([long_op], max_decode_steps=5))
    assert first.finished == [] and first.active == 1 and first.decode_steps == 5
    second = sampler.execute(SamplePlan(short_ops, max_decode_steps=5))
    assert sorted(r.request_id for r in second.finished) == ["short0", "short1"]
    assert second.active == 1  # the long one is still decoding
    last = sampler.execute(SamplePlan([], max_decode_steps=1000))
    assert [r.request_id for r in last.finished] == ["long"] and last.active == 0
    assert sampler.num_rows == 0

    together = {r.request_id: r for r in [*second.finished, *last.finished]}
    for o in [long_op, *short_ops]:
        alone = run_all(make_sampler(), [o])[o.request_id]
        assert_same_sequences(together[o.request_id], alone)
    assert (
        sequences(together["long"])[0]["tokens"]
        == reference_greedy(model, None, long_op.prompt, 30)[0]
    )


def test_row_cap_queues_requests(tiny, make_sampler):
    """With at most 3 rows, a 5-sample request is seated in parts and others wait their turn;
    results are unchanged."""
    model, _ = tiny
    ops = [
        op("a", random_prompt(5, 30), 4, temperature=0.0, num_samples=5),
        op("b", random_prompt(7, 31), 6, seed=1, num_samples=2),
        op("c", random_prompt(3, 32), 2, temperature=0.0),
    ]
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[0]))
    try:
        capped = run_all(make_sampler(max_batch_rows=3), ops)
    finally:
        hook.remove()
    assert max(widths) <= 3
    free = run_all(make_sampler(), ops)
    for o in ops:
        assert_same_sequences(capped[o.request_id], free[o.request_id])
    expected = reference_greedy(model, None, ops[0].prompt, 4)[0]
    assert [s["tokens"] for s in sequences(capped["a"])] == [expected] * 5


# ----------------------------------------------------------------------------- prompt logprobs


def test_prompt_logprobs(tiny, adapters, make_sampler):
    model, _ = tiny
    prompt = random_prompt(14, 40)
    request = op(
        "x", prompt, 1, prompt_logprobs=True, topk_prompt_logprobs=5, **adapter_kw(adapters, "a")
    )
    sampler = make_sampler()
    result = sampler.execute(SamplePlan([request], max_decode_steps=0))
    assert result.decode_steps == 0 and result.active == 0  # max_tokens=1: done at prefill
    body = result.finished[0].result
    lp = full_logprobs(model, adapters["a"][0], prompt)  # (14, V); row i predicts token i+1
    assert body["prompt_logprobs"][0] is None and body["topk_prompt_logprobs"][0] is None
    expected = lp[torch.arange(13), torch.tensor(prompt[1:])]
    torch.testing.assert_close(
        torch.tensor(body["prompt_logprobs"][1:]), expected, atol=ATOL, rtol=0
    )
    values, ids = lp[:-1].topk(5, dim=-1)
    got = body["topk_prompt_logprobs"][1:]
    assert [[t for t, _ in pos] for pos in got] == ids.tolist()
    torch.testing.assert_close(
        torch.tensor([[v for _, v in pos] for pos in got]), values, atol=ATOL, rtol=0
    )
    assert len(body["sequences"]) == 1 and len(body["sequences"][0]["tokens"]) == 1


def test_prompt_logprobs_off_by_default(make_sampler):
    body = run_all(make_sampler(), [op("x", random_prompt(5, 41), 2)])["x"].result
    assert body["prompt_logprobs"] is None and body["topk_prompt_logprobs"] is None
    assert body["type"] == "sample" and body["prompt_cache_hit_tokens"] == 0


# ----------------------------------------------------------------------------- errors


def test_bad_requests_fail_alone(make_sampler, tmp_path):
    sampler = make_sampler(context_length=64)
    good = op("good", random_prompt(5, 50), 3, temperature=0.0)
    bad = [
        op("too-long", random_prompt(60, 51), 10),
        op("bad-token", [1, 2, 49152], 3),
        op("empty", [], 3),
        op("no-adapter", [1, 2, 3], 3, adapter_key="k", adapter_dir=str(tmp_path / "missing")),
        op("bad-top-p", [1, 2], 3, top_p=0.0),
    ]
    results = run_all(sampler, [bad[0], good, *bad[1:]])
    assert results["good"].ok and len(sequences(results["good"])[0]["tokens"]) == 3
    for o in bad:
        r = results[o.request_id]
        assert not r.ok and r.category == "user", (o.request_id, r)
    assert "context length 64" in results["too-long"].error


# ----------------------------------------------------------------------------- sampling math


def test_token_chooser_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=gen).expand(6, 1000).contiguous()
    rows = [
        RowSampling(temperature=0.0),
        RowSampling(temperature=1.0, top_k=1),
        RowSampling(temperature=2.0, top_p=1e-6),
        RowSampling(temperature=1.0, top_k=5),
        RowSampling(temperature=0.5, top_k=20, top_p=0.5),
        RowSampling(temperature=1.0),
    ]
    chooser = TokenChooser(rows, "cpu")
    top5 = set(logits[0].topk(5).indices.tolist())
    top20 = logits[0].topk(20).indices
    seen: list[set[int]] = [set() for _ in rows]
    for _ in range(300):
        tokens = chooser(logits, torch.rand(6, generator=gen, dtype=torch.float64))
        for i, t in enumerate(tokens.tolist()):
            seen[i].add(t)
    argmax = int(logits[0].argmax())
    assert seen[0] == seen[1] == seen[2] == {argmax}  # greedy, top_k=1, tiny top_p
    assert seen[3] == top5  # all five drawn in 300 tries, nothing else
    # top-p 0.5 over the tempered top-20: a prefix of the top-20 with at most half the mass
    probs = torch.softmax(logits[0, top20] / 0.5, dim=-1)
    nucleus = int((probs.cumsum(0) - probs < 0.5).sum())
    assert seen[4] == set(top20[:nucleus].tolist())
    assert len(seen[5]) > 200  # plain sampling over 1000 near-uniform tokens


@pytest.mark.parametrize("temperature", [1e-4, 1e-30, 1e-40, 5e-324])
def test_tiny_temperatures_take_the_argmax(temperature):
    """The limit of sampling as t goes to 0 is the argmax. Dividing raw logits by a tiny t
    overflowed them to inf (NaN probabilities, token 0 drawn); a t below fp32's range rounded
    to 0."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 1000, generator=gen) * 5
    rows = [RowSampling(temperature=temperature), RowSampling(temperature=temperature, top_k=50),
            RowSampling(temperature=temperature, top_p=0.9), RowSampling(temperature=temperature)]
    chooser = TokenChooser(rows, "cpu")
    uniforms = torch.tensor([0.0, 0.3, 0.7, 1 - 1e-12], dtype=torch.float64)
    assert chooser(logits, uniforms).tolist() == logits.argmax(dim=-1).tolist()


def test_inverse_cdf_never_picks_zero_probability():
    logits = torch.full((4, 50), float("-inf"))
    logits[:, 7] = 0.0
    logits[:, 30] = 0.0
    chooser = TokenChooser([RowSampling()] * 4, "cpu")
    uniforms = torch.tensor([0.0, 0.4999, 0.5, 1 - 1e-12], dtype=torch.float64)
    assert chooser(logits, uniforms).tolist() == [7, 7, 30, 30]


def test_inverse_cdf_matches_one_level_search():
    """The two-level search picks what a plain float64 cumulative sum over the vocabulary does."""
    gen = torch.Generator().manual_seed(0)
    for vocab in (50, 256, 1000, 49152):
        for scale in (0.0, 1.0, 4.0):
            probs = torch.softmax(torch.randn(16, vocab, generator=gen) * scale, dim=-1)
            probs[:, ::3] = 0.0  # filtered-out columns
            uniforms = torch.rand(16, generator=gen, dtype=torch.float64)
            cdf = probs.cumsum(dim=-1, dtype=torch.float64)
            expected = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
            assert inverse_cdf(probs, uniforms).tolist() == expected.tolist()


def test_decode_failure_fails_the_batch_then_recovers(tiny, make_sampler):
    """An exception in a decode step fails the requests then decoding (category "server");
    requests admitted afterwards run normally."""
    model, _ = tiny

    def explode(_, args):
        if args[0].shape[1] == 1:  # a decode step, not a prefill
            raise RuntimeError("simulated device failure")

    sampler = make_sampler()
    hook = model.register_forward_pre_hook(explode)
    try:
        result = sampler.execute(SamplePlan([op("x", [5, 6, 7], 4), op("y", [8, 9], 1)], 10))
    finally:
        hook.remove()
    outcome = {r.request_id: r for r in result.finished}
    assert outcome["y"].ok  # max_tokens=1: done at prefill, before the failing step
    assert not outcome["x"].ok and outcome["x"].category == "server"
    assert "simulated device failure" in outcome["x"].error
    assert result.active == 0 and sampler.num_rows == 0
    again = run_all(sampler, [op("z", [5, 6, 7], 4, temperature=0.0)])
    assert sequences(again["z"])[0]["tokens"] == reference_greedy(model, None, [5, 6, 7], 4)[0]


def test_adapter_load_failure_fails_alone(tiny, make_sampler):
    def load(directory: str) -> Adapter:
        raise OSError(f"disk on fire: {directory}")

    sampler = make_sampler(load_adapter=load)
    results = run_all(
        sampler, [op("lora", [1, 2, 3], 2, adapter_key="k", adapter_dir="/x"), op("base", [4], 2)]
    )
    assert results["base"].ok
    assert not results["lora"].ok and results["lora"].category == "server"


def test_streamed_requests_report_their_tokens_so_far(tiny, make_sampler):
    """A `stream` request's tokens so far come back after every plan, per sample; a request
    that is not streamed, or that finished, is not reported."""
    streamed = op("s", random_prompt(5, 30), 12, temperature=0.0, num_samples=2, stream=True)
    quiet = op("q", random_prompt(5, 31), 12, temperature=0.0)
    sampler = make_sampler()
    first = sampler.execute(SamplePlan([streamed, quiet], max_decode_steps=4))
    assert set(first.partial) == {"s"}
    assert [len(t) for t in first.partial["s"]] == [5, 5]  # the first token, then 4 steps
    second = sampler.execute(SamplePlan([], max_decode_steps=3))
    assert [t[:5] for t in second.partial["s"]] == first.partial["s"]
    last = sampler.execute(SamplePlan([], max_decode_steps=1000))
    assert last.partial == {}
    final = {r.request_id: r for r in last.finished}["s"]
    assert [s["tokens"][:8] for s in sequences(final)] == second.partial["s"]


def test_cancel_drops_a_request_and_keeps_the_others(tiny, make_sampler):
    """A cancelled request fails at once (category user) and frees its rows; the request
    decoding beside it gives the same tokens as alone; unknown ids are ignored."""
    keep = op("keep", random_prompt(6, 40), 10, temperature=0.0)
    drop = op("drop", random_prompt(6, 41), 50, temperature=0.0, num_samples=3)
    sampler = make_sampler()
    sampler.execute(SamplePlan([keep, drop], max_decode_steps=2))
    assert sampler.num_rows == 4
    res = sampler.execute(SamplePlan([], max_decode_steps=1000, cancel=("drop", "nope")))
    by_id = {r.request_id: r for r in res.finished}
    assert not by_id["drop"].ok and "cancelled" in (by_id["drop"].error or "")
    assert by_id["drop"].category == "user"
    assert by_id["keep"].ok and res.active == 0 and sampler.num_rows == 0
    assert_same_sequences(by_id["keep"], run_all(make_sampler(), [keep])["keep"])
    assert res.decode_steps == 7  # keep's last 7 of 10 (1 at seating + 2 steps): not 50
