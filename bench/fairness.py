#!/usr/bin/env python
"""Fairness: does one tenant's flood stall another tenant's training?

One `bios serve` (the tiny model, continuous clock, two API-key tenants) per mode, started
fresh. Tenant A floods: one forward_backward of `--big-tokens` tokens (datums of
`--big-datum` tokens; default 262144, the issue's 260k-token request), then `--small`
forward_backwards of `--small-tokens` tokens over `--runs` runs (default 2000 over 20), each
run ending with an optim_step. Tenant B trains one small run alongside: `--victim-steps` steps,
each a forward_backward of `--victim-datums` datums of `--victim-tokens` tokens (default 4 x
128) then an optim_step, one at a time; a
step's latency is from its forward_backward call to its optim_step's result. B starts once A's
big request and the first tenth of its small ones are stored.

Modes (each a fresh server):
  b_alone          B's steps on an idle server (the baseline latency)
  flood            A's flood and B alongside, with the default (bounded, fair) cycles
  a_alone          A's flood alone, default cycles (A's throughput)
  a_alone_unbounded  A's flood alone with --cycle-tokens 0 (one cycle takes all queued work:
                   the scheduler before fair cycles), for A's throughput without fairness
  flood_unbounded  A's flood and B (only `--unbounded-victim-steps` steps) with
                   --cycle-tokens 0: the stall fairness removes (skipped with --skip-unbounded)

Prints one line per mode, the load average beside the figures, and as the LAST line
`fairness: victim slowdown <ratio>` (B's median step latency under A's flood over its median
alone; target <= 3). Writes bench/results/fairness.json.
Usage: python bench/fairness.py [--scale 0.1] [--skip-unbounded]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bios
from bios import types
from bios.server.auth import hash_key
from harness import REPO, load, machine
from server_process import ServerProcess

TINY = "bios/tiny-llama"
KEY_A, KEY_B = "bios_fair-a", "bios_fair-b"


def datum(n: int, salt: int) -> types.Datum:
    tokens = [(salt * 31 + i * 7) % 4000 + 5 for i in range(n + 1)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:]})


def start_server(root: Path, extra: list[str]) -> ServerProcess:
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    keys.write_text(f"A:{hash_key(KEY_A)}\nB:{hash_key(KEY_B)}\n")
    proc = ServerProcess(root / "data", [TINY],
                         extra_args=["--api-keys-file", str(keys), *extra])
    proc.start()
    return proc


def flood(server: ServerProcess, args: argparse.Namespace, stored: threading.Event,
          out: dict[str, Any]) -> None:
    """Tenant A: the big request, then the small ones over its runs; waits for all."""
    sc = bios.ServiceClient(base_url=server.base_url, api_key=KEY_A)
    runs = [sc.create_lora_training_client(base_model=TINY, rank=8, seed=i)
            for i in range(args.runs)]
    big_datums = max(1, args.big_tokens // args.big_datum)
    big = [datum(args.big_datum, i) for i in range(big_datums)]
    tokens = big_datums * args.big_datum + args.small * args.small_tokens
    t0 = time.perf_counter()
    futures = [runs[0].forward_backward(big, "cross_entropy")]
    for i in range(args.small):
        futures.append(runs[i % args.runs].forward_backward([datum(args.small_tokens, i)],
                                                            "cross_entropy"))
    steps = [tc.optim_step(types.AdamParams(learning_rate=1e-4)) for tc in runs]
    wait_stored(server, 1 + args.small // 10)
    stored.set()
    for f in futures + steps:
        f.result(timeout=3600)
    elapsed = time.perf_counter() - t0
    out.update(a_tokens=tokens, a_seconds=round(elapsed, 2),
               a_tokens_per_s=round(tokens / elapsed, 1), a_done_at=time.perf_counter())


def wait_stored(server: ServerProcess, n: int) -> None:
    """Until the server has stored n of tenant A's forward_backwards."""
    import sqlite3

    while True:
        with sqlite3.connect(server.data_dir / "bios.db") as db:
            (count,) = db.execute("SELECT COUNT(*) FROM requests WHERE owner = 'A' AND "
                                  "kind = 'forward_backward'").fetchone()
        if count >= n:
            return
        time.sleep(0.05)


def victim(server: ServerProcess, steps: int, datums: int, tokens: int, out: dict[str, Any],
           ready: threading.Event | None = None) -> None:
    """Tenant B: `steps` steps of forward_backward + optim_step, one at a time."""
    sc = bios.ServiceClient(base_url=server.base_url, api_key=KEY_B)
    tc = sc.create_lora_training_client(base_model=TINY, rank=8, seed=99)
    tc.forward_backward([datum(tokens, d) for d in range(datums)], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-4)).result(timeout=3600)  # warm
    if ready is not None:
        ready.wait()
    lat, ends = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        tc.forward_backward([datum(tokens, (i + 1) * datums + d) for d in range(datums)],
                            "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-4)).result(timeout=3600)
        lat.append(time.perf_counter() - t0)
        ends.append(time.perf_counter())
    out.update(b_step_ends=ends, b_latencies_s=[round(x, 3) for x in lat],
               b_steps=len(lat), b_median_s=round(statistics.median(lat), 4),
               b_max_s=round(max(lat), 4), b_mean_s=round(statistics.mean(lat), 4),
               b_done_at=time.perf_counter())


def cycle_stats(server: ServerProcess) -> dict[str, Any]:
    """Cycle count and the longest cycle, from the server's cycles table."""
    import sqlite3

    with sqlite3.connect(server.data_dir / "bios.db") as db:
        n, longest, tokens, engine_ms, total_ms, first, last = db.execute(
            "SELECT COUNT(*), MAX(total_ms), MAX(tokens), SUM(engine_ms), SUM(total_ms), "
            "MIN(started_at), MAX(started_at + total_ms / 1000.0) FROM cycles "
            "WHERE tokens > 0").fetchone()
    span_s = (last - first) if first is not None else 0.0
    return {"cycles": n, "longest_cycle_ms": round(longest or 0, 1),
            "most_tokens_in_a_cycle": tokens,
            # From the first to the end of the last cycle with passes: the share of the time
            # the engine worked, and the clock's own share of the cycles (claim, record,
            # notify), which is what bounded cycles can cost a flooder beyond engine speed.
            "engine_busy_fraction": round((engine_ms or 0) / 1000 / span_s, 3) if span_s else None,
            "clock_overhead_fraction": round(1 - (engine_ms or 0) / total_ms, 4)
            if total_ms else None}


def run_mode(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    extra = ["--cycle-tokens", "0"] if name.endswith("unbounded") else []
    server = start_server(root / name, extra)
    out: dict[str, Any] = {"mode": name, "server_flags": extra, "load_before": load()}
    try:
        stored = threading.Event()
        threads = []
        if name != "b_alone":
            threads.append(threading.Thread(target=flood, args=(server, args, stored, out)))
        if name in ("b_alone", "flood", "flood_unbounded"):
            steps = args.unbounded_victim_steps if name == "flood_unbounded" else \
                args.victim_steps
            threads.append(threading.Thread(target=victim, args=(
                server, steps, args.victim_datums, args.victim_tokens, out,
                None if name == "b_alone" else stored)))
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if "b_done_at" in out:
            out["b_done_at_s"] = round(out.pop("b_done_at") - t_start, 2)
        ends = out.pop("b_step_ends", [])
        if "a_done_at" in out:
            a_end = out.pop("a_done_at")
            out["b_steps_done_during_flood"] = sum(1 for t in ends if t <= a_end)
        out.update(cycle_stats(server))
    finally:
        server.stop()
    out["load_after"] = load()
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--scale", type=float, default=1.0,
                   help="scale A's flood (big tokens and small count) for quick runs")
    p.add_argument("--big-tokens", type=int, default=262_144)
    p.add_argument("--big-datum", type=int, default=1024)
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--small-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--victim-steps", type=int, default=10)
    p.add_argument("--victim-datums", type=int, default=4)
    p.add_argument("--victim-tokens", type=int, default=128)
    p.add_argument("--unbounded-victim-steps", type=int, default=2)
    p.add_argument("--skip-unbounded", action="store_true")
    p.add_argument("--modes", default=None,
                   help="comma-separated modes to run instead of all (no summary line then)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "fairness.json"))
    args = p.parse_args()
    args.big_tokens = max(args.big_datum, int(args.big_tokens * args.scale))
    args.small = max(args.runs, int(args.small * args.scale))
    # Interleaved, so a drift in the (shared) machine's load touches both sides.
    modes = ["b_alone", "a_alone_unbounded", "flood", "a_alone"]
    if not args.skip_unbounded:
        modes.append("flood_unbounded")
    if args.modes:
        modes = args.modes.split(",")
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="bios-fairness-") as tmp:
        for name in modes:
            results["modes"][name] = run_mode(name, args, Path(tmp))
    m = results["modes"]
    if args.modes:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        return
    slowdown = m["flood"]["b_median_s"] / m["b_alone"]["b_median_s"]
    a_cost = 1 - m["a_alone"]["a_tokens_per_s"] / m["a_alone_unbounded"]["a_tokens_per_s"]
    a_with_b = 1 - m["flood"]["a_tokens_per_s"] / m["a_alone_unbounded"]["a_tokens_per_s"]
    results["summary"] = {
        "victim_slowdown": round(slowdown, 2),
        "victim_worst_step_s": m["flood"]["b_max_s"],
        "victim_steps_done_during_flood": m["flood"].get("b_steps_done_during_flood"),
        "flooder_throughput_cost_of_fair_cycles": round(a_cost, 3),
        "flooder_throughput_cost_with_victim": round(a_with_b, 3),
    }
    if "flood_unbounded" in m:
        results["summary"]["victim_slowdown_unbounded"] = round(
            m["flood_unbounded"]["b_median_s"] / m["b_alone"]["b_median_s"], 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"]))
    print(f"load average now: {load()}")
    print(f"fairness: victim slowdown {slowdown:.2f}")


if __name__ == "__main__":
    main()
