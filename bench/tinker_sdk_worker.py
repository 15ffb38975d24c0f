"""The timed part of bench/tinker_sdk.py, run with an official Tinker SDK venv's interpreter.

`python tinker_sdk_worker.py MODE RUNS STEPS BATCH SEQ_LEN RANK` prints one JSON line with
`ms_per_step` (wall time over RUNS * STEPS steps) after a short untimed warm-up step per run.
Modes: sequential (forward_backward's result, then optim_step's, every step), pipelined (both
submitted back to back, then both results), all_in_flight (every step submitted, then every
result). RUNS > 1 runs that many training clients at once, each pipelined, in threads.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tinker
from tinker import types

MODE, RUNS, STEPS, BATCH, SEQ_LEN, RANK = sys.argv[1], *map(int, sys.argv[2:7])
BASE_MODEL = os.environ["BIOS_BASE_MODEL"]
ADAM = types.AdamParams(learning_rate=1e-4)


def batch(rng: random.Random) -> list[types.Datum]:
    rows = []
    for _ in range(BATCH):
        toks = [rng.randrange(3, 250) for _ in range(SEQ_LEN + 1)]
        rows.append(types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                                loss_fn_inputs={"target_tokens": toks[1:]}))
    return rows


def train(tc: Any, mode: str, batches: list[list[types.Datum]]) -> None:
    if mode == "sequential":
        for b in batches:
            tc.forward_backward(b, "cross_entropy").result()
            tc.optim_step(ADAM).result()
    elif mode == "pipelined":
        for b in batches:
            fb = tc.forward_backward(b, "cross_entropy")
            opt = tc.optim_step(ADAM)
            fb.result()
            opt.result()
    else:
        futures = []
        for b in batches:
            futures += [tc.forward_backward(b, "cross_entropy"), tc.optim_step(ADAM)]
        for f in futures:
            f.result()


def main() -> None:
    service = tinker.ServiceClient()
    clients = [service.create_lora_training_client(base_model=BASE_MODEL, rank=RANK, seed=i)
               for i in range(RUNS)]
    rng = random.Random(0)
    work = [[batch(rng) for _ in range(STEPS)] for _ in range(RUNS)]
    for tc in clients:  # warm-up: first-pass costs are not what is measured
        train(tc, "sequential", [batch(rng)])
    mode = MODE if RUNS == 1 else "pipelined"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(RUNS) as pool:
        list(pool.map(lambda i: train(clients[i], mode, work[i]), range(RUNS)))
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": MODE, "runs": RUNS, "steps": STEPS,
                      "ms_per_step": wall * 1000 / (RUNS * STEPS), "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
