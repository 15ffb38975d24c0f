"""Score tokens with a Bios adapter directory loaded by PEFT on the tiny base model, to check
that what Bios exports is what it computes (e2e tests; needs torch, transformers and peft)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server_process import MODEL_CACHE

TINY_DIR = MODEL_CACHE / "bios--tiny-llama"  # built by the test servers
# bf16 autocast: an incremental decode and a full forward round differently. Measured max
# |difference| on the tiny model is ~1e-2 nats; the bound leaves room for other CPUs.
LOGPROB_ATOL = 0.06


def peft_logprobs(adapter_dir: Path, tokens: list[int]) -> np.ndarray:
    """The logprob of each of tokens[1:] given the ones before, under base + adapter (fp32)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1),
                                         torch.tensor(tokens[1:])].numpy()
