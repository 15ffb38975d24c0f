"""AdamW against torch.optim.AdamW(fused=True) step for step, clipping, zero-gradient steps,
state I/O."""

from __future__ import annotations

import pytest
import torch

from bios.server.engine.optimizer import AdamW, adam_params, global_grad_norm

SHAPES = [(6, 4), (4, 9), (3,)]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def grads_for(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) * (step + 1) for s in SHAPES]


# Hyperparameters change every step, as Tinker's optim_step allows.
SCHEDULE = [
    {"learning_rate": 1e-2, "weight_decay": 0.1},
    {"learning_rate": 5e-3, "weight_decay": 0.1, "beta1": 0.8},
    {"learning_rate": 2e-2, "weight_decay": 0.0, "beta2": 0.99, "eps": 1e-8},
    {"learning_rate": 1e-3, "weight_decay": 0.5},
]


def test_matches_torch_adamw_step_for_step():
    ours, theirs = make_params(), make_params()
    opt = AdamW(ours)
    ref = torch.optim.AdamW(theirs, fused=True)
    for step, raw in enumerate(SCHEDULE):
        hp = adam_params(raw)
        for p, q, g in zip(ours, theirs, grads_for(step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        group = ref.param_groups[0]
        group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps)
        group["weight_decay"] = hp.weight_decay
        metrics = opt.step(ours, hp)
        ref.step()
        assert metrics["learning_rate"] == hp.learning_rate
        for p, q in zip(ours, theirs, strict=True):
            assert torch.equal(p, q)
        for i, q in enumerate(theirs):
            assert torch.equal(opt.exp_avg[i], ref.state[q]["exp_avg"])
            assert torch.equal(opt.exp_avg_sq[i], ref.state[q]["exp_avg_sq"])
    assert opt.step_count == len(SCHEDULE)


def test_grad_clipping_matches_clip_grad_norm_and_reports_the_unclipped_norm():
    ours, theirs = make_params(), make_params()
    opt = AdamW(ours)
    ref = torch.optim.AdamW(
        theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, fused=True
    )
    grads = grads_for(3)
    for p, q, g in zip(ours, theirs, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
    ref.step()
    metrics = opt.step(ours, adam_params({"learning_rate": 1e-2, "grad_clip_norm": 1.0}))
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-6)
    assert metrics["grad_norm"] > 1.0  # so the clip really applied
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # A clip norm above the gradient norm changes nothing.
    a, b = make_params(), make_params()
    for p, q, g in zip(a, b, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    AdamW(a).step(a, adam_params({"grad_clip_norm": 1e6}))
    AdamW(b).step(b, adam_params({}))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_step_without_gradients_acts_like_zero_gradients():
    ours, theirs = make_params(), make_params()
    opt = AdamW(ours)
    ref = torch.optim.AdamW(
        theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.1, fused=True
    )
    hp = adam_params({"learning_rate": 1e-2, "weight_decay": 0.1})
    for step in range(3):  # one real gradient, then two steps with nothing accumulated
        for p, q, g in zip(ours, theirs, grads_for(step), strict=True):
            p.grad = g.clone() if step == 0 else None
            q.grad = g.clone() if step == 0 else torch.zeros_like(g)
        metrics = opt.step(ours, hp)
        ref.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    assert metrics["grad_norm"] == 0.0


def test_non_finite_gradient_is_refused_before_any_change():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = AdamW(params)
    params[0].grad = torch.full(SHAPES[0], float("inf"))
    with pytest.raises(ValueError, match="gradient norm is inf"):
        opt.step(params, adam_params({}))
    assert opt.step_count == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_state_round_trip_continues_identically():
    a, b = make_params(), make_params()
    opt_a, opt_b = AdamW(a), AdamW(b)
    hp = adam_params(SCHEDULE[0])
    for step in range(2):
        for p, q, g in zip(a, b, grads_for(step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step(a, hp)
        opt_b.step(b, hp)
    state = {k: v.clone() for k, v in opt_b.state_tensors().items()}
    resumed = AdamW.from_state_tensors(state, b)
    assert resumed.step_count == 2
    for p, q, g in zip(a, b, grads_for(5), strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    opt_a.step(a, hp)
    resumed.step(b, hp)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_state_that_does_not_fit_is_rejected():
    params = make_params()
    state = AdamW(params).state_tensors()
    with pytest.raises(ValueError, match="does not fit this adapter"):
        AdamW.from_state_tensors(state, params[:2])
    bad = dict(state, **{"exp_avg.0": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"exp_avg\.0 has shape \(2, 2\)"):
        AdamW.from_state_tensors(bad, params)


def test_adam_params_defaults_and_validation():
    hp = adam_params({})
    assert (hp.learning_rate, hp.beta1, hp.beta2, hp.eps) == (1e-4, 0.9, 0.95, 1e-12)
    assert (hp.weight_decay, hp.grad_clip_norm) == (0.0, 0.0)
    with pytest.raises(ValueError, match="lr"):
        adam_params({"lr": 1e-3})
    with pytest.raises(ValueError, match="beta1"):
        adam_params({"beta1": 1.0})


def test_global_grad_norm():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0]])]
    assert float(global_grad_norm(grads)) == pytest.approx(5.0)
    assert float(global_grad_norm([])) == 0.0


def test_explicit_gradients_equal_dot_grad():
    """Gradients may be passed alongside the parameters (the adapter's per-matrix views of its
    packed gradient): the same update as from `.grad`, None as zero, a count mismatch refused."""
    a, b = make_params(), make_params()
    hp = adam_params(SCHEDULE[0])
    grads = grads_for(0)
    for p, g in zip(a, grads, strict=True):
        p.grad = g.clone()
    AdamW(a).step(a, hp)
    with torch.no_grad():
        detached = [p.detach() for p in b]  # views, no .grad of their own
    AdamW(detached).step(detached, hp, [g.clone() for g in grads[:-1]] + [None])
    assert all(torch.equal(p, q) for p, q in zip(a[:-1], b[:-1], strict=True))
    assert not torch.equal(a[-1], b[-1])  # a zero gradient moved it by weight decay alone
    with pytest.raises(RuntimeError, match="2 gradients for 3 parameters"):
        AdamW(detached).step(detached, hp, grads[:2])
