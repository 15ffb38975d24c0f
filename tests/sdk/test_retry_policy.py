"""Retry and polling decisions, as pure functions (no network)."""

from __future__ import annotations

import email.utils

import pytest

from bios.transport import (
    PollDone,
    PollFailed,
    PollTryAgain,
    RetryBudget,
    RetryPolicy,
    api_root,
    classify_poll_body,
    is_retryable_status,
    parse_retry_after,
    retry_delay,
)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 422])
def test_other_4xx_are_never_retried(status: int) -> None:
    assert not is_retryable_status(status)


def test_backoff_doubles_from_half_a_second_and_caps_at_ten() -> None:
    policy = RetryPolicy(jitter=0.0)
    assert [retry_delay(n, policy) for n in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_jitter_only_shortens_the_delay_by_at_most_its_fraction() -> None:
    policy = RetryPolicy(jitter=0.25)
    assert retry_delay(2, policy, rand=lambda: 0.0) == 2.0
    assert retry_delay(2, policy, rand=lambda: 1.0) == 1.5
    assert retry_delay(10, policy, rand=lambda: 0.999) <= 10.0


def test_retry_after_replaces_the_backoff_and_is_capped() -> None:
    policy = RetryPolicy()
    assert retry_delay(0, policy, retry_after=7.0) == 7.0
    assert retry_delay(5, policy, retry_after=0.0) == 0.0
    assert retry_delay(0, policy, retry_after=3600.0) == policy.max_retry_after


def test_retry_after_header_forms() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"Retry-After": "soon"}) is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=1_000_000.0) == pytest.approx(30.0)


def test_budget_stops_after_max_retries() -> None:
    budget = RetryBudget(RetryPolicy(max_retries=3, budget=1e9))
    delays = [budget.next_delay() for _ in range(5)]
    assert [d is not None for d in delays] == [True, True, True, False, False]


def test_budget_stops_when_the_overall_time_is_spent() -> None:
    now = [0.0]
    budget = RetryBudget(RetryPolicy(max_retries=1000, jitter=0.0, budget=300.0),
                         clock=lambda: now[0])
    total = 0.0
    while (d := budget.next_delay()) is not None:
        total += d
        now[0] += d
    assert 290.0 <= total <= 300.0  # about five minutes, never past the budget
    assert budget.attempt > 30


def test_poll_bodies_are_classified() -> None:
    assert classify_poll_body({"type": "try_again", "request_id": "r",
                               "queue_state": "paused_capacity"}) == \
        PollTryAgain("paused_capacity", None)
    assert classify_poll_body({"error": "bad", "category": "user"}) == PollFailed("bad", "user")
    assert classify_poll_body({"error": "boom"}) == PollFailed("boom", "unknown")
    assert classify_poll_body({"metrics": {}}) == PollDone({"metrics": {}})
    assert classify_poll_body('{"path": "p"}') == PollDone({"path": "p"})


def test_api_root_appends_the_prefix_once() -> None:
    assert api_root("http://h:8000") == "http://h:8000/api/v1"
    assert api_root("http://h:8000/") == "http://h:8000/api/v1"
    assert api_root("https://h/api/v1/") == "https://h/api/v1"
    with pytest.raises(ValueError, match="http"):
        api_root("h:8000")


def test_backpressure_does_not_use_up_the_retry_count() -> None:
    """A 429 means "wait": it is retried past max_retries, until the backpressure budget."""
    now = [0.0]
    policy = RetryPolicy(max_retries=2, jitter=0.0, budget=10.0, backpressure_budget=100.0)
    budget = RetryBudget(policy, clock=lambda: now[0])
    waits = 0
    while (delay := budget.next_delay(retry_after=1.0, backpressure=True)) is not None:
        now[0] += delay
        waits += 1
    assert waits == 100  # far past max_retries=2 and the 10 s failure budget
    assert budget.attempt == 0  # ordinary failures still have their own count
