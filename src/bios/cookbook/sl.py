"""The `sl` recipe: supervised fine-tuning on chat data.

The renderer applies the model's chat template and masks the prompt, so the loss is on the
assistant's tokens only. The data are answers about a made-up town (the model cannot know
them); the held-out set asks about the same facts in other words, so its loss falls only if
the model learned the facts, not the wording. Metric: held-out loss per answer token.

- `run_sync`: each step's forward_backward and optim_step are awaited before the next call.
- `run_async`: steps are queued `PIPELINE_DEPTH` ahead (the seeds' pipelined pattern), and
  the evaluations go in the same queue without stopping training. The server runs a run's
  requests in call order, so both styles compute exactly the same thing.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any

import bios
from bios import types
from bios.cookbook.datasets import chat_facts
from bios.cookbook.metrics import MetricsLog
from bios.cookbook.recipe import RecipeConfig, RecipeResult
from bios.cookbook.renderer import ChatRenderer

STEPS = 24
BATCH = 4
LEARNING_RATE = 5e-4
EVAL_EVERY = 8
PIPELINE_DEPTH = 4


def batches(renderer: ChatRenderer, seed: int, steps: int) -> list[list[types.Datum]]:
    """`steps` batches of `BATCH` conversations: the training set shuffled by `seed`, epoch
    after epoch (the same order in both styles)."""
    train, _ = chat_facts()
    data = [renderer.supervised_datum(c) for c in train]
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * BATCH:
        epoch = list(range(len(data)))
        rng.shuffle(epoch)
        order += epoch
    return [[data[i] for i in order[s * BATCH:(s + 1) * BATCH]] for s in range(steps)]


def held_out_data(renderer: ChatRenderer) -> list[types.Datum]:
    _, held_out = chat_facts()
    return [renderer.supervised_datum(c) for c in held_out]


def _result(style: str, log: MetricsLog, t0: float) -> RecipeResult:
    _, evals = log.series("eval_loss")
    return RecipeResult("sl", style, "eval loss", evals[0], evals[-1], time.monotonic() - t0,
                        log.records, log.plot(["train_loss", "eval_loss"]))


def run_sync(cfg: RecipeConfig) -> RecipeResult:
    """Supervised fine-tuning, one request at a time."""
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.rank,
                                                   seed=cfg.seed)
    renderer = ChatRenderer(training.get_tokenizer())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    held_out = held_out_data(renderer)
    log = MetricsLog("sl", "sync", cfg.log_dir, steps, echo=cfg.echo)

    # forward: the loss without gradients (per answer token, the prompt has weight 0).
    log.log(0, eval_loss=training.forward(held_out, "cross_entropy").result().loss)
    for step, batch in enumerate(batches(renderer, cfg.seed, steps), start=1):
        loss = training.forward_backward(batch, "cross_entropy").result().loss
        training.optim_step(adam).result()
        metrics: dict[str, float] = {"train_loss": loss}
        if step % EVAL_EVERY == 0 or step == steps:
            metrics["eval_loss"] = training.forward(held_out, "cross_entropy").result().loss
        log.log(step, **metrics)
    return _result("sync", log, t0)


async def run_async(cfg: RecipeConfig) -> RecipeResult:
    """Supervised fine-tuning with `PIPELINE_DEPTH` steps in flight."""
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training = await service.create_lora_training_client_async(
        base_model=cfg.base_model, rank=cfg.rank, seed=cfg.seed)
    renderer = ChatRenderer(await training.get_tokenizer_async())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    held_out = held_out_data(renderer)
    log = MetricsLog("sl", "async", cfg.log_dir, steps, echo=cfg.echo)

    # Each entry: (step, forward_backward future, optim future, eval future or None).
    pending: deque[tuple[int, Any, Any, Any]] = deque()
    first_eval = await training.forward_async(held_out, "cross_entropy")
    for step, batch in enumerate(batches(renderer, cfg.seed, steps), start=1):
        fb = await training.forward_backward_async(batch, "cross_entropy")
        opt = await training.optim_step_async(adam)
        ev = None
        if step % EVAL_EVERY == 0 or step == steps:
            ev = await training.forward_async(held_out, "cross_entropy")
        pending.append((step, fb, opt, ev))
        if step == 1:
            log.log(0, eval_loss=(await first_eval).loss)
        while len(pending) > PIPELINE_DEPTH or (step == steps and pending):
            done, fb, opt, ev = pending.popleft()
            metrics = {"train_loss": (await fb).loss}
            await opt
            if ev is not None:
                metrics["eval_loss"] = (await ev).loss
            log.log(done, **metrics)
    return _result("async", log, t0)
