"""The `eval` recipe, and the evaluation the other recipes use for their before/after figures.

Evaluation samples each held-out problem greedily and scores the reply with code (the
arithmetic reward and exact match). The recipe compares two ways of asking the same base
model: zero-shot ("before") and with three solved examples in the prompt ("after"), which
teaches what an evaluation measures: the prompt is part of the model.

- `run_sync`: one request at a time, each awaited before the next.
- `run_async`: every request submitted at once; the server batches them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import bios
from bios import types
from bios.cookbook.datasets import ArithmeticProblem, arithmetic_problems, few_shot_messages
from bios.cookbook.metrics import MetricsLog
from bios.cookbook.recipe import RecipeConfig, RecipeResult
from bios.cookbook.renderer import ChatRenderer, Message
from bios.cookbook.rewards import arithmetic_reward, exact_match
from bios.cookbook.rollouts import sampling_params

EVAL_PROBLEMS = 24
MAX_TOKENS = 8
Prompter = Callable[[ArithmeticProblem], list[Message]]


def zero_shot(problem: ArithmeticProblem) -> list[Message]:
    return problem.messages()


def _scores(renderer: ChatRenderer, problems: list[ArithmeticProblem],
            results: list[types.SampleResponse]) -> dict[str, float]:
    replies = [renderer.decode(r.sequences[0].tokens) for r in results]
    n = len(problems)
    return {"reward": sum(arithmetic_reward(t, p.answer) for t, p in zip(replies, problems,
                                                                          strict=True)) / n,
            "exact_match": sum(exact_match(t, p.answer) for t, p in zip(replies, problems,
                                                                          strict=True)) / n}


def evaluate_sync(sampler: bios.SamplingClient, renderer: ChatRenderer,
                  problems: list[ArithmeticProblem], prompter: Prompter = zero_shot
                  ) -> dict[str, float]:
    """Greedy replies to `problems`, one request at a time; mean reward and exact match."""
    params = sampling_params(MAX_TOKENS, renderer.end_of_turn, seed=None, temperature=0.0)
    results = []
    for p in problems:
        prompt = types.ModelInput.from_ints(renderer.prompt_tokens(prompter(p)))
        results.append(sampler.sample(prompt, 1, params).result())
    return _scores(renderer, problems, results)


async def evaluate_async(sampler: bios.SamplingClient, renderer: ChatRenderer,
                         problems: list[ArithmeticProblem], prompter: Prompter = zero_shot
                         ) -> dict[str, float]:
    """`evaluate_sync`, with every request in flight at once."""
    params = sampling_params(MAX_TOKENS, renderer.end_of_turn, seed=None, temperature=0.0)
    futures = [await sampler.sample_async(
        types.ModelInput.from_ints(renderer.prompt_tokens(prompter(p))), 1, params)
        for p in problems]
    results = list(await asyncio.gather(*futures))
    return _scores(renderer, problems, results)


def run_sync(cfg: RecipeConfig) -> RecipeResult:
    """Score the base model zero-shot, then few-shot, on held-out arithmetic (exact match)."""
    t0 = time.monotonic()
    service = bios.ServiceClient(base_url=cfg.base_url)
    sampler = service.create_sampling_client(base_model=cfg.base_model)
    renderer = ChatRenderer(sampler.get_tokenizer())
    problems = arithmetic_problems(cfg.steps or EVAL_PROBLEMS, cfg.seed, held_out=True)
    log = MetricsLog("eval", "sync", cfg.log_dir, total_steps=1, echo=cfg.echo)

    before = evaluate_sync(sampler, renderer, problems, zero_shot)
    log.log(0, shots=0, **before)
    after = evaluate_sync(sampler, renderer, problems, few_shot_messages)
    log.log(1, shots=3, **after)
    return RecipeResult("eval", "sync", "exact match", before["exact_match"],
                        after["exact_match"], time.monotonic() - t0, log.records,
                        log.plot(["exact_match", "reward"]))


async def run_async(cfg: RecipeConfig) -> RecipeResult:
    """`run_sync` with every sampling request of both prompt styles in flight at once."""
    t0 = time.monotonic()
    service = bios.ServiceClient(base_url=cfg.base_url)
    sampler = await service.create_sampling_client_async(base_model=cfg.base_model)
    renderer = ChatRenderer(await sampler.get_tokenizer_async())
    problems = arithmetic_problems(cfg.steps or EVAL_PROBLEMS, cfg.seed, held_out=True)
    log = MetricsLog("eval", "async", cfg.log_dir, total_steps=1, echo=cfg.echo)

    before, after = await asyncio.gather(
        evaluate_async(sampler, renderer, problems, zero_shot),
        evaluate_async(sampler, renderer, problems, few_shot_messages))
    log.log(0, shots=0, **before)
    log.log(1, shots=3, **after)
    return RecipeResult("eval", "async", "exact match", before["exact_match"],
                        after["exact_match"], time.monotonic() - t0, log.records,
                        log.plot(["exact_match", "reward"]))
