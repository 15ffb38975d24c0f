"""Property: every malformed request is rejected at submit with a 4xx (never a 5xx, never a
hang) whose body says what is wrong, and the server still trains normally afterwards.

Hypothesis builds a valid body for each route, breaks it in one way (a value out of range, a
wrong type, a missing or unknown key, a non-finite number, ...) and sends it with raw httpx to
the session's live server (tests/e2e/conftest.py)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bios
from bios import types
from server_process import ServerProcess

TINY = "bios/tiny-llama"
VOCAB = 49152  # bios/tiny-llama: SmolLM2's tokenizer
CONTEXT = 2048
INT32_MAX = 2**31 - 1
NAN, INF = float("nan"), float("inf")
JUNK = st.sampled_from([None, {"a": 1}, [[[]]], "zz", -1.5])
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

_seq = itertools.count(1)


class Target:
    """The live objects the bodies point at: a session, a run and a sampler."""

    def __init__(self, server: ServerProcess) -> None:
        self.http = httpx.Client(base_url=f"{server.base_url}/api/v1", timeout=30)
        self.session = self.ok("POST", "/create_session", {})["session_id"]
        fut = self.ok("POST", "/create_model", {"session_id": self.session,
                                                "model_seq_id": 900, "base_model": TINY,
                                                "lora_config": {"rank": 4}})
        self.run = fut["model_id"]
        self.wait(fut["request_id"])
        self.sampler = self.ok("POST", "/create_sampling_session", {
            "session_id": self.session, "sampling_session_seq_id": 900,
            "base_model": TINY})["sampling_session_id"]

    def ok(self, method: str, path: str, body: Any) -> Any:
        r = self.http.request(method, path, json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, request_id: str) -> Any:
        return self.ok("POST", "/retrieve_future", {"request_id": request_id})


@pytest.fixture(scope="module")
def target(server: ServerProcess) -> Target:
    return Target(server)


def send(target: Target, path: str, body: Any) -> httpx.Response:
    """POST `body` (JSON with NaN/Infinity allowed, or raw bytes); assert a proper 4xx."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.monotonic()
    r = target.http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert time.monotonic() - t0 < 20, "a malformed request must be answered at once"
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:500], content[:500])
    detail = r.json().get("detail")
    assert detail, r.text
    return r


# ----------------------------------------------------------------------------- body builders


def datum(n: int = 4) -> dict[str, Any]:
    return {"model_input": {"chunks": [{"tokens": list(range(1, n + 1)),
                                        "type": "encoded_text"}]},
            "loss_fn_inputs": {"target_tokens": {"data": list(range(2, n + 2)),
                                                 "dtype": "int64"}}}


def fb_body(target: Target) -> dict[str, Any]:
    return {"model_id": target.run, "seq_id": next(_seq),
            "forward_backward_input": {"data": [datum()], "loss_fn": "cross_entropy"}}


def set_path(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    b = copy.deepcopy(body)
    node = b
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return b


def del_path(body: Any, path: tuple[Any, ...]) -> Any:
    b = copy.deepcopy(body)
    node = b
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return b


out_of_vocab = st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB))
non_finite = st.sampled_from([NAN, INF, -INF, 1e39, -1e39])
bad_seq = st.one_of(st.integers(max_value=0), st.integers(min_value=INT32_MAX + 1))
unknown_key = st.text(min_size=1, max_size=12).map(lambda s: "zz_" + s)

FB = "forward_backward_input"
TOK = (FB, "data", 0, "model_input", "chunks", 0, "tokens")
TGT = (FB, "data", 0, "loss_fn_inputs", "target_tokens")
FB_REQUIRED = [("model_id",), ("seq_id",), (FB,), (FB, "data"), (FB, "loss_fn"),
               (FB, "data", 0), (FB, "data", 0, "model_input"),
               (FB, "data", 0, "model_input", "chunks", 0), TOK, (*TGT, "data"),
               (*TGT, "dtype")]


@st.composite
def bad_forward_backward(draw: st.DrawFn, target: Target) -> dict[str, Any]:
    b = fb_body(target)
    kind = draw(st.sampled_from([
        "token", "target", "length", "dtype", "nonfinite", "fraction", "loss_fn",
        "config_key", "empty_batch", "empty_input", "context", "junk", "extra_key",
        "missing", "seq", "model_id", "input_key", "shape"]))
    if kind == "token":
        return set_path(b, (*TOK, draw(st.integers(0, 3))), draw(out_of_vocab))
    if kind == "target":
        return set_path(b, (*TGT, "data", draw(st.integers(0, 3))), draw(out_of_vocab))
    if kind == "length":
        n = draw(st.integers(0, 12).filter(lambda n: n != 4))
        return set_path(b, (*TGT, "data"), [3] * n)
    if kind == "dtype":
        return set_path(b, (*TGT, "dtype"), draw(st.sampled_from(["float32", "int32", "", "x"])))
    if kind == "nonfinite":
        i = draw(st.integers(0, 3))
        weights = [1.0] * 4
        weights[i] = draw(non_finite)
        return set_path(b, (FB, "data", 0, "loss_fn_inputs", "weights"),
                        {"data": weights, "dtype": "float32"})
    if kind == "fraction":
        return set_path(b, (*TGT, "data", 0), draw(st.sampled_from([2.5, NAN, INF, 1e300])))
    if kind == "loss_fn":
        return set_path(b, (FB, "loss_fn"), draw(st.text(max_size=20).filter(
            lambda s: s not in ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro"))))
    if kind == "config_key":
        return set_path(b, (FB, "loss_fn_config"),
                        {draw(unknown_key): draw(st.floats(allow_nan=False))})
    if kind == "empty_batch":
        return set_path(b, (FB, "data"), [])
    if kind == "empty_input":
        return set_path(b, TOK[:-2], draw(st.sampled_from([[], [{"tokens": []}]])))
    if kind == "context":
        n = draw(st.integers(CONTEXT + 1, CONTEXT + 64))
        b = set_path(b, TOK, [1] * n)
        return set_path(b, (*TGT, "data"), [1] * n)
    if kind == "junk":
        return set_path(b, draw(st.sampled_from(FB_REQUIRED)), draw(JUNK))
    if kind == "extra_key":
        where = draw(st.sampled_from([(), (FB,), (FB, "data", 0), TOK[:-3], (*TGT,)]))
        return set_path(b, (*where, draw(unknown_key)), 1)
    if kind == "missing":
        return del_path(b, draw(st.sampled_from([
            ("model_id",), ("seq_id",), (FB,), (FB, "data"), (FB, "loss_fn"),
            (FB, "data", 0, "model_input"), (*TGT, "data"), (*TGT, "dtype"),
            (FB, "data", 0, "loss_fn_inputs", "target_tokens")])))
    if kind == "seq":
        return set_path(b, ("seq_id",), draw(bad_seq))
    if kind == "model_id":
        return set_path(b, ("model_id",), draw(st.text(max_size=40)))
    if kind == "input_key":
        return set_path(b, (FB, "data", 0, "loss_fn_inputs", draw(unknown_key)),
                        {"data": [1.0] * 4, "dtype": "float32"})
    assert kind == "shape"
    return set_path(b, (*TGT, "shape"), draw(st.sampled_from([[-4], [2, -2], [5], [2, 3]])))


@st.composite
def bad_optim_step(draw: st.DrawFn, target: Target) -> dict[str, Any]:
    b = {"model_id": target.run, "seq_id": next(_seq), "adam_params": {"learning_rate": 1e-3}}
    kind = draw(st.sampled_from(["range", "nonfinite", "extra", "junk", "seq", "model_id"]))
    if kind == "range":
        key, value = draw(st.sampled_from([
            ("learning_rate", -1e-3), ("beta1", 1.0), ("beta1", -0.1), ("beta2", 1.5),
            ("eps", 0.0), ("eps", -1.0), ("weight_decay", -0.5), ("grad_clip_norm", -1.0)]))
        return set_path(b, ("adam_params", key), value)
    if kind == "nonfinite":
        key = draw(st.sampled_from(["learning_rate", "eps", "weight_decay", "grad_clip_norm"]))
        return set_path(b, ("adam_params", key), draw(st.sampled_from([NAN, INF])))
    if kind == "extra":
        where = draw(st.sampled_from([(), ("adam_params",)]))
        return set_path(b, (*where, draw(unknown_key)), 1)
    if kind == "junk":
        return set_path(b, draw(st.sampled_from([("model_id",), ("seq_id",), ("adam_params",),
                                                 ("adam_params", "learning_rate")])),
                        draw(JUNK))
    if kind == "seq":
        return set_path(b, ("seq_id",), draw(bad_seq))
    return set_path(b, ("model_id",), draw(st.text(max_size=40)))


@st.composite
def bad_sample(draw: st.DrawFn, target: Target) -> dict[str, Any]:
    b = {"sampling_session_id": target.sampler, "seq_id": next(_seq), "num_samples": 1,
         "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
         "sampling_params": {"max_tokens": 4, "temperature": 0.0}}
    sp = "sampling_params"
    kind = draw(st.sampled_from(["token", "empty", "max_tokens", "window", "temperature",
                                 "top_p", "top_k", "num_samples", "stop", "topk", "seq",
                                 "sampler", "no_target", "base_model", "model_path", "extra",
                                 "junk"]))
    if kind == "token":
        return set_path(b, ("prompt", "chunks", 0, "tokens", draw(st.integers(0, 2))),
                        draw(out_of_vocab))
    if kind == "empty":
        return set_path(b, ("prompt", "chunks"), draw(st.sampled_from([[], [{"tokens": []}]])))
    if kind == "max_tokens":
        return set_path(b, (sp, "max_tokens"), draw(st.one_of(st.none(),
                                                              st.integers(max_value=0))))
    if kind == "window":
        return set_path(b, (sp, "max_tokens"), draw(st.integers(CONTEXT - 2, 10**12)))
    if kind == "temperature":
        return set_path(b, (sp, "temperature"),
                        draw(st.one_of(st.floats(max_value=-1e-9), st.sampled_from([NAN, INF]))))
    if kind == "top_p":
        return set_path(b, (sp, "top_p"), draw(st.one_of(
            st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
            st.just(NAN))))
    if kind == "top_k":
        return set_path(b, (sp, "top_k"), draw(st.one_of(
            st.just(0), st.integers(max_value=-2), st.integers(min_value=INT32_MAX + 1))))
    if kind == "num_samples":
        return set_path(b, ("num_samples",), draw(st.one_of(st.integers(max_value=0),
                                                            st.integers(min_value=129))))
    if kind == "stop":
        return set_path(b, (sp, "stop"), draw(st.one_of(
            st.just(""), st.just(["ok", ""]), st.lists(out_of_vocab, min_size=1, max_size=3))))
    if kind == "topk":
        return set_path(b, ("topk_prompt_logprobs",), draw(st.one_of(
            st.integers(max_value=-1), st.integers(min_value=21))))
    if kind == "seq":
        return set_path(b, ("seq_id",), draw(st.one_of(st.integers(max_value=-1),
                                                       st.integers(min_value=INT32_MAX + 1))))
    if kind == "sampler":
        return set_path(b, ("sampling_session_id",), draw(st.text(min_size=1, max_size=40)))
    if kind == "no_target":
        return del_path(b, ("sampling_session_id",))
    if kind == "base_model":
        b = del_path(b, ("sampling_session_id",))
        return set_path(b, ("base_model",), "nope/" + draw(st.text(max_size=20)))
    if kind == "model_path":
        b = del_path(b, ("sampling_session_id",))
        return set_path(b, ("model_path",), draw(st.one_of(
            st.text(max_size=40), st.just("bios://x/weights/.."),
            st.just(f"bios://{target.run}/weights/missing"), st.just("/etc/passwd"))))
    if kind == "extra":
        where = draw(st.sampled_from([(), (sp,), ("prompt",), ("prompt", "chunks", 0)]))
        return set_path(b, (*where, draw(unknown_key)), 1)
    return set_path(b, draw(st.sampled_from([("prompt",), (sp,), ("prompt", "chunks"),
                                             ("prompt", "chunks", 0, "tokens"),
                                             (sp, "temperature"), ("num_samples",)])),
                    draw(JUNK))


@st.composite
def bad_create_model(draw: st.DrawFn, target: Target) -> dict[str, Any]:
    b = {"session_id": target.session, "model_seq_id": 5000 + next(_seq), "base_model": TINY,
         "lora_config": {"rank": 4}}
    kind = draw(st.sampled_from(["base_model", "rank", "layers", "session", "seq", "seed",
                                 "extra", "junk", "metadata"]))
    if kind == "base_model":
        return set_path(b, ("base_model",), "nope/" + draw(st.text(max_size=30)))
    if kind == "rank":
        return set_path(b, ("lora_config", "rank"), draw(st.one_of(
            st.integers(max_value=0), st.integers(min_value=257))))
    if kind == "layers":
        return set_path(b, ("lora_config",), {"rank": 4, "train_attn": False,
                                              "train_mlp": False, "train_unembed": False})
    if kind == "session":
        return set_path(b, ("session_id",), draw(st.text(max_size=40)))
    if kind == "seq":
        return set_path(b, ("model_seq_id",), draw(st.one_of(
            st.integers(max_value=-1), st.integers(min_value=INT32_MAX + 1))))
    if kind == "seed":
        return set_path(b, ("lora_config", "seed"), draw(st.one_of(
            st.integers(max_value=-(2**31) - 1), st.integers(min_value=2**31))))
    if kind == "extra":
        where = draw(st.sampled_from([(), ("lora_config",)]))
        return set_path(b, (*where, draw(unknown_key)), 1)
    if kind == "metadata":
        return set_path(b, ("user_metadata",), {"k": draw(st.sampled_from([1, None, [1]]))})
    return set_path(b, draw(st.sampled_from([("session_id",), ("base_model",),
                                             ("lora_config",), ("lora_config", "rank")])),
                    draw(JUNK))


# ----------------------------------------------------------------------------- the properties


@SETTINGS
@given(data=st.data())
def test_malformed_forward_backward_gets_4xx(target: Target, data: st.DataObject) -> None:
    body = data.draw(bad_forward_backward(target))
    path = data.draw(st.sampled_from(["/forward_backward", "/forward"]))
    if path == "/forward" and FB in body:
        body = {("forward_input" if k == FB else k): v for k, v in body.items()}
    send(target, path, body)


@SETTINGS
@given(data=st.data())
def test_malformed_optim_step_gets_4xx(target: Target, data: st.DataObject) -> None:
    send(target, "/optim_step", data.draw(bad_optim_step(target)))


@SETTINGS
@given(data=st.data())
def test_malformed_sample_gets_4xx(target: Target, data: st.DataObject) -> None:
    send(target, "/asample", data.draw(bad_sample(target)))


@SETTINGS
@given(data=st.data())
def test_malformed_create_model_gets_4xx(target: Target, data: st.DataObject) -> None:
    send(target, "/create_model", data.draw(bad_create_model(target)))


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"42", b'"x"', b"\xff\xfe",
                                 b'{"model_id": NaN}'])
def test_non_object_bodies_get_4xx(target: Target, raw: bytes) -> None:
    for path in ("/forward_backward", "/optim_step", "/asample", "/create_model"):
        send(target, path, raw)


def test_oversized_batch_gets_413(target: Target) -> None:
    body = fb_body(target)
    body[FB]["data"] = [datum(CONTEXT - 1)] * 130  # 130 * 2047 tokens > 262144
    r = send(target, "/forward_backward", body)
    assert r.status_code == 413 and r.json()["field"] == f"{FB}.data"


def test_errors_name_the_field(target: Target) -> None:
    cases = [
        ("/forward_backward", set_path(fb_body(target), (*TOK, 0), VOCAB),
         f"{FB}.data[0].model_input"),
        ("/forward_backward", set_path(fb_body(target), (*TGT, "data"), [1, 2]),
         f"{FB}.data[0].loss_fn_inputs.target_tokens"),
        ("/forward_backward", set_path(fb_body(target), (FB, "loss_fn_config"), {"x": 1.0}),
         f"{FB}.loss_fn_config.x"),
        ("/forward_backward", set_path(fb_body(target), (FB, "loss_fn"), "mse"),
         f"{FB}.loss_fn"),
        ("/create_model", {"session_id": target.session, "model_seq_id": 77,
                           "base_model": TINY, "lora_config": {"rank": 0}}, "lora_config.rank"),
        ("/create_model", {"session_id": target.session, "model_seq_id": 78,
                           "base_model": "nope/x"}, "base_model"),
        ("/asample", {"sampling_session_id": target.sampler, "seq_id": 1,
                      "prompt": {"chunks": [{"tokens": [1] * 2000}]},
                      "sampling_params": {"max_tokens": 100}}, "sampling_params.max_tokens"),
        ("/asample", {"sampling_session_id": target.sampler, "seq_id": 1,
                      "prompt": {"chunks": [{"tokens": [1]}]},
                      "sampling_params": {"max_tokens": 1, "top_p": 0}},
         "sampling_params.top_p"),
    ]
    for path, body, field in cases:
        r = send(target, path, body)
        assert r.json().get("field") == field, (path, r.json())


def test_server_still_trains_after_the_fuzz(server: ServerProcess) -> None:
    """Runs last in this module: the fuzzing left the server healthy."""
    assert httpx.get(f"{server.base_url}/api/v1/healthz", timeout=10).status_code == 200
    sc = bios.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=TINY, rank=8, seed=2)
    d = types.Datum(model_input=types.ModelInput.from_ints([5, 17, 923, 40, 71, 88]),
                    loss_fn_inputs={"target_tokens": [17, 923, 40, 71, 88, 3]})
    losses = []
    for _ in range(6):
        fb = tc.forward_backward([d], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result(timeout=120).metrics["loss:sum"])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    out = tc.save_weights_and_get_sampling_client().sample(
        types.ModelInput.from_ints([5, 17]), 1,
        types.SamplingParams(max_tokens=3, temperature=0.0)).result(timeout=120)
    assert len(out.sequences[0].tokens) == 3


def test_chunked_bodies_are_limited_too(target: Target) -> None:
    """A body without Content-Length (chunked) is read only up to the limit (64 MiB)."""
    def small() -> Any:
        yield b'{"tags": '
        yield b'["chunked"]}'

    r = target.http.post("/create_session", content=small(),
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["session_id"]

    def huge() -> Any:
        yield b'{"tags": ["'
        block = b"x" * (1 << 20)
        for _ in range(65):
            yield block
        yield b'"]}'

    r = target.http.post("/create_session", content=huge(),
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large"
