"""The DPO loss (Rafailov et al. 2023), for `TrainingClient.forward_backward_custom`.

loss = -mean_i log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with pi_* / ref_* the summed logprobs of the chosen / rejected reply under the policy and the
frozen reference. Needs torch (imported inside the functions: the cookbook imports without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bios import types


def reply_logprob(logprobs: Any, weights: Any) -> Any:
    """Sum of the target-token logprobs where weights are 1 (the reply), as a tensor."""
    return (logprobs * weights).sum()


def dpo_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any,
             beta: float) -> tuple[Any, dict[str, float]]:
    """DPO loss of a batch of pairs (1-D tensors of summed reply logprobs, one per pair).

    Returns:
        (loss tensor, metrics): the mean loss, `accuracy` (the share of pairs whose implicit
        reward margin is positive) and `margin` (the mean of beta * margin).
    """
    import torch

    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, {"dpo_loss": float(loss.detach()),
                  "accuracy": float((margin > 0).float().mean()),
                  "margin": float(margin.detach().mean())}


def dpo_loss_fn(ref_logprobs: Sequence[tuple[float, float]], beta: float):
    """A `forward_backward_custom` loss for data laid out [chosen_0, rejected_0, chosen_1, ...].

    Args:
        ref_logprobs: (chosen, rejected) summed reply logprobs of each pair under the reference.
        beta: DPO's temperature.
    """
    def loss_fn(data: list[types.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        import torch

        sums = []
        for datum, lp in zip(data, logprobs, strict=True):
            weights = torch.tensor(datum.loss_fn_inputs["weights"].to_numpy(), dtype=lp.dtype)
            sums.append(reply_logprob(lp, weights))
        chosen, rejected = torch.stack(sums[0::2]), torch.stack(sums[1::2])
        ref = torch.tensor(list(ref_logprobs), dtype=chosen.dtype)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)

    return loss_fn
