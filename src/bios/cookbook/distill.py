"""The `distill` recipe: on-policy distillation with per-token reverse KL as the advantage.

The student (a LoRA on the base model) answers arithmetic questions asked plainly. The
teacher is a model Bios serves (by default the same base model) given three solved examples
in its prompt, so it answers in the strict format: this is context distillation, moving what
the teacher does with a long prompt into the student's weights for the short one. Each step
the student samples, the teacher scores every sampled token (`compute_logprobs` of its own
prompt + the student's reply), and the advantage of each token is
log p_teacher - log p_student (`advantages.reverse_kl_advantages`), trained with the
`importance_sampling` loss. Metric: the mean per-token reverse KL on held-out questions.

- `run_sync`: sample one question, score it, next question; then train.
- `run_async`: every sample and teacher score of a batch in flight at once, and the next batch
  sampled while this one trains (samples up to `max_off_policy` optimizer steps old).
"""

from __future__ import annotations

import asyncio
import time

import bios
from bios import types
from bios.cookbook.advantages import reverse_kl_advantages
from bios.cookbook.datasets import ArithmeticProblem, arithmetic_problems, few_shot_messages
from bios.cookbook.metrics import MetricsLog
from bios.cookbook.recipe import RecipeConfig, RecipeResult
from bios.cookbook.renderer import ChatRenderer
from bios.cookbook.rewards import arithmetic_reward
from bios.cookbook.rollouts import rollout_datum, sampling_params, sampling_seed

STEPS = 12
BATCH = 8
GROUP = 2
MAX_TOKENS = 8
LEARNING_RATE = 2e-4
EVAL_PROBLEMS = 8
EVAL_STEP = 1_000_000  # the sampling-seed "step" of the held-out evaluation


def step_problems(seed: int, step: int) -> list[ArithmeticProblem]:
    return arithmetic_problems(BATCH, seed * 10_007 + step + 1)


class Rollout:
    """One student sample with the teacher's score of it."""

    def __init__(self, renderer: ChatRenderer, problem: ArithmeticProblem, prompt: list[int],
                 sequence: types.SampledSequence, teacher_prompt_logprobs: list[float | None]):
        reply = list(sequence.tokens)
        teacher = [float(x) if x is not None else 0.0
                   for x in teacher_prompt_logprobs[-len(reply):]]
        student = list(sequence.logprobs or [])
        self.advantages = reverse_kl_advantages(student, teacher)
        self.kl = sum(s - t for s, t in zip(student, teacher, strict=True))
        self.tokens = len(reply)
        self.reward = arithmetic_reward(renderer.decode(reply), problem.answer)
        self.datum = rollout_datum(prompt, sequence, self.advantages)


def teacher_input(renderer: ChatRenderer, problem: ArithmeticProblem,
                  sequence: types.SampledSequence) -> types.ModelInput:
    """The teacher's view of a student reply: its own few-shot prompt, then the reply."""
    return types.ModelInput.from_ints(renderer.prompt_tokens(few_shot_messages(problem))
                                      + list(sequence.tokens))


def summarize(rollouts: list[Rollout]) -> dict[str, float]:
    tokens = sum(r.tokens for r in rollouts)
    return {"reverse_kl": sum(r.kl for r in rollouts) / tokens,
            "reward": sum(r.reward for r in rollouts) / len(rollouts)}


def _result(style: str, log: MetricsLog, t0: float) -> RecipeResult:
    _, kl = log.series("eval_reverse_kl")
    return RecipeResult("distill", style, "reverse KL", kl[0], kl[-1], time.monotonic() - t0,
                        log.records, log.plot(["reverse_kl", "eval_reverse_kl", "reward"]))


def _params(renderer: ChatRenderer, seed: int, step: int, i: int) -> types.SamplingParams:
    return sampling_params(MAX_TOKENS, renderer.end_of_turn, sampling_seed(seed, step, i))


def rollouts_sync(student: bios.SamplingClient, teacher: bios.SamplingClient,
                  renderer: ChatRenderer, problems: list[ArithmeticProblem], seed: int,
                  step: int) -> list[Rollout]:
    out = []
    for i, problem in enumerate(problems):
        prompt = renderer.prompt_tokens(problem.messages())
        result = student.sample(types.ModelInput.from_ints(prompt), GROUP,
                                _params(renderer, seed, step, i)).result()
        for seq in result.sequences:
            scored = teacher.compute_logprobs(teacher_input(renderer, problem, seq)).result()
            out.append(Rollout(renderer, problem, prompt, seq, scored))
    return out


def run_sync(cfg: RecipeConfig) -> RecipeResult:
    """On-policy distillation, one request at a time."""
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.rank,
                                                   seed=cfg.seed)
    teacher = service.create_sampling_client(base_model=cfg.base_model)
    renderer = ChatRenderer(training.get_tokenizer())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    held_out = arithmetic_problems(EVAL_PROBLEMS, cfg.seed, held_out=True)
    log = MetricsLog("distill", "sync", cfg.log_dir, steps, echo=cfg.echo)

    def evaluate() -> dict[str, float]:
        student = training.save_weights_and_get_sampling_client()
        m = summarize(rollouts_sync(student, teacher, renderer, held_out, cfg.seed, EVAL_STEP))
        return {"eval_reverse_kl": m["reverse_kl"], "eval_reward": m["reward"]}

    log.log(-1, **evaluate())
    for step in range(steps):
        student = training.save_weights_and_get_sampling_client()
        rollouts = rollouts_sync(student, teacher, renderer, step_problems(cfg.seed, step),
                                 cfg.seed, step)
        out = training.forward_backward([r.datum for r in rollouts],
                                        "importance_sampling").result()
        training.optim_step(adam).result()
        log.log(step, **summarize(rollouts), loss=out.loss, off_policy_steps=0)
    log.log(steps, **evaluate())
    return _result("sync", log, t0)


async def rollouts_async(student: bios.SamplingClient, teacher: bios.SamplingClient,
                         renderer: ChatRenderer, problems: list[ArithmeticProblem], seed: int,
                         step: int) -> list[Rollout]:
    async def one(i: int, problem: ArithmeticProblem) -> list[Rollout]:
        prompt = renderer.prompt_tokens(problem.messages())
        result = await (await student.sample_async(types.ModelInput.from_ints(prompt), GROUP,
                                                   _params(renderer, seed, step, i)))
        scores = await asyncio.gather(*[
            await teacher.compute_logprobs_async(teacher_input(renderer, problem, seq))
            for seq in result.sequences])
        return [Rollout(renderer, problem, prompt, seq, s)
                for seq, s in zip(result.sequences, scores, strict=True)]

    groups = await asyncio.gather(*[one(i, p) for i, p in enumerate(problems)])
    return [r for g in groups for r in g]


async def run_async(cfg: RecipeConfig) -> RecipeResult:
    """On-policy distillation with requests overlapped and the next batch sampled early."""
    if cfg.max_off_policy not in (0, 1):
        raise ValueError(f"max_off_policy must be 0 or 1, got {cfg.max_off_policy}")
    t0 = time.monotonic()
    steps = cfg.steps or STEPS
    service = bios.ServiceClient(base_url=cfg.base_url)
    training, teacher = await asyncio.gather(
        service.create_lora_training_client_async(base_model=cfg.base_model, rank=cfg.rank,
                                                  seed=cfg.seed),
        service.create_sampling_client_async(base_model=cfg.base_model))
    renderer = ChatRenderer(await training.get_tokenizer_async())
    adam = types.AdamParams(learning_rate=cfg.learning_rate or LEARNING_RATE)
    held_out = arithmetic_problems(EVAL_PROBLEMS, cfg.seed, held_out=True)
    log = MetricsLog("distill", "async", cfg.log_dir, steps, echo=cfg.echo)

    async def evaluate(student: bios.SamplingClient) -> dict[str, float]:
        m = summarize(await rollouts_async(student, teacher, renderer, held_out, cfg.seed,
                                           EVAL_STEP))
        return {"eval_reverse_kl": m["reverse_kl"], "eval_reward": m["reward"]}

    def batch_task(student: bios.SamplingClient, step: int) -> asyncio.Task[list[Rollout]]:
        return asyncio.create_task(rollouts_async(
            student, teacher, renderer, step_problems(cfg.seed, step), cfg.seed, step))

    base = await training.save_weights_and_get_sampling_client_async()
    evaluation = asyncio.create_task(evaluate(base))
    next_batch = batch_task(base, 0)
    log.log(-1, **await evaluation)
    sampled_after = optim_steps = 0
    for step in range(steps):
        rollouts = await next_batch
        gap = optim_steps - sampled_after
        fb = opt = None
        if cfg.max_off_policy == 0:
            fb = await training.forward_backward_async([r.datum for r in rollouts],
                                                       "importance_sampling")
            opt = await training.optim_step_async(adam)
            optim_steps += 1
        if step + 1 < steps:
            student = await training.save_weights_and_get_sampling_client_async()
            sampled_after = optim_steps
            next_batch = batch_task(student, step + 1)
        if fb is None:
            fb = await training.forward_backward_async([r.datum for r in rollouts],
                                                       "importance_sampling")
            opt = await training.optim_step_async(adam)
            optim_steps += 1
        loss = (await fb).loss
        await opt
        log.log(step, **summarize(rollouts), loss=loss, off_policy_steps=gap)
    log.log(steps, **await evaluate(await training.save_weights_and_get_sampling_client_async()))
    return _result("async", log, t0)
