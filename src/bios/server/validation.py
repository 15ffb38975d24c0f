"""Submit-time checks: reject bad input with a 400 that names the field and the fix.

Pure functions over wire types and a model's limits; no torch, no SQL. Anything the engine
would choke on (token ids outside the vocabulary, mismatched lengths, NaNs, unknown loss keys)
is caught here, before the request is queued, so it can never fail another run's cycle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bios import types as T

INT32_MAX = 2**31 - 1  # ids and seeds are stored in 32-bit integer columns (PostgreSQL int4)
FLOAT32_MAX = 3.4028234663852886e38
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PATH_RE = re.compile(r"^(?:bios|tinker)://([^/]+)/(weights|sampler_weights)/([^/]+)$")


class APIError(Exception):
    """An error for the client: HTTP status, what is wrong and how to fix it, which field."""

    def __init__(self, status: int, detail: str, field: str | None = None,
                 code: str | None = None, extra: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.code = code
        self.extra = extra  # more JSON for the error body (e.g. a 429's queue_state)


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    context_length: int


def _finite(v: float) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


def check_int(value: int | None, field: str, low: int = 0, high: int = INT32_MAX) -> None:
    """A 400 naming `field` unless `value` is None or in [low, high]."""
    if value is not None and not low <= value <= high:
        raise APIError(400, f"{field} must be between {low} and {high}, got {value}", field)


def check_name(name: str, field: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise APIError(400, f"{field} {name!r} is not a valid checkpoint name: use 1-128 letters, "
                       "digits, '.', '_' or '-', starting with a letter or digit", field)
    return name


def parse_checkpoint_path(path: str, field: str = "path") -> tuple[str, str, str]:
    """`bios://<run>/weights/<name>` -> (run_id, kind "training"|"sampler", name)."""
    m = PATH_RE.fullmatch(path) if isinstance(path, str) else None
    if not m:
        raise APIError(400, f"{field} {path!r} is not a checkpoint path; expected "
                       "bios://<run_id>/weights/<name> or bios://<run_id>/sampler_weights/<name>",
                       field)
    run_id, kind, name = m.groups()
    check_name(name, field)
    return run_id, "training" if kind == "weights" else "sampler", name


def check_lora_config(cfg: T.LoraConfig, max_rank: int) -> None:
    check_int(cfg.seed, "lora_config.seed", -INT32_MAX - 1)
    if not 1 <= cfg.rank <= max_rank:
        raise APIError(400, f"lora_config.rank must be between 1 and {max_rank}, got {cfg.rank}",
                       "lora_config.rank")
    if not (cfg.train_attn or cfg.train_mlp or cfg.train_unembed):
        raise APIError(400, "at least one of train_attn, train_mlp, train_unembed must be true",
                       "lora_config")


def check_forward_backward(inp: T.ForwardBackwardInput, limits: ModelLimits, max_tokens: int,
                           prefix: str = "forward_backward_input") -> int:
    """Validate a forward/forward_backward batch; return its token count."""
    if not inp.data:
        raise APIError(400, "data is empty: pass at least one Datum", f"{prefix}.data")
    allowed = T.LOSS_CONFIG_DEFAULTS[inp.loss_fn]
    for key, value in (inp.loss_fn_config or {}).items():
        if key not in allowed:
            ok = ", ".join(allowed) or "none"
            raise APIError(400, f"loss_fn_config key {key!r} is not used by {inp.loss_fn!r} "
                           f"(accepted keys: {ok})", f"{prefix}.loss_fn_config.{key}")
        if not math.isfinite(value):
            raise APIError(400, f"loss_fn_config.{key} must be finite, got {value}",
                           f"{prefix}.loss_fn_config.{key}")
    total = 0
    vocab = limits.vocab_size
    for i, d in enumerate(inp.data):
        where = f"{prefix}.data[{i}]"
        tokens = d.model_input.to_ints()
        n = len(tokens)
        if n == 0:
            raise APIError(400, "model_input is empty", f"{where}.model_input")
        if n > limits.context_length:
            raise APIError(400, f"model_input has {n} tokens, more than the model's context "
                           f"length {limits.context_length}; truncate it", f"{where}.model_input")
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})",
                           f"{where}.model_input")
        for key in T.LOSS_REQUIRED_INPUTS[inp.loss_fn]:
            if key not in d.loss_fn_inputs:
                need = ", ".join(T.LOSS_REQUIRED_INPUTS[inp.loss_fn])
                raise APIError(400, f"loss_fn_inputs[{key!r}] is missing; {inp.loss_fn!r} needs "
                               f"{need}", f"{where}.loss_fn_inputs.{key}")
        for key, td in d.loss_fn_inputs.items():
            field = f"{where}.loss_fn_inputs.{key}"
            want = T.LOSS_INPUT_DTYPES.get(key)
            if want is None:
                raise APIError(400, f"unknown loss_fn_inputs key {key!r}; known keys: "
                               f"{', '.join(T.LOSS_INPUT_DTYPES)}", field)
            if td.dtype != want:
                raise APIError(400, f"{key} must have dtype {want}, got {td.dtype}", field)
            if want == "int64" and not all(isinstance(v, int) or (_finite(v) and
                                                                  float(v).is_integer())
                                           for v in td.data):
                raise APIError(400, f"{key} has dtype int64 but holds non-integer values", field)
            if td.shape is not None and any(dim < 0 for dim in td.shape):
                raise APIError(400, f"{key}: shape {td.shape} has a negative dimension", field)
            if len(td.data) != n:
                raise APIError(400, f"{key} has {len(td.data)} values but model_input has {n} "
                               "tokens; every per-token input must match model_input's length "
                               "(input = sequence[:-1], target_tokens = sequence[1:])", field)
            if td.shape is not None and math.prod(td.shape) != len(td.data):
                raise APIError(400, f"{key}: shape {td.shape} does not match {len(td.data)} "
                               "values", field)
            if want == "float32":
                if not all(_finite(v) and abs(float(v)) <= FLOAT32_MAX for v in td.data):
                    raise APIError(400, f"{key} contains NaN, infinite or out-of-float32-range "
                                   "values", field)
            elif key == "target_tokens":
                bad = next((int(t) for t in td.data if not 0 <= int(t) < vocab), None)
                if bad is not None:
                    raise APIError(400, f"target token id {bad} is outside the vocabulary "
                                   f"[0, {vocab})", field)
        total += n
    if total > max_tokens:
        raise APIError(413, f"the batch has {total} tokens, more than this server's limit of "
                       f"{max_tokens} per request (--max-tokens-per-request); split it into "
                       "several forward_backward calls",
                       f"{prefix}.data")
    return total


def check_sample(req: T.SampleRequest, limits: ModelLimits, max_samples: int) -> dict:
    """Validate a sample request; return the SampleOp fields (without ids/adapter)."""
    sp = req.sampling_params
    prompt = req.prompt.to_ints()
    vocab = limits.vocab_size
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
    if not 1 <= req.num_samples <= max_samples:
        raise APIError(400, f"num_samples must be between 1 and {max_samples}, got "
                       f"{req.num_samples}", "num_samples")
    if sp.max_tokens is None or sp.max_tokens < 1:
        raise APIError(400, "sampling_params.max_tokens must be set to a positive number of "
                       "tokens to generate", "sampling_params.max_tokens")
    if len(prompt) + sp.max_tokens > limits.context_length:
        raise APIError(400, "Prompt length plus max_tokens exceeds the model's context window: "
                       f"{len(prompt)} + {sp.max_tokens} > {limits.context_length}; shorten the "
                       "prompt or lower max_tokens", "sampling_params.max_tokens")
    if not (math.isfinite(sp.temperature) and sp.temperature >= 0):
        raise APIError(400, "temperature must be a finite number >= 0 (0 = greedy)",
                       "sampling_params.temperature")
    if sp.top_k != -1 and not 1 <= sp.top_k <= INT32_MAX:
        raise APIError(400, f"top_k must be -1 (no limit) or between 1 and {INT32_MAX}",
                       "sampling_params.top_k")
    check_int(req.seq_id, "seq_id")
    if not (math.isfinite(sp.top_p) and 0 < sp.top_p <= 1):
        raise APIError(400, "top_p must be in (0, 1]", "sampling_params.top_p")
    stop = sp.stop
    stop_strings: list[str] = []
    stop_tokens: list[int] = []
    if isinstance(stop, str):
        stop_strings = [stop]
    elif stop:
        for item in stop:
            if isinstance(item, str):
                stop_strings.append(item)
            else:
                stop_tokens.append(int(item))
    if any(not st for st in stop_strings):
        raise APIError(400, "stop strings must be non-empty", "sampling_params.stop")
    bad = next((t for t in stop_tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"stop token {bad} is outside the vocabulary [0, {vocab})",
                       "sampling_params.stop")
    if not 0 <= req.topk_prompt_logprobs <= 20:
        raise APIError(400, "topk_prompt_logprobs must be between 0 and 20",
                       "topk_prompt_logprobs")
    return {"prompt": prompt, "num_samples": req.num_samples, "max_tokens": sp.max_tokens,
            "temperature": sp.temperature, "top_k": sp.top_k, "top_p": sp.top_p,
            "seed": sp.seed, "stop_tokens": stop_tokens, "stop_strings": stop_strings,
            "prompt_logprobs": req.prompt_logprobs or req.topk_prompt_logprobs > 0,
            "topk_prompt_logprobs": req.topk_prompt_logprobs}


def check_optimizer_config(cfg: T.OptimizerConfig | None, field: str = "optimizer_config"
                           ) -> None:
    """A 400 unless the optimizer is AdamW (the only family Bios implements)."""
    if cfg is not None and cfg.type != "adamw":
        raise APIError(400, f"optimizer type {cfg.type!r} is not supported by Bios: it trains "
                       "with AdamW only; pass optimizer_config={'type': 'adamw'} (the default) "
                       "and AdamParams to optim_step", f"{field}.type", "unsupported_optimizer")


def check_sample_extras(req: T.SampleRequest) -> None:
    """Tinker 0.38's sampling extras Bios does not compute yet: fine at their defaults, a 400
    naming the feature (so the SDK fails at once instead of waiting) otherwise."""
    unsupported = [
        ("topk_sample_logprobs", req.topk_sample_logprobs != 0,
         "per-token top-k logprobs of sampled tokens"),
        ("target_prompt_logprobs", req.target_prompt_logprobs is not None,
         "logprobs of chosen token ids at prompt positions"),
        ("prompt_alt_tokens_k", req.prompt_alt_tokens_k != 0, "alternative prompt-token draws"),
        ("record_stability_info", bool(req.record_stability_info),
         "stability info for stable_reinforce (train with importance_sampling instead)"),
        ("prompt_logprobs_last_n", req.prompt_logprobs_last_n is not None,
         "scoring only the last N prompt tokens (include_prompt_logprobs scores them all)"),
    ]
    for field, given, what in unsupported:
        if given:
            raise APIError(400, f"{field} ({what}) is not supported by Bios; leave it at its "
                           "default", field, "unsupported_feature")
