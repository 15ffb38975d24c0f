"""The sampler: many sample requests, from many adapter snapshots and the bare base model, decoded
together in one continuously batched loop over a KV cache.

`Sampler.execute(plan)` admits the plan's `SampleOp`s into an internal FIFO queue, then runs up
to `plan.max_decode_steps` decode steps. Between steps, finished rows leave the batch and queued
requests join it (continuous batching), so a long request never holds up short ones. Each
request is prefilled once; its prompt's keys/values are then copied into the cache rows of all
its `num_samples` samples (seated a few at a time if the batch is full). Every decode step is
one forward pass over all active rows with one routed LoRA batch, whatever their adapters.

Semantics (Tinker's, see tinker-api.md sections 3 and 8):
  * temperature 0 is exactly greedy: argmax of the raw logits.
  * Reported logprobs are of the sampled token under the model's full distribution:
    log_softmax of the raw logits, before temperature and top-k/top-p, computed like a training
    `forward` (losses.target_logprobs) so the two agree for the same tokens and snapshot.
  * seed: sample i of a request draws from a stream seeded by (seed, i) (sampling_math.row_rng),
    so the same seed, prompt, snapshot and settings give the same tokens, and the num_samples
    sequences of one request differ. No seed: random. (Logits can differ in their last bits
    with the batch a row decodes in, so a near-tie may rarely resolve differently.)
  * stop_tokens end a sequence when generated (the stop token is kept, stop_reason "stop").
    stop_strings are checked on the decoded continuation (special tokens decoded as text) after
    every token; the token that completes one is the last kept. EOS is not a stop unless the
    request passes it, as in Tinker, where the client's renderer supplies its stop sequences.
    Otherwise a sequence ends with stop_reason "length" after max_tokens tokens.

Failures: a request that cannot run (prompt + max_tokens beyond the context, bad token ids or
settings, an unreadable adapter) fails alone with category "user"; a prefill that raises fails
only its own requests. An exception in a decode step fails the requests then in the batch.

The sampler owns the decode batch's KV cache and a bounded LRU of loaded adapter snapshots. It
knows nothing about HTTP, SQL, runs or scheduling policy; it is not thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from bios.server.engine import checkpoints
from bios.server.engine.checkpoints import CheckpointError
from bios.server.engine.lora import Adapter, LoRABatch
from bios.server.engine.losses import target_logprobs
from bios.server.engine.model import KVCache, ModelConfig, Transformer
from bios.server.engine.sampling_math import RowSampling, TokenChooser, row_rng
from bios.server.plan import OpResult, SampleOp, SamplePlan, SampleResult

log = logging.getLogger(__name__)

PROMPT_LOGPROB_CHUNK = 256  # prompt positions unembedded at once for prompt logprobs
# attention kernels for CUDA: all but cuDNN's (see Sampler._compute)
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SampleRequestError(ValueError):
    """A request the sampler cannot run as given (reported with category "user")."""


class SampleCancelled(SampleRequestError):
    """A request its client gave up on (`SamplePlan.cancel`)."""


def load_sampler_adapter(
    adapter_dir: str | Path, cfg: ModelConfig, device: torch.device | str
) -> Adapter:
    """Read a PEFT-format adapter directory (training or sampler checkpoint) onto `device`."""
    ckpt = checkpoints.read_checkpoint(adapter_dir)
    adapter = Adapter.init(cfg, ckpt.spec, device)
    adapter.load_peft_state_dict(ckpt.adapter_state)
    for tensor in adapter.parameters():
        tensor.requires_grad_(False)
    return adapter


# ----------------------------------------------------------------------------- LoRA routing


class RowLoRA:
    """LoRA routing for rows in any order, some of them (adapter None) on the bare base model.

    `LoRABatch` wants each adapter's rows contiguous, but decode rows stay where they were
    seated so that leaving is cheap. `apply` gathers the adapter rows into grouped order, runs
    the LoRABatch and scatters the deltas back; base rows get an exact zero delta. It has
    LoRABatch's `apply(key, x)` and `add_to(key, x, y)`, which are all the Transformer calls.
    """

    def __init__(self, adapters: Sequence[Adapter | None], seq_len: int):
        groups: dict[int, tuple[Adapter, list[int]]] = {}
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                groups.setdefault(id(adapter), (adapter, []))[1].append(row)
        order = [row for _, rows in groups.values() for row in rows]
        self.batch = LoRABatch.build(
            [a for a, _ in groups.values()], [len(rows) for _, rows in groups.values()], seq_len
        )
        self.num_rows = len(adapters)
        self.in_place = order == list(range(self.num_rows))  # grouped already, no base rows
        self.order = torch.tensor(order, dtype=torch.long, device=self.batch.adapters[0].device)

    @classmethod
    def build(cls, adapters: Sequence[Adapter | None], seq_len: int) -> RowLoRA | None:
        """None when every row is on the base model."""
        return cls(adapters, seq_len) if any(a is not None for a in adapters) else None

    def apply(self, key: str, x: Tensor) -> Tensor | None:
        """x (rows, ..., in) -> LoRA delta (rows, ..., out), or None if no adapter targets key."""
        if self.in_place:
            return self.batch.apply(key, x)
        delta = self.batch.apply(key, x.index_select(0, self.order))
        if delta is None:
            return None
        out = delta.new_zeros((self.num_rows, *delta.shape[1:]))
        return out.index_copy_(0, self.order, delta)

    def add_to(self, key: str, x: Tensor, y: Tensor) -> Tensor:
        """`y + apply(key, x)`: the adapter rows of y, gathered into grouped order, get their
        deltas added in y's dtype (in place into y where the rows are grouped already)."""
        if self.in_place:
            return self.batch.add_to(key, x, y)
        if key not in self.batch.targets:
            return y
        grouped = self.batch.add_to(key, x.index_select(0, self.order),
                                    y.index_select(0, self.order))
        return y.index_copy(0, self.order, grouped)


# ----------------------------------------------------------------------------- KV cache


class DecodeCache(KVCache):
    """The decode batch's KV cache: rows 0..n-1 of per-layer buffers that grow on demand.

    `k[i]`/`v[i]` are views of the first n rows, so the Transformer reads and writes the
    buffers in place. Rows join by copying a prompt's keys/values in (`add_rows`) and leave by
    moving the last rows into the freed slots (`remove_rows`): rows that stay in place are
    never copied. Capacity doubles in rows and in length when needed; `clear` frees it all.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_rows: int,
        max_len: int,
    ):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.row_limit, self.len_limit = max_rows, max_len
        self.clear()

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    def clear(self) -> None:
        """Drop every row and free the buffers."""
        super().__init__(self.cfg, batch_size=0, max_len=0, device=self.device, dtype=self.dtype)
        self._kbuf, self._vbuf = self.k, self.v  # (capacity rows, kv_heads, max_len, D) each

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` slots each (keeping the filled contents)."""
        cap_rows, cap_len = self._kbuf[0].shape[0], self.max_len
        if rows <= cap_rows and length <= cap_len:
            return
        if rows > self.row_limit or length > self.len_limit:
            raise ValueError(
                f"KV cache of {rows} x {length} beyond its limits {self.row_limit} x "
                f"{self.len_limit}"
            )
        if rows > cap_rows:  # grow by doubling, within the limits
            cap_rows = min(max(rows, 2 * cap_rows), self.row_limit)
        if length > cap_len:
            cap_len = min(max(length, 2 * cap_len, 64), self.len_limit)
        n, filled = self.num_rows, self.max_len
        shape = (cap_rows, self.cfg.num_kv_heads, cap_len, self.cfg.head_dim)
        for bufs in (self._kbuf, self._vbuf):
            for i, old in enumerate(bufs):
                new = torch.zeros(shape, device=self.device, dtype=self.dtype)
                new[:n, :, :filled] = old[:n]
                bufs[i] = new
        self.max_len = cap_len
        self._views()

    def add_rows(self, k: Sequence[Tensor], v: Sequence[Tensor], count: int) -> None:
        """Append `count` rows that all start from one prompt's k[i]/v[i] (1, kv_heads, P, D)."""
        n, length = self.num_rows, k[0].shape[2]
        self.reserve(n + count, length)
        for buf, src in zip(self._kbuf, k, strict=True):
            buf[n : n + count, :, :length] = src
        for buf, src in zip(self._vbuf, v, strict=True):
            buf[n : n + count, :, :length] = src
        added = torch.full((count,), length, dtype=torch.long, device=self.device)
        self.lengths = torch.cat([self.lengths, added])
        self._views()

    def remove_rows(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        """Drop `rows`; returns the (from, to) row moves that fill the holes, to mirror."""
        n = self.num_rows
        gone = set(rows)
        keep = n - len(gone)
        holes = sorted(r for r in gone if r < keep)
        movers = [r for r in range(keep, n) if r not in gone]
        moves = list(zip(movers, holes, strict=True))
        if moves:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            filled = int(self.lengths[src].max())
            for buf in (*self._kbuf, *self._vbuf):
                buf[dst, :, :filled] = buf[src, :, :filled]
            self.lengths[dst] = self.lengths[src]
        self.lengths = self.lengths[:keep].clone()
        self._views()
        return moves

    def _views(self) -> None:
        n = self.num_rows
        self.k = [buf[:n] for buf in self._kbuf]
        self.v = [buf[:n] for buf in self._vbuf]


# ----------------------------------------------------------------------------- requests


@dataclass(eq=False)
class _Request:
    """One SampleOp from admission to its last finished sample."""

    op: SampleOp
    sampling: RowSampling
    stop_tokens: frozenset[int]
    stop_window: int  # continuation tokens decoded to look for stop strings (0: none)
    adapter: Adapter | None = None
    prompt_k: list[Tensor] | None = None  # per layer (1, kv_heads, P, D), until all seated
    prompt_v: list[Tensor] | None = None
    last_logits: Tensor | None = None  # (V,) after the prompt, until all seated
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[list[float]] | None] | None = None
    seated: int = 0  # samples given a row so far
    sequences: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> finished

    @property
    def prefilled(self) -> bool:
        return self.last_logits is not None

    @property
    def unseated(self) -> int:
        return self.op.num_samples - self.seated

    def result(self) -> dict[str, Any]:
        return {
            "type": "sample",
            "sequences": [self.sequences[i] for i in range(self.op.num_samples)],
            "prompt_logprobs": self.prompt_logprobs,
            "topk_prompt_logprobs": self.topk_prompt_logprobs,
            "prompt_cache_hit_tokens": 0,
        }


@dataclass(eq=False)
class _Row:
    """One sample being decoded: its cache row is its index in Sampler._rows."""

    request: _Request
    index: int  # sample index within the request
    rng: random.Random
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class SamplerCounters:
    """Totals since the sampler was built (for logs and tests)."""

    prefill_passes: int = 0
    prefill_tokens: int = 0  # prompt tokens run through the model (once per request)
    decode_passes: int = 0
    generated_tokens: int = 0


# ----------------------------------------------------------------------------- sampler


class Sampler:
    """Continuous-batching generation over one base model. See the module docstring.

    load_adapter(adapter_dir) -> Adapter reads a snapshot (default: `load_sampler_adapter`);
    snapshots are cached by SampleOp.adapter_key, at most `max_cached_adapters` of them.
    tokenizer (a `tokenizers.Tokenizer` or the path of a tokenizer.json) is needed only for
    stop strings. context_length defaults to the config's max_position_embeddings.
    """

    def __init__(
        self,
        model: Transformer,
        model_config: ModelConfig,
        *,
        device: torch.device | str,
        autocast_dtype: torch.dtype | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        load_adapter: Callable[[str], Adapter] | None = None,
        context_length: int | None = None,
        max_batch_rows: int = 64,
        max_prefill_tokens: int = 8192,
        max_cached_adapters: int = 16,
    ) -> None:
        if max_batch_rows < 1 or max_prefill_tokens < 1 or max_cached_adapters < 1:
            raise ValueError("max_batch_rows, max_prefill_tokens, max_cached_adapters must be >= 1")
        self.model = model
        self.config = model_config
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.context_length = context_length or model_config.max_position_embeddings
        self.max_batch_rows = max_batch_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.max_cached_adapters = max_cached_adapters
        if isinstance(tokenizer, str | Path):
            tokenizer = Tokenizer.from_file(str(tokenizer))
        self.tokenizer = tokenizer
        self._load_adapter = load_adapter or (
            lambda d: load_sampler_adapter(d, model_config, self.device)
        )
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()
        weight = next(model.parameters())
        self.kv_dtype = autocast_dtype or weight.dtype  # what k/v come out of the projections as
        self.counters = SamplerCounters()
        self._queue: deque[_Request] = deque()  # waiting for (more) rows, FIFO
        self._unfinished: dict[str, _Request] = {}  # request_id -> request, queued or decoding
        self._rows: list[_Row] = []  # row i lives in cache row i
        self._cache = DecodeCache(
            model_config, self.device, self.kv_dtype, max_batch_rows, self.context_length
        )
        self._chooser: TokenChooser | None = None  # for the current rows; None = rebuild
        self._lora: RowLoRA | None = None

    @property
    def num_requests(self) -> int:
        """Requests admitted and not yet finished (queued or decoding)."""
        return len(self._unfinished)

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def execute(self, plan: SamplePlan) -> SampleResult:
        """Admit `plan.admit`, then decode up to `plan.max_decode_steps` steps; return the
        requests that finished (or failed) during this call."""
        start = time.perf_counter()
        finished: list[OpResult] = []
        tokens_before = self.counters.generated_tokens
        for op in plan.admit:
            if op.request_id in self._unfinished:  # admitted before: its result will come
                log.warning("sample request %s admitted twice; ignoring the repeat", op.request_id)
                continue
            try:
                self._enqueue(op)
            except SampleRequestError as exc:
                finished.append(OpResult(op.request_id, ok=False, error=str(exc), category="user"))
        cancelled = [self._unfinished[r] for r in plan.cancel if r in self._unfinished]
        if cancelled:
            self._fail(cancelled, SampleCancelled("cancelled: the client went away"), finished)
        steps = 0
        with torch.no_grad():
            self._admit(finished)
            while self._rows and steps < plan.max_decode_steps:
                try:
                    self._decode_step(finished)
                except Exception as exc:
                    log.exception("decode step failed; failing the batch's requests")
                    self._fail(
                        {id(r.request): r.request for r in self._rows}.values(), exc, finished
                    )
                steps += 1
                self._admit(finished)
        return SampleResult(
            finished=finished,
            active=len(self._unfinished),
            decode_steps=steps,
            tokens=self.counters.generated_tokens - tokens_before,
            engine_ms=(time.perf_counter() - start) * 1000.0,
            partial=self._partial(),
        )

    def _partial(self) -> dict[str, list[list[int]]]:
        """Each unfinished streamed request's tokens so far, per sample (copies: the lists
        go to another thread while decoding goes on)."""
        streamed = {id(r): r for r in self._unfinished.values() if r.op.stream}
        if not streamed:
            return {}
        out = {r.op.request_id: [list(r.sequences[i]["tokens"]) if i in r.sequences else []
                                 for i in range(r.op.num_samples)] for r in streamed.values()}
        for row in self._rows:
            if id(row.request) in streamed:
                out[row.request.op.request_id][row.index] = list(row.tokens)
        return out

    # ------------------------------------------------------------------------- admission

    def _enqueue(self, op: SampleOp) -> None:
        """Check the request and queue it; raises SampleRequestError if it cannot run."""
        vocab, ctx = self.config.vocab_size, self.context_length
        if not op.prompt:
            raise SampleRequestError("the prompt is empty")
        if op.num_samples < 1 or op.max_tokens < 1:
            raise SampleRequestError(
                f"num_samples and max_tokens must be >= 1, got {op.num_samples}, {op.max_tokens}"
            )
        if len(op.prompt) + op.max_tokens > ctx:
            raise SampleRequestError(
                f"prompt ({len(op.prompt)} tokens) + max_tokens ({op.max_tokens}) exceeds the "
                f"model's context length {ctx}; shorten the prompt or lower max_tokens"
            )
        bad = next((t for t in op.prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise SampleRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {vocab})"
            )
        if not op.temperature >= 0.0 or op.temperature == float("inf"):
            raise SampleRequestError(f"temperature must be finite and >= 0, got {op.temperature}")
        if not 0.0 < op.top_p <= 1.0:
            raise SampleRequestError(f"top_p must be in (0, 1], got {op.top_p}")
        if not 0 <= op.topk_prompt_logprobs <= vocab:
            raise SampleRequestError(
                f"topk_prompt_logprobs must be in [0, {vocab}], got {op.topk_prompt_logprobs}"
            )
        if op.adapter_key is not None and op.adapter_dir is None:
            raise SampleRequestError(f"adapter {op.adapter_key!r} has no adapter_dir")
        window = 0
        if op.stop_strings:
            if self.tokenizer is None:
                raise SampleRequestError("stop strings need a tokenizer; this sampler has none")
            if not all(op.stop_strings):
                raise SampleRequestError("stop strings must not be empty")
            # every token decodes to >= 1 byte, so a stop string of S bytes lies in the last S
            # tokens; 2 more absorb decoding effects at the window's start
            window = max(len(s.encode()) for s in op.stop_strings) + 2
        request = _Request(
            op=op,
            sampling=RowSampling(op.temperature, op.top_k, op.top_p),
            stop_tokens=frozenset(op.stop_tokens),
            stop_window=window,
        )
        self._queue.append(request)
        self._unfinished[op.request_id] = request

    def _admit(self, finished: list[OpResult]) -> None:
        """Give free rows to queued requests, FIFO: prefill each once, then seat samples."""
        while self._queue and len(self._rows) < self.max_batch_rows:
            free = self.max_batch_rows - len(self._rows)
            heads: list[_Request] = []
            for request in self._queue:
                if free <= 0:
                    break
                heads.append(request)
                free -= request.unseated
            for request, exc in self._prefill([r for r in heads if not r.prefilled]):
                self._fail([request], exc, finished)
            seats: list[tuple[_Request, int]] = []
            free = self.max_batch_rows - len(self._rows)
            for request in heads:
                if request.prefilled and free > 0:
                    count = min(free, request.unseated)
                    seats.append((request, count))
                    free -= count
            try:
                self._seat(seats, finished)
            except Exception as exc:
                log.exception("seating sample requests failed")
                self._fail([request for request, _ in seats], exc, finished)
            while self._queue and self._queue[0].unseated == 0:
                done = self._queue.popleft()
                done.prompt_k = done.prompt_v = done.last_logits = None

    def _adapter(self, op: SampleOp) -> Adapter | None:
        if op.adapter_key is None:
            return None
        adapter = self._adapters.get(op.adapter_key)
        if adapter is None:
            adapter = self._load_adapter(str(op.adapter_dir))
            self._adapters[op.adapter_key] = adapter
            while len(self._adapters) > self.max_cached_adapters:
                self._adapters.popitem(last=False)  # rows still using it keep a reference
        self._adapters.move_to_end(op.adapter_key)
        return adapter

    def _prefill(self, requests: list[_Request]) -> list[tuple[_Request, BaseException]]:
        """Run the prompts through the model in padded passes of at most max_prefill_tokens;
        returns the requests that failed, each with its error."""
        failed: list[tuple[_Request, BaseException]] = []
        ready = []
        for request in requests:
            try:
                request.adapter = self._adapter(request.op)
                ready.append(request)
            except (CheckpointError, ValueError) as exc:  # missing, malformed or wrong shapes
                why = f"cannot load adapter {request.op.adapter_key!r}: {exc}"
                failed.append((request, SampleRequestError(why)))
            except Exception as exc:
                failed.append((request, exc))
        chunks: list[list[_Request]] = []
        for request in ready:
            chunk = chunks[-1] if chunks else None
            longest = max([len(r.op.prompt) for r in chunk or []] + [len(request.op.prompt)])
            if chunk and longest * (len(chunk) + 1) <= self.max_prefill_tokens:
                chunk.append(request)
            else:
                chunks.append([request])
        for chunk in chunks:
            try:
                self._prefill_pass(chunk)
            except Exception as exc:
                if len(chunk) == 1:
                    failed.append((chunk[0], exc))
                    continue
                for request in chunk:  # find the one(s) at fault; the others still run
                    try:
                        self._prefill_pass([request])
                    except Exception as single_exc:
                        failed.append((request, single_exc))
        return failed

    def _prefill_pass(self, requests: list[_Request]) -> None:
        """One right-padded forward over the prompts; keeps each prompt's keys/values and the
        logits after its last token, and computes prompt logprobs where asked."""
        lengths = [len(r.op.prompt) for r in requests]
        B, T = len(requests), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, request in enumerate(requests):
            ids[b, : lengths[b]] = torch.tensor(request.op.prompt)
        ids = ids.to(self.device)
        cache = KVCache(self.config, B, T, self.device, self.kv_dtype)
        lora = RowLoRA.build([r.adapter for r in requests], T)
        last = torch.tensor(lengths, device=self.device) - 1
        with self._compute():
            hidden = self.model(ids, lora=lora, kv_cache=cache)  # (B, T, H)
            last_hidden = hidden[torch.arange(B, device=self.device), last][:, None]  # (B, 1, H)
            logits = self.model.unembed(last_hidden, lora)[:, 0].float()  # (B, V)
        for b, request in enumerate(requests):
            P = lengths[b]
            request.prompt_k = [k[b : b + 1, :, :P] for k in cache.k]
            request.prompt_v = [v[b : b + 1, :, :P] for v in cache.v]
            request.last_logits = logits[b]
            if request.op.prompt_logprobs or request.op.topk_prompt_logprobs:
                self._prompt_logprobs(request, hidden[b : b + 1, :P])
        self.counters.prefill_passes += 1
        self.counters.prefill_tokens += sum(lengths)

    def _prompt_logprobs(self, request: _Request, hidden: Tensor) -> None:
        """hidden (1, P, H) of the prompt -> logprob of each prompt token given the ones
        before it ([None, lp1, ...]) and/or the top-k (token, logprob) pairs per position."""
        op = request.op
        prompt = torch.tensor(op.prompt, device=self.device)
        lora = RowLoRA.build([request.adapter], hidden.shape[1])
        logprobs: list[float | None] = [None]
        topk: list[list[list[float]] | None] = [None]
        for s in range(0, len(op.prompt) - 1, PROMPT_LOGPROB_CHUNK):
            e = min(len(op.prompt) - 1, s + PROMPT_LOGPROB_CHUNK)
            with self._compute():
                logits = self.model.unembed(hidden[:, s:e], lora)[0].float()  # predicts s+1..e
            if op.prompt_logprobs:
                logprobs.extend(target_logprobs(logits, prompt[s + 1 : e + 1]).tolist())
            if op.topk_prompt_logprobs:
                values, ids = torch.log_softmax(logits, -1).topk(op.topk_prompt_logprobs, dim=-1)
                for pos_ids, pos_values in zip(ids.tolist(), values.tolist(), strict=True):
                    topk.append([[t, lp] for t, lp in zip(pos_ids, pos_values, strict=True)])
        request.prompt_logprobs = logprobs if op.prompt_logprobs else None
        request.topk_prompt_logprobs = topk if op.topk_prompt_logprobs else None

    def _seat(self, seats: list[tuple[_Request, int]], finished: list[OpResult]) -> None:
        """Give `count` new rows to each request: sample each row's first token from the
        prompt's logits; rows that are not done at once join the cache."""
        if not seats:
            return
        rows: list[_Row] = []
        for request, count in seats:
            first = request.seated
            rows += [
                _Row(request, i, row_rng(request.op.seed, i)) for i in range(first, first + count)
            ]
            request.seated += count
        logits = torch.stack([row.request.last_logits for row in rows])  # (n, V)
        done = self._sample_and_record(
            rows, logits, TokenChooser([r.request.sampling for r in rows], self.device), finished
        )
        live = [row for i, row in enumerate(rows) if i not in done]
        for request, _ in seats:  # cache rows and self._rows stay in step
            joining = [row for row in live if row.request is request]
            if joining:
                self._cache.add_rows(request.prompt_k, request.prompt_v, len(joining))
                self._rows += joining
                self._chooser = None

    # ------------------------------------------------------------------------- decoding

    def _decode_step(self, finished: list[OpResult]) -> None:
        """One forward over every active row, one token each; finished rows leave."""
        rows = self._rows
        if self._chooser is None:
            self._chooser = TokenChooser([r.request.sampling for r in rows], self.device)
            self._lora = RowLoRA.build([r.request.adapter for r in rows], 1)
        longest = max(len(r.request.op.prompt) + len(r.tokens) for r in rows)
        self._cache.reserve(len(rows), longest)  # the last token goes to slot longest - 1
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        with self._compute():
            hidden = self.model(ids, lora=self._lora, kv_cache=self._cache)
            logits = self.model.unembed(hidden, self._lora)[:, 0].float()  # (n, V)
        self.counters.decode_passes += 1
        done = self._sample_and_record(rows, logits, self._chooser, finished)
        self._drop_rows(done)

    def _drop_rows(self, indices: Collection[int]) -> None:
        """Remove rows from the batch (and the cache), keeping the two in step."""
        if not indices:
            return
        for src, dst in self._cache.remove_rows(sorted(indices)):
            self._rows[dst] = self._rows[src]
        del self._rows[len(self._rows) - len(indices) :]
        self._chooser = self._lora = None
        if not self._rows:
            self._cache.clear()  # free the memory while idle

    def _sample_and_record(
        self, rows: list[_Row], logits: Tensor, chooser: TokenChooser, finished: list[OpResult]
    ) -> set[int]:
        """Choose one token per row, append it with its logprob, and finish the rows that
        stop; returns their indices in `rows`."""
        uniforms = torch.tensor([row.rng.random() for row in rows], dtype=torch.float64)
        tokens = chooser(logits, uniforms.to(self.device))
        logprobs = target_logprobs(logits, tokens)
        # one device->host copy for both (token ids are exact in float64)
        picked = torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64)]).tolist()
        self.counters.generated_tokens += len(rows)
        done = set()
        for i, (row, token, logprob) in enumerate(zip(rows, *picked, strict=True)):
            row.tokens.append(int(token))
            row.logprobs.append(logprob)
            reason = self._stop_reason(row)
            if reason is not None:
                done.add(i)
                request = row.request
                request.sequences[row.index] = {
                    "tokens": row.tokens,
                    "logprobs": row.logprobs,
                    "stop_reason": reason,
                }
                if len(request.sequences) == request.op.num_samples:
                    self._finish_request(request, finished)
        return done

    def _stop_reason(self, row: _Row) -> str | None:
        request = row.request
        if row.tokens[-1] in request.stop_tokens:
            return "stop"
        if request.stop_window:
            text = self.tokenizer.decode(
                row.tokens[-request.stop_window :], skip_special_tokens=False
            )
            if any(s in text for s in request.op.stop_strings):
                return "stop"
        if len(row.tokens) >= request.op.max_tokens:
            return "length"
        return None

    # ------------------------------------------------------------------------- endings

    def _finish_request(
        self, request: _Request, finished: list[OpResult], error: BaseException | None = None
    ) -> None:
        del self._unfinished[request.op.request_id]
        rid = request.op.request_id
        if error is None:
            finished.append(OpResult(rid, ok=True, result=request.result()))
        elif isinstance(error, SampleRequestError | CheckpointError):
            finished.append(OpResult(rid, ok=False, error=str(error), category="user"))
        else:
            log.error("sample request %s failed: %r", rid, error)
            message = f"{type(error).__name__}: {error}"
            finished.append(OpResult(rid, ok=False, error=message, category="server"))

    def _fail(
        self, requests: Iterable[_Request], exc: BaseException, finished: list[OpResult]
    ) -> None:
        """Fail `requests` (those not finished yet) and free their rows and queue places."""
        requests = list(requests)
        doomed = {id(r) for r in requests}
        self._drop_rows([i for i, row in enumerate(self._rows) if id(row.request) in doomed])
        for request in requests:
            if request in self._queue:
                self._queue.remove(request)
            if request.op.request_id in self._unfinished:
                self._finish_request(request, finished, error=exc)

    def _compute(self) -> contextlib.ExitStack:
        """Autocast (if set) and, on CUDA, attention without the cuDNN backend: cuDNN builds
        a plan per new shape (~7 ms of CPU on an H200), and the key length grows every step."""
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.device.type == "cuda":
            stack.enter_context(sdpa_kernel(ATTENTION_BACKENDS))
        return stack
