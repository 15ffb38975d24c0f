"""The scheduler -> engine boundary: a cycle's plan in, its results out, as plain data.

Nothing here imports torch, SQL or HTTP. Fields are ids, token lists, floats and strings, so a
plan can be pickled to an engine worker in another process (or on another machine) unchanged.

A `CyclePlan` is an ordered list of steps. A step is either one `PassGroup` (forward /
forward_backward ops of many runs, which the engine packs into batched passes under its token
budget) or a single op that touches one run (create, optim_step, save, load, release). The
scheduler guarantees that executing the steps in order respects each run's submission order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# ----------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class AdapterSpec:
    """A run's LoRA configuration. `alpha / rank` scales the adapter's output."""

    rank: int
    seed: int
    alpha: float = 32.0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class ModelDims:
    """The base model's dimensions that size a LoRA adapter (from the engine's `info()`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    q_dim: int  # num_heads * head_dim
    kv_dim: int  # num_kv_heads * head_dim
    vocab_size: int

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> ModelDims | None:
        """The dims in an engine's `info()`, or None if it lacks them."""
        try:
            return cls(*(int(info[k]) for k in ("hidden_size", "intermediate_size",
                                                "num_layers", "q_dim", "kv_dim", "vocab_size")))
        except (KeyError, TypeError, ValueError):
            return None


# Bytes per adapter parameter while a run is resident: its fp32 weight and AdamW's two fp32
# moments (gradients come and go between optim steps, and are not counted).
RESIDENT_BYTES_PER_PARAM = 12


def adapter_params(dims: ModelDims, spec: AdapterSpec) -> int:
    """The parameters of a LoRA adapter: rank x (in + out) for every module it trains (as
    `engine.lora.target_shapes` lays them out)."""
    h, m, q, kv = dims.hidden_size, dims.intermediate_size, dims.q_dim, dims.kv_dim
    per_layer = 0
    if spec.train_attn:  # q, k, v, o
        per_layer += (h + q) + 2 * (h + kv) + (q + h)
    if spec.train_mlp:  # gate, up, down
        per_layer += 3 * (h + m)
    total = per_layer * dims.num_layers
    if spec.train_unembed:
        total += h + dims.vocab_size
    return spec.rank * total


def resident_bytes(dims: ModelDims, spec: AdapterSpec) -> int:
    """A resident run's bytes: its fp32 adapter weights plus AdamW state."""
    return RESIDENT_BYTES_PER_PARAM * adapter_params(dims, spec)


# ----------------------------------------------------------------------------- ops


@dataclass(frozen=True)
class DatumRows:
    """One datum: input tokens and per-token loss inputs, all of length len(tokens).

    loss_inputs keys: "target_tokens" (ints), and optionally "weights", "advantages",
    "logprobs" (floats). A missing "weights" means 1 for every position.
    """

    tokens: list[int]
    loss_inputs: dict[str, list[float] | list[int]]


@dataclass(frozen=True)
class CreateAdapterOp:
    """Create a run's adapter; with `load_from`, then load that checkpoint into it (and its
    AdamW state with `load_optimizer`), as one op: Tinker 0.38 creates runs that way."""

    request_id: str
    run_id: str
    spec: AdapterSpec
    kind: Literal["create"] = "create"
    load_from: str | None = None
    load_optimizer: bool = False


@dataclass(frozen=True)
class ForwardBackwardOp:
    """forward (forward_only=True, no gradients) or forward_backward (gradients accumulate)."""

    request_id: str
    run_id: str
    data: list[DatumRows]
    loss_fn: str
    loss_config: dict[str, float]
    forward_only: bool = False
    kind: Literal["forward_backward"] = "forward_backward"

    @property
    def num_tokens(self) -> int:
        return sum(len(d.tokens) for d in self.data)


@dataclass(frozen=True)
class OptimStepOp:
    """Apply the run's accumulated gradients with AdamW, then zero them.

    adam: learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm.
    """

    request_id: str
    run_id: str
    adam: dict[str, float]
    kind: Literal["optim_step"] = "optim_step"


@dataclass(frozen=True)
class SaveStateOp:
    """Write the run's adapter to `directory` (created atomically by the engine).

    what="training": adapter + optimizer state (resumable). what="sampler": adapter only, in
    PEFT's format. base_model is written into adapter_config.json.
    """

    request_id: str
    run_id: str
    directory: str
    what: Literal["training", "sampler"]
    base_model: str
    kind: Literal["save"] = "save"


@dataclass(frozen=True)
class LoadStateOp:
    """Replace the run's adapter (and, with optimizer=True, its AdamW state) from `directory`."""

    request_id: str
    run_id: str
    directory: str
    optimizer: bool
    kind: Literal["load"] = "load"


@dataclass(frozen=True)
class ReleaseAdapterOp:
    """Free a run's adapter and optimizer state."""

    request_id: str
    run_id: str
    kind: Literal["release"] = "release"


SingleOp = CreateAdapterOp | OptimStepOp | SaveStateOp | LoadStateOp | ReleaseAdapterOp


@dataclass(frozen=True)
class PassGroup:
    """forward/forward_backward ops of different runs (at most one op sequence per run, in
    submission order) that may share batched passes."""

    ops: list[ForwardBackwardOp]
    kind: Literal["pass_group"] = "pass_group"


Step = PassGroup | SingleOp


@dataclass(frozen=True)
class CyclePlan:
    cycle_id: int
    base_model: str
    steps: list[Step] = field(default_factory=list)

    @property
    def num_ops(self) -> int:
        return sum(len(s.ops) if isinstance(s, PassGroup) else 1 for s in self.steps)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class OpResult:
    """The outcome of one op. `result` is the JSON-able wire response (e.g. a
    ForwardBackwardOutput dump); on failure `error` says what happened and `category` is
    "user" (bad input: the SDK does not retry) or "server"."""

    request_id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    category: Literal["user", "server"] = "server"
    # forward/forward_backward: the tokens the loss counts (loss:mean's denominator), so the
    # scheduler can merge the parts of a request it split across cycles.
    loss_tokens: int = 0


@dataclass(frozen=True)
class CycleStats:
    runs: int = 0  # distinct runs with work in the cycle
    tokens: int = 0  # tokens through forward/backward passes
    passes: int = 0  # batched model passes run
    ops_by_kind: dict[str, int] = field(default_factory=dict)
    engine_ms: float = 0.0  # wall time inside the engine
    # Per run (optional; empty from executors that do not measure it): tokens of the run's
    # successful forward/forward_backward ops, and the run's share of engine time (its single
    # ops' own time plus a share of each pass group's time in proportion to its tokens).
    tokens_by_run: dict[str, int] = field(default_factory=dict)
    compute_ms_by_run: dict[str, float] = field(default_factory=dict)
    # Host memory at the cycle's end (MiB; None where unknown): the process's resident size
    # before freed memory was returned to the OS, and malloc's heap in use.
    rss_mib: float | None = None
    heap_in_use_mib: float | None = None


@dataclass(frozen=True)
class CycleResult:
    cycle_id: int
    results: list[OpResult]
    stats: CycleStats = field(default_factory=CycleStats)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SampleOp:
    """One sample request: `num_samples` continuations of `prompt` from one adapter snapshot.

    adapter_key identifies an immutable snapshot (None = the bare base model); adapter_dir is
    where its PEFT-format weights live, loaded on first use and cached by key.
    stop_strings are checked on the decoded continuation; stop_tokens on token ids.
    The result is a SampleResponse dump: sequences[i] = {tokens, logprobs, stop_reason}, plus
    prompt_logprobs / topk_prompt_logprobs when asked.
    """

    request_id: str
    adapter_key: str | None
    adapter_dir: str | None
    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    stream: bool = False  # report its tokens so far after every plan (SampleResult.partial)


@dataclass(frozen=True)
class SamplePlan:
    """Admit new sample requests into the running decode batch, then run up to
    `max_decode_steps` decode steps (fewer if every sequence finishes).

    `cancel` names requests to stop (their clients went away): each still unfinished fails
    with a "cancelled" error before any decoding; unknown ids are ignored."""

    admit: list[SampleOp]
    max_decode_steps: int
    cancel: tuple[str, ...] = ()


@dataclass(frozen=True)
class SampleResult:
    finished: list[OpResult]  # requests whose every sample is done
    active: int  # requests still decoding after this plan
    decode_steps: int = 0
    tokens: int = 0  # tokens generated (all rows) during this plan
    engine_ms: float = 0.0
    # streamed requests still unfinished -> the tokens of each of their samples so far
    partial: dict[str, list[list[int]]] = field(default_factory=dict)
