"""Server overhead (issue 4): a LoRA training job through `bios serve` vs the same job as a
plain in-process loop with transformers + PEFT, on the same model, batch, LoRA and dtype.

Both sides: batch 8 x 128 tokens (random ids, the same batches in the same order), LoRA rank 32
alpha 32 on the attention and MLP projections (q,k,v,o,gate,up,down; not the unembedding, so
the PEFT side needs no tied-embedding special case), AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-12,
no weight decay: Tinker's defaults), summed token cross-entropy, bf16 base weights and bf16
autocast with fp32 LoRA parameters where the CPU computes bf16 (fp32 otherwise; the server's
engine defaults). `--warmup` steps, then `--steps` timed steps per side.

  server:     `bios serve --clock-period 0` (continuous) in its own process; the client keeps
              `--depth` forward_backward + optim_step pairs queued ahead (efficient mode).
  in-process: `LlamaForCausalLM.from_pretrained(model_dir)` + `peft.get_peft_model`, a plain
              forward / backward / `torch.optim.AdamW.step` loop in this process.

The two sides alternate for `--rounds` short rounds (the server idles while the in-process
loop runs). Each side's best round is the headline figure (the machine is shared: the fastest
round is the one least disturbed by other processes); medians and CPU seconds per step (server
process + client, vs this process) are reported too. The last line is
`server/in-process throughput ratio: X`. Writes bench/results/overhead.json.

    .venv/bin/python bench/overhead.py                      # tiny model (about a minute)
    .venv/bin/python bench/overhead.py --model HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from harness import REPO, machine

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/peft internals

import bios  # noqa: E402
from bios import types  # noqa: E402
from server_process import MODEL_CACHE, ServerProcess  # noqa: E402

RESULTS = REPO / "bench" / "results" / "overhead.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = ALPHA = 32
ADAM = types.AdamParams()  # lr 1e-4, betas (0.9, 0.95), eps 1e-12, weight_decay 0




def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_batches(count: int, batch: int, seq: int, vocab: int) -> list[list[list[int]]]:
    """`count` batches of `batch` sequences of seq + 1 token ids (inputs + shifted targets)."""
    rng = random.Random(0)
    return [[[rng.randrange(3, vocab) for _ in range(seq + 1)] for _ in range(batch)]
            for _ in range(count)]


# ----------------------------------------------------------------------------- server side


class ServerSide:
    def __init__(self, server: ServerProcess, model: str, batches: list, depth: int):
        self.service = bios.ServiceClient(base_url=server.base_url)
        self.client = self.service.create_lora_training_client(
            base_model=model, rank=RANK, seed=0, train_mlp=True, train_attn=True,
            train_unembed=False)
        self.data = [[types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                                  loss_fn_inputs={"target_tokens": seq[1:]}) for seq in b]
                     for b in batches]
        self.depth = depth
        self.pid = server.proc.pid
        self.step = 0

    def run(self, steps: int) -> tuple[float, float, list[float]]:
        """`steps` steps with `depth` (fb, optim) pairs in flight; returns (seconds,
        CPU seconds of server + client, losses)."""
        cpu0 = proc_cpu_seconds(self.pid) + time.process_time()
        t0 = time.perf_counter()
        pending: list = []
        losses = []
        for _ in range(steps):
            batch = self.data[self.step % len(self.data)]
            self.step += 1
            fb = self.client.forward_backward(batch, "cross_entropy")
            opt = self.client.optim_step(ADAM)
            pending.append((fb, opt))
            if len(pending) >= self.depth:
                fb, opt = pending.pop(0)
                losses.append(fb.result().loss)
                opt.result()
        for fb, opt in pending:
            losses.append(fb.result().loss)
            opt.result()
        elapsed = time.perf_counter() - t0
        return elapsed, proc_cpu_seconds(self.pid) + time.process_time() - cpu0, losses


# ----------------------------------------------------------------------------- in-process side


class InProcessSide:
    def __init__(self, model_dir: Path, batches: list):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        from bios.server.engine.engine import bf16_supported

        self.torch = torch
        self.bf16 = bf16_supported(torch.device("cpu"))
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        base.config.use_cache = False
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                            bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(0)
        self.model = get_peft_model(base, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.params:  # fp32 LoRA parameters, as the server keeps them
            p.data = p.data.float()
        self.trainable = sum(p.numel() for p in self.params)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=ADAM.learning_rate, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps,
            weight_decay=ADAM.weight_decay)
        t = torch.tensor(batches)
        self.data = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in t]
        self.dtype = str(dtype).removeprefix("torch.")
        self.step = 0

    def run(self, steps: int) -> tuple[float, float, list[float]]:
        torch = self.torch
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        losses = []
        for _ in range(steps):
            x, y = self.data[self.step % len(self.data)]
            self.step += 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(input_ids=x).logits  # [B, T, V]
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item() / y.numel())
        return time.perf_counter() - t0, time.process_time() - cpu0, losses


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bios/tiny-llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--depth", type=int, default=3,
                    help="server side: (forward_backward, optim_step) pairs kept in flight")
    ap.add_argument("--data-dir", default=None, help="server data dir (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    start_machine = machine()
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bios-bench-overhead-")
    data_dir = Path(args.data_dir or tmp.name)
    server = ServerProcess(data_dir, [args.model], clock_period=0.0).start()
    try:
        service = bios.ServiceClient(base_url=server.base_url)
        tokenizer = service.create_sampling_client(base_model=args.model).get_tokenizer()
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 20000
        batches = make_batches(4, args.batch, args.seq, vocab)
        model_dir = MODEL_CACHE / args.model.replace("/", "--")  # the server built it there
        if not model_dir.is_dir():
            model_dir = Path(args.model)
        remote = ServerSide(server, args.model, batches, args.depth)
        local = InProcessSide(model_dir, batches)
        remote.run(args.warmup)
        local.run(args.warmup)
        rounds = []
        for _ in range(args.rounds):  # short alternating rounds: both sides see the same load
            local_s, local_cpu, local_losses = local.run(args.steps)
            remote_s, remote_cpu, remote_losses = remote.run(args.steps)
            rounds.append({"in_process_s": local_s, "server_s": remote_s,
                           "in_process_cpu_s": local_cpu, "server_cpu_s": remote_cpu,
                           "in_process_loss": [local_losses[0], local_losses[-1]],
                           "server_loss": [remote_losses[0], remote_losses[-1]],
                           "loadavg_1min": round(os.getloadavg()[0], 2)})
        cycles = [line for line in server.log().splitlines() if " cycle " in line]
    finally:
        server.stop()
        tmp.cleanup()

    tokens = args.steps * args.batch * args.seq
    sides = {}
    for key in ("in_process", "server"):
        walls = [r[f"{key}_s"] for r in rounds]
        cpus = [r[f"{key}_cpu_s"] for r in rounds]
        sides[key] = {
            "best_tokens_per_s": round(tokens / min(walls), 1),
            "median_tokens_per_s": round(tokens / statistics.median(walls), 1),
            "best_s_per_step": round(min(walls) / args.steps, 4),
            "cpu_s_per_step": round(statistics.median(cpus) / args.steps, 4),
            "per_round_tokens_per_s": [round(tokens / w, 1) for w in walls],
        }
    ratio = sides["server"]["best_tokens_per_s"] / sides["in_process"]["best_tokens_per_s"]
    ratio_median = (sides["server"]["median_tokens_per_s"]
                    / sides["in_process"]["median_tokens_per_s"])
    ratio_cpu = sides["in_process"]["cpu_s_per_step"] / sides["server"]["cpu_s_per_step"]
    end_machine = machine()
    report = {
        "benchmark": "overhead",
        "model": args.model,
        "batch": [args.batch, args.seq],
        "steps_per_round": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
        "lora": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "unembedding": False,
                 "trainable_params": local.trainable},
        "optimizer": ADAM.model_dump(),
        "dtype": {"base": local.dtype, "autocast_bf16": local.bf16, "lora_params": "float32"},
        "server": {"clock_period": 0, "pipeline_depth": args.depth,
                   "last_cycles": cycles[-3:]},
        "sides": sides,
        "ratio_server_over_in_process": round(ratio, 3),
        "ratio_median_rounds": round(ratio_median, 3),
        "ratio_cpu_seconds_in_process_over_server": round(ratio_cpu, 3),
        "rounds_detail": [{k: (round(v, 4) if isinstance(v, float) else v)
                           for k, v in r.items()} for r in rounds],
        "machine": {**start_machine, "loadavg_end": end_machine["loadavg"]},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"model {args.model}; batch {args.batch} x {args.seq} tokens; LoRA r{RANK} on "
          f"{','.join(TARGETS)} (no unembedding); {local.dtype} base, bf16 autocast "
          f"{'on' if local.bf16 else 'off'}, fp32 LoRA; {args.rounds} alternating rounds x "
          f"{args.steps} steps after {args.warmup} warm-up; server pipeline depth {args.depth}")
    print(f"machine: {start_machine['nproc']} cores, {start_machine['cpu']}, load "
          f"{start_machine['loadavg']} -> {end_machine['loadavg']}")
    widths = [38, 12, 12, 14, 14, 22]
    print(fmt_row(["side", "best s/step", "best tok/s", "median tok/s", "CPU s/step",
                   "loss first -> last"], widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for name, key in (("in-process transformers + PEFT", "in_process"),
                      ("bios server (continuous, pipelined)", "server")):
        side = sides[key]
        first, last = rounds[0][f"{key}_loss"][0], rounds[-1][f"{key}_loss"][1]
        print(fmt_row([name, f"{side['best_s_per_step']:.3f}",
                       f"{side['best_tokens_per_s']:.0f}", f"{side['median_tokens_per_s']:.0f}",
                       f"{side['cpu_s_per_step']:.3f}", f"{first:.4f} -> {last:.4f}"], widths))
    print("per round tokens/s: in-process "
          + ", ".join(f"{x:.0f}" for x in sides["in_process"]["per_round_tokens_per_s"])
          + "; server " + ", ".join(f"{x:.0f}" for x in sides["server"]["per_round_tokens_per_s"]))
    print(f"median-round ratio {ratio_median:.2f}; CPU-seconds ratio (in-process/server, "
          f"server counts both processes) {ratio_cpu:.2f}")
    print(f"results written to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    print(f"server/in-process throughput ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
