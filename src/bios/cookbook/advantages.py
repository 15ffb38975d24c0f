"""RL advantages: group-normalised rewards, and per-token reverse KL for distillation."""

from __future__ import annotations

import math
from collections.abc import Sequence


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """Advantages of one group of samples of the same prompt: (r - mean) / (std + eps).

    The std is the population std of the group. A group whose rewards are all equal teaches
    nothing and gets zeros (not 0/eps noise).
    """
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    if std < eps:
        return [0.0] * n
    return [(r - mean) / (std + eps) for r in rewards]


def reverse_kl_advantages(student_logprobs: Sequence[float],
                          teacher_logprobs: Sequence[float]) -> list[float]:
    """Per-token advantage of on-policy distillation: -(log p_student - log p_teacher).

    Sampled from the student, log p_student - log p_teacher is a one-sample estimate of the
    per-token reverse KL(student || teacher); using its negative as the advantage moves the
    student toward tokens the teacher finds likely.
    """
    if len(student_logprobs) != len(teacher_logprobs):
        raise ValueError(f"{len(student_logprobs)} student and {len(teacher_logprobs)} teacher "
                         "logprobs: one each per sampled token")
    return [t - s for s, t in zip(student_logprobs, teacher_logprobs, strict=True)]
