"""The engine: one frozen base model, every run's adapter and optimizer, and plan execution.

`Engine.execute(plan)` runs a `CyclePlan`'s steps in order and returns a `CycleResult`. A
`PassGroup`'s rows (of many runs) are packed into batched passes under a token budget; each
pass runs the base model once with a `LoRABatch` routing rows to their run's adapter, and one
backward over the sum of the pass's losses. Every op fails alone: bad input is reported as a
"user" error, anything else as "server", and the other ops of the cycle complete normally.

The engine knows nothing about HTTP, SQL, tokenizers or scheduling policy: plans come in as
plain data (bios.server.plan) and results go out as plain data with JSON-able wire dicts.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor

from bios.server.engine import checkpoints
from bios.server.engine.checkpoints import CheckpointError
from bios.server.engine.lora import Adapter, LoRABatch
from bios.server.engine.losses import (
    datum_loss_inputs,
    datum_losses,
    loss_token_count,
    resolve_loss_config,
    target_logprobs,
)
from bios.server.engine.memory import HeapWatch
from bios.server.engine.model import ModelConfig, Transformer, load_transformer
from bios.server.engine.optimizer import AdamW, adam_params
from bios.server.engine.sampler import Sampler
from bios.server.plan import (
    AdapterSpec,
    CreateAdapterOp,
    CyclePlan,
    CycleResult,
    CycleStats,
    ForwardBackwardOp,
    LoadStateOp,
    OpResult,
    OptimStepOp,
    PassGroup,
    ReleaseAdapterOp,
    SamplePlan,
    SampleResult,
    SaveStateOp,
    SingleOp,
)

log = logging.getLogger(__name__)

# Past this much free malloc heap when the engine falls idle (or every 10 s under load), give
# it back to the OS (engine/memory.py).
TRIM_FREE_MIB = 128.0
# Tokens unembedded at a time (a chunk may span runs). On CPU the [chunk, vocab] logits should
# stay near cache size: a 512-token pass of one run on the tiny model (49k vocabulary, 2-core
# EPYC) took 164, 139, 128 and 137 ms with 64, 128, 256 and 512-token chunks. A GPU wants
# large blocks.
CPU_UNEMBED_CHUNK = 256
GPU_UNEMBED_CHUNK = 4096
CPU_TOKEN_BUDGET = 2048  # environment.md: CPU throughput peaks at 512-2048 tokens per pass
GPU_TOKEN_BUDGET = 16384


class UserError(Exception):
    """The request is at fault (unknown run, bad token, bad config): the SDK does not retry."""


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """ValueErrors raised by validation inside this block are the request's fault."""
    try:
        yield
    except ValueError as exc:
        raise UserError(str(exc)) from exc


@dataclass
class RunState:
    """One run's trainable state. Gradients accumulate in the adapter's leaves' `.grad`
    (`Adapter.parameters()`; per matrix: `Adapter.grads()`)."""

    spec: AdapterSpec
    adapter: Adapter
    optimizer: AdamW

    def zero_grad(self) -> None:
        for p in self.adapter.parameters():
            p.grad = None

    def shared_gradient_buffers(self) -> list[Tensor]:
        """The batched passes' shared buffers (see `lora._StackPacked`) that a gradient of this
        run is a row of; holding a row keeps every row of its buffer alive."""
        return [p.grad._base for p in self.adapter.parameters() if _is_shared_row(p.grad)]

    def holds_shared_gradient(self) -> bool:
        """Whether any gradient of this run is a row of a shared buffer."""
        return bool(self.shared_gradient_buffers())

    def own_gradients(self, of: Collection[Tensor]) -> None:
        """Copy out gradients that are rows of the shared buffers in `of` (by identity): the
        run then holds only its own memory, not the rows of every run it shared the pass
        with."""
        for p in self.adapter.parameters():
            if _is_shared_row(p.grad) and any(p.grad._base is b for b in of):
                p.grad = p.grad.clone()


def _is_shared_row(grad: Tensor | None) -> bool:
    """A view into a larger tensor (a row of a pass's (K, size) gradient buffer)."""
    return grad is not None and grad._base is not None and grad._base.numel() > grad.numel()


# ----------------------------------------------------------------------------- pass packing


def pack_rows(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Cut rows into passes whose padded size (rows x longest row) stays within the budget.

    Rows go longest first, so each pass pads little; a row longer than the budget gets a pass
    of its own. Returns row indices per pass; deterministic for the same lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    passes: list[list[int]] = []
    for i in order:
        if passes and (len(passes[-1]) + 1) * lengths[passes[-1][0]] <= token_budget:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


@dataclass
class _Row:
    """One datum of one op, ready for a pass."""

    work: _OpWork
    datum: int  # index in the op's data
    tokens: Tensor  # [L] int64
    inputs: dict[str, Tensor]  # per-token loss inputs, [L] each


@dataclass
class _OpWork:
    """A validated forward/forward_backward op and its outputs, filled pass by pass."""

    index: int  # position in the PassGroup
    op: ForwardBackwardOp
    run: RunState
    config: dict[str, float]
    rows: list[_Row] = field(default_factory=list)
    loss_tokens: int = 0  # tokens with nonzero weight (CE) / advantage (RL losses)
    logprobs: list[list[float]] = field(default_factory=list)  # per datum
    losses: list[float] = field(default_factory=list)  # per datum

    def reset(self) -> None:
        self.logprobs = [[] for _ in self.op.data]
        self.losses = [0.0 for _ in self.op.data]

    def result(self) -> dict[str, Any]:
        """The ForwardBackwardOutput wire dict."""
        loss_sum = sum(self.losses)
        return {
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": [
                {"logprobs": {"data": lp, "dtype": "float32", "shape": [len(lp)]}}
                for lp in self.logprobs
            ],
            "metrics": {
                "loss:sum": loss_sum,
                "loss:mean": loss_sum / self.loss_tokens if self.loss_tokens else 0.0,
            },
        }


_StagedGrads = dict[int, tuple[RunState, list[Tensor | None]]]  # id(run) -> (run, grads)


@dataclass
class _Counters:
    tokens: int = 0
    passes: int = 0


# ----------------------------------------------------------------------------- engine


class Engine:
    """Executes cycle plans against one base model. Not thread-safe: use it from one thread
    (the executor's worker)."""

    def __init__(
        self,
        model: Transformer,
        model_config: ModelConfig,
        *,
        device: torch.device | str,
        autocast_dtype: torch.dtype | None,
        token_budget: int,
        trim_free_mib: float | None = TRIM_FREE_MIB,
    ) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.model = model
        self.config = model_config
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.token_budget = token_budget
        self.heap = HeapWatch(trim_free_mib)  # None: never return freed heap to the OS
        self.unembed_chunk = CPU_UNEMBED_CHUNK if self.device.type == "cpu" else GPU_UNEMBED_CHUNK
        self.tokenizer_path: Path | None = None  # for the sampler's stop strings
        self._sampler: Sampler | None = None
        self.runs: dict[str, RunState] = {}
        # Runs that ended a cycle holding a row of a shared gradient buffer, and (weakly) those
        # buffers. Most runs step in the same or the next cycle, which frees the row; a run
        # still holding a row of the same buffer one cycle later, or when the engine falls
        # idle, gets it copied out (`RunState.own_gradients`). A row of a newer buffer (the run
        # stepped, then ran another pass) waits its own cycle.
        self._holding_rows: dict[str, list[weakref.ref[Tensor]]] = {}

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        device: torch.device | str | None = None,
        *,
        base_dtype: torch.dtype | None = None,
        autocast_dtype: torch.dtype | Literal["auto"] | None = "auto",
        token_budget: int | None = None,
    ) -> Engine:
        """Load an HF model directory with defaults for the hardware: CUDA when available;
        bf16 base and bf16 autocast where the device computes bf16 natively, else fp32;
        a token budget of 2048 per pass on CPU, 16384 on GPU."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bf16 = bf16_supported(device)
        if base_dtype is None:
            base_dtype = torch.bfloat16 if bf16 else torch.float32
        if autocast_dtype == "auto":
            autocast_dtype = torch.bfloat16 if bf16 else None
        if token_budget is None:
            token_budget = CPU_TOKEN_BUDGET if device.type == "cpu" else GPU_TOKEN_BUDGET
        model, cfg = load_transformer(model_dir, device=device, base_dtype=base_dtype)
        engine = cls(
            model, cfg, device=device, autocast_dtype=autocast_dtype, token_budget=token_budget
        )
        tokenizer = Path(model_dir) / "tokenizer.json"
        engine.tokenizer_path = tokenizer if tokenizer.exists() else None
        return engine

    def info(self) -> dict[str, Any]:
        return {
            "arch": self.config.arch,
            "vocab_size": self.config.vocab_size,
            "max_context_length": self.config.max_position_embeddings,
            # What sizes an adapter (plan.ModelDims: the scheduler's resident-bytes bound).
            "hidden_size": self.config.hidden_size,
            "intermediate_size": self.config.intermediate_size,
            "num_layers": self.config.num_layers,
            "q_dim": self.config.num_heads * self.config.head_dim,
            "kv_dim": self.config.num_kv_heads * self.config.head_dim,
        }

    def has_run(self, run_id: str) -> bool:
        return run_id in self.runs

    def idle(self) -> bool:
        """No work is waiting: a good time to return free host memory to the OS (a few ms).
        Returns whether any was returned. Executors call this after a lull, not between busy
        cycles, where the next pass would only fault the pages back in."""
        self._release_shared_gradients()
        return self.heap.when_idle()

    def _release_shared_gradients(self) -> None:
        """Copy out the rows of the buffers in `_holding_rows` that their runs still hold, and
        forget them."""
        for run_id, refs in self._holding_rows.items():
            buffers = [b for b in (ref() for ref in refs) if b is not None]
            if buffers and run_id in self.runs:
                self.runs[run_id].own_gradients(of=buffers)
        self._holding_rows = {}

    # ------------------------------------------------------------------------- cycle

    @property
    def sampler(self) -> Sampler:
        """The continuous-batching sampler over this engine's base model (made on first use)."""
        if self._sampler is None:
            self._sampler = Sampler(self.model, self.config, device=self.device,
                                    autocast_dtype=self.autocast_dtype,
                                    tokenizer=self.tokenizer_path)
        return self._sampler

    @overload
    def execute(self, plan: CyclePlan) -> CycleResult: ...
    @overload
    def execute(self, plan: SamplePlan) -> SampleResult: ...

    def execute(self, plan: CyclePlan | SamplePlan) -> CycleResult | SampleResult:
        """Run a training cycle (steps in order; one OpResult per op, in plan order), or a
        chunk of sampling (admit requests, then decode steps)."""
        if isinstance(plan, SamplePlan):
            result = self.sampler.execute(plan)
            self.heap.after_work()
            return result
        return self._execute_cycle(plan)

    def _execute_cycle(self, plan: CyclePlan) -> CycleResult:
        start = time.perf_counter()
        counters = _Counters()
        results: list[OpResult] = []
        kinds: Counter[str] = Counter()
        runs: set[str] = set()
        tokens_by_run: Counter[str] = Counter()
        compute_ms: Counter[str] = Counter()
        for step in plan.steps:
            t0 = time.perf_counter()
            if isinstance(step, PassGroup):
                group_results = self._execute_pass_group(step, counters)
                results.extend(group_results)
                ms = (time.perf_counter() - t0) * 1000.0
                ok_tokens = [op.num_tokens if r.ok else 0
                             for op, r in zip(step.ops, group_results, strict=True)]
                total = sum(ok_tokens)
                for op, n in zip(step.ops, ok_tokens, strict=True):
                    kinds["forward" if op.forward_only else "forward_backward"] += 1
                    runs.add(op.run_id)
                    tokens_by_run[op.run_id] += n
                    compute_ms[op.run_id] += ms * (n / total if total else 1 / len(step.ops))
            else:
                results.append(self._execute_single(step, plan.base_model))
                kinds[step.kind] += 1
                runs.add(step.run_id)
                compute_ms[step.run_id] += (time.perf_counter() - t0) * 1000.0
        self._release_shared_gradients()  # held since the last cycle
        held = {r: self.runs[r].shared_gradient_buffers() for r in runs if r in self.runs}
        self._holding_rows = {r: [weakref.ref(b) for b in bufs] for r, bufs in held.items() if bufs}
        engine_ms = (time.perf_counter() - start) * 1000.0
        mem = self.heap.after_work()
        stats = CycleStats(
            runs=len(runs),
            tokens=counters.tokens,
            passes=counters.passes,
            ops_by_kind=dict(kinds),
            engine_ms=engine_ms,
            tokens_by_run=dict(tokens_by_run),
            compute_ms_by_run=dict(compute_ms),
            rss_mib=mem.rss_mib,
            heap_in_use_mib=mem.heap_in_use_mib,
        )
        log.debug(
            "cycle %d: %d runs, %d tokens, %d passes, %s, %.1f ms",
            plan.cycle_id, stats.runs, stats.tokens, stats.passes, stats.ops_by_kind,
            stats.engine_ms,
        )  # fmt: skip
        return CycleResult(cycle_id=plan.cycle_id, results=results, stats=stats)

    def _run(self, run_id: str) -> RunState:
        run = self.runs.get(run_id)
        if run is None:
            raise UserError(f"unknown run {run_id!r} (not created, or released)")
        return run

    @staticmethod
    def _failure(request_id: str, exc: BaseException) -> OpResult:
        if isinstance(exc, UserError | CheckpointError):
            return OpResult(request_id, ok=False, error=str(exc), category="user")
        log.exception("op %s failed", request_id, exc_info=exc)
        return OpResult(
            request_id, ok=False, error=f"{type(exc).__name__}: {exc}", category="server"
        )

    # ------------------------------------------------------------------------- single ops

    def _execute_single(self, op: SingleOp, base_model: str) -> OpResult:
        try:
            if isinstance(op, CreateAdapterOp):
                result = self._create(op, base_model)
            elif isinstance(op, OptimStepOp):
                result = self._optim_step(op)
            elif isinstance(op, SaveStateOp):
                result = self._save(op)
            elif isinstance(op, LoadStateOp):
                result = self._load(op, base_model)
            elif isinstance(op, ReleaseAdapterOp):
                result = {"released": self.runs.pop(op.run_id, None) is not None}
            else:
                raise UserError(f"unknown op kind {getattr(op, 'kind', type(op).__name__)!r}")
        except Exception as exc:
            return self._failure(op.request_id, exc)
        return OpResult(op.request_id, ok=True, result=result)

    def _create(self, op: CreateAdapterOp, base_model: str) -> dict[str, Any]:
        if op.run_id in self.runs:
            raise UserError(f"run {op.run_id!r} already exists")
        with _user_errors():
            adapter = Adapter.init(self.config, op.spec, self.device)
        self.runs[op.run_id] = RunState(op.spec, adapter, AdamW(adapter.tensors()))
        if op.load_from is not None:
            try:
                self._load(LoadStateOp(op.request_id, op.run_id, op.load_from,
                                       op.load_optimizer), base_model)
            except Exception:
                del self.runs[op.run_id]  # a failed creation leaves no run behind
                raise
            return {"model_id": op.run_id, "path": op.load_from}
        return {"model_id": op.run_id}

    def _optim_step(self, op: OptimStepOp) -> dict[str, Any]:
        """AdamW on the accumulated gradients, then zero them. With nothing accumulated the
        step still runs with zero gradients (weight decay and momentum apply, as AdamW)."""
        run = self._run(op.run_id)
        with _user_errors():
            hp = adam_params(op.adam)
        try:
            with _user_errors():
                metrics = run.optimizer.step(run.adapter.tensors(), hp, run.adapter.grads())
        finally:
            run.zero_grad()
        return {"metrics": metrics}

    def _save(self, op: SaveStateOp) -> dict[str, Any]:
        run = self._run(op.run_id)
        config = run.adapter.peft_config(op.base_model)
        weights = run.adapter.to_peft_state_dict()
        if op.what == "sampler":
            path = checkpoints.write_sampler_weights(
                op.directory, adapter_state=weights, adapter_config=config
            )
        elif op.what == "training":
            path = checkpoints.write_training_state(
                op.directory,
                spec=run.spec,
                adapter_state=weights,
                adapter_config=config,
                optimizer_state=run.optimizer.state_tensors(),
                optimizer_step=run.optimizer.step_count,
            )
        else:
            raise UserError(f"save: unknown what={op.what!r} (training or sampler)")
        return {"path": str(path)}

    def _load(self, op: LoadStateOp, base_model: str) -> dict[str, Any]:
        """Replace the run's weights (and AdamW state, or a fresh one); drops its gradients.
        Everything is validated before anything changes."""
        run = self._run(op.run_id)
        ckpt = checkpoints.read_checkpoint(
            op.directory, base_model=base_model, with_optimizer=op.optimizer
        )
        checkpoints.check_adapter_state(run.adapter.to_peft_state_dict(), ckpt.adapter_state)
        if ckpt.spec.alpha != run.spec.alpha:
            raise CheckpointError(
                f"checkpoint lora_alpha {ckpt.spec.alpha} differs from this run's {run.spec.alpha}"
            )
        params = run.adapter.tensors()
        if ckpt.optimizer_state is not None:
            try:
                optimizer = AdamW.from_state_tensors(ckpt.optimizer_state, params)
            except ValueError as exc:
                raise CheckpointError(f"{op.directory}: {exc}") from exc
        else:
            optimizer = AdamW(params)
        run.adapter.load_peft_state_dict(ckpt.adapter_state)
        run.optimizer = optimizer
        run.zero_grad()
        return {"path": op.directory}

    # ------------------------------------------------------------------------- pass groups

    def _execute_pass_group(self, group: PassGroup, counters: _Counters) -> list[OpResult]:
        """Batched passes for all valid ops. If any pass fails, nothing of the batched attempt
        is kept and each op is rerun on its own, so only the faulty op fails."""
        results: dict[int, OpResult] = {}
        works: list[_OpWork] = []
        for i, op in enumerate(group.ops):
            try:
                works.append(self._prepare(i, op))
            except Exception as exc:
                results[i] = self._failure(op.request_id, exc)
        try:
            self._run_works(works, counters)
            results.update({w.index: OpResult(w.op.request_id, True, w.result(),
                                              loss_tokens=w.loss_tokens) for w in works})
        except Exception:
            log.warning("batched passes failed; rerunning %d ops one by one", len(works))
            for w in works:
                try:
                    self._run_works([w], counters)
                    results[w.index] = OpResult(w.op.request_id, True, w.result(),
                                                  loss_tokens=w.loss_tokens)
                except Exception as exc:
                    results[w.index] = self._failure(w.op.request_id, exc)
        return [results[i] for i in range(len(group.ops))]

    def _prepare(self, index: int, op: ForwardBackwardOp) -> _OpWork:
        """Validate an op's input and turn its datums into rows (user errors raise here)."""
        run = self._run(op.run_id)
        vocab, context = self.config.vocab_size, self.config.max_position_embeddings
        with _user_errors():
            work = _OpWork(index, op, run, resolve_loss_config(op.loss_fn, op.loss_config))
            for d, datum in enumerate(op.data):
                where = f"datum {d}"
                try:
                    tokens = torch.tensor(datum.tokens, dtype=torch.int64).reshape(-1)
                except (TypeError, RuntimeError) as exc:
                    raise UserError(f"{where}: tokens must be a flat list of ints") from exc
                if len(tokens) > context:
                    raise UserError(
                        f"{where}: {len(tokens)} tokens exceed the model's context of {context}"
                    )
                inputs = datum_loss_inputs(op.loss_fn, datum.loss_inputs, len(tokens))
                _check_token_ids(f"{where}: model_input", tokens, vocab)
                _check_token_ids(f"{where}: target_tokens", inputs["target_tokens"], vocab)
                work.loss_tokens += loss_token_count(op.loss_fn, inputs)
                if len(tokens):
                    work.rows.append(_Row(work, d, tokens, inputs))
        return work

    def _run_works(self, works: list[_OpWork], counters: _Counters) -> None:
        """All passes for these ops: forward-only ops under no_grad in their own passes.
        Gradients are staged and added to the runs' `.grad` only once every pass succeeded."""
        for w in works:
            w.reset()
        staged: _StagedGrads = {}
        for grad in (False, True):
            rows = [r for w in works if w.op.forward_only != grad for r in w.rows]
            for chosen in pack_rows([len(r.tokens) for r in rows], self.token_budget):
                counters.passes += 1  # counted when attempted: failed passes cost time too
                counters.tokens += sum(len(rows[i].tokens) for i in chosen)
                self._run_pass([rows[i] for i in chosen], grad, staged)
        for run, grads in staged.values():
            for p, g in zip(run.adapter.parameters(), grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)

    def _run_pass(self, rows: list[_Row], grad: bool, staged: _StagedGrads) -> None:
        """One batched pass: fills each op's per-datum logprobs and losses and, with `grad`,
        stages the gradient of the summed losses for every run in the pass."""
        # LoRABatch needs rows contiguous per run: runs in first-seen order, then op, datum.
        run_order: dict[int, int] = {}
        for r in rows:
            run_order.setdefault(id(r.work.run), len(run_order))
        rows = sorted(rows, key=lambda r: (run_order[id(r.work.run)], r.work.index, r.datum))
        with torch.set_grad_enabled(grad):
            lp = self._target_logprobs(rows)  # [N] fp32, rows' tokens end to end
            total = lp.new_zeros(())
            start = 0
            for work, op_rows in _consecutive_by_work(rows):  # an op's rows are contiguous
                lens = [len(r.tokens) for r in op_rows]
                seg = lp[start : start + sum(lens)]
                start += sum(lens)
                inputs = {
                    k: torch.cat([r.inputs[k] for r in op_rows]).to(self.device)
                    for k in op_rows[0].inputs
                }
                losses = datum_losses(work.op.loss_fn, seg, inputs, lens, work.config)  # [rows]
                total = total + losses.sum()
                seg_lp = seg.detach().cpu().split(lens)
                for r, row_lp, loss in zip(op_rows, seg_lp, losses.tolist(), strict=True):
                    work.logprobs[r.datum] = row_lp.tolist()
                    work.losses[r.datum] = loss
        if grad and total.requires_grad:
            runs = list({id(r.work.run): r.work.run for r in rows}.values())
            params = [run.adapter.parameters() for run in runs]
            grads = torch.autograd.grad(total, [p for ps in params for p in ps], allow_unused=True)
            offset = 0
            for run, ps in zip(runs, params, strict=True):
                acc = staged.setdefault(id(run), (run, [None] * len(ps)))[1]
                for j, g in enumerate(grads[offset : offset + len(ps)]):
                    if g is not None:
                        acc[j] = g if acc[j] is None else acc[j].add_(g)
                offset += len(ps)

    def _target_logprobs(self, rows: list[_Row]) -> Tensor:
        """Right-pad the rows (grouped per run), run the model with their adapters, and return
        the target-token logprobs of the real tokens, [N] fp32 in row order."""
        runs = list({id(r.work.run): r.work.run for r in rows}.values())
        adapters = [run.adapter for run in runs]
        rows_per_run = [sum(1 for r in rows if r.work.run is run) for run in runs]
        tokens_per_run = [sum(len(r.tokens) for r in rows if r.work.run is run) for run in runs]
        lengths = torch.tensor([len(r.tokens) for r in rows])  # [B]
        seq_len = int(lengths.max())
        ids = torch.zeros(len(rows), seq_len, dtype=torch.int64)  # [B, T], right-padded with 0
        for b, r in enumerate(rows):
            ids[b, : len(r.tokens)] = r.tokens
        real = torch.arange(seq_len)[None, :] < lengths[:, None]  # [B, T]
        targets = torch.cat([r.inputs["target_tokens"] for r in rows]).to(self.device)  # [N]
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            lora = LoRABatch.build(adapters, rows_per_run, seq_len)
            hidden = self.model(ids.to(self.device), lora=lora)  # [B, T, H]
            # Unembed real tokens only (padding would cost most of the FLOPs on a big
            # vocabulary), a chunk of tokens at a time, whichever runs they belong to: each
            # chunk's logits go straight into its logprobs, so no pass-sized logits tensor is
            # ever made, and small runs still share one large matmul.
            hidden = hidden[real.to(self.device)]  # [N, H], grouped by run
        lps = []
        for start, pieces in _chunk_pieces(tokens_per_run, self.unembed_chunk):
            n = sum(count for _, count in pieces)
            lora = LoRABatch.build([adapters[i] for i, _ in pieces], [c for _, c in pieces], 1)
            with autocast:
                logits = self.model.unembed(hidden[start : start + n], lora=lora)
            lps.append(target_logprobs(logits, targets[start : start + n]))  # [n] fp32
        return torch.cat(lps)


def _check_token_ids(where: str, ids: Tensor, vocab_size: int) -> None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if len(bad):
        raise UserError(
            f"{where} has token id {int(bad[0])} outside the vocabulary [0, {vocab_size})"
        )


def _chunk_pieces(counts: list[int], chunk: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Cut consecutive groups (`counts[i]` items of group i) into chunks of at most `chunk`
    items. Yields each chunk's first item and its pieces as (group, items), in order."""
    start, pieces, size = 0, [], 0
    for group, count in enumerate(counts):
        while count:
            take = min(count, chunk - size)
            pieces.append((group, take))
            size, count = size + take, count - take
            if size == chunk:
                yield start, pieces
                start, pieces, size = start + chunk, [], 0
    if pieces:
        yield start, pieces


def _consecutive_by_work(rows: list[_Row]) -> Iterator[tuple[_OpWork, list[_Row]]]:
    """Split rows into runs of consecutive rows of the same op."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].work is not rows[start].work:
            yield rows[start].work, rows[start:i]
            start = i


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (CUDA bf16, or CPU AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False
