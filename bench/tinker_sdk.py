"""Bios driven by Tinker's official SDK (issue 15): ms per training step on the tiny model.

The job: `--steps` steps of forward_backward + optim_step, batch `--batch` x `--seq-len`
tokens, LoRA rank `--rank`, run by bench/tinker_sdk_worker.py with the interpreter of one SDK
version's virtual environment (built by the tests' sdk_venvs.py, reused) against one
continuous-mode `bios serve` on loopback:

  sequential     each call's result before the next call
  pipelined      forward_backward and optim_step submitted back to back, then both results
  all_in_flight  every step submitted, then every result
  8 runs         8 training clients at once, each pipelined: aggregate ms per step

Every mode runs `--repeats` times (interleaved) and keeps its fastest run, since the numbers
swing with other load on a shared machine; the load average is printed beside them. (skyrl,
the peer server the issue compares with, needs Python 3.12 and is not run here.) Writes
bench/results/tinker_sdk.json; the last line is `tinker SDK pipelined ms/step: <bios>`.

    .venv/bin/python bench/tinker_sdk.py                 # ~2-4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import REPO, load, machine

sys.path.insert(0, str(REPO / "tests" / "tinker_sdk"))
from sdk_venvs import venv_python
from tinker_server import TINY, TML_KEY, tinker_server_process

RESULTS = REPO / "bench" / "results" / "tinker_sdk.json"
WORKER = Path(__file__).with_name("tinker_sdk_worker.py")
MODES = (("sequential", 1), ("pipelined", 1), ("all_in_flight", 1), ("runs_8", 8))


def run_mode(python: Path, base_url: str, mode: str, runs: int, args: argparse.Namespace
             ) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIOS_", "TINKER_"))}
    env.update(TINKER_BASE_URL=base_url, TINKER_API_KEY=TML_KEY, TINKER_TELEMETRY="0",
               BIOS_BASE_MODEL=TINY, PYTHONPATH="")
    out = subprocess.run([str(python), str(WORKER), mode, str(runs), str(args.steps),
                          str(args.batch), str(args.seq_len), str(args.rank)],
                         env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{mode}: the worker failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdk", default="0.25.0", help="tinker SDK version (default 0.25.0)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    python = venv_python(args.sdk)
    best: dict[str, float] = {}
    loads: list[list[float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = tinker_server_process(Path(tmp)).start()
        try:
            for _ in range(args.repeats):
                for name, runs in MODES:
                    mode = "pipelined" if runs > 1 else name
                    r = run_mode(python, server.base_url, mode, runs, args)
                    loads.append(load())
                    best[name] = min(best.get(name, float("inf")), r["ms_per_step"])
                    print(f"  {name:14s} {r['ms_per_step']:8.1f} ms/step   load {loads[-1]}",
                          flush=True)
        finally:
            server.stop()
    result = {"sdk": args.sdk, "model": TINY, "steps": args.steps, "batch": args.batch,
              "seq_len": args.seq_len, "rank": args.rank, "repeats": args.repeats,
              "best_ms_per_step": best, "loads": loads, "machine": machine()}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nSDK {args.sdk}, {TINY}, batch {args.batch}x{args.seq_len}, rank {args.rank}, "
          f"{args.steps} steps (fastest of {args.repeats}):")
    for name, _ in MODES:
        print(f"  {name:14s} {best[name]:8.1f} ms/step")
    print(f"tinker SDK pipelined ms/step: {best['pipelined']:.1f}")


if __name__ == "__main__":
    main()
