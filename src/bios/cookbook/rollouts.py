"""Pieces of the sampling recipes (`rl`, `distill`, `eval`): sampling settings and rollouts
turned into training data."""

from __future__ import annotations

from bios import types


def sampling_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt `index` at `step`: the same in the sync and async styles, so
    they draw the same samples from the same weights."""
    return (seed * 1_000_003 + step * 1_009 + index) % (2**31)


def sampling_params(max_tokens: int, stop_token: int, seed: int | None,
                    temperature: float = 1.0) -> types.SamplingParams:
    """Sampling settings that stop at the end of the assistant's turn."""
    return types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                stop=[stop_token])


def rollout_datum(prompt: list[int], sequence: types.SampledSequence,
                  advantages: list[float]) -> types.Datum:
    """An RL `Datum` for one sampled reply: the loss is on the reply's tokens only.

    Args:
        prompt: the prompt tokens the reply was sampled from.
        sequence: the sample (its `tokens` and the sampler's `logprobs` of them).
        advantages: one per reply token (a sequence-level advantage repeated, or per-token).
    """
    from bios.cookbook.renderer import sequence_datum

    reply = list(sequence.tokens)
    if sequence.logprobs is None or len(sequence.logprobs) != len(reply):
        raise ValueError("the sampler returned no logprob per sampled token")
    if len(advantages) != len(reply):
        raise ValueError(f"{len(advantages)} advantages for {len(reply)} reply tokens")
    pad = [0.0] * len(prompt)
    return sequence_datum(prompt + reply, logprobs=pad + list(sequence.logprobs),
                          advantages=pad + list(advantages))
