"""Score tokens with a Bios adapter directory loaded by PEFT on the tiny base model, to check
that what Bios exports is what it computes (e2e tests; needs torch, transformers and peft)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from server_process import MODEL_CACHE

TINY_DIR = MODEL_CACHE / "bios--tiny-llama"  # built by the test servers
# bf16 autocast: an incremental decode and a full forward round differently. Measured max
# |difference| on the tiny model is ~1e-2 nats; the bound leaves room for other CPUs.
LOGPROB_ATOL = 0.06
# Bios (bf16 autocast) against PEFT (fp32) on an adapter trained a few steps at a high learning
# rate: measured up to 0.1 nats, varying with the trained weights (the order of tests, kernels).
# Tests using it also check that the adapter moves the logprobs far more than this.
PEFT_ATOL = 0.15


def peft_logprobs(adapter_dir: Path, tokens: list[int], adapter: bool = True) -> np.ndarray:
    """The logprob of each of tokens[1:] given the ones before, under base + adapter (fp32),
    or with `adapter=False` under the base model alone."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad(), (contextlib.nullcontext() if adapter else model.disable_adapter()):
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1),
                                         torch.tensor(tokens[1:])].numpy()
