#!/usr/bin/env python
"""Multi-tenant batching: K runs training at once on one server vs the same K runs one by one.

For K = 1, 2, 4, 8 and for two clock modes (continuous cycles, and a fixed period), start K
training runs on one `bios serve` process (the tiny model) and let each take `--steps` small
steps at once (one step = forward_backward of `--batch` sequences of `--seq-len` tokens plus
optim_step, both submitted, then both awaited: online / RL-style training). The server batches
the runs' work into shared cycles. Then train K fresh runs one after another on the same server
(the serial baseline) and compare throughput (training tokens per second). With continuous
cycles each K runs `--rounds` such pairs, alternating which half goes first, and reports the
median of the pairs' ratios; the fixed period runs one pair (its tick sets the figure).

In-process (no server): one engine pass over 8 adapters' rows against the same rows on one
adapter (the cost of mixing adapters; `--reps` pairs in each of `--mix-procs` fresh processes,
median of the processes' paired medians), and the resident memory each extra run costs next to
a separate PEFT process per run.

Prints a table, then the two headline lines last; writes bench/results/multitenant.json.
Usage: python bench/multitenant.py [--steps 12] [--batch 1] [--period 1.0] [--rounds 5]
       [--reps 20] [--mix-procs 5] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bios
from bios import types
from harness import REPO, machine
from server_process import MODEL_CACHE, ServerProcess

TINY = "bios/tiny-llama"
RESULTS = REPO / "bench" / "results" / "multitenant.json"
VOCAB = 49152
RANK = 32


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_data(rng: random.Random, batch: int, seq_len: int) -> list[types.Datum]:
    out = []
    for _ in range(batch):
        toks = [rng.randrange(3, VOCAB) for _ in range(seq_len + 1)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                               loss_fn_inputs={"target_tokens": toks[1:]}))
    return out


# ----------------------------------------------------------------------------- server part


def train(client: bios.TrainingClient, data: list[types.Datum], steps: int) -> None:
    adam = types.AdamParams(learning_rate=1e-4)
    for _ in range(steps):
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(adam)
        fb.result(timeout=300)
        opt.result(timeout=300)


def batched(sc: bios.ServiceClient, k: int, steps: int, batch: int, seq_len: int,
            seed: int) -> tuple[float, list[str]]:
    """K runs stepping at once (one thread each); returns (seconds, run ids)."""
    clients = [sc.create_lora_training_client(base_model=TINY, rank=RANK, seed=seed + i)
               for i in range(k)]
    data = [make_data(random.Random(seed + i), batch, seq_len) for i in range(k)]
    gate = threading.Barrier(k + 1)

    def worker(i: int) -> None:
        gate.wait()
        train(clients[i], data[i], steps)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [c.model_id for c in clients]


def serial(sc: bios.ServiceClient, k: int, steps: int, batch: int, seq_len: int,
           seed: int) -> float:
    """The same K runs trained one after another (creation not timed)."""
    total = 0.0
    for i in range(k):
        client = sc.create_lora_training_client(base_model=TINY, rank=RANK, seed=seed + i)
        data = make_data(random.Random(seed + i), batch, seq_len)
        t0 = time.perf_counter()
        train(client, data, steps)
        total += time.perf_counter() - t0
    return total


def server_mode(name: str, period: float, ks: list[int], steps: int, batch: int,
                seq_len: int, rounds: int) -> list[dict[str, Any]]:
    """Per K: `rounds` pairs of (K runs at once, the same K runs one by one), alternating
    which goes first; the ratio is the median of the pairs' ratios (the machine is shared and
    noisy, so one pair can be off by 20%)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bios-bench-mt-") as tmp:
        server = ServerProcess(Path(tmp), [TINY], clock_period=period).start()
        try:
            os.environ["BIOS_BASE_URL"] = server.base_url
            sc = bios.ServiceClient()
            rest = sc.create_rest_client()
            warm = sc.create_lora_training_client(base_model=TINY, rank=RANK, seed=999)
            train(warm, make_data(random.Random(999), batch, seq_len), 2)
            tokens_per_step = batch * seq_len
            n_tokens = 0
            for k in ks:
                n_tokens = k * steps * tokens_per_step
                pairs, metrics = [], []
                for r in range(rounds):
                    seed = 1000 * k + 100 * r
                    if r % 2:
                        s_s = serial(sc, k, steps, batch, seq_len, seed=seed + 50)
                        b_s, run_ids = batched(sc, k, steps, batch, seq_len, seed=seed)
                    else:
                        b_s, run_ids = batched(sc, k, steps, batch, seq_len, seed=seed)
                        s_s = serial(sc, k, steps, batch, seq_len, seed=seed + 50)
                    metrics += [rest.get_run_metrics(run) for run in run_ids]
                    pairs.append((b_s, s_s))
                row = {
                    "mode": name, "period_s": period, "k": k, "steps_per_run": steps,
                    "tokens_per_step": tokens_per_step, "rounds": rounds,
                    "batched_s": [b for b, _ in pairs], "serial_s": [s for _, s in pairs],
                    "batched_tok_s": n_tokens / statistics.median(b for b, _ in pairs),
                    "serial_tok_s": n_tokens / statistics.median(s for _, s in pairs),
                    "ratios": [s / b for b, s in pairs],
                    "ratio": statistics.median(s / b for b, s in pairs),
                    "cycles_per_run": statistics.mean(m.cycles_with_work for m in metrics),
                    "missed_per_run": statistics.mean(m.missed_cycles for m in metrics),
                    "queue_wait_per_req_ms": 1000 * statistics.mean(
                        m.queue_wait_s / m.requests for m in metrics),
                    "engine_busy_frac": statistics.mean(
                        m.engine_busy_s / m.active_s for m in metrics if m.active_s > 0),
                    "tokens_ok": all(m.tokens == steps * tokens_per_step for m in metrics),
                }
                rows.append(row)
                print(f"  {name:10s} K={k}: batched {row['batched_tok_s']:7.1f} tok/s, serial "
                      f"{row['serial_tok_s']:7.1f} tok/s, ratio {row['ratio']:.2f} (pairs: "
                      f"{', '.join(f'{x:.2f}' for x in row['ratios'])})", flush=True)
            util = rest.get_engine_utilization(last=20)
            rows[-1]["last_cycles"] = [c.model_dump() for c in util.cycles[-5:]]
        finally:
            server.stop()
            os.environ.pop("BIOS_BASE_URL", None)
    return rows


# ----------------------------------------------------------------------------- in-process part


def tiny_engine() -> tuple[Any, Path]:
    """An in-process engine on the tiny model, as the server builds it, and the model's dir."""
    from bios.server.engine.engine import Engine
    from bios.server.engine.registry import ModelRegistry

    model_dir = ModelRegistry(MODEL_CACHE, [TINY]).materialize(TINY)
    return Engine.from_model_dir(model_dir, device="cpu"), model_dir


def random_rows(rng: random.Random, n: int, seq_len: int) -> list[Any]:
    from bios.server import plan as P

    out = []
    for _ in range(n):
        toks = [rng.randrange(3, VOCAB) for _ in range(seq_len + 1)]
        out.append(P.DatumRows(tokens=toks[:-1], loss_inputs={"target_tokens": toks[1:]}))
    return out


def run_plan(engine: Any, steps: list[Any]) -> Any:
    """One cycle of `steps` on the engine; every op must succeed."""
    from bios.server import plan as P

    res = engine.execute(P.CyclePlan(0, TINY, steps))
    assert all(r.ok for r in res.results), [r.error for r in res.results if not r.ok]
    return res


def inprocess(batch: int, seq_len: int, extra_runs: int) -> dict[str, Any]:
    import torch

    from bios.server import plan as P

    engine, model_dir = tiny_engine()
    rng = random.Random(0)

    def rows(n: int) -> list[P.DatumRows]:
        return random_rows(rng, n, seq_len)

    def run(steps: list[P.Step]) -> P.CycleResult:
        return run_plan(engine, steps)

    def step_of(run_id: str, data: list[P.DatumRows]) -> list[P.Step]:
        return [P.PassGroup([P.ForwardBackwardOp(f"{run_id}-fb", run_id, data,
                                                 "cross_entropy", {})]),
                P.OptimStepOp(f"{run_id}-opt", run_id, {"learning_rate": 1e-4})]

    # Memory: one run trained (allocator warm), then `extra_runs` more, each trained alone so
    # peak activations stay those of one small pass; per extra run = RSS growth / extra_runs.
    run([P.CreateAdapterOp("c0", "r0", P.AdapterSpec(rank=RANK, seed=0))])
    for _ in range(2):
        run(step_of("r0", rows(batch)))
    gc.collect()
    rss_one = rss_mib()
    for i in range(1, extra_runs + 1):
        run([P.CreateAdapterOp(f"c{i}", f"r{i}", P.AdapterSpec(rank=RANK, seed=i))])
        run(step_of(f"r{i}", rows(batch)))
    gc.collect()
    rss_all = rss_mib()
    adapter = engine.runs["r0"].adapter
    param_mib = sum(p.numel() * p.element_size() for p in adapter.parameters()) / 2**20

    peft = peft_process_rss(model_dir)
    return {
        "threads": torch.get_num_threads(),
        "autocast": str(engine.autocast_dtype), "base_dtype": str(next(
            engine.model.parameters()).dtype),
        "rss_server_one_run_mib": rss_one,
        "rss_per_extra_run_mib": (rss_all - rss_one) / extra_runs,
        "adapter_param_mib": param_mib,
        "extra_runs_measured": extra_runs,
        "peft_process_rss_mib": peft,
    }


def mixing_worker(batch: int, seq_len: int, reps: int) -> dict[str, Any]:
    """In this process: one pass of 8 x `batch` rows on 8 adapters vs the same rows on one
    adapter, `reps` pairs back to back (alternating which goes first after two warm-up pairs).

    Every run's gradient is cleared (untimed) before each pass, as after an optim_step: a
    run's forward_backward normally starts from no gradient, and without the reset the 8-run
    pass would also pay for adding into 8 accumulated gradients that training never keeps."""
    from bios.server import plan as P

    engine, _ = tiny_engine()
    rng = random.Random(0)
    for i in range(8):
        run_plan(engine, [P.CreateAdapterOp(f"c{i}", f"r{i}", P.AdapterSpec(rank=RANK, seed=i))])
    data = [random_rows(rng, batch, seq_len) for _ in range(8)]
    plans = {
        "mixed": [P.PassGroup([P.ForwardBackwardOp(f"m{i}", f"r{i}", data[i], "cross_entropy",
                                                   {}) for i in range(8)])],
        "single": [P.PassGroup([P.ForwardBackwardOp(f"s{i}", "r0", data[i], "cross_entropy",
                                                    {}) for i in range(8)])],
    }
    times: dict[str, list[float]] = {"mixed": [], "single": []}
    for rep in range(reps + 2):
        for name in ("mixed", "single") if rep % 2 == 0 else ("single", "mixed"):
            for state in engine.runs.values():
                state.zero_grad()
            t0 = time.perf_counter()
            res = run_plan(engine, plans[name])
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
            assert res.stats.passes == 1
    return {
        "mixed_ms": 1000 * statistics.median(times["mixed"]),
        "single_ms": 1000 * statistics.median(times["single"]),
        # the median of paired ratios is steadier on a shared machine than a ratio of medians
        "mix_cost": statistics.median(
            m / s for m, s in zip(times["mixed"], times["single"], strict=True)) - 1,
    }


def mixing(batch: int, seq_len: int, reps: int, procs: int) -> dict[str, Any]:
    """`mixing_worker` in `procs` fresh processes, one after another. On our shared 2-core VMs
    the cost measured in one process swung between about -4% and +19% from process to process
    (where the allocator and the kernel put its memory; the pass is memory-bound in the
    unembedding), far more than between pairs within a process; the median over processes is
    the figure, and every process's figure is kept."""
    per_proc = []
    for i in range(procs):
        out = subprocess.run(
            [sys.executable, __file__, "--mixing-worker", "--batch", str(batch), "--seq-len",
             str(seq_len), "--reps", str(reps)],
            capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        per_proc.append(json.loads(out.stdout.strip().splitlines()[-1]))
        p = per_proc[-1]
        print(f"  mixing, process {i + 1}/{procs}: 8 adapters {p['mixed_ms']:.1f} ms vs 1 "
              f"adapter {p['single_ms']:.1f} ms: {100 * p['mix_cost']:+.1f}%", flush=True)
    return {
        "procs": procs, "reps": reps,
        "mix_rows": 8 * batch, "mix_tokens": 8 * batch * seq_len,
        "mixed_ms": statistics.median(p["mixed_ms"] for p in per_proc),
        "single_ms": statistics.median(p["single_ms"] for p in per_proc),
        "mix_cost": statistics.median(p["mix_cost"] for p in per_proc),
        "per_process": per_proc,
    }


PEFT_SCRIPT = r"""
import sys, torch
from transformers import LlamaForCausalLM
from peft import LoraConfig, get_peft_model
d, seq_len, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
cfg = LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                 "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, cfg)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(3, 49152, (1, seq_len + 1))
for _ in range(2):
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward(); opt.step(); opt.zero_grad()
rss = [l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1]
print(int(rss) / 1024)
"""


def peft_process_rss(model_dir: Path, seq_len: int = 64) -> float:
    """RSS (MiB) of a separate process serving one run: transformers Llama + PEFT LoRA
    (r=RANK on the 7 projections), after two training steps."""
    out = subprocess.run([sys.executable, "-c", PEFT_SCRIPT, str(model_dir), str(seq_len),
                          str(RANK)], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return float(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--period", type=float, default=1.0, help="the fixed clock period (s)")
    ap.add_argument("--reps", type=int, default=20, help="mixing: timed pairs per process")
    ap.add_argument("--mix-procs", type=int, default=5,
                    help="mixing: fresh processes to measure in (the figure is their median)")
    ap.add_argument("--mixing-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=5,
                    help="paired rounds per K with continuous cycles (the fixed period's "
                         "figure is set by its tick, so it runs one)")
    ap.add_argument("--quick", action="store_true",
                    help="K = 1, 8 only, 3 steps, 1 round; mixing in 1 process, 5 pairs")
    ap.add_argument("--ks", type=lambda v: [int(k) for k in v.split(",")], default=None,
                    help="comma-separated K values (default 1,2,4,8; --quick: 1,8)")
    ap.add_argument("--clocks", choices=["both", "continuous", "fixed"], default="both",
                    help="which clock modes to run on the server")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-inprocess", action="store_true")
    args = ap.parse_args()
    if args.mixing_worker:  # one process of the mixing measurement: JSON on the last line
        print(json.dumps(mixing_worker(args.batch, args.seq_len, args.reps)))
        return
    ks = args.ks or ([1, 8] if args.quick else [1, 2, 4, 8])
    steps = 3 if args.quick else args.steps
    info = machine()
    print(f"machine: {info['cpu']}, {info['nproc']} cores; load {info['loadavg']}", flush=True)
    result: dict[str, Any] = {"machine": info, "args": vars(args), "server": []}
    t_start = time.perf_counter()
    if not args.skip_inprocess:
        result["inprocess"] = inprocess(args.batch, args.seq_len, extra_runs=16)
        result["mixing"] = mixing(args.batch, args.seq_len, 5 if args.quick else args.reps,
                                  1 if args.quick else args.mix_procs)
    if not args.skip_server:
        rounds = 1 if args.quick else args.rounds
        for name, period, n in (("continuous", 0.0, rounds), ("fixed", args.period, 1)):
            if args.clocks not in ("both", name):
                continue
            result["server"] += server_mode(name, period, ks, steps, args.batch, args.seq_len, n)
    result["machine"]["uptime_end"] = subprocess.run(
        ["uptime"], capture_output=True, text=True).stdout.strip()
    result["wall_s"] = time.perf_counter() - t_start
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print()
    if "inprocess" in result:
        ip, mx = result["inprocess"], result["mixing"]
        print(f"in-process, one pass of {mx['mix_rows']} rows ({mx['mix_tokens']} tokens), "
              f"{ip['threads']} threads, base {ip['base_dtype']}, autocast {ip['autocast']}:")
        each = ", ".join(f"{100 * p['mix_cost']:+.1f}%" for p in mx["per_process"])
        print(f"  8 adapters {mx['mixed_ms']:.1f} ms vs 1 adapter {mx['single_ms']:.1f} ms: "
              f"mixing costs {100 * mx['mix_cost']:+.1f}% (median of {mx['procs']} "
              f"processes: {each})")
        print(f"  RSS per extra run {ip['rss_per_extra_run_mib']:.1f} MiB (adapter weights "
              f"{ip['adapter_param_mib']:.1f} MiB; x4 with grads and AdamW) vs a separate "
              f"PEFT process per run {ip['peft_process_rss_mib']:.0f} MiB")
        print()
    if result["server"]:
        print("| mode | K | batched tok/s | serial tok/s | batched/serial | pairs | cycles/run | "
              "missed/run | queue wait/req ms | engine busy |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["server"]:
            mode = r["mode"] if r["period_s"] == 0 else f"fixed {r['period_s']:g}s"
            pairs = " ".join(f"{x:.2f}" for x in r["ratios"])
            print(f"| {mode} | {r['k']} | {r['batched_tok_s']:.0f} | {r['serial_tok_s']:.0f} | "
                  f"{r['ratio']:.2f} | {pairs} | {r['cycles_per_run']:.1f} | "
                  f"{r['missed_per_run']:.1f} | {r['queue_wait_per_req_ms']:.0f} | "
                  f"{r['engine_busy_frac']:.2f} |")
        print(f"\n(total {result['wall_s']:.0f} s; {result['machine']['uptime_end']})")
        by = {(r["mode"], r["k"]): r["ratio"] for r in result["server"]}
        for mode, label in (("continuous", "continuous"), ("fixed", "fixed period")):
            if (mode, 8) in by:
                print(f"batched/serial throughput ratio at K=8, {label}: {by[(mode, 8)]:.2f}")


if __name__ == "__main__":
    main()
