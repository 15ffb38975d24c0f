"""Sampling throughput (issue 3): bios batched vs bios one-at-a-time vs HF `generate` + PEFT.

One run, one base model, the same 32 prompts (8 per adapter, 4 LoRA adapters, varied lengths),
every sequence forced to exactly `--max-tokens` new tokens (greedy, no stop tokens), so
tokens/s counts real decode work:

  A  bios batched:    all 32 `sample_async` submitted at once, `asyncio.gather` on the
                      submissions, then `asyncio.gather` on the results (the seeds' pattern).
  B  bios sequential: the same 32 requests one at a time, each waited for before the next.
  C  HF + PEFT:       in-process transformers `LlamaForCausalLM` on the same model directory
                      (bf16 weights, bf16 autocast, as the server runs on a CPU with bf16),
                      with the 4 adapters the server exported loaded into one PeftModel;
                      per adapter: `set_adapter`, then its 8 prompts as one left-padded batch,
                      `generate(min_new_tokens=N, max_new_tokens=N, do_sample=False)`.

The server is stopped before C runs, so the two never share the CPU. Prints a table, then the
two headline ratios last; writes bench/results/sampling.json.

    .venv/bin/python bench/sampling.py                      # tiny model (about a minute)
    .venv/bin/python bench/sampling.py --model HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

from harness import REPO, machine

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/peft internals
# the exported adapters train lm_head, which the tiny model ties to the embedding; PEFT adds
# the LoRA delta on the output side only, which is what the server does too
warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")

import bios  # noqa: E402
from bios import types  # noqa: E402
from server_process import MODEL_CACHE, ServerProcess  # noqa: E402

RESULTS = REPO / "bench" / "results" / "sampling.json"




def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of varied lengths (8..64 tokens) of ordinary token ids."""
    rng = random.Random(seed)
    lengths = [8 + (56 * i) // max(1, n - 1) for i in range(n)]
    rng.shuffle(lengths)
    return [[rng.randrange(3, min(vocab, 20000)) for _ in range(length)] for length in lengths]


def train_adapters(service: bios.ServiceClient, model: str, count: int, rank: int,
                   vocab: int) -> list[bios.TrainingClient]:
    """`count` runs, each trained 3 steps on its own random data so the adapters differ."""
    clients = []
    for k in range(count):
        tc = service.create_lora_training_client(base_model=model, rank=rank, seed=100 + k)
        rng = random.Random(k)
        tokens = [rng.randrange(3, min(vocab, 20000)) for _ in range(33)]
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:]})
        for _ in range(3):
            tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2))
        clients.append(tc)
    return clients


async def run_batched(jobs: list[tuple[bios.SamplingClient, list[int]]],
                      params: types.SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    futures = await asyncio.gather(*[
        sc.sample_async(prompt=types.ModelInput.from_ints(p), num_samples=1,
                        sampling_params=params) for sc, p in jobs])
    results = await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(r.sequences[0].tokens) for r in results)


def run_sequential(jobs: list[tuple[bios.SamplingClient, list[int]]],
                   params: types.SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = 0
    for sc, p in jobs:
        out = sc.sample(types.ModelInput.from_ints(p), 1, params).result()
        tokens += len(out.sequences[0].tokens)
    return time.perf_counter() - t0, tokens


def run_hf_peft(model_dir: Path, adapter_dirs: list[Path], prompts: list[list[list[int]]],
                max_tokens: int, repeats: int) -> dict:
    """Generate each adapter's prompts as one left-padded batch, switching adapters with
    set_adapter; returns the best and all timings of `repeats` timed rounds."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from bios.server.engine.engine import bf16_supported

    bf16 = bf16_supported(torch.device("cpu"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    names = [f"a{k}" for k in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], adapter_dirs[1:], strict=True):
        model.load_adapter(d, adapter_name=name)
    model.eval()
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0

    def batch(ps: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for i, p in enumerate(ps):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids, mask

    def one_round(new_tokens: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        produced = 0
        for name, ps in zip(names, prompts, strict=True):
            model.set_adapter(name)
            ids, mask = batch(ps)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
            with torch.inference_mode(), autocast:
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                                     pad_token_id=pad)
            produced += (out.shape[1] - ids.shape[1]) * out.shape[0]
        return time.perf_counter() - t0, produced

    one_round(4)  # warm-up: every adapter, short
    runs = [one_round(max_tokens) for _ in range(repeats)]
    return {"runs": runs, "dtype": str(dtype).removeprefix("torch."), "autocast_bf16": bf16}


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bios/tiny-llama")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--prompts-per-adapter", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed rounds of the batched and HF modes (the best is reported)")
    ap.add_argument("--data-dir", default=None, help="server data dir (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    start_machine = machine()
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bios-bench-sampling-")
    data_dir = Path(args.data_dir or tmp.name)
    server = ServerProcess(data_dir, [args.model]).start()
    try:
        service = bios.ServiceClient(base_url=server.base_url)
        tokenizer = service.create_sampling_client(base_model=args.model).get_tokenizer()
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 20000
        n_total = args.adapters * args.prompts_per_adapter
        prompts = make_prompts(n_total, vocab)
        per_adapter = [prompts[k::args.adapters] for k in range(args.adapters)]

        clients = train_adapters(service, args.model, args.adapters, args.rank, vocab)
        samplers = [tc.save_weights_and_get_sampling_client() for tc in clients]
        exports = [tc.save_weights_for_sampler(f"bench-{k}").result()
                   for k, tc in enumerate(clients)]
        adapter_dirs = [data_dir / "checkpoints" / tc.model_id.replace(":", "__")
                        / "sampler_weights" / f"bench-{k}" for k, tc in enumerate(clients)]
        for e, d in zip(exports, adapter_dirs, strict=True):
            assert (d / "adapter_config.json").is_file(), (e.path, d)

        jobs = [(samplers[k], p) for k in range(args.adapters) for p in per_adapter[k]]
        params = types.SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        # warm-up: loads every adapter snapshot and runs the decode path once
        asyncio.run(run_batched(jobs, types.SamplingParams(max_tokens=4, temperature=0.0)))

        batched = [asyncio.run(run_batched(jobs, params)) for _ in range(args.repeats)]
        sequential = run_sequential(jobs, params)
    finally:
        server.stop()
    server_log = server.log()

    model_dir = MODEL_CACHE / args.model.replace("/", "--")
    if not model_dir.is_dir():
        model_dir = Path(args.model)
    hf = run_hf_peft(model_dir, adapter_dirs, per_adapter, args.max_tokens, args.repeats)
    tmp.cleanup()

    expected = n_total * args.max_tokens
    rows = []
    for mode, runs in ((f"bios batched ({n_total} x asyncio.gather)", batched),
                       ("bios sequential (one at a time)", [sequential]),
                       (f"HF generate + PEFT set_adapter ({args.adapters} x batch "
                        f"{args.prompts_per_adapter})", hf["runs"])):
        elapsed, tokens = min(runs, key=lambda r: r[0])
        if tokens != expected:
            raise SystemExit(f"{mode}: generated {tokens} tokens, expected {expected}")
        rows.append({"mode": mode, "seconds": round(elapsed, 3), "tokens": tokens,
                     "tokens_per_s": round(tokens / elapsed, 1),
                     "all_seconds": [round(r[0], 3) for r in runs]})
    tps = [r["tokens_per_s"] for r in rows]
    ratio_seq = tps[0] / tps[1]
    ratio_hf = tps[0] / tps[2]

    end_machine = machine()
    report = {
        "benchmark": "sampling",
        "model": args.model,
        "adapters": args.adapters,
        "prompts": n_total,
        "prompt_lengths": sorted(len(p) for p in prompts),
        "max_tokens": args.max_tokens,
        "lora_rank": args.rank,
        "lora_targets": "attention + MLP + unembedding (SDK default)",
        "server": "bios serve --clock-period 0, engine defaults (bf16 base + bf16 autocast "
                  "where the CPU has bf16)",
        "hf_baseline": {"dtype": hf["dtype"], "autocast_bf16": hf["autocast_bf16"],
                        "decode": "generate(do_sample=False, min_new_tokens=max_new_tokens)"},
        "results": rows,
        "ratios": {"batched/sequential": round(ratio_seq, 2),
                   "batched/hf_peft": round(ratio_hf, 2)},
        "machine": {**start_machine, "loadavg_end": end_machine["loadavg"]},
        "torch_threads": _torch_threads(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "server_log_tail": server_log.splitlines()[-5:],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"model {args.model}; {n_total} prompts ({min(report['prompt_lengths'])}-"
          f"{max(report['prompt_lengths'])} tokens) over {args.adapters} adapters "
          f"(rank {args.rank}); {args.max_tokens} new tokens each, greedy")
    print(f"machine: {start_machine['nproc']} cores, {start_machine['cpu']}, load "
          f"{start_machine['loadavg']} -> {end_machine['loadavg']}")
    widths = [46, 9, 8, 9]
    print(fmt_row(["mode", "seconds", "tokens", "tokens/s"], widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt_row([r["mode"], f"{r['seconds']:.2f}", str(r["tokens"]),
                       f"{r['tokens_per_s']:.0f}"], widths))
    print(f"results written to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    print(f"bios batched/sequential sampling throughput ratio: {ratio_seq:.2f}")
    print(f"bios batched/HF-PEFT sampling throughput ratio: {ratio_hf:.2f}")
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
