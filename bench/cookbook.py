"""The Cookbook (issue 16): every recipe sync vs async, side by side, against one server.

For each recipe, the sync version runs, then the async version with the same settings (same
model, seed, steps, data), on a fresh LoRA run each, against one `bios serve` that is warmed up
first. Reports each run's wall time, the recipe's metric before -> after, and the async/sync
wall-time ratio (sync seconds / async seconds: how many times faster async is), with the load
average beside each. Step counts are short by default so the whole benchmark fits in
~10-15 minutes on 2 quiet cores with SmolLM2; the recipes' own default runs (what
docs/cookbook.md quotes before/after figures from) are longer. Writes
bench/results/cookbook.json; the last line is `cookbook async/sync: <ratio>`, the smallest
ratio over the recipes.

    .venv/bin/python bench/cookbook.py                           # SmolLM2, clock period 1 s
    .venv/bin/python bench/cookbook.py --clock-period 0          # continuous cycles
    .venv/bin/python bench/cookbook.py --model bios/tiny-llama --recipes sl eval
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bios
from bios import types
from bios.cookbook import RecipeConfig, run_recipe
from harness import REPO, load, machine
from server_process import ServerProcess

RESULTS = REPO / "bench" / "results" / "cookbook.json"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Short runs: enough steps for the async pipeline to fill (steps for eval: problems).
# Cheapest first, so an interrupted run still has whole recipes in its JSON.
STEPS = {"eval": 12, "sl": 8, "dpo": 4, "distill": 2, "rl": 3}


def warm_up(base_url: str, model: str) -> None:
    """One sample and one training step, so no timed run pays for first-use costs."""
    service = bios.ServiceClient(base_url=base_url)
    sampler = service.create_sampling_client(base_model=model)
    sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2,
                   types.SamplingParams(max_tokens=4)).result()
    training = service.create_lora_training_client(base_model=model, rank=16, seed=0)
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4, 5]})
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step().result()


def write(args: argparse.Namespace, started: dict[str, Any], rows: list[dict[str, Any]]
          ) -> float:
    """Write the results so far (after every recipe); returns the smallest ratio."""
    ratio = min(r["async_over_sync"] for r in rows)
    out = {**started, "model": args.model, "clock_period": args.clock_period, "rows": rows,
           "min_async_over_sync": ratio, "loadavg_end": load()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--recipes", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps for every recipe (default: per recipe, {STEPS})")
    parser.add_argument("--clock-period", type=float, default=1.0,
                        help="the server's clock period in seconds (0 = continuous)")
    parser.add_argument("--model-cache", default=None,
                        help="converted-model cache (default: the tests' cache)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so `finally` stops the server (it runs in its own session).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    extra: dict[str, Any] = {}
    if args.model_cache:
        extra["model_cache"] = Path(args.model_cache)
    rows: list[dict[str, Any]] = []
    started = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                            time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-cookbook-") as tmp:
        server = ServerProcess(Path(tmp) / "server", [args.model],
                               clock_period=args.clock_period, **extra).start(timeout=900)
        try:
            warm_up(server.base_url, args.model)
            for recipe in args.recipes:
                steps = args.steps or STEPS[recipe]
                row: dict[str, Any] = {"recipe": recipe, "steps": steps}
                for style in ("sync", "async"):
                    cfg = RecipeConfig(base_url=server.base_url, base_model=args.model,
                                       steps=steps, seed=0, echo=False,
                                       log_dir=Path(tmp) / f"{recipe}_{style}")
                    load_before = load()
                    result = run_recipe(recipe, style, cfg)
                    row[style] = {"wall_s": round(result.wall_s, 2), "metric": result.metric,
                                  "before": result.before, "after": result.after,
                                  "loadavg_before": load_before, "loadavg_after": load()}
                    print(f"{recipe:8s} {style:6s} {result.wall_s:8.1f} s  {result.summary}"
                          f"  (load {load_before[0]:.1f} -> {load()[0]:.1f})", flush=True)
                row["async_over_sync"] = round(row["sync"]["wall_s"] / row["async"]["wall_s"], 2)
                print(f"{recipe:8s} async/sync {row['async_over_sync']:.2f}x", flush=True)
                rows.append(row)
                write(args, started, rows)
        finally:
            server.stop()

    ratio = write(args, started, rows)
    print()
    print(f"{'recipe':8s} {'steps':>5s} {'sync s':>8s} {'async s':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['recipe']:8s} {r['steps']:5d} {r['sync']['wall_s']:8.1f} "
              f"{r['async']['wall_s']:8.1f} {r['async_over_sync']:6.2f}")
    print(f"cookbook async/sync: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
