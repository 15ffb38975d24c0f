"""Unit tests of the cookbook's parts: renderer, rewards, advantages, DPO loss, datasets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bios import types
from bios.cookbook.advantages import group_advantages, reverse_kl_advantages
from bios.cookbook.datasets import arithmetic_problems, chat_facts, preference_pairs
from bios.cookbook.metrics import MetricsLog
from bios.cookbook.recipe import RecipeResult
from bios.cookbook.renderer import ChatRenderer, chatml, sequence_datum
from bios.cookbook.rewards import arithmetic_reward, exact_match, is_bare_integer, last_integer
from bios.cookbook.rollouts import rollout_datum, sampling_seed
from bios.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    """The tiny model's directory, built into the tests' shared model cache (the e2e servers'
    cache) if it is not there yet."""
    from bios.server.engine.registry import TINY_LLAMA, ModelRegistry
    from server_process import MODEL_CACHE

    return ModelRegistry(MODEL_CACHE).materialize(TINY_LLAMA)


@pytest.fixture(scope="module")
def hf_renderer(tiny_dir: Path) -> ChatRenderer:
    """The tiny model's tokenizer (SmolLM2's, with its chat template) through transformers."""
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True))


# ------------------------------------------------------------------ renderer


def test_renderer_masks_everything_but_the_assistant_reply(hf_renderer: ChatRenderer) -> None:
    messages = [{"role": "user", "content": "Who is the mayor of Ossly?"},
                {"role": "assistant", "content": "The mayor of Ossly is Ilsa Varn."}]
    tokens, weights = hf_renderer.supervised_tokens(messages)
    assert len(tokens) == len(weights)
    trained = [t for t, w in zip(tokens, weights, strict=True) if w == 1.0]
    assert hf_renderer.tokenizer.decode(trained) == "The mayor of Ossly is Ilsa Varn.<|im_end|>"
    # The prompt (system, user, assistant header) is the template's own generation prompt.
    prompt = hf_renderer.prompt_tokens(messages[:1])
    assert tokens[:len(prompt)] == prompt and weights[:len(prompt)] == [0.0] * len(prompt)
    text = hf_renderer.tokenizer.decode(prompt)
    assert text.endswith("<|im_start|>assistant\n") and "Who is the mayor" in text


def test_supervised_datum_shifts_targets_and_weights(hf_renderer: ChatRenderer) -> None:
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    tokens, weights = hf_renderer.supervised_tokens(messages)
    datum = hf_renderer.supervised_datum(messages)
    assert datum.model_input.to_ints() == tokens[:-1]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == tokens[1:]
    assert datum.loss_fn_inputs["weights"].tolist() == weights[1:]


def test_chatml_fallback_matches_smollm2_template(hf_renderer: ChatRenderer,
                                                  tiny_dir: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chatml(messages, True) == hf_renderer.text(messages, add_generation_prompt=True)
    plain = ChatRenderer(Tokenizer(tiny_dir))  # the SDK's tokenizer: no chat template
    assert plain.prompt_tokens(messages) == hf_renderer.prompt_tokens(messages)
    assert plain.end_of_turn == hf_renderer.end_of_turn


def test_renderer_refuses_a_conversation_not_ending_with_the_assistant(
        hf_renderer: ChatRenderer) -> None:
    with pytest.raises(ValueError, match="assistant"):
        hf_renderer.supervised_tokens([{"role": "user", "content": "hi"}])


def test_rollout_datum_puts_logprobs_and_advantages_on_the_reply_only() -> None:
    seq = types.SampledSequence(stop_reason="stop", tokens=[7, 8, 9], logprobs=[-1.0, -2.0, -3.0])
    datum = rollout_datum([1, 2], seq, [0.5, 0.5, 0.5])
    assert datum.model_input.to_ints() == [1, 2, 7, 8]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [2, 7, 8, 9]
    assert datum.loss_fn_inputs["logprobs"].tolist() == [0.0, -1.0, -2.0, -3.0]
    assert datum.loss_fn_inputs["advantages"].tolist() == [0.0, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="advantages"):
        rollout_datum([1, 2], seq, [1.0])
    with pytest.raises(ValueError, match="2 tokens"):
        sequence_datum([1])


# ------------------------------------------------------------------ rewards


@pytest.mark.parametrize(("reply", "answer", "reward", "exact"), [
    ("7", 7, 1.0, 1.0),
    (" 7.\n", 7, 1.0, 1.0),
    ("8", 7, 0.5, 0.0),            # the format, the wrong number
    ("3 + 4 = 7", 7, 0.5, 0.0),    # the right number, not the format
    ("The answer is 7.", 7, 0.5, 0.0),
    ("The answer is 15.", 7, 0.0, 0.0),
    ("seven", 7, 0.0, 0.0),
    ("", 7, 0.0, 0.0),
])
def test_arithmetic_reward(reply: str, answer: int, reward: float, exact: float) -> None:
    assert arithmetic_reward(reply, answer) == reward
    assert exact_match(reply, answer) == exact


def test_reward_helpers() -> None:
    assert is_bare_integer("-12") and not is_bare_integer("1 2") and not is_bare_integer("x1")
    assert last_integer("1 + 5 is 6") == 6 and last_integer("none") is None


# ------------------------------------------------------------------ advantages


def test_group_advantages_are_the_normalised_rewards() -> None:
    rewards = [1.0, 0.0, 0.5, 0.5]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    got = group_advantages(rewards)
    assert got == pytest.approx([(r - mean) / (std + 1e-6) for r in rewards])
    assert sum(got) == pytest.approx(0.0, abs=1e-9)
    assert np.std(got) == pytest.approx(1.0, rel=1e-4)


def test_a_tied_group_has_zero_advantages() -> None:
    assert group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]
    assert group_advantages([]) == []


def test_reverse_kl_advantages() -> None:
    assert reverse_kl_advantages([-1.0, -0.5], [-2.0, -0.1]) == pytest.approx([-1.0, 0.4])
    with pytest.raises(ValueError, match="one each"):
        reverse_kl_advantages([-1.0], [])


# ------------------------------------------------------------------ DPO loss


def test_dpo_loss_matches_its_formula_and_gradient() -> None:
    torch = pytest.importorskip("torch")
    from bios.cookbook.preference import dpo_loss

    pc = torch.tensor([-3.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0], requires_grad=True)
    rc, rr, beta = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -3.0]), 0.5
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta)
    margins = [beta * ((-3.0 + 3.5) - (-4.0 + 3.5)), beta * ((-5.0 + 4.0) - (-2.0 + 3.0))]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == pytest.approx(sum(margins) / 2)
    loss.backward()
    # d/dpc of -log sigmoid(m) / n = -beta * sigmoid(-m) / n; the rejected side is its negative.
    sig = [1 / (1 + math.exp(m)) for m in margins]
    assert pc.grad.tolist() == pytest.approx([-beta * s / 2 for s in sig], rel=1e-5)
    assert pr.grad.tolist() == pytest.approx([beta * s / 2 for s in sig], rel=1e-5)


def test_dpo_loss_fn_sums_reply_logprobs_by_weight() -> None:
    torch = pytest.importorskip("torch")
    from bios.cookbook.preference import dpo_loss_fn

    def datum(weights: list[float]) -> types.Datum:
        return types.Datum(model_input=types.ModelInput.from_ints([1] * len(weights)),
                           loss_fn_inputs={"target_tokens": [1] * len(weights),
                                           "weights": weights})

    data = [datum([0, 1, 1]), datum([0, 0, 1])]
    logprobs = [torch.tensor([-9.0, -1.0, -2.0], requires_grad=True),
                torch.tensor([-9.0, -9.0, -1.0], requires_grad=True)]
    loss, metrics = dpo_loss_fn([(-2.0, -2.0)], beta=1.0)(data, logprobs)
    # chosen: -3 - (-2) = -1; rejected: -1 - (-2) = 1; margin -2.
    assert float(loss.detach()) == pytest.approx(-math.log(1 / (1 + math.exp(2.0))), rel=1e-6)
    assert metrics["accuracy"] == 0.0
    loss.backward()
    assert logprobs[0].grad[0] == 0.0 and logprobs[1].grad[1] == 0.0  # the prompt: no gradient


# ------------------------------------------------------------------ data, seeds, metrics


def test_datasets_are_deterministic_and_held_out_differs() -> None:
    assert arithmetic_problems(5, 3) == arithmetic_problems(5, 3)
    assert arithmetic_problems(20, 3) != arithmetic_problems(20, 3, held_out=True)
    train, held_out = chat_facts()
    assert len(train) == len(held_out) and train[0][0] != held_out[0][0]
    assert train[0][1] == held_out[0][1]  # the same fact, asked differently
    pairs, _ = preference_pairs()
    assert all(p.chosen != p.rejected for p in pairs)
    assert len({sampling_seed(0, s, i) for s in range(50) for i in range(8)}) == 400


def test_metrics_log_writes_jsonl_and_a_plot(tmp_path: Path) -> None:
    log = MetricsLog("sl", "sync", tmp_path, total_steps=2, echo=False)
    log.log(0, eval_loss=2.0)
    log.log(1, train_loss=1.5, eval_loss=1.0)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1] and lines[1]["eval_loss"] == 1.0
    assert log.series("eval_loss") == ([0, 1], [2.0, 1.0])
    plot = log.plot(["train_loss", "eval_loss"])
    assert plot is not None and plot.stat().st_size > 1000
    result = RecipeResult("sl", "sync", "eval loss", 2.0, 1.0, 0.1)
    assert result.summary == "sl: eval loss 2.000 -> 1.000"


def test_the_cookbook_imports_without_torch_or_the_server() -> None:
    import subprocess
    import sys

    code = ("import sys, bios.cookbook, bios.cookbook.sl, bios.cookbook.rl, bios.cookbook.dpo, "
            "bios.cookbook.distill, bios.cookbook.evaluation, bios.cookbook.preference\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', "
            "'sqlalchemy') or m.startswith('bios.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
