"""Per-run AdamW: moments and step count for one adapter, hyperparameters given per step.

Owns: reading Tinker's `AdamParams` from a plan's `OptimStepOp.adam` dict, the update rule
(`torch.optim.AdamW(fused=True)`'s kernel, decoupled weight decay included), global
gradient-norm clipping, and the state as named tensors for checkpoints. It does not own the
parameters or their gradients: callers pass the adapter's tensors (fixed order), and their
gradients, to each call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from bios.types import AdamParams


def adam_params(values: Mapping[str, float]) -> AdamParams:
    """A plan's `OptimStepOp.adam` dict as validated `AdamParams` (missing keys take Tinker's
    defaults); unknown keys or bad values raise ValueError."""
    return AdamParams.model_validate(dict(values))


def global_grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """L2 norm over all gradients, computed as `torch.nn.utils.clip_grad_norm_` does."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(list(grads))  # one call for all tensors of the run
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


class AdamW:
    """AdamW moments (`exp_avg`, `exp_avg_sq`, fp32, like the parameters) and the step count."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.step_count = 0

    @torch.no_grad()
    def step(self, params: Sequence[Tensor], hp: AdamParams,
             grads: Sequence[Tensor | None] | None = None) -> dict[str, float]:
        """One AdamW update of `params` in place, from `grads` (one per parameter; default:
        each parameter's `.grad`). A None gradient counts as zero, so a step with nothing
        accumulated still decays the weights and moves them by the momentum, as
        torch.optim.AdamW would with zero gradients. Gradients are left in place; the caller
        zeros them. A non-finite gradient norm raises ValueError before anything changes."""
        self._check_params(params)
        given = [p.grad for p in params] if grads is None else list(grads)
        if len(given) != len(params):
            raise RuntimeError(f"AdamW.step: {len(given)} gradients for {len(params)} parameters")
        grads = [g if g is not None else torch.zeros_like(p)
                 for p, g in zip(params, given, strict=True)]
        grad_norm = global_grad_norm(grads)
        if not bool(torch.isfinite(grad_norm)):
            raise ValueError(f"gradient norm is {float(grad_norm)}; the step was not applied")
        if hp.grad_clip_norm > 0:
            coef = torch.clamp(hp.grad_clip_norm / (grad_norm + 1e-6), max=1.0)
            grads = [g * coef.to(g.device) for g in grads]

        self.step_count += 1
        step = self.step_count
        lr, beta1, beta2 = hp.learning_rate, hp.beta1, hp.beta2
        # torch.optim.AdamW(fused=True)'s kernel: one pass over each tensor's memory (the
        # update is memory-bound: ~1 ms for a rank-32 run of the tiny model on CPU, against
        # ~4 ms as foreach ops and ~8 ms as single-tensor ops).
        params = list(params)
        steps = [torch.tensor(float(step), device=params[0].device)] * len(params)
        torch._fused_adamw_(params, grads, self.exp_avg, self.exp_avg_sq, [], steps,
                            lr=lr, beta1=beta1, beta2=beta2, weight_decay=hp.weight_decay,
                            eps=hp.eps, amsgrad=False, maximize=False)
        # The fused kernel writes the parameters without advancing their version counters;
        # advance them, as any in-place op would, so that what was derived from the old values
        # knows it is stale (Adapter.cast_b, autograd's saved-tensor checks).
        torch.autograd.graph.increment_version(params)
        return {"grad_norm": float(grad_norm), "learning_rate": lr}

    # ------------------------------------------------------------------------- state

    def state_tensors(self) -> dict[str, Tensor]:
        """Named tensors for a checkpoint: `exp_avg.{i}`, `exp_avg_sq.{i}` (i = parameter
        position) and `step` (a 0-d int64)."""
        out: dict[str, Tensor] = {"step": torch.tensor(self.step_count, dtype=torch.int64)}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            out[f"exp_avg.{i}"] = m
            out[f"exp_avg_sq.{i}"] = v
        return out

    @classmethod
    def from_state_tensors(cls, state: Mapping[str, Tensor], params: Sequence[Tensor]) -> AdamW:
        """Rebuild from `state_tensors()` output for `params`; a mismatch raises ValueError."""
        names = ("exp_avg", "exp_avg_sq")
        expected = {"step"} | {f"{k}.{i}" for i in range(len(params)) for k in names}
        if set(state) != expected:
            raise ValueError(
                f"optimizer state does not fit this adapter: it has {len(state)} tensors, "
                f"expected {len(expected)} (missing {sorted(expected - set(state))[:4]}, "
                f"unexpected {sorted(set(state) - expected)[:4]})"
            )
        opt = cls(params)
        for i, p in enumerate(params):
            for name, dest in (("exp_avg", opt.exp_avg), ("exp_avg_sq", opt.exp_avg_sq)):
                src = state[f"{name}.{i}"]
                if src.shape != p.shape:
                    raise ValueError(
                        f"optimizer tensor {name}.{i} has shape {tuple(src.shape)}, "
                        f"parameter has {tuple(p.shape)}"
                    )
                dest[i].copy_(src)
        opt.step_count = int(state["step"])
        return opt

    def _check_params(self, params: Sequence[Tensor]) -> None:
        if len(params) != len(self.exp_avg) or any(
            p.shape != m.shape for p, m in zip(params, self.exp_avg, strict=True)
        ):
            raise RuntimeError("AdamW.step: parameters do not match the optimizer state")
