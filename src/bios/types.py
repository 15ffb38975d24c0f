"""Wire types: the JSON shapes of Bios's `/api/v1` protocol (Tinker's shapes).

The SDK and the server both import this module, so a request the SDK builds is exactly the
request the server validates. It depends on pydantic and numpy only (never torch); torch tensors
given to `Datum`/`TensorData` are converted by duck typing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"]
LOSS_FNS: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro",
                             "gspo")

# Which `loss_fn_inputs` each loss needs, and which `loss_fn_config` keys it accepts (defaults).
LOSS_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages", "sequence_ratio_mask"),
}
LOSS_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    # Tinker's docs do not state gspo's defaults; Bios uses ppo's.
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
# Known per-token inputs and their dtype; anything else is rejected with a clear error.
LOSS_INPUT_DTYPES: dict[str, str] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "sequence_ratio_mask": "float32",  # gspo: the tokens whose log-ratios make the sequence's
}


# Headers of ordered training requests (the SDK sends them; the server reads them before the
# body): the run and seq_id slot the request takes, so a request rejected unread (413, bad
# JSON) still fills its slot; and seq ids of the run whose submission the client gave up on
# (comma-separated, at most MAX_ABANDONED_SEQS), whose slots the server fills before storing
# this request. Either way the run's later requests do not wait forever.
SLOT_RUN_HEADER = "x-bios-model-id"
SLOT_SEQ_HEADER = "x-bios-seq-id"
ABANDONED_SEQS_HEADER = "x-bios-abandoned-seqs"
MAX_ABANDONED_SEQS = 64

# A LoRA learning rate above this is a typo (1e308 turned a run's loss into NaN for good).
MAX_LEARNING_RATE = 10.0


class StrictModel(BaseModel):
    """Base for wire types: unknown fields are an error, so typos fail loudly.

    NaN/inf serialize as the JSON constants NaN/Infinity (not null), so the server can say
    exactly which value is not finite.
    """

    model_config = ConfigDict(extra="forbid", frozen=False, ser_json_inf_nan="constants")


class LenientModel(BaseModel):
    """Base for responses: unknown fields are ignored, so old clients read new servers."""

    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------- inputs


def _strict_numbers(values: Any, integers: bool) -> Any:
    """Reject `true` and `"7"` (and, for `integers`, 7.5 and 7.0) in a list of numbers.

    Pydantic's lax mode would turn them into 1 and 7; on the wire that hides a client bug, so
    they fail here with the list's field named. Numpy scalars stay accepted (SDK users pass
    them).
    """
    if not isinstance(values, list):
        return values
    for i, v in enumerate(values):
        t = type(v)
        if t is int or (t is float and not integers):
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or (
                integers and not isinstance(v, numbers.Integral)):
            want = "an integer" if integers else "a number"
            raise ValueError(f"item {i} is {v!r} ({t.__name__}); each must be {want} "
                             "(not a string or a boolean)")
    return values


class EncodedTextChunk(StrictModel):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        return _strict_numbers(value, integers=True)

    @property
    def length(self) -> int:
        return len(self.tokens)


class ModelInput(StrictModel):
    """A sequence of token chunks (only text chunks are supported by Bios)."""

    chunks: list[EncodedTextChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        """Build a model input from token ids (a list, tuple or 1-D array)."""
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """All token ids, concatenated."""
        return [t for c in self.chunks for t in c.tokens]

    @property
    def length(self) -> int:
        return sum(c.length for c in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[int(token)]))


def _to_numpy(value: Any) -> np.ndarray:
    """Convert a list, numpy array or torch tensor (duck-typed, no torch import) to numpy."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(value)


class TensorData(StrictModel):
    """A flat tensor on the wire: `data` in row-major order, `shape`, and `dtype`."""

    data: list[float] | list[int]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return _strict_numbers(value, integers=False)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        array = np.asarray(array)
        if array.dtype.kind in "iub":
            return cls(data=array.astype(np.int64).ravel().tolist(), dtype="int64",
                       shape=list(array.shape))
        if array.dtype.kind == "f":
            return cls(data=array.astype(np.float32).ravel().tolist(), dtype="float32",
                       shape=list(array.shape))
        raise ValueError(f"TensorData: unsupported dtype {array.dtype}; use integers or floats")

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        return cls.from_numpy(_to_numpy(tensor))

    def to_numpy(self) -> np.ndarray:
        arr = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return arr.reshape(self.shape) if self.shape is not None else arr

    def to_torch(self) -> Any:
        import torch  # only where the caller already uses torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list[Any]:
        return self.to_numpy().tolist()


class Datum(StrictModel):
    """One training example: the model input and per-token loss inputs.

    Position i of `model_input` predicts token i+1 of the full sequence, so for a full sequence
    `s`: `model_input = s[:-1]` and `loss_fn_inputs["target_tokens"] = s[1:]`; every per-token
    input has the same length as `model_input`. Values may be lists, numpy arrays, torch tensors
    or `TensorData`.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _coerce_inputs(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, v in value.items():
            if isinstance(v, TensorData | dict):
                out[key] = v
                continue
            arr = _to_numpy(v)
            want = LOSS_INPUT_DTYPES.get(key)
            if want == "int64":
                arr = arr.astype(np.int64)
            elif want == "float32" or arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
            out[key] = TensorData.from_numpy(arr)
        return out


class AdamParams(StrictModel):
    """AdamW hyperparameters for one `optim_step` (Tinker's defaults).

    `weight_decay` is decoupled (as `torch.optim.AdamW`); `grad_clip_norm` > 0 clips the global
    gradient norm of the run's adapter before the step.
    """

    learning_rate: float = Field(default=1e-4, ge=0.0, le=MAX_LEARNING_RATE)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-12, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    grad_clip_norm: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _finite(self) -> AdamParams:
        for name, v in self.model_dump().items():
            if not math.isfinite(v):
                raise ValueError(f"AdamParams.{name} must be finite, got {v}")
        return self


class LoraConfig(StrictModel):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class SamplingParams(StrictModel):
    """How to sample. `temperature=0` is greedy (argmax) exactly; `top_k=-1` means no limit."""

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


# ----------------------------------------------------------------------------- outputs


class ForwardBackwardOutput(LenientModel):
    """Result of `forward` / `forward_backward`.

    `loss_fn_outputs[i]["logprobs"]` holds the target-token logprobs of datum i under the model
    as it was for this pass. `metrics` uses Tinker's `name:reduction` keys: `loss:sum` is the
    loss summed over every token of the request (Tinker's convention, what the gradient is of);
    `loss:mean` divides it by the number of tokens that carry loss (nonzero `weights` for
    `cross_entropy`, nonzero `advantages` for the RL losses).
    """

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The mean loss per loss-carrying token (`metrics["loss:mean"]`), as the seeds print it."""
        if "loss:mean" in self.metrics:
            return float(self.metrics["loss:mean"])
        return float(self.metrics.get("loss:sum", float("nan")))


class OptimStepResponse(LenientModel):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(LenientModel):
    path: str


class SaveWeightsForSamplerResponse(LenientModel):
    path: str | None = None
    sampling_session_id: str | None = None


class LoadWeightsResponse(LenientModel):
    path: str | None = None
    model_id: str | None = None


class CreateModelResponse(LenientModel):
    model_id: str


class UntypedAPIFuture(LenientModel):
    """What every submit endpoint returns at once: the durable id of the queued request.

    `sample_sequence_ids` (sample requests only): one id per requested sample, which Tinker's
    SDK (0.26 and later) attaches to each returned sequence.
    """

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class TryAgainResponse(LenientModel):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: str = "active"
    queue_state_reason: str | None = None


class RequestFailedResponse(LenientModel):
    error: str
    category: Literal["user", "server", "unknown"] = "unknown"


class SampledSequence(LenientModel):
    stop_reason: Literal["length", "stop"]
    tokens: list[int]
    logprobs: list[float] | None = None


class SampleResponse(LenientModel):
    type: Literal["sample"] = "sample"
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_cache_hit_tokens: int = 0


class ModelData(LenientModel):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(LenientModel):
    type: Literal["get_info"] = "get_info"
    model_id: str
    model_data: ModelData
    is_lora: bool = True
    lora_rank: int | None = None
    model_name: str | None = None


class SupportedModel(LenientModel):
    model_name: str
    max_context_length: int | None = None
    arch: str | None = None
    aliases: list[str] = Field(default_factory=list)


class GetServerCapabilitiesResponse(LenientModel):
    supported_models: list[SupportedModel]


class WeightsInfoResponse(LenientModel):
    base_model: str
    is_lora: bool = True
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class Checkpoint(LenientModel):
    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler"]
    time: str
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    expires_at: str | None = None


class CheckpointsListResponse(LenientModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class CheckpointArchiveUrlResponse(LenientModel):
    """A signed URL that downloads a checkpoint as a tar (no API key needed) until `expires`."""

    url: str
    expires: datetime


class Cursor(LenientModel):
    offset: int = 0
    limit: int = 0
    total_count: int = 0


class TrainingRun(LenientModel):
    training_run_id: str
    base_model: str
    model_owner: str = "local"
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: str | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(LenientModel):
    training_runs: list[TrainingRun]
    cursor: Cursor | None = None


class RunMetrics(LenientModel):
    """What the server did for one training run (GET /training_runs/{id}/metrics).

    cycles_with_work: training cycles in which the run had work. missed_cycles: cycles in which
    it had none although one of its requests arrived after the cycle started and before it
    ended (so that request waited for a later cycle). queue_wait_s: summed time its requests
    waited between being stored and being claimed. active_s: from its first request stored to
    its last one finished; engine_busy_s: engine time of the base model's cycles (every run's)
    that started in that window; engine_idle_s = active_s - engine_busy_s. tokens: tokens of
    its forward/forward_backward ops; compute_s: its share of engine time. steps: completed
    optim_steps; requests: all its requests, its creation included.
    """

    training_run_id: str
    cycles_with_work: int = 0
    missed_cycles: int = 0
    queue_wait_s: float = 0.0
    engine_busy_s: float = 0.0
    engine_idle_s: float = 0.0
    active_s: float = 0.0
    tokens: int = 0
    compute_s: float = 0.0
    steps: int = 0
    requests: int = 0


class CycleUtilization(LenientModel):
    """One training cycle: busy_fraction = engine_ms / (time to the next cycle's start)."""

    cycle_id: int
    started_at: float  # unix seconds
    engine_ms: float
    total_ms: float
    busy_fraction: float
    runs: int
    tokens: int


class EngineUtilizationResponse(LenientModel):
    """The last cycles of one base model's engine (GET /engine/utilization), oldest first;
    busy_fraction is engine time over wall time from the first cycle's start to now."""

    base_model: str
    cycles: list[CycleUtilization] = Field(default_factory=list)
    busy_fraction: float = 0.0


class GetSamplerResponse(LenientModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class CreateSessionResponse(LenientModel):
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class CreateSamplingSessionResponse(LenientModel):
    sampling_session_id: str


class HealthResponse(LenientModel):
    status: str = "ok"


# ----------------------------------------------------------------------------- requests


class CreateSessionRequest(StrictModel):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, str] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None  # Tinker 0.38: a label for the session (kept nowhere yet)
    type: Literal["create_session"] = "create_session"


class SessionHeartbeatRequest(StrictModel):
    session_id: str
    type: Literal["session_heartbeat"] = "session_heartbeat"


class OptimizerConfig(BaseModel):
    """The optimizer a run trains with, fixed at creation (Tinker 0.38). Bios has AdamW only;
    other families (`dimuon`) are refused at submit time with a 400 naming the type."""

    model_config = ConfigDict(extra="allow")
    type: str = "adamw"


class CreateModelRequest(StrictModel):
    session_id: str
    model_seq_id: int = 0
    base_model: str
    lora_config: LoraConfig = Field(default_factory=LoraConfig)
    user_metadata: dict[str, str] | None = None
    optimizer_config: OptimizerConfig | None = None
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(StrictModel):
    model_id: str
    type: Literal["get_info"] = "get_info"


class ForwardBackwardInput(StrictModel):
    data: list[Datum]
    loss_fn: LossFnType
    loss_fn_config: dict[str, float] | None = None


class ForwardBackwardRequest(StrictModel):
    forward_backward_input: ForwardBackwardInput
    model_id: str
    seq_id: int
    type: Literal["forward_backward"] = "forward_backward"


class ForwardRequest(StrictModel):
    forward_input: ForwardBackwardInput
    model_id: str
    seq_id: int
    type: Literal["forward"] = "forward"


class OptimStepRequest(StrictModel):
    adam_params: AdamParams = Field(default_factory=AdamParams)
    # Tinker 0.38 sends a non-Adam family's step parameters here (refused: AdamW only).
    optimizer_params: dict[str, Any] | None = None
    model_id: str
    seq_id: int
    type: Literal["optim_step"] = "optim_step"


class SaveWeightsRequest(StrictModel):
    model_id: str
    path: str
    seq_id: int
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerRequest(StrictModel):
    model_id: str
    seq_id: int
    path: str | None = None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None
    # Tinker 0.38: "snapshot" (fixed weights) or "inflight" (follows the run's newest save).
    kind: Literal["snapshot", "inflight"] = "snapshot"
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class LoadWeightsRequest(StrictModel):
    """Load a checkpoint into a run (`model_id`, `seq_id`), or, as Tinker 0.38's
    create_training_client_from_state does, create the run from it: `session_id` and
    `model_seq_id` instead, and the run's id is `{session_id}:train:{model_seq_id}`."""

    model_id: str | None = None
    path: str
    seq_id: int | None = None
    optimizer: bool = False
    weights_access_token: str | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, str] | None = None
    optimizer_config: OptimizerConfig | None = None
    type: Literal["load_weights"] = "load_weights"


class CreateSamplingSessionRequest(StrictModel):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"


class SampleRequest(StrictModel):
    sampling_session_id: str | None = None
    seq_id: int | None = None
    base_model: str | None = None
    model_path: str | None = None
    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    prompt_logprobs: bool | None = False
    topk_prompt_logprobs: int = 0
    # Tinker 0.38's sampling extras: accepted at their defaults, refused otherwise (400).
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"


class FutureRetrieveRequest(StrictModel):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoRequest(StrictModel):
    tinker_path: str


class ErrorResponse(LenientModel):
    """Body of every 4xx/5xx: `detail` says what is wrong and how to fix it; `field` names it."""

    detail: str
    field: str | None = None
    code: str | None = None



class RunRequestRecord(LenientModel):
    """One request of a run, as the run history reports it (times in unix seconds).

    queue wait = started_at - created_at; the request ran in training cycle `cycle_id`.
    `loss` is a forward/forward_backward's `loss:mean` (None for other kinds or failures).
    """

    seq_id: int
    kind: str
    status: str
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    cycle_id: int | None = None
    loss: float | None = None
    error: str | None = None


class RunCycleRecord(LenientModel):
    """A training cycle the run had work in (or missed): the cycle's times and totals (every
    run's) and the run's part (`run_tokens`, `run_ops`, `run_compute_ms`)."""

    cycle_id: int
    started_at: float
    engine_ms: float
    total_ms: float
    runs: int
    tokens: int
    run_tokens: int = 0
    run_ops: int = 0
    run_compute_ms: float = 0.0
    missed: bool = False


class StepLoss(LenientModel):
    """One optim_step of a run: its number (1-based), seq id, time completed, and the mean
    `loss:mean` of the forward_backwards since the step before (None if there were none)."""

    step: int
    seq_id: int
    time: float
    loss: float | None = None


class RunHistory(LenientModel):
    """GET /training_runs/{id}/history: the run's requests (seq order) and cycles, after the
    given seq id / cycle id (for incremental polling); `steps` is one point per completed
    optim_step: the mean loss of the forward_backwards since the step before."""

    training_run_id: str
    requests: list[RunRequestRecord] = Field(default_factory=list)
    cycles: list[RunCycleRecord] = Field(default_factory=list)
    steps: list[StepLoss] = Field(default_factory=list)


class ModelStatus(LenientModel):
    """One served base model now: queued requests (training and sampling), the last cycle,
    and the server process's memory (MiB; None where it cannot be read)."""

    base_model: str
    queued_training: int = 0
    queued_samples: int = 0
    running: int = 0
    last_cycle_id: int | None = None
    rss_mib: float | None = None
    heap_in_use_mib: float | None = None


class ServerStatus(LenientModel):
    """GET /console/status: what the dashboard polls for queue depth and memory over time."""

    time: float
    models: list[ModelStatus] = Field(default_factory=list)


CheckpointsListResponse.model_rebuild()

__all__ = [name for name in dir() if name[0].isupper() and not name.startswith("_")] + [
    "LOSS_CONFIG_DEFAULTS",
    "LOSS_FNS",
    "LOSS_INPUT_DTYPES",
    "LOSS_REQUIRED_INPUTS",
]
