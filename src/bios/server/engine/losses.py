"""Tinker's built-in losses, as pure functions over target-token logprobs.

Owns: the loss formulas (token-level sums, no normalization: the client normalizes through
`weights` / `advantages`), validation of `loss_fn_config` against
`bios.types.LOSS_CONFIG_DEFAULTS` and of per-token loss inputs, and target logprobs from logits
(in fp32). Knows nothing about models, adapters, batching or the wire.

Notation (tinker-api.md section 4): `lp` = target logprobs under the current model, `q` =
sampling logprobs (`loss_inputs["logprobs"]`), `A` = advantages, `r = exp(lp - q)`.
Every loss below returns its per-token terms `[N]`; `datum_losses` sums them per datum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from bios.types import LOSS_CONFIG_DEFAULTS, LOSS_FNS, LOSS_INPUT_DTYPES, LOSS_REQUIRED_INPUTS

LossInputs = Mapping[str, Tensor]  # key -> [N]: target_tokens int64, others fp32
LossFn = Callable[[Tensor, LossInputs, Mapping[str, float]], Tensor]

# ----------------------------------------------------------------------------- validation


def resolve_loss_config(loss_fn: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """The loss's config with defaults filled in; unknown losses or keys raise ValueError."""
    if loss_fn not in LOSS_FNS:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; expected one of {', '.join(LOSS_FNS)}")
    defaults = LOSS_CONFIG_DEFAULTS[loss_fn]
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(
            f"loss_fn_config keys {unknown} are not accepted by {loss_fn!r} (accepted: {allowed})"
        )
    resolved = {**defaults, **{k: float(v) for k, v in config.items()}}
    if "clip_low_threshold" in resolved and (
        resolved["clip_low_threshold"] > resolved["clip_high_threshold"]
    ):
        raise ValueError(
            f"{loss_fn}: clip_low_threshold {resolved['clip_low_threshold']} is above "
            f"clip_high_threshold {resolved['clip_high_threshold']}"
        )
    return resolved


def datum_loss_inputs(
    loss_fn: str, loss_inputs: Mapping[str, Sequence[float] | Sequence[int]], length: int
) -> dict[str, Tensor]:
    """One datum's loss inputs as tensors `[length]`, checked; raises ValueError on bad input.

    Returns the loss's required inputs plus `weights` (ones when absent). Known inputs the loss
    does not use (e.g. `weights` for the RL losses, which Tinker's formulas ignore) are checked
    and dropped, so every datum of an op has the same keys.
    """
    unknown = sorted(set(loss_inputs) - set(LOSS_INPUT_DTYPES))
    if unknown:
        raise ValueError(f"unknown loss_fn_inputs {unknown}; known: {', '.join(LOSS_INPUT_DTYPES)}")
    missing = [k for k in LOSS_REQUIRED_INPUTS[loss_fn] if k not in loss_inputs]
    if missing:
        raise ValueError(f"loss_fn {loss_fn!r} needs loss_fn_inputs {missing}")
    out: dict[str, Tensor] = {}
    for key, values in loss_inputs.items():
        if len(values) != length:
            raise ValueError(
                f"loss_fn_inputs[{key!r}] has length {len(values)} but model_input has "
                f"{length} tokens; every per-token input must match it"
            )
        dtype = torch.int64 if LOSS_INPUT_DTYPES[key] == "int64" else torch.float32
        try:
            tensor = torch.tensor(values, dtype=dtype).reshape(length)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"loss_fn_inputs[{key!r}] must be a flat list of numbers") from exc
        if dtype == torch.float32 and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"loss_fn_inputs[{key!r}] contains NaN or infinite values")
        out[key] = tensor
    if "weights" not in out:
        out["weights"] = torch.ones(length, dtype=torch.float32)
    return {k: out[k] for k in (*LOSS_REQUIRED_INPUTS[loss_fn], "weights")}


def loss_token_count(loss_fn: str, inputs: LossInputs) -> int:
    """Tokens that carry loss: nonzero `weights` (cross_entropy) or `advantages` (RL losses)."""
    key = "weights" if loss_fn == "cross_entropy" else "advantages"
    return int(torch.count_nonzero(inputs[key]))


# ----------------------------------------------------------------------------- logprobs


def target_logprobs(logits: Tensor, targets: Tensor, block_rows: int | None = None) -> Tensor:
    """log softmax(logits)[target] in fp32: logits `[N, V]` (any float dtype), targets `[N]`.

    Differentiable with respect to `logits`; the gradient comes back in the logits' dtype.
    `block_rows` rows are upcast to fp32 at a time (default: about 1 MiB of them on CPU, 1024
    rows on GPU).
    """
    if block_rows is None:
        block_rows = 1024 if logits.device.type == "cuda" else max(1, 2**18 // logits.shape[-1])
    return _TargetLogprobs.apply(logits, targets, block_rows)


class _TargetLogprobs(torch.autograd.Function):
    """`log_softmax(x)[t]` per row, with a hand-written backward.

    Autograd's version (`log_softmax(x.float()).gather(t)`) keeps an fp32 copy of every logit,
    fills and scatters an [N, V] zero gradient for the gather, and casts the fp32 gradient back:
    on a CPU with a 49k vocabulary that was over half of the unembedding's time. Here forward
    keeps nothing but the logits, and backward writes `g * (onehot(t) - softmax(x))` straight
    into a gradient of the logits' dtype, a few cache-sized fp32 rows at a time. (softmax, not
    `exp(x - logsumexp)`: ATen's pointwise exp takes a slow path below -87, where real logits
    often reach, and its softmax kernel does not.)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, block_rows: int) -> Tensor:
        ctx.save_for_backward(logits, targets)
        ctx.block_rows = block_rows
        out = logits.new_empty(logits.shape[0], dtype=torch.float32)
        for s in range(0, logits.shape[0], block_rows):
            x = torch.log_softmax(logits[s : s + block_rows].float(), dim=-1)
            out[s : s + block_rows] = x.gather(-1, targets[s : s + block_rows, None]).squeeze(-1)
        return out

    @staticmethod
    def backward(ctx, grad_lp: Tensor) -> tuple[Tensor, None, None]:
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        rows = torch.arange(min(ctx.block_rows, logits.shape[0]), device=logits.device)
        for s in range(0, logits.shape[0], ctx.block_rows):
            g = grad_lp[s : s + ctx.block_rows].float()
            p = torch.softmax(logits[s : s + ctx.block_rows].float(), dim=-1).mul_(-g[:, None])
            p[rows[: len(g)], targets[s : s + ctx.block_rows]] += g
            grad[s : s + ctx.block_rows] = p
        return grad, None, None


# ----------------------------------------------------------------------------- losses


def cross_entropy(lp: Tensor, inputs: LossInputs, config: Mapping[str, float]) -> Tensor:
    """`-lp * weights`."""
    return -lp * inputs["weights"]


def importance_sampling(lp: Tensor, inputs: LossInputs, config: Mapping[str, float]) -> Tensor:
    """`-exp(lp - q) * A`: REINFORCE with an importance weight for sampler/learner mismatch."""
    return -torch.exp(lp - inputs["logprobs"]) * inputs["advantages"]


def ppo(lp: Tensor, inputs: LossInputs, config: Mapping[str, float]) -> Tensor:
    """`-min(r * A, clip(r, lo, hi) * A)`."""
    ratio = torch.exp(lp - inputs["logprobs"])
    adv = inputs["advantages"]
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * adv, clipped * adv)


def cispo(lp: Tensor, inputs: LossInputs, config: Mapping[str, float]) -> Tensor:
    """`-sg(clip(r, lo, hi)) * lp * A`: the detached clipped ratio weights the logprob."""
    ratio = torch.exp(lp - inputs["logprobs"]).detach()
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -clipped * lp * inputs["advantages"]


def dro(lp: Tensor, inputs: LossInputs, config: Mapping[str, float]) -> Tensor:
    """`-(lp * A - beta/2 * (lp - q)^2)`. Note the penalty applies to every token, A or not."""
    penalty = 0.5 * config["beta"] * (lp - inputs["logprobs"]).square()
    return -(lp * inputs["advantages"] - penalty)


def gspo(lp: Tensor, inputs: LossInputs, config: Mapping[str, float], segment: Tensor,
         datums: int) -> Tensor:
    """GSPO-token: PPO's clipped objective on `r = exp(s + lp - sg(lp))`, where `s` is the
    datum's sequence log-ratio, the mean of `sg(lp) - q` over its `sequence_ratio_mask` tokens.

    The ratio's value is the sequence's `exp(s)` at every token, its gradient each token's own
    (`s` is detached). `segment[i]` is the datum of token i. A datum with an all-zero mask has
    `s = 0`.
    """
    mask = inputs["sequence_ratio_mask"]
    diff = (lp.detach() - inputs["logprobs"]) * mask
    sums = diff.new_zeros(datums).index_add(0, segment, diff)
    counts = mask.new_zeros(datums).index_add(0, segment, mask)
    s = torch.where(counts > 0, sums / counts.clamp_min(1e-12), torch.zeros_like(sums))
    ratio = torch.exp(s[segment] + lp - lp.detach())
    adv = inputs["advantages"]
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * adv, clipped * adv)


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}


def datum_losses(
    loss_fn: str,
    lp: Tensor,
    inputs: LossInputs,
    lengths: Sequence[int],
    config: Mapping[str, float],
) -> Tensor:
    """Per-datum loss sums `[D]` for datums laid end to end in `lp` / `inputs` (`[N]`,
    N = sum(lengths)). `config` must come from `resolve_loss_config`."""
    counts = torch.tensor(lengths, dtype=torch.long, device=lp.device)
    index = torch.repeat_interleave(torch.arange(len(lengths), device=lp.device), counts)
    if loss_fn == "gspo":  # a sequence-level ratio: needs to know where each datum ends
        terms = gspo(lp, inputs, config, index, len(lengths))
    else:
        terms = LOSSES[loss_fn](lp, inputs, config)  # [N]
    return terms.new_zeros(len(lengths)).index_add(0, index, terms)
