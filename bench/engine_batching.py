#!/usr/bin/env python
"""Engine-level multi-tenant batching: K runs' training steps in one cycle vs K cycles of one.

No server and no HTTP: the engine alone (`Engine.execute`), so the figure is the ceiling that
the clock's batching can reach on this device. For each K, K runs (tiny model, LoRA rank 32)
each take one step (forward_backward of one `--seq-len`-token sequence + optim_step): as one
cycle (one batched pass over the K runs' rows, then K optimizer steps) and as K separate
cycles, one run each, alternating for `--reps` rounds (median of paired ratios). It also checks
that the batched cycle gives each run the same loss as its cycle alone.

    .venv/bin/python bench/engine_batching.py                  # CPU, K = 1, 2, 4, 8
    python bench/engine_batching.py --device cuda --ks 1 8 32 64

Prints a table, then `engine batched/serial at K=<max>: X` last; writes
bench/results/engine_batching[_<device>].json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from harness import REPO, machine

sys.path.insert(0, str(REPO / "src"))

import torch

from bios.server import plan as P
from bios.server.engine.engine import Engine
from bios.server.engine.registry import ModelRegistry

TINY = "bios/tiny-llama"
VOCAB = 49152


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--model-cache", type=Path, default=REPO / ".bios" / "test-model-cache")
    args = ap.parse_args()

    model_dir = ModelRegistry(args.model_cache, [TINY]).materialize(TINY)
    engine = Engine.from_model_dir(model_dir, device=args.device)
    rng = random.Random(0)
    kmax = max(args.ks)
    for i in range(kmax):
        res = engine.execute(P.CyclePlan(0, TINY, [P.CreateAdapterOp(f"c{i}", f"r{i}",
                                                   P.AdapterSpec(rank=args.rank, seed=i))]))
        assert res.results[0].ok, res.results[0].error
    data = []
    for _ in range(kmax):
        toks = [rng.randrange(3, VOCAB) for _ in range(args.seq_len + 1)]
        data.append([P.DatumRows(tokens=toks[:-1], loss_inputs={"target_tokens": toks[1:]})])

    def step(runs: list[int], lr: float) -> list[P.Step]:
        return [P.PassGroup([P.ForwardBackwardOp(f"f{i}", f"r{i}", data[i], "cross_entropy", {})
                             for i in runs]),
                *(P.OptimStepOp(f"o{i}", f"r{i}", {"learning_rate": lr}) for i in runs)]

    def run(steps: list[P.Step]) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        res = engine.execute(P.CyclePlan(0, TINY, steps))
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        assert all(r.ok for r in res.results), [r.error for r in res.results if not r.ok]
        losses = {r.request_id: r.result["metrics"]["loss:sum"] for r in res.results
                  if r.request_id.startswith("f")}
        return time.perf_counter() - t0, losses

    info = machine()
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print(f"engine on {engine.device} ({info.get('gpu', info['cpu'])}), tiny model, LoRA r"
          f"{args.rank}, {args.seq_len} tokens per run per step; load {info['loadavg']}")
    rows = []
    for k in args.ks:
        runs = list(range(k))
        ratios, t_b, t_s, worst = [], [], [], 0.0
        for rep in range(args.reps + 1):
            lr = 0.0  # steps leave the weights as they are, so every rep computes the same
            tb, batched_loss = run(step(runs, lr))
            ts, alone_loss = 0.0, {}
            for i in runs:
                t, lo = run(step([i], lr))
                ts += t
                alone_loss |= lo
            worst = max(worst, max(abs(batched_loss[f] - alone_loss[f]) / abs(alone_loss[f])
                                   for f in batched_loss))
            if rep:  # the first round warms up
                ratios.append(ts / tb)
                t_b.append(tb)
                t_s.append(ts)
        row = {"k": k, "batched_ms": 1000 * statistics.median(t_b),
               "serial_ms": 1000 * statistics.median(t_s), "ratio": statistics.median(ratios),
               "max_rel_loss_diff": worst}
        rows.append(row)
        print(f"  K={k:3d}: one cycle {row['batched_ms']:8.1f} ms, {k} cycles "
              f"{row['serial_ms']:8.1f} ms, batched/serial {row['ratio']:5.2f}x "
              f"(loss agreement {worst:.1e})", flush=True)
    suffix = "" if engine.device.type == "cpu" else f"_{engine.device.type}"
    out = REPO / "bench" / "results" / f"engine_batching{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                               "device": str(engine.device), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    print(f"engine batched/serial at K={rows[-1]['k']}: {rows[-1]['ratio']:.2f}")


if __name__ == "__main__":
    main()
