"""The OpenAI-compatible routes through the official `openai` client against a real keyed
`bios serve` on the tiny model: completions, chat, streaming, checkpoint paths, tenants,
bad input, and a stream whose client disconnects."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer

import bios
from bios import types
from server_process import KEY_A, KEY_B, MODEL_CACHE, ServerProcess

TINY = "bios/tiny-llama"
TINY_DIR = MODEL_CACHE / "bios--tiny-llama"
PROMPT = "The ledger balances every"


def oai(server: ServerProcess, key: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + prefix, api_key=key, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(TINY_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def eos(tok: Tokenizer) -> int:
    cfg = json.loads((TINY_DIR / "tokenizer_config.json").read_text())
    tid = tok.token_to_id(cfg["eos_token"])
    assert tid is not None
    return tid


@pytest.fixture(scope="module")
def alice(keyed_server: ServerProcess) -> dict[str, Any]:
    """Alice's trained run and a sampler checkpoint of it (the SDK, as a user would)."""
    service = bios.ServiceClient(base_url=keyed_server.base_url, api_key=KEY_A)
    tc = service.create_lora_training_client(base_model=TINY, rank=8, seed=11)
    tokens = [1, 504, 2119, 314, 260, 1345, 282, 900, 901, 902, 903, 904]
    d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:]})
    for _ in range(3):
        tc.forward_backward([d], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2))
    path = tc.save_weights_for_sampler("oai").result(timeout=120).path
    return {"service": service, "path": path}


def sdk_greedy(service: bios.ServiceClient, prompt: list[int], max_tokens: int, stop: list[int],
               model_path: str | None = None) -> list[int]:
    sampler = (service.create_sampling_client(model_path=model_path) if model_path
               else service.create_sampling_client(base_model=TINY))
    out = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                              stop=stop)).result(timeout=120)
    return out.sequences[0].tokens


def test_completion_is_the_sdk_sample(keyed_server, alice, tok, eos) -> None:
    """Greedy through the OpenAI route gives the SDK's greedy tokens, decoded."""
    client = oai(keyed_server, KEY_A)
    out = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, temperature=0,
                                    logprobs=1)
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    expected = sdk_greedy(alice["service"], ids, 12, [eos])
    assert out.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert out.choices[0].finish_reason == ("stop" if expected[-1] == eos else "length")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(expected)
    assert len(out.choices[0].logprobs.token_logprobs) == len(expected)
    assert all(lp <= 0 for lp in out.choices[0].logprobs.token_logprobs)


def test_n_seed_and_tinker_prefix(keyed_server) -> None:
    client = oai(keyed_server, KEY_A, "/oai/api/v1")
    a = client.completions.create(model=TINY, prompt=[PROMPT, "Once"], max_tokens=8, n=2,
                                  seed=7, temperature=1.0)
    b = client.completions.create(model=TINY, prompt=[PROMPT, "Once"], max_tokens=8, n=2,
                                  seed=7, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_chat_uses_the_chat_template(keyed_server, alice, tok) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    client = oai(keyed_server, KEY_A)
    messages = [{"role": "system", "content": "You count."},
                {"role": "user", "content": "One, two,"}]
    out = client.chat.completions.create(model=TINY, messages=messages, max_tokens=10,
                                         temperature=0, logprobs=True)
    template = (TINY_DIR / "chat_template.jinja").read_text()
    rendered = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        template).render(messages=messages, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered
    ids = tok.encode(rendered, add_special_tokens=False).ids
    assert out.usage.prompt_tokens == len(ids)
    ends = [t for t in (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
            if t is not None]
    expected = sdk_greedy(alice["service"], ids, 10, ends)
    msg = out.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == tok.decode(expected, skip_special_tokens=True)
    assert len(out.choices[0].logprobs.content) == len(expected)


def test_streaming_deltas_add_up_to_the_completion(keyed_server) -> None:
    client = oai(keyed_server, KEY_A)
    kw: dict[str, Any] = {"model": TINY, "max_tokens": 40, "temperature": 0}
    whole = client.completions.create(prompt=PROMPT, **kw).choices[0]
    chunks = list(client.completions.create(prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == [whole.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    if chunks[-1].usage.completion_tokens > 16:  # decode chunks are 16 steps
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2

    chat = list(client.chat.completions.create(
        messages=[{"role": "user", "content": "Hello"}], stream=True, **kw))
    assert chat[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat)
    whole_chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "Hello"}], **kw)
    assert streamed == whole_chat.choices[0].message.content


def _streamed(client: openai.OpenAI, **kw: Any) -> tuple[dict[int, str], dict[int, str]]:
    """A streamed completion's text and finish reason per choice index."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons


def test_streams_of_several_prompts_and_samples(keyed_server) -> None:
    """Choice i of prompt p streams as index p * n + i, each the non-streamed text.

    The exact comparison is greedy: a seeded temperature-1 sample of the tiny random model
    (a nearly flat distribution) can take another token when its logits differ in their last
    bits with the batch it decodes in (sampler.py), and a stream decodes in another batch than
    the request before it. The seeded part checks that the n samples stream apart."""
    client = oai(keyed_server, KEY_A)
    kw: dict[str, Any] = {"model": TINY, "prompt": [PROMPT, "Once upon"], "max_tokens": 20,
                          "n": 2, "temperature": 0}
    whole = client.completions.create(**kw)
    texts, reasons = _streamed(client, **kw)
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]

    texts, reasons = _streamed(client, **{**kw, "seed": 5, "temperature": 1.0})
    assert sorted(texts) == sorted(reasons) == [0, 1, 2, 3]
    assert len(set(texts.values())) == 4


def test_stop_strings_are_cut(keyed_server) -> None:
    client = oai(keyed_server, KEY_A)
    base = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=30,
                                     temperature=0).choices[0].text
    if len(base) < 6:
        pytest.skip("the tiny model's greedy text is too short to pick a stop string from")
    stop = base[3:5]
    out = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=30, temperature=0,
                                    stop=[stop]).choices[0]
    assert out.text == base[:base.find(stop)]
    assert out.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=TINY, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop], stream=True))
    assert streamed == out.text


def test_checkpoint_paths_sample_the_adapter(keyed_server, alice, tok, eos) -> None:
    client = oai(keyed_server, KEY_A)
    path = alice["path"]
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    expected = tok.decode(sdk_greedy(alice["service"], ids, 12, [eos], model_path=path),
                          skip_special_tokens=True)
    base = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=12,
                                     temperature=0).choices[0].text
    assert expected != base  # the trained adapter changes the sample
    for model in (path, path.replace("bios://", "tinker://"), f"{TINY};{path}"):
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                        temperature=0)
        assert out.choices[0].text == expected, model
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=path, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert streamed == expected


def test_models_lists_what_the_key_may_use(keyed_server, alice) -> None:
    ids_a = [m.id for m in oai(keyed_server, KEY_A).models.list()]
    ids_b = [m.id for m in oai(keyed_server, KEY_B).models.list()]
    assert TINY in ids_a and TINY in ids_b
    assert alice["path"] in ids_a
    assert alice["path"] not in ids_b
    rest = alice["service"].create_rest_client()
    rest.publish_checkpoint_from_tinker_path(alice["path"])
    try:
        assert alice["path"] in [m.id for m in oai(keyed_server, KEY_B).models.list()]
        bob = oai(keyed_server, KEY_B)  # and bob may sample it now
        assert bob.completions.create(model=alice["path"], prompt=PROMPT, max_tokens=2,
                                      temperature=0).choices[0].text is not None
    finally:
        rest.unpublish_checkpoint_from_tinker_path(alice["path"])
    assert alice["path"] not in [m.id for m in oai(keyed_server, KEY_B).models.list()]


def test_another_tenants_checkpoint_and_bad_keys_are_refused(keyed_server, alice) -> None:
    bob = oai(keyed_server, KEY_B)
    with pytest.raises(openai.NotFoundError) as e:
        bob.completions.create(model=alice["path"], prompt=PROMPT, max_tokens=4)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model=alice["path"], max_tokens=4,
                                    messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        oai(keyed_server, "not-a-key").completions.create(model=TINY, prompt="x", max_tokens=2)


def test_bad_requests_name_the_field(keyed_server) -> None:
    client = oai(keyed_server, KEY_A)
    cases = [({"model": "no/such-model"}, openai.NotFoundError, "model"),
             ({"model": f"{TINY};bios://nope/weights"}, openai.BadRequestError, "model"),
             ({"n": 1000}, openai.BadRequestError, "n"),
             ({"max_tokens": 100000}, openai.BadRequestError, "max_tokens"),
             ({"temperature": -1}, openai.BadRequestError, "temperature"),
             ({"top_p": 0}, openai.BadRequestError, "top_p")]
    for kw, error, param in cases:
        args = {"model": TINY, "prompt": PROMPT, "max_tokens": 4, **kw}
        with pytest.raises(error) as e:
            client.completions.create(**args)
        assert e.value.body["param"] == param, (kw, e.value.body)


def test_disconnecting_a_stream_stops_its_generation(keyed_server) -> None:
    """Read one chunk of a long stream, hang up; the request ends cancelled, not completed
    (it would need ~2000 decode steps, which the hang-up interrupts after a few chunks)."""
    body = {"model": TINY, "prompt": PROMPT, "max_tokens": 2000, "temperature": 1.0,
            "seed": 3, "stream": True}
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.stream("POST", f"{keyed_server.base_url}/v1/completions", json=body,
                      headers=headers, timeout=120) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    rid = json.loads(first[len("data: "):])["id"].removeprefix("cmpl-")
    state = httpx.post(f"{keyed_server.base_url}/api/v1/retrieve_future", headers=headers,
                       json={"request_id": rid}, timeout=60).json()
    while state.get("type") == "try_again":
        state = httpx.post(f"{keyed_server.base_url}/api/v1/retrieve_future", headers=headers,
                           json={"request_id": rid}, timeout=60).json()
    assert "cancelled" in state.get("error", ""), state
