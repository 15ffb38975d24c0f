"""Our Transformer against transformers' own model classes, and the KV cache against full passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from bios.server.engine.lora import Adapter, LoRABatch
from bios.server.engine.model import KVCache, ModelConfig, load_transformer
from bios.server.plan import AdapterSpec

TINY_ARCH = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

# name -> (config class, model class, extra config fields)
ARCHS = {
    "llama3-rope-bias": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            attention_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=50000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(head_dim=16)),
    # windows shorter than the test sequences: every layer, and from layer 1 on
    "mistral-window": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(head_dim=16, sliding_window=7),
    ),
    "qwen2-window": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(tie_word_embeddings=True, rope_theta=1e6),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=24, tie_word_embeddings=False),
    ),
}


def random_hf_model(name: str, directory: Path) -> transformers.PreTrainedModel:
    """A tiny HF model with every weight random (biases and norms too), saved sharded."""
    config_cls, model_cls, extra = ARCHS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY_ARCH, **extra)).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(directory, max_shard_size="100KB")
    return model


def test_tiny_matches_transformers(tiny_fp32, tiny_model_dir):
    ours, _ = tiny_fp32
    theirs = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.unembed(ours(ids)), theirs(ids).logits)


@pytest.mark.parametrize("name", list(ARCHS))
def test_architectures_match_transformers(name, tmp_path):
    theirs = random_hf_model(name, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, cfg = load_transformer(tmp_path, base_dtype=torch.float32)
    assert cfg.qk_norm == (name == "qwen3")
    assert cfg.attention_bias == (name in ("llama3-rope-bias", "qwen2", "qwen2-window"))
    windows = {"mistral": (4096, 4096), "mistral-window": (7, 7), "qwen2-window": (None, 6)}
    assert cfg.sliding_windows == windows.get(name)  # MistralConfig's default window is 4096
    assert (cfg.rope_scaling is not None) == (name == "llama3-rope-bias")
    # long enough to reach the llama3-scaled low frequencies (original context 16)
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours.unembed(ours(ids)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mistral-window", "qwen2-window"])
def test_sliding_window_kv_cache_decode_matches_transformers(name, tmp_path):
    """Prefill, a chunk appended to the cache, then one-token steps, all past the window:
    each position's logits equal transformers' over the whole sequence."""
    theirs = random_hf_model(name, tmp_path)
    ours, cfg = load_transformer(tmp_path, base_dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(1))
    cache = KVCache(cfg, 2, max_len=30, dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(ids).logits
        pieces = [ours(ids[:, :12], kv_cache=cache), ours(ids[:, 12:20], kv_cache=cache)]
        pieces += [ours(ids[:, t : t + 1], kv_cache=cache) for t in range(20, 30)]
        got = ours.unembed(torch.cat(pieces, dim=1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sliding_window_config_reading():
    from bios.server.engine.model import _sliding_windows

    base = dict(num_hidden_layers=4, sliding_window=16)
    assert _sliding_windows("mistral", base) == (16,) * 4
    assert _sliding_windows("mistral", {**base, "sliding_window": None}) is None
    assert _sliding_windows("qwen2", base) is None  # use_sliding_window defaults to off
    qwen = {**base, "use_sliding_window": True, "max_window_layers": 2}
    assert _sliding_windows("qwen3", qwen) == (None, None, 16, 16)
    types = ["full_attention", "sliding_attention"] * 2
    assert _sliding_windows("qwen2", {**qwen, "layer_types": types}) == (None, 16, None, 16)
    assert _sliding_windows("llama", base) is None  # transformers' Llama has no window
    with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
        _sliding_windows("mistral", {**base, "layer_types": types[:3]})


def test_unsupported_arch_names_the_supported_ones():
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})


def test_bf16_base_is_frozen_and_close_to_fp32(tiny_fp32, tiny_bf16):
    model, _ = tiny_bf16
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params)
    ref, _ = tiny_fp32
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.unembed(model(ids)).float()
    with torch.no_grad():
        expected = ref.unembed(ref(ids))
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("with_lora", [False, True])
def test_kv_cache_decode_matches_full_forward(tiny_fp32, with_lora):
    """Right-padded prefill of ragged prompts, then greedy one-token steps, row by row equal to
    a full causal pass over each row's prompt + generated tokens."""
    model, cfg = tiny_fp32
    prompt_lens, steps = [5, 9, 3], 6
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in prompt_lens]
    lora = row_lora = None
    if with_lora:
        adapters = []
        for seed, rank in enumerate([4, 8, 2]):
            a = Adapter.init(cfg, AdapterSpec(rank=rank, seed=seed), "cpu")
            with torch.no_grad():
                for _, B in a.weights.values():
                    B.normal_(0, 0.02, generator=gen)
            adapters.append(a)
        lora = LoRABatch.build(adapters, [1, 1, 1], seq_len=1)
        row_lora = [LoRABatch.build([a], [1], seq_len=1) for a in adapters]

    B, T = len(prompts), max(prompt_lens)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    cache = KVCache(cfg, B, max_len=T + steps, dtype=torch.float32)
    lengths = torch.tensor(prompt_lens)
    outputs = [[] for _ in range(B)]
    with torch.no_grad():
        logits = model.unembed(model(ids, lora=lora, kv_cache=cache), lora)
        cache.truncate(lengths)
        last = logits[torch.arange(B), lengths - 1]  # (B, vocab)
        for _ in range(steps):
            for b in range(B):
                outputs[b].append(last[b])
            nxt = last.argmax(-1)
            for b in range(B):
                prompts[b] = torch.cat([prompts[b], nxt[b : b + 1]])
            last = model.unembed(model(nxt[:, None], lora=lora, kv_cache=cache), lora)[:, 0]
        assert cache.lengths.tolist() == [n + steps for n in prompt_lens]

        for b in range(B):
            lb = row_lora[b] if with_lora else None
            full = model.unembed(model(prompts[b][None], lora=lb), lb)[0]  # (n + steps, vocab)
            n = prompt_lens[b]
            torch.testing.assert_close(
                torch.stack(outputs[b]), full[n - 1 : n - 1 + steps], rtol=1e-4, atol=1e-4
            )


def test_kv_cache_overflow_is_an_error(tiny_fp32):
    model, cfg = tiny_fp32
    cache = KVCache(cfg, 1, max_len=4, dtype=torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_kv_cache_chunked_prefill_matches_one_pass(tiny_fp32):
    """Appending several tokens to a non-empty cache (the explicit-mask path with T > 1)."""
    model, cfg = tiny_fp32
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    cache = KVCache(cfg, 2, max_len=16, dtype=torch.float32)
    with torch.no_grad():
        chunks = [model(ids[:, :4], kv_cache=cache), model(ids[:, 4:], kv_cache=cache)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(ids), rtol=1e-4, atol=1e-4)
    assert cache.lengths.tolist() == [11, 11]
