"""OpenAI-compatible sampling: `/completions`, `/chat/completions` and `/models`.

Mounted at Tinker's `/oai/api/v1` and at `/v1` (what OpenAI clients default to), so an OpenAI
client, an evaluation harness or `curl` can sample a base model or a trained adapter. The API
key comes in `Authorization: Bearer` (the request guard accepts it there as well as in
`X-API-Key`).

`model` is a base model name, a sampler checkpoint path (`bios://<run>/sampler_weights/<name>`,
`tinker://...`, or a training checkpoint's `.../weights/<name>`), or `base;path` (the base
named explicitly; it must be the checkpoint's). Each prompt becomes one ordinary sample request
(`BiosService.sample`): it is stored, claimed by the model's clock and decoded in the same
continuous batch as the SDK's samples. There is no second engine.

Streaming (`stream: true`, server-sent events): the request is flagged `stream`, the sampler
reports its tokens so far after each decode chunk (`SampleResult.partial`, 16 steps), and the
route turns the new tokens into text deltas. When the client disconnects, the route cancels the
request and the sampler drops its rows at the next chunk.

Differences from OpenAI's API, by design: `stop` strings are cut from the returned text (the
sampler keeps the token that completes one, as Tinker does); generation also stops at the
model's end-of-sequence token (and, for chat, the template's end-of-turn token); `logprobs`
carry the sampled tokens' logprobs (top alternatives are not computed) and are not sent in
streamed chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from bios import types as T
from bios.server.store import CheckpointRow
from bios.server.validation import APIError

STREAM_POLL_S = 5.0  # a streamed request re-reads its state this often if no wake-up came
DEFAULT_CHAT_MAX_TOKENS = 256

# ----------------------------------------------------------------------------- wire models


class _OpenAIModel(BaseModel):
    # OpenAI clients send fields Bios does not use (user, presence_penalty, ...): ignore them.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_OpenAIModel):
    include_usage: bool = False


class CompletionRequest(_OpenAIModel):
    """POST /completions (OpenAI's legacy text completions)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = None


class ChatMessage(_OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (the text parts of a multi-part content)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatCompletionRequest(_OpenAIModel):
    """POST /chat/completions: the messages rendered with the model's chat template."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


# ----------------------------------------------------------------------------- tokenizers


@dataclass
class ModelText:
    """A base model's tokenizer, end tokens and chat template (read once per model)."""

    tokenizer: Any  # tokenizers.Tokenizer
    end_tokens: tuple[int, ...]  # eos (and, for chat, the template's end of turn)
    bos_token: str
    eos_token: str
    chat_template: str | None

    @classmethod
    def load(cls, model_dir: Path) -> ModelText:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def token_text(value: Any) -> str:
            return str(value.get("content", "")) if isinstance(value, dict) else str(value or "")

        bos, eos = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
        ends = []
        for name in (eos, "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = tok.token_to_id(name) if name else None
            if tid is not None and tid not in ends:
                ends.append(tid)
        hf_cfg = json.loads((model_dir / "config.json").read_text())
        eos_ids = hf_cfg.get("eos_token_id")
        for tid in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
            if isinstance(tid, int) and tid not in ends:
                ends.append(tid)
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else cfg.get(
            "chat_template")
        return cls(tok, tuple(ends), bos, eos, template if isinstance(template, str) else None)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        """The prompt text for `messages` and an assistant turn to come."""
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        if self.chat_template is None:  # a model without a template: a plain transcript
            return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise APIError(400, f"the model's chat template refused the messages: {message}",
                           "messages")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=msgs, add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token)
        except TemplateError as e:
            raise APIError(400, f"the model's chat template cannot render these messages: {e}",
                           "messages") from e

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))


# ----------------------------------------------------------------------------- streams


@dataclass(eq=False)
class _Watch:
    """What one route waits on for one sample request: its tokens so far and its end."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: list[list[int]] | None = None  # per sample, from the latest progress report
    body: str | None = None  # the finished response (retrieve_future's body)
    ended: bool = False  # it finished, but its body must be read from the store


class SampleWatches:
    """request id -> the routes waiting on it; fed from clock threads (thread-safe)."""

    def __init__(self) -> None:
        self._watches: dict[str, _Watch] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def watch(self, request_id: str) -> _Watch:
        self.loop = asyncio.get_running_loop()
        return self._watches.setdefault(request_id, _Watch())

    def drop(self, request_id: str) -> None:
        self._watches.pop(request_id, None)

    def _progress(self, partial: dict[str, list[list[int]]]) -> None:
        for rid, tokens in partial.items():
            w = self._watches.get(rid)
            if w is not None:
                w.tokens = tokens
                w.event.set()

    def _finished(self, bodies: dict[str, str | None]) -> None:
        for rid, body in bodies.items():
            w = self._watches.get(rid)
            if w is not None:
                w.body, w.ended = body, body is None
                w.event.set()

    def progress_threadsafe(self, partial: dict[str, list[list[int]]]) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._progress, partial)

    def finished_threadsafe(self, bodies: dict[str, str | None]) -> None:
        if self._watches and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._finished, dict(bodies))


# ----------------------------------------------------------------------------- the routes


def openai_error(e: APIError) -> JSONResponse:
    """OpenAI's error shape ({"error": {message, type, param, code}}), with Bios's status."""
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    if e.status == 401:
        kind = "authentication_error"
    elif e.status == 404:
        kind = "not_found_error"
    return JSONResponse({"error": {"message": e.detail, "type": kind, "param": e.field,
                                   "code": e.code}}, status_code=e.status)


@dataclass
class _Target:
    """What a request's `model` names: a served base model and maybe a checkpoint."""

    canonical: str
    base_model: str
    model_path: str | None


@dataclass
class _Choice:
    """One returned sequence: its text so far (sent) and how it ended."""

    index: int
    sent: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class OpenAIRoutes:
    """The OpenAI-compatible routes over a `BiosService` (see the module docstring)."""

    def __init__(self, service: Any, owner_of: Any) -> None:
        self.svc = service
        self.owner_of = owner_of
        self.watches = SampleWatches()
        self._texts: dict[str, ModelText] = {}
        service.sample_progress = self.watches.progress_threadsafe

    def notify(self, bodies: dict[str, str | None]) -> None:
        """Hand finished requests' bodies to waiting routes (chain it into the service's
        notify)."""
        self.watches.finished_threadsafe(bodies)

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/models", self.models, methods=["GET"])
        r.add_api_route("/completions", self.completions, methods=["POST"])
        r.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        return r

    # ------------------------------------------------------------------ model resolution

    def _text(self, canonical: str) -> ModelText:
        text = self._texts.get(canonical)
        if text is None:
            text = ModelText.load(Path(self.svc.registry.materialize(canonical)))
            self._texts[canonical] = text
        return text

    def _base(self, name: str) -> str:
        try:
            canonical = self.svc.registry.resolve(name).name
        except KeyError:
            canonical = None
        if canonical is None or canonical not in self.svc.models:
            served = ", ".join(self.svc.registry.names())
            raise APIError(404, f"model {name!r} is neither a base model this server serves "
                           f"({served}) nor a checkpoint path (bios://<run>/sampler_weights/"
                           "<name>); GET /models lists what your key may use", "model",
                           "model_not_found")
        return str(canonical)

    def _target(self, owner: str, model: str) -> _Target:
        base, sep, path = model.partition(";")
        if not sep and "://" in model:
            base, path = "", model
        if not path:
            return _Target(self._base(base), base, None)
        try:  # checks the path's form and that this key may read it (404 otherwise)
            info = self.svc.weights_info(owner, path)
        except APIError as e:
            raise APIError(e.status, e.detail.replace("tinker_path", "model"), "model",
                           e.code) from e
        canonical = self._base(info.base_model)
        if base and self._base(base) != canonical:
            raise APIError(400, f"checkpoint {path!r} was trained on {info.base_model!r}, not "
                           f"{base!r}; name its base model or give the path alone", "model")
        return _Target(canonical, info.base_model, path)

    # ------------------------------------------------------------------ submitting

    def _submit(self, owner: str, target: _Target, prompts: list[list[int]], *, n: int,
                max_tokens: int, temperature: float, top_p: float, stop: list[str],
                seed: int | None, stream: bool, chat: bool) -> list[str]:
        """One sample request per prompt; returns their request ids."""
        text = self._text(target.canonical)
        ends = text.end_tokens if chat else text.end_tokens[:1]
        ids = []
        for prompt in prompts:
            req = T.SampleRequest(
                base_model=None if target.model_path else target.base_model,
                model_path=target.model_path, num_samples=n,
                prompt=T.ModelInput.from_ints(prompt),
                sampling_params=T.SamplingParams(max_tokens=max_tokens, seed=seed,
                                                 stop=stop or None, temperature=temperature,
                                                 top_p=top_p))
            try:
                fut = self.svc.sample(owner, req, stream=stream, stop_tokens=ends)
            except APIError as e:
                for rid in ids:  # the prompts before this one need not run
                    self.svc.cancel_sample(target.canonical, rid)
                field_map = {"sampling_params.max_tokens": "max_tokens",
                             "sampling_params.temperature": "temperature",
                             "sampling_params.top_p": "top_p", "num_samples": "n",
                             "model_path": "model", "base_model": "model"}
                raise APIError(e.status, e.detail, field_map.get(e.field or "", e.field),
                               e.code, e.extra) from e
            ids.append(fut.request_id)
        return ids

    async def _final(self, owner: str, rid: str, watch: _Watch) -> dict[str, Any]:
        """Wait for a request's end; its result, or the APIError it failed with."""
        while True:
            body = watch.body or await run_in_threadpool(self.svc.future_state, owner, rid)
            if body is not None:
                out = json.loads(body)
                if "error" in out and "sequences" not in out:
                    user = out.get("category") == "user"
                    raise APIError(400 if user else 500, f"sampling failed: {out['error']}",
                                   None, "sampling_failed")
                return dict(out)
            with suppress(TimeoutError):
                await asyncio.wait_for(watch.event.wait(), timeout=STREAM_POLL_S)
            watch.event.clear()

    # ------------------------------------------------------------------ routes

    def models(self, request: Request) -> dict[str, Any]:
        """The base models served, the key's own checkpoints and those other tenants
        published."""
        owner = self.owner_of(request)
        now = int(time.time())
        data = [{"id": m.model_name, "object": "model", "created": now, "owned_by": "bios"}
                for m in self.svc.capabilities().supported_models]
        offset = 0
        while True:
            page = self.svc.list_runs(owner, 1000, offset)
            for run in page.training_runs:
                for ck in self.svc.list_checkpoints(owner, run.training_run_id).checkpoints:
                    data.append({"id": ck.tinker_path, "object": "model", "created": now,
                                 "owned_by": owner, "root": run.base_model})
            offset += len(page.training_runs)
            if not page.training_runs or offset >= (page.cursor.total_count or 0):
                break
        with self.svc.db.tx() as s:
            published = s.execute(select(CheckpointRow).where(
                CheckpointRow.public.is_(True), CheckpointRow.ephemeral.is_(False),
                CheckpointRow.owner != owner).order_by(CheckpointRow.id)).scalars().all()
        for ck in published:
            seg = "weights" if ck.kind == "training" else "sampler_weights"
            data.append({"id": f"bios://{ck.run_id}/{seg}/{ck.name}", "object": "model",
                         "created": int(ck.created_at), "owned_by": ck.owner,
                         "root": ck.base_model})
        return {"object": "list", "data": data}

    async def completions(self, request: Request, body: CompletionRequest) -> Any:
        try:
            owner = self.owner_of(request)
            target = await run_in_threadpool(self._target, owner, body.model)
            text = await run_in_threadpool(self._text, target.canonical)
            prompts = _prompt_ids(body.prompt, text)
            if body.max_tokens is not None and body.max_tokens < 1:
                raise APIError(400, "max_tokens must be >= 1", "max_tokens")
            params = _params(body.temperature, body.top_p, body.stop, body.seed)
            ids = await run_in_threadpool(
                lambda: self._submit(owner, target, prompts, n=body.n,
                                     max_tokens=body.max_tokens or 16, stream=body.stream,
                                     chat=False, **params))
        except APIError as e:
            return openai_error(e)
        stops = params["stop"]
        usage_on = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return self._stream(owner, target, ids, body.n, body.model, text, stops, False,
                                sum(len(p) for p in prompts), usage_on)
        try:
            results = await self._gather(owner, ids)
        except APIError as e:
            return openai_error(e)
        choices = []
        completion_tokens = 0
        for p, result in enumerate(results):
            for i, seq in enumerate(result["sequences"]):
                out, reason = _visible(text, seq["tokens"], stops, seq.get("stop_reason"))
                completion_tokens += len(seq["tokens"])
                choice: dict[str, Any] = {"index": p * body.n + i, "text": out,
                                          "finish_reason": reason, "logprobs": None}
                if body.logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(text, seq)
                choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts)
        return {"id": f"cmpl-{ids[0]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)}

    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Any:
        try:
            owner = self.owner_of(request)
            target = await run_in_threadpool(self._target, owner, body.model)
            text = await run_in_threadpool(self._text, target.canonical)
            prompt = text.encode(text.render_chat(body.messages))
            if not prompt:
                raise APIError(400, "the messages render to an empty prompt", "messages")
            limit = body.max_completion_tokens or body.max_tokens
            if limit is not None and limit < 1:
                raise APIError(400, "max_tokens must be >= 1", "max_tokens")
            context = self.svc.models[target.canonical].limits.context_length
            max_tokens = limit or max(1, min(DEFAULT_CHAT_MAX_TOKENS, context - len(prompt)))
            params = _params(body.temperature, body.top_p, body.stop, body.seed)
            ids = await run_in_threadpool(
                lambda: self._submit(owner, target, [prompt], n=body.n, max_tokens=max_tokens,
                                     stream=body.stream, chat=True, **params))
        except APIError as e:
            return openai_error(e)
        stops = params["stop"]
        usage_on = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return self._stream(owner, target, ids, body.n, body.model, text, stops, True,
                                len(prompt), usage_on)
        try:
            (result,) = await self._gather(owner, ids)
        except APIError as e:
            return openai_error(e)
        choices = []
        completion_tokens = 0
        for i, seq in enumerate(result["sequences"]):
            out, reason = _visible(text, seq["tokens"], stops, seq.get("stop_reason"))
            completion_tokens += len(seq["tokens"])
            choices.append({"index": i, "message": {"role": "assistant", "content": out},
                            "finish_reason": reason,
                            "logprobs": _chat_logprobs(text, seq) if body.logprobs else None})
        return {"id": f"chatcmpl-{ids[0]}", "object": "chat.completion",
                "created": int(time.time()), "model": body.model, "choices": choices,
                "usage": _usage(len(prompt), completion_tokens)}

    async def _gather(self, owner: str, ids: list[str]) -> list[dict[str, Any]]:
        watches = [self.watches.watch(rid) for rid in ids]
        try:
            return list(await asyncio.gather(*(self._final(owner, rid, w)
                                               for rid, w in zip(ids, watches, strict=True))))
        finally:
            for rid in ids:
                self.watches.drop(rid)

    def _stream(self, owner: str, target: _Target, ids: list[str], n: int, model: str,
                text: ModelText, stops: list[str], chat: bool, prompt_tokens: int,
                include_usage: bool) -> StreamingResponse:
        """Server-sent events: text deltas per choice as decode chunks report tokens."""
        watches = [self.watches.watch(rid) for rid in ids]  # before any await: no lost report
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        sid = f"{'chatcmpl' if chat else 'cmpl'}-{ids[0]}"
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may be forming

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            chunk: dict[str, Any] = {"id": sid, "object": obj, "created": created,
                                     "model": model, "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        def delta(choice: _Choice, new: str, reason: str | None) -> dict[str, Any]:
            if chat:
                d: dict[str, Any] = {"content": new} if new else {}
                return {"index": choice.index, "delta": d, "finish_reason": reason,
                        "logprobs": None}
            return {"index": choice.index, "text": new, "finish_reason": reason,
                    "logprobs": None}

        async def events() -> AsyncIterator[str]:
            done: set[str] = set()
            choices = {rid: [_Choice(p * n + i) for i in range(n)] for p, rid in enumerate(ids)}
            try:
                if chat:
                    yield event([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None} for cs in choices.values() for c in cs])
                stale = list(zip(ids, watches, strict=True))  # an end may predate the watch
                while len(done) < len(ids):
                    for rid, w in stale:
                        if rid not in done and w.body is None:
                            w.body = await run_in_threadpool(self.svc.future_state, owner, rid)
                            w.ended = False
                    for rid, w in zip(ids, watches, strict=True):
                        if rid in done or (w.body is None and w.tokens is None):
                            continue
                        out: list[dict[str, Any]] = []
                        if w.body is not None:
                            result = json.loads(w.body)
                            if "sequences" not in result:
                                err = {"message": f"sampling failed: {result.get('error')}",
                                       "type": "server_error", "param": None,
                                       "code": "sampling_failed"}
                                done.add(rid)
                                yield f"data: {json.dumps({'error': err})}\n\n"
                                return
                            for c, seq in zip(choices[rid], result["sequences"], strict=True):
                                c.tokens = seq["tokens"]
                                full, c.finish_reason = _visible(text, c.tokens, stops,
                                                                 seq.get("stop_reason"))
                                out.append(delta(c, _new_text(c.sent, full), c.finish_reason))
                                c.sent = full
                            done.add(rid)
                        else:
                            assert w.tokens is not None
                            for c, toks in zip(choices[rid], w.tokens, strict=True):
                                c.tokens = toks
                                visible = text.decode(toks)
                                visible = visible[:max(0, len(visible) - hold)]
                                new = _new_text(c.sent, visible.rstrip("\ufffd"))  # half a char
                                if new:
                                    out.append(delta(c, new, None))
                                    c.sent += new
                            w.tokens = None
                        if out:
                            yield event(out)
                    pending = [(rid, w) for rid, w in zip(ids, watches, strict=True)
                               if rid not in done]
                    stale = [(rid, w) for rid, w in pending if w.ended]
                    if pending and not any(w.event.is_set() for _, w in pending):
                        waits = [asyncio.ensure_future(w.event.wait()) for _, w in pending]
                        finished, rest = await asyncio.wait(
                            waits, timeout=STREAM_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                        for t in rest:
                            t.cancel()
                        if not finished:  # no report for a while: read the state itself
                            stale = pending
                    for rid, w in pending:
                        w.event.clear()
                        if w.ended:
                            stale.append((rid, w))
                if include_usage:
                    completion = sum(len(c.tokens) for cs in choices.values() for c in cs)
                    yield event([], _usage(prompt_tokens, completion))
                yield "data: [DONE]\n\n"
            finally:
                # The client went away (or the stream ended): stop what is still generating.
                for rid in ids:
                    if rid not in done:
                        self.svc.cancel_sample(target.canonical, rid)
                    self.watches.drop(rid)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})


# ----------------------------------------------------------------------------- helpers


def _prompt_ids(prompt: Any, text: ModelText) -> list[list[int]]:
    """The completions `prompt` (text, texts, token ids, or lists of them) as token lists."""
    if isinstance(prompt, str):
        prompts = [text.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [text.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids "
                       "or a list of such lists", "prompt")
    if not 1 <= len(prompts) <= 64 or not all(prompts):
        raise APIError(400, "give 1 to 64 prompts, none empty", "prompt")
    return prompts


def _params(temperature: float | None, top_p: float | None, stop: str | list[str] | None,
            seed: int | None) -> dict[str, Any]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
    return {"temperature": 1.0 if temperature is None else float(temperature),
            "top_p": 1.0 if top_p is None else float(top_p), "stop": stops, "seed": seed}


def _visible(text: ModelText, tokens: list[int], stops: list[str],
             stop_reason: str | None) -> tuple[str, Literal["stop", "length"]]:
    """A finished sequence's text (cut before a stop string) and OpenAI's finish_reason."""
    out = text.decode(tokens)
    cut = min((i for i in (out.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        out = out[:cut]
    return out, "stop" if stop_reason == "stop" else "length"


def _new_text(sent: str, now: str) -> str:
    """What to send after `sent` for text that now reads `now` (decoding can revise the
    tail of earlier text, which cannot be unsent: send from where the two diverge)."""
    if now.startswith(sent):
        return now[len(sent):]
    return now[len(sent):] if len(now) > len(sent) else ""


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(text: ModelText, seq: dict[str, Any]) -> dict[str, Any]:
    tokens = [text.tokenizer.decode([t], skip_special_tokens=False) for t in seq["tokens"]]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    lps = seq.get("logprobs") or []
    return {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, lps, strict=False)]}


def _chat_logprobs(text: ModelText, seq: dict[str, Any]) -> dict[str, Any]:
    content = []
    for tid, lp in zip(seq["tokens"], seq.get("logprobs") or [], strict=False):
        tok = text.tokenizer.decode([tid], skip_special_tokens=False)
        content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                        "top_logprobs": []})
    return {"content": content}
