"""Loss formulas against hand computation, config/input validation, and target logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from bios.server.engine.losses import (
    datum_loss_inputs,
    datum_losses,
    loss_token_count,
    resolve_loss_config,
    target_logprobs,
)
from bios.types import LOSS_CONFIG_DEFAULTS

# Ratios r = exp(lp - q) of 0.5, 0.9, 1.0, 1.1, 1.5, 5.0: below, inside and above every clip
# range used here, each with a positive and a negative advantage.
RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5, 5.0] * 2
ADVANTAGES = [1.0] * 6 + [-2.0] * 6


def rl_inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    q = torch.linspace(-3.0, -0.5, len(RATIOS))
    lp = q + torch.log(torch.tensor(RATIOS))
    inputs = {
        "target_tokens": torch.zeros(len(RATIOS), dtype=torch.int64),
        "weights": torch.ones(len(RATIOS)),
        "logprobs": q,
        "advantages": torch.tensor(ADVANTAGES),
    }
    return lp.requires_grad_(), inputs


def total(loss_fn: str, lp, inputs, config=None) -> torch.Tensor:
    cfg = resolve_loss_config(loss_fn, config)
    return datum_losses(loss_fn, lp, inputs, [len(lp)], cfg)[0]


def test_cross_entropy_is_weighted_negative_logprob_sum():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    inputs = {"target_tokens": torch.zeros(4, dtype=torch.int64)}
    inputs["weights"] = torch.tensor([0.0, 1.0, 2.0, 0.5])
    expected = -(-2.0 * 1.0 + -0.5 * 2.0 + -3.0 * 0.5)
    assert total("cross_entropy", lp, inputs).item() == pytest.approx(expected)


def test_importance_sampling_is_ratio_times_advantage():
    lp, inputs = rl_inputs()
    expected = -sum(r * a for r, a in zip(RATIOS, ADVANTAGES, strict=True))
    assert total("importance_sampling", lp, inputs).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("lo, hi", [(0.8, 1.2), (0.5, 2.0)])
def test_ppo_takes_the_pessimistic_clipped_term(lo, hi):
    lp, inputs = rl_inputs()
    expected = -sum(
        min(r * a, min(max(r, lo), hi) * a) for r, a in zip(RATIOS, ADVANTAGES, strict=True)
    )
    config = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    loss = total("ppo", lp, inputs, config)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The gradient vanishes exactly where the clipped term is the minimum and is clipped.
    (grad,) = torch.autograd.grad(loss, lp)
    for i, (r, a) in enumerate(zip(RATIOS, ADVANTAGES, strict=True)):
        clipped = min(max(r, lo), hi)
        if clipped * a < r * a:
            assert grad[i].item() == 0.0
        else:
            assert grad[i].item() == pytest.approx(-r * a, rel=1e-5)


def test_ppo_defaults():
    lp, inputs = rl_inputs()
    explicit = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert torch.equal(total("ppo", lp, inputs), total("ppo", lp, inputs, explicit))


def test_cispo_weights_logprob_by_detached_clipped_ratio():
    lp, inputs = rl_inputs()
    q = inputs["logprobs"].tolist()
    lo, hi = 0.0, 4.0  # defaults
    clipped = [min(max(r, lo), hi) for r in RATIOS]
    expected = -sum(
        c * (qi + math.log(r)) * a
        for c, qi, r, a in zip(clipped, q, RATIOS, ADVANTAGES, strict=True)
    )
    loss = total("cispo", lp, inputs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, lp)  # sg(): d/dlp = -clip(r) * A, ratio 5 clipped to 4
    want = torch.tensor([-c * a for c, a in zip(clipped, ADVANTAGES, strict=True)])
    torch.testing.assert_close(grad, want)


def test_dro_penalizes_distance_to_sampling_logprobs():
    lp, inputs = rl_inputs()
    beta = 0.3
    expected = -sum(
        (qi + math.log(r)) * a - 0.5 * beta * math.log(r) ** 2
        for qi, r, a in zip(inputs["logprobs"].tolist(), RATIOS, ADVANTAGES, strict=True)
    )
    assert total("dro", lp, inputs, {"beta": beta}).item() == pytest.approx(expected, rel=1e-5)
    default = total("dro", lp, inputs).item()
    assert default == pytest.approx(total("dro", lp, inputs, {"beta": 0.05}).item())


def test_datum_losses_sums_each_datum_separately():
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    inputs = {"target_tokens": torch.zeros(6, dtype=torch.int64), "weights": torch.ones(6)}
    out = datum_losses("cross_entropy", lp, inputs, [1, 0, 3, 2], {})
    assert out.tolist() == [1.0, 0.0, 9.0, 11.0]


def test_config_defaults_come_from_the_wire_table():
    for loss_fn, defaults in LOSS_CONFIG_DEFAULTS.items():
        assert resolve_loss_config(loss_fn, None) == defaults
    assert resolve_loss_config("ppo", {"clip_high_threshold": 1.5}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.5,
    }


@pytest.mark.parametrize(
    "loss_fn, config, message",
    [
        ("hinge", {}, "unknown loss_fn"),
        ("cross_entropy", {"beta": 0.1}, "not accepted by 'cross_entropy'"),
        ("ppo", {"clip_low": 0.5}, "accepted: clip_low_threshold, clip_high_threshold"),
        ("cispo", {"clip_low_threshold": 5.0}, "above clip_high_threshold"),
    ],
)
def test_bad_config_is_rejected(loss_fn, config, message):
    with pytest.raises(ValueError, match=message):
        resolve_loss_config(loss_fn, config)


def test_datum_inputs_fill_weights_and_validate():
    out = datum_loss_inputs("cross_entropy", {"target_tokens": [1, 2, 3]}, 3)
    assert out["target_tokens"].dtype == torch.int64
    assert out["weights"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="has length 2 but model_input has 3"):
        datum_loss_inputs("cross_entropy", {"target_tokens": [1, 2]}, 3)
    with pytest.raises(ValueError, match=r"needs loss_fn_inputs \['logprobs'\]"):
        datum_loss_inputs("ppo", {"target_tokens": [1], "advantages": [1.0]}, 1)
    with pytest.raises(ValueError, match="unknown loss_fn_inputs"):
        datum_loss_inputs("cross_entropy", {"target_tokens": [1], "mask": [1.0]}, 1)
    with pytest.raises(ValueError, match="NaN"):
        datum_loss_inputs("cross_entropy", {"target_tokens": [1], "weights": [math.nan]}, 1)


def test_loss_token_count():
    inputs = {"weights": torch.tensor([0.0, 1.0, 0.5]), "advantages": torch.tensor([0.0, 0, 2])}
    assert loss_token_count("cross_entropy", inputs) == 2
    assert loss_token_count("ppo", inputs) == 1


def test_target_logprobs_matches_log_softmax_in_fp32_and_chunks():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=gen) * 3
    targets = torch.randint(0, 50, (7,), generator=gen)
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(target_logprobs(logits, targets), want)
    torch.testing.assert_close(target_logprobs(logits, targets, block_rows=3), want)
    bf16 = target_logprobs(logits.bfloat16(), targets)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, want, atol=0.1, rtol=0.05)
    assert target_logprobs(logits[:0], targets[:0]).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [1, 3, 7, None])
def test_target_logprobs_gradient_matches_autograd(dtype, block_rows):
    """The hand-written backward against autograd through log_softmax, per-token upstream
    gradients of both signs (as the RL losses give), blocks that do not divide the rows."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(7, 50, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, 50, (7,), generator=gen)
    upstream = torch.randn(7, generator=gen)

    ours = logits.clone().requires_grad_()
    (target_logprobs(ours, targets, block_rows) * upstream).sum().backward()
    ref = logits.clone().requires_grad_()
    lp = torch.log_softmax(ref.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    (lp * upstream).sum().backward()

    assert ours.grad.dtype == dtype
    tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(ours.grad, ref.grad, **tol)


def test_gspo_uses_each_sequences_masked_mean_log_ratio() -> None:
    # Two datums of 3 tokens: datum 0 masks its last token out of the ratio, datum 1 is all in.
    q = torch.tensor([-1.0, -2.0, -1.5, -0.5, -1.0, -2.0])
    delta = torch.tensor([0.1, -0.3, 2.0, 0.05, 0.05, 0.05])  # lp - q
    lp = (q + delta).requires_grad_()
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    inputs = {"target_tokens": torch.zeros(6, dtype=torch.int64), "logprobs": q,
              "advantages": adv, "sequence_ratio_mask": mask, "weights": torch.ones(6)}
    cfg = resolve_loss_config("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    losses = datum_losses("gspo", lp, inputs, [3, 3], cfg)
    s0, s1 = (0.1 - 0.3) / 2, 0.05  # the masked means; datum 0's third token is left out
    r0, r1 = math.exp(s0), math.exp(s1)  # both inside [0.9, 1.1]: unclipped
    assert losses.tolist() == pytest.approx([-3 * r0, 3 * r1], rel=1e-5)
    losses.sum().backward()
    # Each token's gradient is its own: d/d lp_t of -r * A_t, with r = exp(s + lp_t - sg(lp_t)).
    want = [-r0, -r0, -r0, r1, r1, r1]
    assert lp.grad.tolist() == pytest.approx(want, rel=1e-5)


def test_gspo_clips_like_ppo_and_needs_its_mask() -> None:
    q = torch.tensor([-1.0, -1.0])
    lp = (q + 1.0).requires_grad_()  # sequence ratio e: above the clip
    inputs = {"target_tokens": torch.zeros(2, dtype=torch.int64), "logprobs": q,
              "advantages": torch.tensor([1.0, 1.0]), "sequence_ratio_mask": torch.ones(2),
              "weights": torch.ones(2)}
    loss = total("gspo", lp, inputs)
    assert loss.item() == pytest.approx(-2 * 1.2)  # min(e * A, 1.2 * A) per token
    loss.backward()
    assert lp.grad.tolist() == [0.0, 0.0]  # the clipped term carries no gradient
    with pytest.raises(ValueError, match="sequence_ratio_mask"):
        datum_loss_inputs("gspo", {"target_tokens": [0], "logprobs": [0.0],
                                   "advantages": [1.0]}, 1)
