"""The `rl` recipe: reinforcement learning with a verifiable reward (tiny arithmetic).

Each step samples a group of replies to each of a batch of problems, scores every reply with
code (`rewards.arithmetic_reward`: half for the strict format, half for the right number),
turns each group's rewards into group-normalised advantages, and trains on the replies with
the `importance_sampling` (or `ppo`) loss, whose ratio is against the sampler's logprobs.
Held-out problems are evaluated greedily before and after.

- `run_sync`: on-policy; every step snapshots the weights, samples one problem at a time,
  then trains. The loop is the algorithm.
- `run_async`: the next batch is sampled while the current one trains, so the samples are
  up to `max_off_policy` optimizer steps old (default 1; the importance ratio corrects for it,
  and the gap is logged as `off_policy_steps`). With `max_off_policy=0` it runs the same
  computation as `run_sync`, only with each batch's requests in flight at once.
"""

from __future__ import annotations

import asyncio
import time

import bios
from bios import types
from bios.cookbook.advantages import group_advantages
from bios.cookbook.datasets import ArithmeticProblem, arithmetic_problems
from bios.cookbook.evaluation import evaluate_async, evaluate_sync
from bios.cookbook.metrics import MetricsLog
from bios.cookbook.recipe import RecipeConfig, RecipeResult
from bios.cookbook.renderer import ChatRenderer
from bios.cookbook.rewards import arithmetic_reward
from bios.cookbook.rollouts import rollout_datum, sampling_params, sampling_seed

STEPS = 16
BATCH = 4          # problems per step
GROUP = 8          # samples per problem
MAX_TOKENS = 8
TEMPERATURE = 0.7  # at 1.0 SmolLM2-135M's replies are mostly noise: too little reward signal
LEARNING_RATE = 5e-4
EVAL_PROBLEMS = 16
LOSSES = ("importance_sampling", "ppo")


def step_problems(seed: int, step: int) -> list[ArithmeticProblem]:
    """The problems of one step (the same in both styles)."""
    return arithmetic_problems(BATCH, seed * 10_007 + step)


def group_data(renderer: ChatRenderer, prompt: list[int], problem: ArithmeticProblem,
               result: types.SampleResponse) -> tuple[list[types.Datum], list[float]]:
    """Score one group of samples; (training data of the samples that carry signal, rewards)."""
    rewards = [arithmetic_reward(renderer.decode(s.tokens), problem.answer)
               for s in result.sequences]
    data = [rollout_datum(prompt, s, [adv] * len(s.tokens))
            for s, adv in zip(result.sequences, group_advantages(rewards), strict=True)
            if adv != 0.0]  # a zero advantage has zero gradient: skip the compute
    return data, rewards


def _check(cfg: RecipeConfig) -> None:
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.max_off_policy not in (0, 1):
        raise ValueError(f"max_off_policy must be 0 or 1, got {cfg.max_off_policy}")


def _result(style: str, log: MetricsLog, before: dict[str, float], after: dict[str, float],
            t0: float) -> RecipeResult:
    return RecipeResult("rl", style, "reward", before["reward"], after["reward"],
                        time.monotonic() - t0, log.records,
                        log.plot(["reward", "eval_reward", "loss"]))


def run_sync(cfg: RecipeConfig) -> RecipeResult:
    """On-policy RL, one request at a time."""
    _check(cfg)
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.rank,
                                                   seed=cfg.seed)
    renderer = ChatRenderer(training.get_tokenizer())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    held_out = arithmetic_problems(EVAL_PROBLEMS, cfg.seed, held_out=True)
    log = MetricsLog("rl", "sync", cfg.log_dir, steps, echo=cfg.echo)

    before = evaluate_sync(training.save_weights_and_get_sampling_client(), renderer, held_out)
    log.log(-1, eval_reward=before["reward"], eval_exact_match=before["exact_match"])
    for step in range(steps):
        sampler = training.save_weights_and_get_sampling_client()  # the current policy
        data: list[types.Datum] = []
        rewards: list[float] = []
        for i, problem in enumerate(step_problems(cfg.seed, step)):
            prompt = renderer.prompt_tokens(problem.messages())
            params = sampling_params(MAX_TOKENS, renderer.end_of_turn,
                                     sampling_seed(cfg.seed, step, i), TEMPERATURE)
            result = sampler.sample(types.ModelInput.from_ints(prompt), GROUP, params).result()
            group, group_rewards = group_data(renderer, prompt, problem, result)
            data += group
            rewards += group_rewards
        metrics = {"reward": sum(rewards) / len(rewards), "trained": len(data),
                   "off_policy_steps": 0}
        if data:  # else every group tied: nothing to learn this step
            metrics["loss"] = training.forward_backward(data, cfg.loss).result().loss
            training.optim_step(adam).result()
        log.log(step, **metrics)
    after = evaluate_sync(training.save_weights_and_get_sampling_client(), renderer, held_out)
    log.log(steps, eval_reward=after["reward"], eval_exact_match=after["exact_match"])
    return _result("sync", log, before, after, t0)


async def _rollouts(sampler: bios.SamplingClient, renderer: ChatRenderer, seed: int,
                    step: int) -> tuple[list[types.Datum], list[float]]:
    """Sample and score one step's batch, every problem's request in flight at once."""
    problems = step_problems(seed, step)
    prompts = [renderer.prompt_tokens(p.messages()) for p in problems]
    futures = [await sampler.sample_async(
        types.ModelInput.from_ints(prompt), GROUP,
        sampling_params(MAX_TOKENS, renderer.end_of_turn, sampling_seed(seed, step, i),
                        TEMPERATURE))
        for i, prompt in enumerate(prompts)]
    data: list[types.Datum] = []
    rewards: list[float] = []
    for problem, prompt, result in zip(problems, prompts, await asyncio.gather(*futures),
                                       strict=True):
        group, group_rewards = group_data(renderer, prompt, problem, result)
        data += group
        rewards += group_rewards
    return data, rewards


async def run_async(cfg: RecipeConfig) -> RecipeResult:
    """RL with the next batch sampled while the current one trains (bounded off-policy gap)."""
    _check(cfg)
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training = await service.create_lora_training_client_async(
        base_model=cfg.base_model, rank=cfg.rank, seed=cfg.seed)
    renderer = ChatRenderer(await training.get_tokenizer_async())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    held_out = arithmetic_problems(EVAL_PROBLEMS, cfg.seed, held_out=True)
    log = MetricsLog("rl", "async", cfg.log_dir, steps, echo=cfg.echo)

    base = await training.save_weights_and_get_sampling_client_async()
    evaluation = asyncio.create_task(evaluate_async(base, renderer, held_out))
    # Batch 0 is sampled from the initial weights while the evaluation runs.
    next_batch = asyncio.create_task(_rollouts(base, renderer, cfg.seed, 0))
    sampled_after = 0  # how many optimizer steps the weights of `next_batch` had seen
    optim_steps = 0
    before = await evaluation
    log.log(-1, eval_reward=before["reward"], eval_exact_match=before["exact_match"])
    for step in range(steps):
        data, rewards = await next_batch
        gap = optim_steps - sampled_after
        fb = opt = None
        if cfg.max_off_policy == 0 and data:  # train first: the next batch is on-policy
            fb = await training.forward_backward_async(data, cfg.loss)
            opt = await training.optim_step_async(adam)
            optim_steps += 1
        if step + 1 < steps:
            # The snapshot is ordered after every optim_step submitted so far, so with
            # max_off_policy=1 the next batch samples while this batch trains.
            sampler = await training.save_weights_and_get_sampling_client_async()
            sampled_after = optim_steps
            next_batch = asyncio.create_task(_rollouts(sampler, renderer, cfg.seed, step + 1))
        if cfg.max_off_policy == 1 and data:
            fb = await training.forward_backward_async(data, cfg.loss)
            opt = await training.optim_step_async(adam)
            optim_steps += 1
        metrics = {"reward": sum(rewards) / len(rewards), "trained": len(data),
                   "off_policy_steps": gap}
        if fb is not None and opt is not None:
            metrics["loss"] = (await fb).loss
            await opt
        log.log(step, **metrics)
    final = await training.save_weights_and_get_sampling_client_async()
    after = await evaluate_async(final, renderer, held_out)
    log.log(steps, eval_reward=after["reward"], eval_exact_match=after["exact_match"])
    return _result("async", log, before, after, t0)
