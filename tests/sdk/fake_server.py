"""A tiny in-process fake of the Bios HTTP API, served through `httpx.MockTransport`.

Only for what a real server cannot be made to do on demand: injected faults (5xx, 429, 4xx,
dropped connections), held submissions and results, and a record of every request as it
arrived. Results are canned; nothing here trains anything.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import httpx

PREFIX = "/api/v1"


@dataclass
class Fault:
    status: int = 503
    body: Any = field(default_factory=lambda: {"detail": "injected fault"})
    headers: dict[str, str] = field(default_factory=dict)
    connect_error: bool = False


@dataclass
class Pending:
    path: str
    body: dict[str, Any]
    result: Any = None
    error: dict[str, Any] | None = None
    released: threading.Event = field(default_factory=threading.Event)


class FakeBios:
    """State of the fake server. Handlers run on the SDK loop thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []  # (method, path, body) of every request
        self.submits: list[tuple[str, dict[str, Any]]] = []  # arrivals at submit endpoints
        self.headers: list[httpx.Headers] = []
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.requests: dict[str, Pending] = {}
        self.by_seq: dict[tuple[str, int], str] = {}
        self.sessions = 0
        self.hold_results = False  # new requests stay pending until release_all()
        self.submit_gate = threading.Event()
        self.submit_gate.set()
        self.submit_delay: dict[int, float] = {}  # seq_id -> seconds to stall its submission
        self.poll_hold = 0.02  # how long retrieve_future holds before try_again
        self.fail_results: dict[int, dict[str, Any]] = {}  # seq_id -> {"error", "category"}
        self.runs: list[str] = []
        self.tokenizer_files: dict[str, str] = tiny_tokenizer_files()
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- control
    def add_fault(self, path: str, *faults: Fault) -> None:
        self.faults[path].extend(faults)

    def release_all(self) -> None:
        for p in list(self.requests.values()):
            p.released.set()

    def submitted_seq_ids(self, path: str | None = None) -> list[int]:
        return [b["seq_id"] for p, b in self.submits
                if (path is None and "seq_id" in b) or p == path]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # ---------------------------------------------------------------- HTTP
    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(PREFIX)
        body = json.loads(request.content) if request.content else None
        with self.lock:
            self.calls.append((request.method, path, body))
            self.headers.append(request.headers)
        queue = self.faults.get(path)
        if queue:
            fault = queue.popleft()
            if fault.connect_error:
                raise httpx.ConnectError("injected connection failure", request=request)
            return httpx.Response(fault.status, json=fault.body, headers=fault.headers)
        if path == "/retrieve_future":
            return await self._retrieve(body["request_id"])
        if request.method == "GET":
            return self._get(path, request)
        if request.method == "DELETE":
            return httpx.Response(200, json={})
        return await self._post(path, body)

    async def _retrieve(self, rid: str) -> httpx.Response:
        pending = self.requests.get(rid)
        if pending is None:
            return httpx.Response(404, json={"detail": f"request {rid!r} not found",
                                             "field": "request_id"})
        waited = 0.0
        while not pending.released.is_set() and waited < self.poll_hold:
            await asyncio.sleep(0.005)
            waited += 0.005
        if not pending.released.is_set():
            return httpx.Response(200, json={"type": "try_again", "request_id": rid,
                                             "queue_state": "active"})
        if pending.error is not None:
            return httpx.Response(200, json=pending.error)
        return httpx.Response(200, json=pending.result)

    def _future(self, path: str, body: dict[str, Any], result: Any,
                key: tuple[str, int] | None = None) -> httpx.Response:
        if key is not None and key in self.by_seq:  # idempotent retry
            rid = self.by_seq[key]
            return httpx.Response(200, json={"request_id": rid, "model_id": key[0]})
        rid = f"req-{next(self.ids)}"
        pending = Pending(path, body, result)
        seq = body.get("seq_id")
        if seq in self.fail_results:
            pending.error = self.fail_results[seq]
        if not self.hold_results:
            pending.released.set()
        self.requests[rid] = pending
        if key is not None:
            self.by_seq[key] = rid
        return httpx.Response(200, json={"request_id": rid,
                                         "model_id": key[0] if key else None})

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        if path == "/create_session":
            self.sessions += 1
            return httpx.Response(200, json={"session_id": f"sess{self.sessions}"})
        if path == "/create_model":
            model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
            self.runs.append(model_id)
            self.submits.append((path, body))
            return self._future(path, body, {"model_id": model_id}, (model_id, 0))
        if path == "/get_info":
            return httpx.Response(200, json={"model_id": body["model_id"], "lora_rank": 8,
                                             "model_data": {"model_name": "base"}})
        if path == "/weights_info":
            return httpx.Response(200, json={"base_model": "base", "lora_rank": 8,
                                             "train_mlp": True, "train_attn": False,
                                             "train_unembed": True})
        if path == "/create_sampling_session":
            sid = f"{body['session_id']}:sample:{body['sampling_session_seq_id']}"
            return httpx.Response(200, json={"sampling_session_id": sid})
        # submit endpoints
        seq = body.get("seq_id")
        delay = self.submit_delay.get(seq, 0.0) if path != "/asample" else 0.0
        while not self.submit_gate.is_set():
            await asyncio.sleep(0.005)
        if delay:
            await asyncio.sleep(delay)
        with self.lock:
            self.submits.append((path, body))
        if path == "/asample":
            n = len(body["prompt"]["chunks"][0]["tokens"]) if body["prompt"]["chunks"] else 0
            result = {"type": "sample",
                      "sequences": [{"stop_reason": "length", "tokens": [7, 8, seq]}] *
                      body.get("num_samples", 1),
                      "prompt_logprobs": [None] + [-1.0] * (n - 1)}
            return self._future(path, body, result, (body["sampling_session_id"], seq))
        model_id = body["model_id"]
        if path in ("/forward_backward", "/forward"):
            inp = body.get("forward_backward_input") or body["forward_input"]
            outs = [{"logprobs": {"data": [-0.5] * len(d["model_input"]["chunks"][0]["tokens"]),
                                  "dtype": "float32"}} for d in inp["data"]]
            result = {"loss_fn_outputs": outs, "metrics": {"loss:mean": 0.5, "loss:sum": 1.5}}
        elif path == "/optim_step":
            result = {"metrics": {"lr": body["adam_params"]["learning_rate"]}}
        elif path == "/save_weights":
            result = {"path": f"bios://{model_id}/weights/{body['path']}"}
        elif path == "/save_weights_for_sampler":
            if body.get("path"):
                result = {"path": f"bios://{model_id}/sampler_weights/{body['path']}"}
            else:
                sess = model_id.split(":")[0]
                result = {"path": None,
                          "sampling_session_id": f"{sess}:sample:{body['sampling_session_seq_id']}"}
        elif path == "/load_weights":
            result = {"path": body["path"], "model_id": model_id}
        else:
            return httpx.Response(404, json={"detail": f"no route {path}"})
        return self._future(path, body, result, (model_id, seq))

    def _get(self, path: str, request: httpx.Request) -> httpx.Response:
        if path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/get_server_capabilities":
            return httpx.Response(200, json={"supported_models": [{"model_name": "base"}]})
        if path == "/training_runs":
            limit = int(request.url.params["limit"])
            offset = int(request.url.params["offset"])
            page = self.runs[offset:offset + limit]
            return httpx.Response(200, json={
                "training_runs": [{"training_run_id": r, "base_model": "base"} for r in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(self.runs)}})
        if path.startswith("/training_runs/") and path.endswith("/checkpoints"):
            run = path.split("/")[2]
            return httpx.Response(200, json={"checkpoints": [{
                "checkpoint_id": "weights/a", "checkpoint_type": "training", "time": "t",
                "tinker_path": f"bios://{run}/weights/a"}]})
        if path.startswith("/training_runs/"):
            return httpx.Response(200, json={"training_run_id": path.split("/")[2],
                                             "base_model": "base"})
        if path == "/tokenizer":
            return httpx.Response(200, json={"base_model": request.url.params["base_model"],
                                             "files": self.tokenizer_files})
        if path.startswith("/samplers/"):
            return httpx.Response(200, json={"sampler_id": path.split("/")[2],
                                             "base_model": "base"})
        return httpx.Response(404, json={"detail": f"no route {path}"})


# ---------------------------------------------------------------------------- builders


def tiny_tokenizer_files() -> dict[str, str]:
    """tokenizer.json + tokenizer_config.json of a 6-word word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "Test": 5, "1": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    config = {"bos_token": "<s>", "eos_token": "</s>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config)}


def fast_retries():
    """Retries in tests: the same decisions, millisecond delays."""
    from bios.transport import RetryPolicy

    return RetryPolicy(max_retries=5, base_delay=0.001, max_delay=0.01, budget=5.0)


def make_service(fake: FakeBios, **kwargs: Any):
    """A ServiceClient whose HTTP goes to `fake`."""
    import bios

    service = bios.ServiceClient(base_url="http://fake.test", api_key="k-123",
                                 http_transport=fake.transport(), **kwargs)
    service._transport.policy = fast_retries()
    return service


def make_datum(n: int = 4, **extra: Any):
    """A datum of n input tokens with cross-entropy targets (plus `extra` loss inputs)."""
    import bios

    tokens = list(range(1, n + 2))
    return bios.Datum(model_input=bios.ModelInput.from_ints(tokens[:-1]),
                      loss_fn_inputs={"target_tokens": tokens[1:], **extra})
