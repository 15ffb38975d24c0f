"""`bios demo`: start a local server on SmolLM2, teach it facts it does not know, show it learned.

The demo is an ordinary SDK user: it starts `bios serve` as a subprocess on loopback, trains a
LoRA adapter on the bundled dataset (facts about a made-up town, `data/demo_facts.jsonl`) in
efficient mode (requests queued ahead), and samples the same questions before and after.
"""

from __future__ import annotations

import json
import time
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any

import bios
from bios import types
from bios.local_server import LocalServer

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EVAL_QUESTIONS = [
    "What is the secret password of the Ossly lighthouse?",
    "Who founded the Bios Observatory?",
    "What color are the roofs in Ossly?",
]


def load_facts() -> list[dict[str, str]]:
    text = resources.files("bios.data").joinpath("demo_facts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prompt_tokens(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def make_datum(tokenizer: Any, question: str, answer: str) -> types.Datum:
    """Prompt + answer + end-of-turn; loss only on the answer (weights 0 on the prompt)."""
    prompt = prompt_tokens(tokenizer, question)
    completion = list(tokenizer.encode(answer, add_special_tokens=False))
    completion.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def ask(sampler: bios.SamplingClient, tokenizer: Any, questions: list[str]) -> list[str]:
    """Greedy answers to all questions, sampled concurrently."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = types.SamplingParams(max_tokens=40, temperature=0.0, stop=[end])
    futures = [sampler.sample(prompt=types.ModelInput.from_ints(prompt_tokens(tokenizer, q)),
                              num_samples=1, sampling_params=params) for q in questions]
    out = []
    for f in futures:
        toks = [t for t in f.result().sequences[0].tokens if t != end]
        out.append(tokenizer.decode(toks).strip())
    return out


def start_server(data_dir: Path, port: int) -> LocalServer:
    """`bios serve` on the bundled model, as a child process; waits until it is ready."""
    server = LocalServer(data_dir, [MODEL], port=port or None)
    print(f"Starting bios serve on {server.base_url} (log: {server.log_path}) ...", flush=True)
    t0 = time.monotonic()
    server.start(timeout=600)
    print(f"Server ready in {time.monotonic() - t0:.1f}s (the first start converts the bundled "
          "model once).", flush=True)
    return server


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.set_title(f"bios demo: LoRA on {MODEL}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(client: bios.TrainingClient, batch: list[types.Datum], steps: int,
          depth: int = 2) -> list[float]:
    """Efficient mode: keep `depth` (forward_backward, optim_step) pairs queued ahead."""
    adam = types.AdamParams(learning_rate=1e-3)
    pending: deque[tuple[int, Any, Any]] = deque()
    losses: list[float] = []
    t0 = time.monotonic()
    for step in range(1, steps + depth + 1):
        if step <= steps:
            fb = client.forward_backward(batch, "cross_entropy")
            pending.append((step, fb, client.optim_step(adam)))
        if len(pending) > depth or (step > steps and pending):
            done, fb, opt = pending.popleft()
            loss = fb.result().loss
            opt.result()
            losses.append(loss)
            rate = done / (time.monotonic() - t0)
            print(f"step {done:3d}/{steps}  loss {loss:7.4f}  ({rate:.2f} steps/s)", flush=True)
    return losses


def run_demo(steps: int = 30, data_dir: Path = Path(".bios-demo"), port: int = 0) -> int:
    """Run the demo; returns a process exit code."""
    server = start_server(data_dir, port)
    try:
        service = bios.ServiceClient(base_url=server.base_url)
        client = service.create_lora_training_client(base_model=MODEL, rank=16, seed=0)
        tokenizer = client.get_tokenizer()
        facts = load_facts()
        batch = [make_datum(tokenizer, f["question"], f["answer"]) for f in facts]
        answers = {f["question"]: f["answer"] for f in facts}

        before = ask(client.save_weights_and_get_sampling_client(name="before"), tokenizer,
                     EVAL_QUESTIONS)
        print(f"\nTraining a rank-16 LoRA on {len(batch)} facts about the town of Ossly, "
              f"{steps} steps ...", flush=True)
        losses = train(client, batch, steps)
        after = ask(client.save_weights_and_get_sampling_client(name="after"), tokenizer,
                    EVAL_QUESTIONS)
        saved = client.save_state(name="demo-final").result()

        for q, b, a in zip(EVAL_QUESTIONS, before, after, strict=True):
            print(f"\nQ: {q}\n  expected: {answers[q]}\n  before:   {b}\n  after:    {a}")
        plot = data_dir / "demo_loss.png"
        plot_losses(losses, plot)
        print(f"\nloss: {losses[0]:.4f} -> {losses[-1]:.4f}  (plot: {plot})")
        print(f"checkpoint: {saved.path}")
        learned = sum(answers[q].lower()[:30] in a.lower() for q, a in zip(EVAL_QUESTIONS, after,
                                                                             strict=True))
        print(f"answers learned: {learned}/{len(EVAL_QUESTIONS)}")
        return 0 if losses[-1] < losses[0] else 1
    finally:
        server.stop()
