"""Bios's protobuf codec against Tinker's own encoder and decoder, and protobuf bodies on a
real server: zstd, protobuf results, clear 400s, and seq slots filled by rejected bodies."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zstandard
from sdk_venvs import SDKUnavailable, venv_python
from tinker_server import TINY, TML_KEY

from bios.server.wire_proto import (
    PROTOBUF,
    ProtoDecodeError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
    peek_ids,
)
from server_process import ServerProcess

SAMPLES = Path(__file__).with_name("proto_samples.py")
HEADERS = {"X-API-Key": TML_KEY}


def sdk(version: str, *args: str, stdin: str | None = None) -> Any:
    """Run proto_samples.py with one SDK version's interpreter; its JSON output."""
    try:
        python = venv_python(version)
    except SDKUnavailable as e:
        pytest.skip(str(e))
    out = subprocess.run([str(python), str(SAMPLES), *args], input=stdin, capture_output=True,
                         text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_decodes_the_sdks_requests() -> None:
    bodies = {k: bytes.fromhex(v) for k, v in sdk("0.38.0", "requests", "s1:train:0").items()}
    req, forward_only = decode_forward_backward(bodies["plain"])
    assert not forward_only and req["model_id"] == "s1:train:0" and req["seq_id"] == 1
    inp = req["forward_backward_input"]
    assert inp["loss_fn"] == "ppo" and inp["loss_fn_config"] == {"clip_low_threshold": 0.75}
    assert len(inp["data"]) == 2
    d = inp["data"][0]
    assert d["model_input"]["chunks"][0]["tokens"] == list(range(10, 19))
    assert d["loss_fn_inputs"]["target_tokens"] == {"data": list(range(11, 20)),
                                                    "dtype": "int64", "shape": [9]}
    w = d["loss_fn_inputs"]["weights"]
    assert w["dtype"] == "float32" and np.allclose(w["data"], np.linspace(0, 1, 9))
    assert peek_ids(bodies["plain"]) == ("s1:train:0", 1)

    text, _ = decode_forward_backward(bodies["text_config"])  # v2 carries text values
    assert text["forward_backward_input"]["loss_fn_config"] == {"mode": "sum"}

    sparse, _ = decode_forward_backward(bodies["sparse"])  # CSR made dense, row-major
    tt = sparse["forward_backward_input"]["data"][0]["loss_fn_inputs"]["target_tokens"]
    assert tt == {"data": [0, 11, 0, 0, 12, 13], "dtype": "int64", "shape": [3, 2]}

    with pytest.raises(ProtoDecodeError, match="image"):
        decode_forward_backward(bodies["image"])
    assert peek_ids(bodies["image"]) == ("s1:train:0", 4)
    with pytest.raises(ProtoDecodeError):
        decode_forward_backward(b"\x0a\xff\xff")  # a length past the end


@pytest.mark.parametrize("version", ["0.25.0", "0.38.0"])
def test_the_sdk_reads_bios_results(version: str) -> None:
    fbo = {"loss_fn_output_type": "ArrayRecord", "metrics": {"loss:sum": 3.5, "loss:mean": 0.5},
           "loss_fn_outputs": [
               {"logprobs": {"data": [-1.0, -2.0, -0.5], "dtype": "float32", "shape": [3]}},
               {"logprobs": {"data": [-0.25], "dtype": "float32", "shape": [1]}}]}
    sample = {"type": "sample", "prompt_logprobs": [None, -1.5, -2.5],
              "topk_prompt_logprobs": None, "prompt_cache_hit_tokens": 0,
              "sequences": [{"stop_reason": "length", "tokens": [5, 6], "logprobs": [-0.1, -0.2]},
                            {"stop_reason": "stop", "tokens": [7], "logprobs": None}]}
    got = sdk(version, "decode", "forward_backward",
              stdin=json.dumps({"a": encode_forward_backward_output(fbo).hex(),
                                "empty": encode_forward_backward_output(
                                    {"metrics": {"x": 1.0}, "loss_fn_outputs": []}).hex()}))
    assert got["a"]["metrics"] == fbo["metrics"]
    assert got["a"]["outputs"] == [{"logprobs": {"data": [-1.0, -2.0, -0.5], "shape": [3]}},
                                   {"logprobs": {"data": [-0.25], "shape": [1]}}]
    assert got["empty"] == {"metrics": {"x": 1.0}, "loss_fn_output_type": "ArrayRecord",
                            "outputs": []}
    s = sdk(version, "decode", "sample",
            stdin=json.dumps({"s": encode_sample_response(sample).hex()}))["s"]
    assert s["sequences"][0]["stop_reason"] == "length" and s["sequences"][0]["tokens"] == [5, 6]
    assert np.allclose(s["sequences"][0]["logprobs"], [-0.1, -0.2])
    assert s["sequences"][1] == {"stop_reason": "stop", "tokens": [7], "logprobs": None}
    assert s["prompt_logprobs"][0] is None and np.allclose(s["prompt_logprobs"][1:], [-1.5, -2.5])


def _post(client: httpx.Client, route: str, body: dict) -> dict:
    r = client.post(f"/api/v1/{route}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(client: httpx.Client, request_id: str, accept: str | None = None) -> httpx.Response:
    deadline = time.monotonic() + 120
    headers = {"Accept": accept} if accept else {}
    while time.monotonic() < deadline:
        r = client.post("/api/v1/retrieve_future", json={"request_id": request_id},
                        headers=headers)
        if r.headers["content-type"].startswith(PROTOBUF) or r.json().get("type") != "try_again":
            return r
    raise AssertionError(f"{request_id} never finished")


def test_protobuf_bodies_on_a_real_server(tinker_server: ServerProcess) -> None:
    with httpx.Client(base_url=tinker_server.base_url, headers=HEADERS, timeout=60) as client:
        config = _post(client, "client/config", {"sdk_version": "0.38.0"})
        assert config["parallel_fwdbwd_chunks"] is False
        assert config["custom_loss_server_side"] is False
        session = _post(client, "create_session", {"tags": [], "sdk_version": "0.38.0"})
        created = _post(client, "create_model", {
            "session_id": session["session_id"], "model_seq_id": 0, "base_model": TINY,
            "lora_config": {"rank": 4}, "optimizer_config": {"type": "adamw"}})
        run = created["model_id"]
        _wait(client, created["request_id"])
        bodies = {k: bytes.fromhex(v) for k, v in sdk("0.38.0", "requests", run).items()}

        # seq 1: zstd-compressed protobuf, answered as protobuf when asked.
        r = client.post("/api/v1/forward_backward", content=zstandard.compress(bodies["plain"]),
                        headers={"Content-Type": PROTOBUF, "Content-Encoding": "zstd"})
        assert r.status_code == 200, r.text
        done = _wait(client, r.json()["request_id"], accept=PROTOBUF)
        assert done.headers["content-type"] == PROTOBUF and done.content
        as_json = _wait(client, r.json()["request_id"])  # the same result, as JSON by default
        assert len(as_json.json()["loss_fn_outputs"]) == 2

        # seq 2-4: three bodies refused at once, each naming what is wrong...
        for name, field in (("text_config", "loss_fn_config"), ("sparse", "target_tokens"),
                            ("image", "image")):
            r = client.post("/api/v1/forward_backward", content=bodies[name],
                            headers={"Content-Type": PROTOBUF})
            assert r.status_code == 400 and field in r.text, (name, r.text)
        # ...and each fills its seq slot, so the run's next request (seq 5) still runs.
        step = _post(client, "optim_step", {"model_id": run, "seq_id": 5,
                                            "adam_params": {"learning_rate": 1e-3}})
        assert "metrics" in _wait(client, step["request_id"]).json()

        # A refused optimizer, a refused sampling extra: a 400 naming the feature.
        r = client.post("/api/v1/create_model", json={
            "session_id": session["session_id"], "model_seq_id": 1, "base_model": TINY,
            "optimizer_config": {"type": "dimuon", "version": 1}})
        assert r.status_code == 400 and "dimuon" in r.text and "adamw" in r.text
        r = client.post("/api/v1/optim_step", json={
            "model_id": run, "seq_id": 6,
            "optimizer_params": {"type": "dimuon", "learning_rate": 0.1}})
        assert r.status_code == 400 and "dimuon" in r.text
        r = client.post("/api/v1/asample", json={
            "base_model": TINY, "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 2}, "topk_sample_logprobs": 3})
        assert r.status_code == 400 and "topk_sample_logprobs" in r.text
