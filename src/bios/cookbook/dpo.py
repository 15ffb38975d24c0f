"""The `dpo` recipe: preference learning (DPO) against a frozen reference.

Pairs of replies to the same question, the true fact chosen and a wrong value rejected. The
reference is the base model: its logprobs of each reply come once, up front, from a base-model
sampler (`compute_logprobs`). Each step, `forward_backward_custom` gets the policy's logprobs,
our torch loss (`preference.dpo_loss`) turns them into the DPO loss, and the SDK sends its
gradient back as per-token weights. Metric: held-out pair accuracy (the share of held-out pairs
whose implicit reward, beta * (log pi - log ref), prefers the chosen reply); held-out DPO loss is
logged too. Needs torch on the client (for the custom loss).

- `run_sync`: reference logprobs one request at a time; each step waits for its results.
- `run_async`: reference logprobs all at once; each step's backward and optim_step are left in
  flight while the next step's forward is submitted behind them (the server runs them in
  order, so the numbers are the same as the sync version's).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import bios
from bios import types
from bios.cookbook.datasets import PreferencePair, preference_pairs
from bios.cookbook.metrics import MetricsLog
from bios.cookbook.preference import dpo_loss_fn
from bios.cookbook.recipe import RecipeConfig, RecipeResult
from bios.cookbook.renderer import ChatRenderer

STEPS = 12
BATCH = 4          # pairs per step
BETA = 0.1
LEARNING_RATE = 3e-4
EVAL_EVERY = 4


def pair_data(renderer: ChatRenderer, pairs: list[PreferencePair]) -> list[types.Datum]:
    """[chosen_0, rejected_0, chosen_1, ...], each weighted on its reply only."""
    data = []
    for p in pairs:
        for reply in (p.chosen, p.rejected):
            data.append(renderer.supervised_datum(
                [*p.prompt, {"role": "assistant", "content": reply}]))
    return data


def reply_logprob(prompt_logprobs: list[float | None], datum: types.Datum) -> float:
    """Sum of a reply's token logprobs from `compute_logprobs` of the whole sequence."""
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    # compute_logprobs gives one entry per token (the first is None); targets are tokens[1:].
    return float(sum(lp * w for lp, w in zip(prompt_logprobs[1:], weights, strict=True)
                     if lp is not None))


def full_tokens(datum: types.Datum) -> types.ModelInput:
    """The whole sequence of a `Datum` (its input plus the last target token)."""
    last = int(datum.loss_fn_inputs["target_tokens"].to_numpy()[-1])
    return types.ModelInput.from_ints([*datum.model_input.to_ints(), last])


def step_pairs(pairs: list[PreferencePair], seed: int, steps: int) -> list[list[int]]:
    """Indices of each step's pairs: the training set shuffled per epoch by `seed`."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * BATCH:
        epoch = list(range(len(pairs)))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * BATCH:(s + 1) * BATCH] for s in range(steps)]


def held_out_metrics(forward: types.ForwardBackwardOutput, data: list[types.Datum],
                     ref: list[tuple[float, float]]) -> dict[str, float]:
    """Held-out DPO loss and pair accuracy from a forward pass over the held-out pairs."""
    import torch

    sums = [float((out["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum())
            for out, d in zip(forward.loss_fn_outputs, data, strict=True)]
    from bios.cookbook.preference import dpo_loss

    r = torch.tensor(ref)
    _, metrics = dpo_loss(torch.tensor(sums[0::2]), torch.tensor(sums[1::2]), r[:, 0], r[:, 1],
                          BETA)
    return {"eval_loss": metrics["dpo_loss"], "eval_accuracy": metrics["accuracy"]}


def _result(style: str, log: MetricsLog, t0: float) -> RecipeResult:
    _, acc = log.series("eval_accuracy")
    return RecipeResult("dpo", style, "held-out pair accuracy", acc[0], acc[-1],
                        time.monotonic() - t0, log.records,
                        log.plot(["dpo_loss", "eval_loss", "eval_accuracy"]))


def _pairs_ref(ref_lp: list[float]) -> list[tuple[float, float]]:
    return list(zip(ref_lp[0::2], ref_lp[1::2], strict=True))


def run_sync(cfg: RecipeConfig) -> RecipeResult:
    """DPO, one request at a time."""
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.rank,
                                                   seed=cfg.seed)
    reference = service.create_sampling_client(base_model=cfg.base_model)  # frozen
    renderer = ChatRenderer(training.get_tokenizer())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    train, held_out = preference_pairs()
    train_data, eval_data = pair_data(renderer, train), pair_data(renderer, held_out)
    log = MetricsLog("dpo", "sync", cfg.log_dir, steps, echo=cfg.echo)

    ref_train = _pairs_ref([reply_logprob(reference.compute_logprobs(full_tokens(d)).result(), d)
                            for d in train_data])
    ref_eval = _pairs_ref([reply_logprob(reference.compute_logprobs(full_tokens(d)).result(), d)
                           for d in eval_data])
    log.log(0, **held_out_metrics(training.forward(eval_data, "cross_entropy").result(),
                                  eval_data, ref_eval))
    for step, idx in enumerate(step_pairs(train, cfg.seed, steps), start=1):
        data = [train_data[2 * i + k] for i in idx for k in (0, 1)]
        loss_fn = dpo_loss_fn([ref_train[i] for i in idx], BETA)
        out = training.forward_backward_custom(data, loss_fn).result()
        training.optim_step(adam).result()
        metrics = {"dpo_loss": out.metrics["dpo_loss"], "accuracy": out.metrics["accuracy"]}
        if step % EVAL_EVERY == 0 or step == steps:
            metrics.update(held_out_metrics(
                training.forward(eval_data, "cross_entropy").result(), eval_data, ref_eval))
        log.log(step, **metrics)
    return _result("sync", log, t0)


async def run_async(cfg: RecipeConfig) -> RecipeResult:
    """DPO with the reference logprobs concurrent and each step's tail left in flight."""
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training, reference = await asyncio.gather(
        service.create_lora_training_client_async(base_model=cfg.base_model, rank=cfg.rank,
                                                  seed=cfg.seed),
        service.create_sampling_client_async(base_model=cfg.base_model))
    renderer = ChatRenderer(await training.get_tokenizer_async())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    train, held_out = preference_pairs()
    train_data, eval_data = pair_data(renderer, train), pair_data(renderer, held_out)
    log = MetricsLog("dpo", "async", cfg.log_dir, steps, echo=cfg.echo)

    async def ref_logprobs(data: list[types.Datum]) -> list[tuple[float, float]]:
        futures = [await reference.compute_logprobs_async(full_tokens(d)) for d in data]
        results = await asyncio.gather(*futures)
        return _pairs_ref([reply_logprob(r, d) for r, d in zip(results, data, strict=True)])

    first_eval = await training.forward_async(eval_data, "cross_entropy")
    ref_train, ref_eval = await asyncio.gather(ref_logprobs(train_data), ref_logprobs(eval_data))
    log.log(0, **held_out_metrics(await first_eval, eval_data, ref_eval))
    previous: tuple[int, Any, Any, Any] | None = None
    for step, idx in enumerate(step_pairs(train, cfg.seed, steps), start=1):
        data = [train_data[2 * i + k] for i in idx for k in (0, 1)]
        # Awaits this step's forward (queued behind the last optim_step), submits the backward.
        fb = await training.forward_backward_custom_async(
            data, dpo_loss_fn([ref_train[i] for i in idx], BETA))
        opt = await training.optim_step_async(adam)
        ev = None
        if step % EVAL_EVERY == 0 or step == steps:
            ev = await training.forward_async(eval_data, "cross_entropy")
        if previous is not None:
            await _log_step(log, previous, eval_data, ref_eval)
        previous = (step, fb, opt, ev)
    if previous is not None:
        await _log_step(log, previous, eval_data, ref_eval)
    return _result("async", log, t0)


async def _log_step(log: MetricsLog, entry: tuple[int, Any, Any, Any],
                    eval_data: list[types.Datum], ref_eval: list[tuple[float, float]]) -> None:
    step, fb, opt, ev = entry
    out = await fb
    await opt
    metrics = {"dpo_loss": out.metrics["dpo_loss"], "accuracy": out.metrics["accuracy"]}
    if ev is not None:
        metrics.update(held_out_metrics(await ev, eval_data, ref_eval))
    log.log(step, **metrics)
